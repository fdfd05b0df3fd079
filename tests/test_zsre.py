"""zsRE as ROME scores it: the formulas (metrics.zsre) on fixed flags, the teacher-forced top-1
reads (pipeline.core.scoring) against a plain loop on tiny-gpt2, and the evaluate stage's zsRE
path with its table."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from metrics import zsre as zm
from metrics.intervals import wilson_ci
from pipeline.core import editing
from pipeline.core.editing import rome
from pipeline.core.editing.rome import RomeHparams
from pipeline.core.scoring import score_zsre_cases
from pipeline.core.second_moment import second_moment
from pipeline.core.tokens import encode, target_ids
from pipeline.data.records import load_zsre
from pipeline.data.sources import BUNDLED
from tests.conftest import tiny_model
from tests.test_evaluate_stage import evaluate
from tests.test_stages import run_stage

SAMPLE = BUNDLED / "zsre_eval_sample.json"


def test_a_case_scores_the_mean_over_all_its_answer_tokens():
    assert zm.token_correct([5, 7, 9], [5, 8, 9]) == [True, False, True]
    with pytest.raises(ValueError, match="2 predictions for 3"):
        zm.token_correct([1, 2], [1, 2, 3])
    # Two prompts' tokens together (the reference concatenates them): 2 of 3, not (1/2 + 1)/2.
    flags = {"rewrite": [[True, False, True, True]], "paraphrase": [[True, False], [True]]}
    got = zm.case_metrics(flags)
    assert got["efficacy"] == 0.75 and got["paraphrase"] == pytest.approx(2 / 3)
    assert math.isnan(got["specificity"])  # no prompt of that family


def test_the_summary_is_a_mean_over_cases_with_its_wilson_interval_and_n():
    cases = [
        {"efficacy": 1.0, "paraphrase": 0.5, "specificity": 0.25},
        {"efficacy": 0.0, "paraphrase": 1.0, "specificity": math.nan},
        {"efficacy": 1.0, "paraphrase": 0.0, "specificity": 0.75},
    ]
    summary = zm.summarize(cases)
    assert summary["n_cases"] == 3
    for name in zm.METRICS:
        values = [c[name] for c in cases if not math.isnan(c[name])]
        plain = wilson_ci(sum(values), len(values))
        assert summary[name]["n"] == len(values)
        assert summary[name]["mean"] == pytest.approx(100 * sum(values) / len(values))
        assert summary[name]["low"] == pytest.approx(100 * plain["low"])
        assert summary[name]["high"] == pytest.approx(100 * plain["high"])


def plain_flags(lm, prompt: str, answer: str) -> list[bool]:
    """The reference's rule by hand: one forward pass of prompt + answer, and for each answer
    token whether the logits before it pick it."""
    ids, tokens = encode(lm.tokenizer, prompt), target_ids(lm.tokenizer, answer, prompt)
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids + tokens])).logits[0]
    return [int(logits[len(ids) - 1 + j].argmax()) == t for j, t in enumerate(tokens)]


def greedy(lm, prompt: str, steps: int = 3) -> str:
    ids = encode(lm.tokenizer, prompt)
    with torch.no_grad():
        out = lm.model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False)
    return lm.tokenizer.decode(out[0, len(ids) :])


@pytest.fixture(scope="module")
def cases_and_updates():
    torch.set_num_threads(1)
    lm = tiny_model("tiny-gpt2")
    cases = load_zsre(SAMPLE, limit=4).records
    # Answers the model partly predicts (its own greedy words, then a word it may not), so the
    # flags mix True and False and a wrong read shows. Case 1 (its answer already the model's
    # own: ROME refuses it) stays unedited beside the three edited ones.
    cases[1] = dataclasses.replace(cases[1], target_new=greedy(lm, cases[1].prompt).strip())
    cases[2] = dataclasses.replace(
        cases[2], neighborhood_answer=greedy(lm, cases[2].neighborhood_prompt).strip() + " tree"
    )
    stat = second_moment(lm, 1, [c.prompt for c in cases] * 5, progress=False)
    hp = RomeHparams(layer=1, v_num_grad_steps=4, context_templates=((3, 2),))
    edited = [cases[i] for i in (0, 2, 3)]
    requests = [editing.EditRequest(c.template, c.subject, c.target_new) for c in edited]
    results = rome.compute_updates(lm, requests, hp, second_moment=stat)
    assert all(r.ok for r in results)
    updates = [r.update for r in results]
    return lm, cases, [updates[0], None, *updates[1:]]


def test_batched_top1_reads_equal_a_plain_loop_with_edited_weights(cases_and_updates):
    lm, cases, updates = cases_and_updates
    batched = score_zsre_cases(lm, cases, updates, batch_size=64)
    small = score_zsre_cases(lm, cases, updates, batch_size=2)
    assert batched == small
    seen = []
    for case, update, got in zip(cases, updates, batched, strict=True):
        prompts = {
            "rewrite": [(case.prompt, case.target_new)],
            "paraphrase": [(p, case.target_new) for p in case.paraphrase_prompts],
            "neighborhood": [(case.neighborhood_prompt, case.neighborhood_answer)],
        }
        with editing.edited(lm, [update] if update is not None else []):
            expected = {
                family: [plain_flags(lm, p, a) for p, a in pairs]
                for family, pairs in prompts.items()
            }
        assert got == expected
        seen += [flag for family in got.values() for prompt in family for flag in prompt]
    assert any(seen) and not all(seen)  # the comparison could fail both ways
    # The reads see each case's own edit: the unedited reads differ somewhere.
    assert score_zsre_cases(lm, cases) != batched


# The stage


# The bundled zsRE sample, whether or not a data root is set (CI sets ROME_DATA).
SAMPLE_DATA = ("data=zsre", "paths.data=/nonexistent-data-root")


def test_evaluate_on_zsre_writes_cases_and_a_summary_with_intervals(tmp_path):
    evaluate(tmp_path, *SAMPLE_DATA, "data.limit=3", "eval.cases_per_batch=2")
    out = tmp_path / "results/evaluate/tiny-gpt2/zsre/rome"
    lines = [json.loads(x) for x in (out / "zsre-cases-0of1.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["id"] for r in lines] == [0, 1, 2] and not list(out.glob("cases-*.jsonl"))
    assert lines[0]["target_new"] == "1998" and lines[0]["edit"]["ok"]  # answers[0], as ROME
    assert summary["benchmark"] == "zsre" and summary["n_cases"] == 3
    assert summary["data"]["origin"] == "bundled sample" and summary["data"]["loaded"] == 3
    for phase in ("pre", "post"):
        for name in zm.METRICS:
            metric = summary[phase][name]
            plain = np.mean([r[phase]["metrics"][name] for r in lines])
            assert metric["mean"] == pytest.approx(100 * plain) and metric["n"] == 3
            assert metric["low"] <= metric["mean"] <= metric["high"]
            for r in lines:  # each case's score is its flags' mean
                assert r[phase]["metrics"] == zm.case_metrics(r[phase]["correct"])


def test_zsre_in_the_unedited_run_and_the_summarize_stage(tmp_path):
    evaluate(tmp_path, *SAMPLE_DATA, "data.limit=2", editor="none")
    evaluate(tmp_path, *SAMPLE_DATA, "data.limit=2")
    line = json.loads(
        (tmp_path / "results/evaluate/tiny-gpt2/zsre/none/zsre-cases-0of1.jsonl")
        .read_text()
        .splitlines()[0]
    )
    assert line["pre"] == line["post"] and "edit" not in line
    done = run_stage("summarize", f"paths.results={tmp_path / 'results'}")
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "results/summary/zsre_table.md").read_text().splitlines()
    assert table[0] == "| model | data | editor | n | Efficacy | Paraphrase | Specificity | PPL |"
    assert [row.split(" | ")[2] for row in table[2:]] == ["none", "rome"]
    # The damage, as CounterFact's runs measure it: the first cases' edits on the held-out text.
    summary = json.loads(
        (tmp_path / "results/evaluate/tiny-gpt2/zsre/rome/summary.json").read_text()
    )
    damage = summary["perplexity"]
    assert damage["cases"] == [0, 1] and damage["edited"]["edits"] == 2
    ppl = f"{damage['edited']['mean']:.1f} [{damage['edited']['low']:.1f}, "
    assert table[3].split(" | ")[-1].startswith(ppl)
    assert not (tmp_path / "results/summary/table.md").exists()  # no CounterFact runs: no Table 4
    csv_head = (tmp_path / "results/summary/zsre_table.csv").read_text().splitlines()[0]
    assert csv_head.startswith("model,data,editor,n,efficacy_mean,efficacy_low")
    done = run_stage(
        "report",
        "experiment=demo",
        "model=tiny-gpt2",
        f"paths.results={tmp_path / 'results'}",
        f"paths.reports={tmp_path / 'reports'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "reports/demo/index.md").read_text()
    section = report[report.index("## zsRE") :]
    assert "\n".join(table[:4]) in section  # the summarize stage's table, unchanged
    assert "zsre_eval_sample.json" in report  # its data file and digest among the report's


def test_mass_and_sequential_on_zsre_stop_with_a_message(tmp_path):
    for mode in ("mass", "sequential"):
        done = run_stage(
            "evaluate",
            "model=tiny-gpt2",
            "data=zsre",
            f"eval.mode={mode}",
            f"paths.results={tmp_path}",
            f"paths.cache={tmp_path / 'cache'}",
        )
        assert done.returncode != 0
        assert f"eval.mode={mode} is not implemented for zsRE" in done.stderr
        assert not (tmp_path / "evaluate").exists() or not list(
            (tmp_path / "evaluate").rglob("*.jsonl")
        )
