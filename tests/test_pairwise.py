"""The pairwise matrix: cases matched by id, every pair once, Holm over the pairs of a metric."""

import numpy as np
import pytest

from metrics.paired import holm, rate_difference
from pipeline.app.pairwise import (
    comparisons,
    csv_text,
    latex,
    markdown,
    resolution,
    scaling_comparisons,
    scaling_markdown,
)


def row(editor, es_by_id, model="m"):
    cases = {
        i: {"post": {"ES": es, "PS": es, "NS": 1.0 - es, "GE": np.nan, "perplexity": np.nan}}
        for i, es in es_by_id.items()
    }
    return {"model": model, "data": "cf", "editor": editor, "cases": cases}


def test_pairs_are_matched_by_case_id_and_holm_adjusted_over_the_pairs():
    rng = np.random.default_rng(0)
    ids = list(range(60))
    runs = {name: {i: float(rng.random() < p) for i in ids} for name, p in
            (("none", 0.3), ("rome", 0.9), ("memit", 0.85))}  # fmt: skip
    # memit's cases listed in another order and one case more: matched by id, not position.
    memit = dict(reversed(list(runs["memit"].items())))
    table = [row("none", runs["none"]), row("rome", runs["rome"]), row("memit", {**memit, 99: 1.0})]
    table.append(row("rome", runs["rome"], model="other"))  # another model: no pair with it
    found = comparisons(table, seed=0)
    assert [(c["a"], c["b"]) for c in found] == [
        ("rome", "none"),
        ("memit", "none"),
        ("memit", "rome"),
    ]
    assert all(c["n"] == 60 for c in found) and all("GE" not in c["metrics"] for c in found)
    x = [runs["memit"][i] for i in ids]
    expected = rate_difference(x, [runs["rome"][i] for i in ids])
    assert found[2]["metrics"]["ES"]["mean"] == pytest.approx(100 * expected["mean"])
    assert found[2]["metrics"]["ES"]["p"] == expected["p"]
    for name in ("S", "ES", "PS", "NS"):
        p = [c["metrics"][name]["p"] for c in found]
        assert [c["metrics"][name]["p_holm"] for c in found] == holm(p)
    text = markdown(found)
    assert "| m | cf | memit − rome | 60 |" in text and "ΔGE" not in text
    assert "memit - rome" in latex(found)
    assert (
        csv_text(found).splitlines()[0]
        == "model,data,a,b,metric,mean,low,high,n,p,p_holm,interval,p_bound"
    )


def test_scaling_pairs_are_per_size_on_the_cases_both_scored_and_holm_within_a_size():
    rng = np.random.default_rng(1)

    def scored(p, ids):
        return {
            i: {"id": i, "post": {"metrics": {"ES": float(rng.random() < p), "PS": 0.5,
                                              "NS": float(rng.random() < 0.7)}}}
            for i in ids
        }  # fmt: skip

    points = {
        "alphaedit": {100: scored(0.95, range(100)), 200: scored(0.9, range(200))},
        "memit": {100: scored(0.9, range(100)), 200: scored(0.5, range(200))},
        "emmet": {100: scored(0.9, range(50, 150))},  # other cases, and no point at 200
    }
    found = scaling_comparisons(points, "m", "cf-union", seed=0)
    assert [(c["size"], c["a"], c["b"], c["n"]) for c in found] == [  # Table 4's order
        (100, "emmet", "memit", 50),  # only the 50 cases both scored
        (100, "alphaedit", "memit", 100),
        (100, "alphaedit", "emmet", 50),
        (200, "alphaedit", "memit", 200),
    ]
    es = [points[e][200][i]["post"]["metrics"]["ES"] for e in ("alphaedit", "memit")
          for i in range(200)]  # fmt: skip
    expected = rate_difference(es[:200], es[200:])
    assert found[-1]["metrics"]["ES"]["mean"] == pytest.approx(100 * expected["mean"])
    assert found[-1]["metrics"]["ES"]["p_holm"] == expected["p"]  # alone at its size: unadjusted
    at_100 = [c["metrics"]["ES"]["p"] for c in found[:3]]
    assert [c["metrics"]["ES"]["p_holm"] for c in found[:3]] == holm(at_100)
    text = scaling_markdown(found)
    assert "| 200 | alphaedit − memit | 200 |" in text and "ΔGE" not in text
    assert csv_text(found).splitlines()[0].startswith("model,data,size,a,b,metric,")


def test_the_resolution_counts_each_metrics_resolved_pairs_and_names_the_open_s_ones():
    rng = np.random.default_rng(2)
    ids = list(range(80))
    runs = {name: {i: float(rng.random() < p) for i in ids} for name, p in
            (("none", 0.3), ("rome", 0.95), ("memit", 0.95))}  # fmt: skip
    found = comparisons([row(name, es) for name, es in runs.items()], seed=0)
    lines = resolution(found)
    assert len(lines) == 1 and lines[0].startswith("- cf (m, n = 80 cases per pair): resolved")
    for name in ("S", "ES", "PS", "NS"):
        hits = sum(c["metrics"][name]["p_holm"] < 0.05 for c in found)
        assert f"{name} {hits} of 3" in lines[0]
    # rome and memit edit alike: their S difference is open, and named with its interval.
    memit_rome = next(c for c in found if (c["a"], c["b"]) == ("memit", "rome"))
    assert memit_rome["metrics"]["S"]["p_holm"] >= 0.05
    m = memit_rome["metrics"]["S"]
    opened = lines[0].split("S not resolved: ")[1]
    assert f"memit − rome ({m['mean']:+.1f} [{m['low']:+.1f}, {m['high']:+.1f}])" in opened
