"""What a stage prints when it needs something out of reach: one line, no traceback."""

from __future__ import annotations

import socket
import urllib.error

import pytest

from pipeline.app.offline import is_network_error, one_line_errors, unavailable_message
from pipeline.core.models import ModelNotAvailableError
from pipeline.data.corpus import CorpusNotAvailableError
from pipeline.data.sources import DataNotFoundError
from tests.test_stages import run_stage


class LocalEntryNotFoundError(FileNotFoundError):
    """Named as huggingface_hub's: the hub could not be asked and the cache has nothing."""


def caused_by(outer: Exception, inner: Exception) -> Exception:
    try:
        try:
            raise inner
        except Exception as error:
            raise outer from error
    except Exception as raised:
        return raised


@pytest.mark.parametrize(
    "error",
    [
        ModelNotAvailableError("model needs the hub;\n use model.path=/dir"),
        DataNotFoundError("known_1000.json not in the data root; run `make data`"),
        CorpusNotAvailableError("the key statistics need corpus text; ROME_DATA=..."),
    ],
)
def test_errors_that_say_what_to_do_pass_through_as_one_line(error):
    message = unavailable_message(error)
    assert message == " ".join(str(error).split()) and "\n" not in message


@pytest.mark.parametrize(
    "error",
    [
        ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)"),
        urllib.error.URLError(socket.gaierror(-2, "Name or service not known")),
        caused_by(RuntimeError("loading failed"), LocalEntryNotFoundError("no cache")),
        caused_by(ValueError("tokenizer"), TimeoutError("timed out")),
        OSError("We couldn't connect to 'https://huggingface.co' to load the files"),
    ],
)
def test_any_missing_network_is_one_line_with_the_remedies(error):
    assert is_network_error(error)
    message = unavailable_message(error)
    assert message is not None and "\n" not in message
    assert "ROME_DATA=" in message and "make data" in message and "model.path=" in message


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError("no corpus files in /x"),
        ValueError("dtype must be one of ..."),
        KeyError("subject"),
        caused_by(RuntimeError("shape mismatch"), IndexError("layer 40")),
    ],
)
def test_other_errors_are_left_alone(error):
    assert not is_network_error(error)
    assert unavailable_message(error) is None


def test_one_line_errors_exits_with_the_line_and_reraises_the_rest():
    with pytest.raises(SystemExit) as caught, one_line_errors():
        raise DataNotFoundError("counterfact.json not found; run `make data`")
    assert caught.value.code == "error: counterfact.json not found; run `make data`"
    with pytest.raises(KeyError), one_line_errors():
        raise KeyError("a bug stays a traceback")


def assert_one_line(done, *needles: str) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), done.stderr[-3000:]
    for needle in needles:
        assert needle in last, last
    return last


OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_a_stage_needing_a_hub_model_offline_prints_one_line(tmp_path):
    done = run_stage(
        "known",
        "model=gpt2",
        "data.limit=2",
        f"paths.results={tmp_path}",
        env={**OFFLINE, "HF_HOME": str(tmp_path / "hf")},
    )
    assert_one_line(done, "needs the Hugging Face hub", str(tmp_path / "hf"), "model.path=")


def test_a_stage_needing_wikitext_offline_prints_one_line(tmp_path):
    done = run_stage(
        "stats",
        "model=tiny-gpt2",
        "corpus.source=datasets",
        f"paths.data={tmp_path / 'data'}",
        f"paths.cache={tmp_path / 'cache'}",
        f"paths.results={tmp_path / 'results'}",
        env={**OFFLINE, "HF_HOME": str(tmp_path / "hf")},
    )
    assert_one_line(done, "need corpus text", "make data", "ROME_DATA=", "corpus.source=sample")


def test_a_stage_needing_a_download_offline_prints_one_line(tmp_path):
    # An address that cannot resolve anywhere (RFC 6761), so this fails the same with network.
    done = run_stage(
        "known",
        "model=tiny-gpt2",
        f"paths.data={tmp_path / 'data'}",
        f"paths.results={tmp_path / 'results'}",
        "data.download=true",
        "data.sample=null",
        "data.url=https://rome.invalid/known_1000.json",
    )
    assert_one_line(done, "could not be downloaded", "rome.invalid", "make data", "data.path=")
