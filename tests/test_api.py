"""`pipeline.api` on the tiny models: the edit is `evaluate`'s, the weights come back bit for bit,
a saved model is plain transformers, bad requests get `evaluate`'s errors, and the examples of
docs/api.md run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.api import load
from pipeline.app.edited_model import MANIFEST, update_sha256
from pipeline.app.editors import CaseEditor, stats_key
from pipeline.core.scoring import too_long
from pipeline.data.records import RecordError, load_counterfact
from tests.conftest import CACHE, ROOT
from tests.test_stats_stage import TEXT

SAMPLE = ROOT / "data/samples/counterfact-edit_sample.json"
RECORD = json.loads(SAMPLE.read_text())[0]  # Danielle Darrieux: French -> English
PLAIN = {
    "prompt": "The mother tongue of {} is",
    "subject": "Danielle Darrieux",
    "target_new": "English",
    "target_true": "French",
    "paraphrase_prompts": [RECORD["rephrase_prompt"]],
    "neighborhood_prompts": [RECORD["locality_prompt"]],
    "case_id": RECORD["case_id"],
}
FAST = {"v_num_grad_steps": 4, "context_templates": [[3, 2]]}  # as the evaluate stage tests
CASE_TOLERANCE = 1e-5  # probabilities: hooks (W x + ΔW x) against edited weights ((W + ΔW) x)


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    """A cache and corpus of the module's own, so the statistics are computed here (seconds)."""
    root = tmp_path_factory.mktemp("api")
    (root / "corpus").mkdir()
    (root / "corpus" / "text.txt").write_text(TEXT * 3)
    return {"paths.cache": str(root / "cache"), "corpus.local_dir": str(root / "corpus")}


@pytest.fixture(scope="module")
def gpt2(settings):
    return load("tiny-gpt2", settings=settings)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.lm.model.state_dict().items()}


def evaluate_config(settings, *overrides, model="tiny-gpt2"):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "evaluate",
            overrides=[
                f"model={model}",
                *(f"{k}={v}" for k, v in settings.items()),
                "editor.v_num_grad_steps=4",
                "editor.context_templates=[[3,2]]",
                *overrides,
            ],
        )


def test_the_edit_is_evaluates_update_and_the_weights_come_back_bit_for_bit(gpt2, settings):
    """The same request and settings through `evaluate`'s editor (`CaseEditor.updates`, the
    independent protocol) give the same update, exactly: the same code on the same numbers."""
    before = weights(gpt2)
    case = load_counterfact(SAMPLE, limit=1).records[0]
    (expected,) = CaseEditor(evaluate_config(settings), gpt2.lm).updates([case])
    with gpt2.edit(RECORD, editor="rome", **FAST) as edit:
        (update,) = edit.updates
        assert torch.equal(update.left, expected.update.left)
        assert torch.equal(update.right, expected.update.right)
        changed = [k for k, v in weights(gpt2).items() if not torch.equal(v, before[k])]
        assert changed == ["transformer.h.1.mlp.c_proj.weight"]  # ROME's layer for tiny-gpt2
    after = weights(gpt2)
    assert all(torch.equal(after[k], before[k]) for k in before)  # bit for bit
    with pytest.raises(RuntimeError, match="restored"):
        edit.generate()


def test_a_memit_edit_of_one_request_is_evaluates_to_float32_rounding(settings):
    """MEMIT's independent protocol (evaluate) runs each request's lower-layer updates as hooks
    (W x + ΔW x); the API's edit writes them into the weights ((W + ΔW) x) before the next
    layer's keys are read. The first layer's update is the same exactly; above it the keys
    differ by float32 rounding (~1e-7 relative), which the solve scales by C's conditioning:
    3-5e-7 of the update's largest entry measured on tiny-llama, 1e-5 allowed. (On tiny-gpt2
    with this 300-token corpus C is near singular and the same rounding moves layer 1's update
    by its own size; with the bundled sample, 1.7e-6.)"""
    llama = load("tiny-llama", settings=settings)
    case = load_counterfact(SAMPLE, limit=1).records[0]
    cfg = evaluate_config(settings, "editor=memit", model="tiny-llama")
    (expected,) = CaseEditor(cfg, llama.lm).updates([case])
    with llama.edit(case, editor="memit", **FAST) as edit:
        first, *above = zip(expected.update, edit.updates, strict=True)
        assert torch.equal(first[0].matrix(), first[1].matrix())
        for theirs, ours in above:
            scale = theirs.matrix().abs().max()
            assert (theirs.matrix() - ours.matrix()).abs().max() <= 1e-5 * scale


def test_plain_requests_counterfact_records_and_cases_make_one_edit(gpt2):
    case = load_counterfact(SAMPLE, limit=1).records[0]
    edits = []
    for request in (PLAIN, RECORD, case):
        with gpt2.edit([request], editor="rome", **FAST) as edit:
            edits.append(update_sha256(edit.updates))
            assert edit.cases[0].template == "The mother tongue of {} is"
    assert edits[0] == edits[1] == edits[2]


def test_scores_are_evaluates_case_record(tmp_path, gpt2, settings):
    """The evaluate stage on the same case and settings writes the probabilities `scores`
    returns (to CASE_TOLERANCE: evaluate adds each case's update by hooks) and the same edit."""
    from tests.test_stages import run_stage

    overrides = [f"{k}={v}" for k, v in settings.items()]
    done = run_stage(
        "evaluate",
        "model=tiny-gpt2",
        "editor=rome",
        "editor.v_num_grad_steps=4",
        "editor.context_templates=[[3,2]]",
        "data.limit=1",
        "eval.perplexity=false",
        f"paths.results={tmp_path}",
        *overrides,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "evaluate/tiny-gpt2/counterfact-easyedit/rome/cases-0of1.jsonl"
    (written,) = [json.loads(line) for line in out.read_text().splitlines()]
    with gpt2.edit(RECORD, editor="rome", **FAST) as edit:
        (mine,) = edit.scores()
    assert mine["edit"]["target_nll"] == pytest.approx(written["edit"]["target_nll"], rel=1e-6)
    assert mine["edit"]["steps"] == written["edit"]["steps"]
    for phase in ("pre", "post"):
        for kind, pairs in written[phase]["probs"].items():
            got = torch.tensor(mine[phase]["probs"][kind])
            assert torch.allclose(got, torch.tensor(pairs), atol=CASE_TOLERANCE, rtol=0)
        assert mine[phase]["metrics"].keys() == written[phase]["metrics"].keys()


def test_a_saved_model_is_plain_transformers_with_the_edited_logits(tmp_path, gpt2, settings):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([gpt2.lm.tokenizer.encode("The mother tongue of Danielle Darrieux is")])
    unedited = gpt2.lm.model(ids).logits
    with gpt2.edit(PLAIN, editor="rome", **FAST) as edit:
        edited_logits = gpt2.lm.model(ids).logits
        edit.save(tmp_path / "saved")
        manifest = json.loads((tmp_path / "saved" / MANIFEST).read_text())
        key = stats_key(edit.cfg, gpt2.lm, 1)[0].metadata()
        assert manifest["update"]["sha256"] == update_sha256(edit.updates)
    assert not torch.equal(edited_logits, unedited)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        # The same weights bit for bit and the same forward pass: the same logits.
        assert torch.equal(reloaded(ids).logits, edited_logits)
    again = load(tmp_path / "saved", settings=settings)  # and through the API, by directory
    assert again.lm.name == "saved" and torch.equal(again.lm.model(ids).logits, edited_logits)
    assert manifest["requests"][0]["target_new"] == "English"
    assert manifest["editor"]["name"] == "rome"
    assert manifest["editor"]["hparams"]["v_num_grad_steps"] == 4
    assert manifest["editor"]["hparams"]["layer"] == 1
    assert manifest["base_model"]["identity"] == gpt2.lm.identity
    assert manifest["statistics"] == [key]
    assert re.fullmatch(r"[0-9a-f]{40}", manifest["git"]["commit"] or "")


def bad_records():
    subject = {**RECORD, "subject": "Nobody At All"}
    same = {**RECORD, "target_new": "French"}
    long = {**RECORD, "prompt": " and".join(["Danielle Darrieux"] * 150)}
    return {"subject": subject, "target": same, "too long": long}


@pytest.mark.parametrize("kind", ["subject", "target", "too long"])
def test_bad_requests_get_evaluates_error_before_anything_is_computed(
    tmp_path, gpt2, settings, kind
):
    """`evaluate` reads the record from its file (`load_counterfact`, then the context check
    of its `reject_too_long`); the API raises the same error, naming the request instead."""
    record = bad_records()[kind]
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([record]))
    with pytest.raises(RecordError) as theirs:
        loaded = load_counterfact(data, on_error="fail")
        editor = CaseEditor(evaluate_config(settings), gpt2.lm)
        prefix = editor.prefix_tokens()
        loaded.reject(lambda case: too_long(gpt2.lm, case, edit_prefix=prefix), "fail")
    before = weights(gpt2)
    with pytest.raises(RecordError) as ours:
        gpt2.edit(record, editor="rome", **FAST)
    assert str(theirs.value).removeprefix(f"{data}: ") == str(ours.value).removeprefix("requests: ")
    assert (ours.value.field, ours.value.reason) == (theirs.value.field, theirs.value.reason)
    after = weights(gpt2)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_plain_requests_are_checked_as_records(gpt2):
    with pytest.raises(RecordError, match="field 'subject': subject 'Nobody' is not in the"):
        gpt2.edit({"prompt": "Danielle Darrieux speaks", "subject": "Nobody", "target_new": "x"})
    with pytest.raises(RecordError, match="field 'target_new': missing"):
        gpt2.edit({"prompt": "{} speaks", "subject": "Danielle Darrieux"})


def test_editor_settings_are_checked_as_the_stages_check_them(gpt2):
    with pytest.raises(ValueError, match=r"unknown editor settings \['v_learning_rate'\]"):
        gpt2.edit(PLAIN, editor="rome", v_learning_rate=0.1)
    with pytest.raises(ValueError, match="editor.layer=9"):
        gpt2.edit(PLAIN, editor="rome", layer=9)
    with pytest.raises(ValueError, match="unknown editor 'rom'"):
        gpt2.edit(PLAIN, editor="rom")


def test_memit_on_llama_generates_before_and_after_and_refuses_a_second_edit(settings):
    llama = load("tiny-llama", settings=settings)
    before = weights(llama)
    edit = llama.edit([PLAIN], editor="memit", layers=[0, 1], **FAST)
    assert sorted({u.layer for u in edit.updates}) == [0, 1]
    with pytest.raises(RuntimeError, match="holds an edit already"):
        llama.edit([PLAIN], editor="rome")
    (row,) = edit.generate(max_new_tokens=5)
    assert row["after"] == llama.generate(row["prompt"], max_new_tokens=5)[0]
    with edit.unedited():
        assert row["before"] == llama.generate(row["prompt"], max_new_tokens=5)[0]
    edit.restore()
    after = weights(llama)
    assert all(torch.equal(after[k], before[k]) for k in before)


# --------------------------------------------------------------------------------------------
# docs/api.md runs as written

DOCS = ROOT / "docs" / "api.md"


def examples() -> list[str]:
    """The code blocks of docs/api.md marked ```python example, in order."""
    return re.findall(r"```python example\n(.*?)```", DOCS.read_text(), flags=re.S)


def test_the_docs_examples_run_as_written(tmp_path):
    """Each marked block of docs/api.md, in one process, on the model ROME_DOCS_MODEL names
    (the docs' smollm2-135m is written in; tiny-gpt2 by default, for speed) from a directory of
    its own (the examples write `out/`)."""
    model = os.environ.get("ROME_DOCS_MODEL", "tiny-gpt2")
    code = "\n".join(examples()).replace('"smollm2-135m"', repr(model))
    assert code.count("load(") >= 1 and "save(" in code and "scores()" in code
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        # Without a data root, as a reader trying the docs has: the key statistics come from the
        # bundled sample (seconds), not the data root's whole corpus (five minutes on tiny-gpt2).
        env={
            **{k: v for k, v in os.environ.items() if k != "ROME_DATA"},
            "PYTHONPATH": str(ROOT),
            "ROME_CACHE": str(CACHE),
        },
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out").is_dir()


def test_the_update_digest_reads_the_values_whatever_the_layout():
    """A (out, 1) factor made by a transpose has stride 64 in its last dimension (MEMIT's z of
    one request): hashing its bytes failed. The digest is of the values, not the layout."""
    from pipeline.core.editing.updates import LowRankUpdate

    left = torch.randn(1, 64).T  # shape (64, 1), strides (1, 64)
    right = torch.randn(1, 8)
    same = LowRankUpdate(0, torch.tensor(left.tolist()), right)
    assert update_sha256([LowRankUpdate(0, left, right)]) == update_sha256([same])
    moved = LowRankUpdate(0, torch.tensor(left.tolist()), right * 2)
    assert update_sha256([moved]) != update_sha256([same])


def test_a_model_loaded_by_directory_edits_at_a_layer_given_by_keyword(tmp_path, gpt2, settings):
    with gpt2.edit(PLAIN, editor="rome", **FAST) as edit:
        edit.save(tmp_path / "saved")
    again = load(tmp_path / "saved", settings=settings)
    with pytest.raises(ValueError, match="no layer preset for model 'saved'"):
        again.edit(PLAIN, editor="rome", **FAST)
    with again.edit(PLAIN, editor="rome", layer=2, **FAST) as edit:
        assert [u.layer for u in edit.updates] == [2]


def test_a_request_the_model_already_answers_is_left_out_and_named(gpt2):
    """ROME refuses a target that is already the greedy answer (`reject_already_predicted`):
    the other requests are edited and the refused one is listed; alone, the edit raises."""
    prompt = "The mother tongue of Danielle Darrieux is"
    answer = gpt2.generate(prompt, max_new_tokens=1)[0].strip()
    known = {**PLAIN, "target_new": answer, "target_true": "Zulu", "case_id": 7}
    with pytest.raises(ValueError, match="no request could be edited: .*already the greedy"):
        gpt2.edit(known, editor="rome", **FAST)
    other = {"prompt": "{} plays the", "subject": "Miles Davis", "target_new": "violin"}
    with gpt2.edit([known, other], editor="rome", **FAST) as edit:
        assert edit.failed == [
            {"id": 7, "error": f"target_new {answer!r} is already the greedy answer"}
        ]
        assert len(edit.updates) == 1 and edit.manifest()["failed"] == edit.failed


def test_an_edits_own_settings_win_over_those_given_at_load():
    from pipeline.api import configure

    loaded = {"editor.v_num_grad_steps": 2, "editor.mom2.max_tokens": 1000}
    cfg = configure("tiny-gpt2", "rome", {"v_num_grad_steps": 4}, settings=loaded)
    assert cfg.editor.v_num_grad_steps == 4 and cfg.editor.mom2.max_tokens == 1000
    cfg = configure("tiny-gpt2", "memit", {"layers": [1, 2], "mom2": {"max_tokens": 9}})
    assert list(cfg.editor.layer) == [1, 2] and cfg.editor.mom2.max_length == 256
    assert cfg.editor.mom2.max_tokens == 9


def test_scores_need_target_true_and_generate_names_a_prompt_that_fills_the_context(gpt2):
    bare = {k: v for k, v in PLAIN.items() if k != "target_true"}
    with gpt2.edit(bare, editor="rome", **FAST) as edit:
        with pytest.raises(ValueError, match=r"requests with ids \[0\] have no target_true"):
            edit.scores()
        with pytest.raises(ValueError, match="no room to generate in the model's context of 256"):
            edit.generate(["the river" * 300])
        (row,) = edit.generate(max_new_tokens=500)  # clipped to the context, not an error
        assert row["prompt"] == "The mother tongue of Danielle Darrieux is"
