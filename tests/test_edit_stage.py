"""`python -m pipeline.edit` end to end on a tiny model: the files it writes, the table it
prints, the model it saves (the API's edit), and bad requests stopped before anything exists."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.api import load
from pipeline.app.edited_model import MANIFEST, update_sha256
from tests.test_api import RECORD, SAMPLE
from tests.test_stages import last_line, run_stage
from tests.test_stats_stage import TEXT

REQUEST = (
    'request={prompt: "The mother tongue of {} is", subject: Danielle Darrieux, '
    "target_new: English, target_true: French}"
)
FAST = ["editor.v_num_grad_steps=4", "editor.context_templates=[[3,2]]"]


def settings(tmp_path) -> dict[str, str]:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "text.txt").write_text(TEXT * 3)
    return {"paths.cache": str(tmp_path / "cache"), "corpus.local_dir": str(corpus)}


def edit(tmp_path, *overrides: str):
    given = settings(tmp_path)
    return run_stage(
        "edit",
        "model=tiny-gpt2",
        *(f"{k}={v}" for k, v in given.items()),
        f"paths.results={tmp_path / 'results'}",
        *FAST,
        *overrides,
    )


def test_the_stage_saves_the_apis_edit_and_prints_the_table_it_writes(tmp_path):
    done = edit(tmp_path, REQUEST, "edit.max_new_tokens=6", "edit.prompts=[Danielle Darrieux was]")
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "results/edit/tiny-gpt2/rome/danielle-darrieux-english"
    assert last_line(done.stdout) == f"results: {out}"
    table = (out / "generations.md").read_text()
    assert table.startswith("| prompt | before | after |\n|---|---|---|\n")
    assert table in done.stdout  # printed as written
    rows = json.loads((out / "generations.json").read_text())["rows"]
    prompts = ["The mother tongue of Danielle Darrieux is", "Danielle Darrieux was"]
    assert [r["prompt"] for r in rows] == prompts
    # The Python API with the same request and settings: the same edit, the same table.
    model = load("tiny-gpt2", settings=settings(tmp_path))
    fast = {"v_num_grad_steps": 4, "context_templates": [[3, 2]]}
    request = {k: RECORD[k] for k in ("subject", "target_new")} | {
        "prompt": "The mother tongue of {} is",
        "target_true": "French",
    }
    with model.edit(request, editor="rome", **fast) as api_edit:
        assert api_edit.generate(prompts, max_new_tokens=6) == rows
        expected = {k: v.clone() for k, v in model.lm.model.state_dict().items()}
        digest = update_sha256(api_edit.updates)
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    manifest = json.loads((out / "model" / MANIFEST).read_text())
    assert manifest["update"]["sha256"] == digest
    summary = json.loads((out / "summary.json").read_text())
    assert summary["update"]["sha256"] == digest and summary["requests"] == 1
    assert json.loads((out / "requests.json").read_text())[0]["target_true"] == "French"


def test_requests_from_a_file_of_counterfact_records_in_one_memit_edit(tmp_path):
    records = json.loads(SAMPLE.read_text())[:2]
    path = tmp_path / "requests.json"
    path.write_text(json.dumps(records))
    done = edit(
        tmp_path,
        f"requests={path}",
        "editor=memit",
        "editor.layer=[0,1]",
        "edit.save_model=false",
        "edit.max_new_tokens=4",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "results/edit/tiny-gpt2/memit/danielle-darrieux-english-and-1-more"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] == 2 and summary["update"]["layers"] == [0, 1]
    assert summary["saved_model"] is None and not (out / "model").exists()
    rows = json.loads((out / "generations.json").read_text())["rows"]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in records]


@pytest.mark.parametrize(
    ("request_text", "error"),
    [
        (
            "request={prompt: The mother tongue of Danielle is, subject: Danielle Darrieux, "
            "target_new: English}",
            "error: request: record 0 (id 0): field 'subject': subject 'Danielle Darrieux' "
            "is not in the prompt 'The mother tongue of Danielle is'",
        ),
        (
            "request={prompt: 'The mother tongue of {} is', subject: Danielle Darrieux, "
            "target_new: French, target_true: French}",
            "error: request: record 0 (id 0): field 'target_new': target_new equals the true "
            "answer 'French'",
        ),
        (
            "request={prompt: '{} speaks" + " and the river" * 120 + "', subject: Danielle "
            "Darrieux, target_new: English}",
            "error: request: record 0 (id 0): field 'prompt': ",
        ),
        ("edit.top_k=1", "error: no request: give one with"),
    ],
    ids=["subject", "target", "too long", "none"],
)
def test_a_bad_request_stops_the_run_in_one_line_before_anything_is_written(
    tmp_path, request_text, error
):
    done = edit(tmp_path, request_text, "tracking.mode=offline")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith(error), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "results" / "edit").exists()
    assert not (tmp_path / "results" / "wandb").exists()


@pytest.mark.parametrize("editor", ["rome", "r-rome", "memit", "alphaedit", "ft", "kn"])
def test_the_edit_config_is_the_stages_model_editor_and_corpus(editor):
    """conf/edit.yaml composes the groups `stats` and `evaluate` compose, and the API's config
    is the stage's: the same editor settings, statistics budget and paths."""
    from hydra import compose, initialize_config_dir

    from pipeline.api import configure
    from pipeline.app.schema import validate_config
    from tests.conftest import ROOT

    overrides = ["model=tiny-llama", f"editor={editor}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        staged, stats = compose("edit", overrides=overrides), compose("stats", overrides=overrides)
    validate_config(staged)
    for group in ("model", "editor", "corpus", "paths"):
        assert staged[group] == stats[group]
    api = configure("tiny-llama", editor)
    assert api.editor == staged.editor and api.model == staged.model and api.paths == staged.paths


def test_a_request_the_model_already_answers_ends_the_run_in_one_line(tmp_path):
    """Refused by the editor after looking at the model (so once the run has begun)."""
    model = load("tiny-gpt2", settings=settings(tmp_path))
    answer = model.generate("The mother tongue of Danielle Darrieux is", max_new_tokens=1)[0]
    request = (
        'request={prompt: "The mother tongue of {} is", subject: Danielle Darrieux, '
        f'target_new: "{answer.strip()}"}}'
    )
    done = edit(tmp_path, request)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: no request could be edited: edit request 0 (id=0): target_new "
        f"{answer.strip()!r} is already the greedy answer"
    )
