"""The report's verdicts on the paper's findings follow their stated rules, both ways."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from metrics.counterfact import harmonic_mean
from pipeline.app import findings
from pipeline.core.patching import BUCKETS

LAYERS = 12


def averages(
    mlp_subject_peak: int, attn_last_peak: int, mlp_last_height: float = 0.05, half: float = 0.01
):
    """Trace averages with one bump per (kind, bucket) at the given layers, each value with a
    95% interval of half-width `half`."""

    def bump(peak: int, height: float) -> list[float]:
        return list(height * np.exp(-0.5 * (np.arange(LAYERS) - peak) ** 2))

    rows = {kind: [[0.0] * LAYERS for _ in BUCKETS] for kind in ("mlp", "attn")}
    rows["mlp"][BUCKETS.index("last_subject")] = bump(mlp_subject_peak, 0.2)
    rows["mlp"][BUCKETS.index("last")] = bump(LAYERS - 1, mlp_last_height)
    rows["attn"][BUCKETS.index("last")] = bump(attn_last_peak, 0.15)
    rows["attn"][BUCKETS.index("last_subject")] = bump(2, 0.02)
    return {
        "kinds": {
            kind: {
                "mean": value,
                "low": [[v - half for v in row] for row in value],
                "high": [[v + half for v in row] for row in value],
            }
            for kind, value in rows.items()
        }
    }


def metric(mean: float, half_width: float) -> dict[str, float]:
    return {"mean": mean, "low": mean - half_width, "high": mean + half_width}


def test_the_trace_sites_agree_when_the_mlp_peaks_early_and_attention_late():
    found = findings.read_results(averages(3, 9), [], [], {})
    verdicts = {f.name: f.verdict for f in found}
    assert verdicts["Early site: MLP at the last subject token"] == findings.AGREES
    assert verdicts["Late site: attention at the last token"] == findings.AGREES
    assert "layer 3 of 12" in found[0].evidence


def test_the_trace_sites_disagree_when_the_peaks_are_swapped():
    found = findings.read_results(averages(9, 3), [], [], {})
    assert [f.verdict for f in found] == [findings.DISAGREES, findings.DISAGREES]
    # an MLP effect at the last token above the subject's is not the paper's early site either
    found = findings.read_results(averages(3, 9, mlp_last_height=0.5), [], [], {})
    assert found[0].verdict == findings.DISAGREES


def test_the_trace_sites_are_not_significant_when_the_peaks_intervals_overlap():
    """The paper's way on the means, but the two compared peaks' intervals overlap."""
    found = findings.read_results(averages(3, 9, mlp_last_height=0.15, half=0.03), [], [], {})
    assert found[0].verdict == findings.WITHIN  # MLP: 0.2 ± 0.03 against 0.15 ± 0.03
    assert "0.200 [0.170, 0.230]" in found[0].evidence
    assert findings.read_results(averages(3, 9, half=0.07), [], [], {})[1].verdict == (
        findings.WITHIN  # attention: 0.15 ± 0.07 at the last token against 0.02 ± 0.07
    )
    # no intervals (one prompt: missing, or NaN as the trace writes them): nothing can be
    # significant, and the evidence gives the bare means
    for missing in (None, float("nan")):
        no_intervals = averages(3, 9)
        for stats in no_intervals["kinds"].values():
            stats["low"] = stats["high"] = [[missing] * LAYERS for _ in BUCKETS]
        found = findings.read_results(no_intervals, [], [], {})
        assert [f.verdict for f in found] == [findings.WITHIN, findings.WITHIN]
        assert "at 0.200; at the last token" in found[0].evidence


def test_severed_paths_compare_the_drop_in_the_lower_half_of_the_layers():
    none = np.linspace(0.3, 0.0, LAYERS)
    trace = averages(3, 9)

    def curve(values: np.ndarray, half: float) -> dict[str, list[float]]:
        return {"mean": list(values), "low": list(values - half), "high": list(values + half)}

    trace["severed"] = {
        "none": curve(none, 0.01),
        "mlp": curve(none * 0.3, 0.01),
        "attn": curve(none * 0.9, 0.01),
    }
    assert findings.severed_mlp(trace).verdict == findings.AGREES
    # lower half (layers 0-5): none averages 0.232, MLPs severed 0.070, attention 0.209
    assert "0.070 [0.060, 0.080] with the MLPs severed" in findings.severed_mlp(trace).evidence
    trace["severed"]["attn"] = curve(none * 0.9, 0.15)  # overlaps the MLP-severed curve
    assert findings.severed_mlp(trace).verdict == findings.WITHIN
    one_prompt = {
        k: curve(np.asarray(v["mean"]), float("nan")) for k, v in trace["severed"].items()
    }
    assert findings.severed_mlp({"severed": one_prompt}).verdict == findings.WITHIN
    assert "0.070 with the MLPs severed" in findings.severed_mlp({"severed": one_prompt}).evidence
    trace["severed"]["mlp"], trace["severed"]["attn"] = (
        trace["severed"]["attn"],
        trace["severed"]["mlp"],
    )
    assert findings.severed_mlp(trace).verdict == findings.DISAGREES


def sweep(scores, cases=None):
    rows = [{"layer": layer, "post": {"S": {"mean": s}}} for layer, s in enumerate(scores)]
    for row, layer_cases in zip(rows, cases or [], strict=False):
        row["cases"] = layer_cases
    return rows


def layer_cases(successes, n=40):
    """Per layer, n cases of which the first `successes[layer]` succeed on PS (ES, NS always)."""
    return [{i: {"ES": 1.0, "PS": float(i < k), "NS": 1.0} for i in range(n)} for k in successes]


def test_editing_follows_the_trace_by_a_bootstrap_over_cases_of_rho():
    trace = averages(4, 9)
    mlp = np.asarray(trace["kinds"]["mlp"]["mean"][BUCKETS.index("last_subject")])
    k = np.round(5 + 30 * mlp / mlp.max()).astype(int)  # PS successes follow the effect
    found = findings.edit_where_trace_peaks(sweep(k, layer_cases(k)), trace)
    assert found.verdict == findings.AGREES and "S peaks at layer 4" in found.evidence
    assert "bootstrap over the 40 cases" in found.evidence
    reverse = sweep(-k, layer_cases(40 - k))
    assert findings.edit_where_trace_peaks(reverse, trace).verdict == findings.DISAGREES
    # One case more at the peak layer and the same cases everywhere else: ρ > 0, but a
    # resample without that case has no order at all, so the interval reaches 0.
    k = np.full(len(mlp), 20)
    k[4] = 21
    found = findings.edit_where_trace_peaks(sweep(k, layer_cases(k)), trace)
    assert found.verdict == findings.WITHIN and "[0.00," in found.evidence
    assert findings.edit_where_trace_peaks(sweep([1, 2]), trace) is None


def test_without_per_case_scores_rho_alone_is_never_significant():
    trace = averages(4, 9)
    mlp = np.asarray(trace["kinds"]["mlp"]["mean"][BUCKETS.index("last_subject")])
    found = findings.edit_where_trace_peaks(sweep(50 + 100 * mlp), trace)
    assert found.verdict == findings.WITHIN and "no interval" in found.evidence
    assert (
        findings.edit_where_trace_peaks(sweep(50 - 100 * mlp), trace).verdict == findings.DISAGREES
    )


def test_rho_interval_equals_a_plain_loop_over_resamples():
    rng = np.random.default_rng(0)
    rates = rng.integers(0, 2, (6, 30, 3)).astype(float)
    effect = np.arange(6.0)
    got = findings.rho_interval(effect, rates, seed=3, resamples=200)
    draws = np.random.default_rng(3).integers(0, 30, size=(200, 30))
    rhos = []
    for index in draws:
        s = [harmonic_mean(rates[layer, index].mean(axis=0)) for layer in range(6)]
        rhos.append(scipy_stats.spearmanr(effect, s).statistic if np.ptp(s) else 0.0)
    assert (got["low"], got["high"]) == pytest.approx(tuple(np.quantile(rhos, [0.025, 0.975])))


def curve(*points):
    return [{"size": size, "post": {"S": metric(s, width)}} for size, s, width in points]


def test_memit_against_rome_at_the_largest_common_number_of_edits():
    mass = {
        "memit": curve((1, 100, 0), (1000, 79, 1.5)),
        "rome": curve((1, 100, 0), (100, 69, 6), (1000, 40, 2)),
    }
    found = findings.memit_holds_where_rome_collapses(mass)
    assert found.verdict == findings.AGREES and "N = 1,000" in found.evidence
    mass["rome"][-1]["post"]["S"] = metric(78, 2)
    assert findings.memit_holds_where_rome_collapses(mass).verdict == findings.WITHIN
    mass["rome"][-1]["post"]["S"] = metric(85, 2)
    assert findings.memit_holds_where_rome_collapses(mass).verdict == findings.DISAGREES
    assert findings.memit_holds_where_rome_collapses({"memit": mass["memit"]}) is None


def test_r_rome_against_rome_on_the_neighbours_after_the_most_common_sequential_edits():
    sequential = {
        "r-rome": curve((1, 100, 0), (200, 81, 3)),
        "rome": curve((1, 100, 0), (200, 75, 4)),
    }
    sequential["rome"].append({"size": 500, "post": {"S": metric(50, 2), "NS": metric(40, 2)}})
    for name, ns in (("r-rome", metric(69, 6)), ("rome", metric(57.5, 6.5))):
        sequential[name][1]["post"]["NS"] = ns
    found = findings.read_results(None, [], [], {}, sequential)[-1]
    assert found.name.startswith("r-ROME") and "after 200 sequential edits" in found.evidence
    assert found.verdict == findings.WITHIN  # the intervals overlap (62.5-75 and 51-64)
    sequential["rome"][1]["post"]["NS"] = metric(50, 5)
    assert findings.r_rome_keeps_the_neighbours(sequential).verdict == findings.AGREES
    sequential["rome"][1]["post"]["NS"] = metric(72, 5)
    assert findings.r_rome_keeps_the_neighbours(sequential).verdict == findings.DISAGREES
    assert findings.r_rome_keeps_the_neighbours({"rome": sequential["rome"]}) is None


def table(**editors):
    return [{"editor": name, "metrics": metrics} for name, metrics in editors.items()]


def test_the_table_findings():
    none = {"ES": metric(30, 5), "PS": metric(30, 5), "NS": metric(75, 4)}
    ft = {"ES": metric(99, 1), "PS": metric(70, 5), "NS": metric(55, 5)}
    rome = {"ES": metric(99, 1), "PS": metric(90, 4), "NS": metric(70, 5)}
    weak = {"ES": metric(40, 5), "PS": metric(35, 5), "NS": metric(70, 5)}
    rows = table(none=none, ft=ft, rome=rome, **{"ft-l": weak, "kn": weak})
    assert findings.fine_tuning_tradeoff(rows).verdict == findings.AGREES
    assert findings.rome_generalizes(rows).verdict == findings.AGREES
    ft["NS"] = metric(72, 5)  # lower, but inside the unedited model's interval
    assert findings.fine_tuning_tradeoff(rows).verdict == findings.WITHIN
    ft["ES"] = metric(20, 5)  # fine-tuning that does not reach its target
    assert findings.fine_tuning_tradeoff(rows).verdict == findings.DISAGREES
    rome["PS"] = metric(30, 4)
    assert findings.rome_generalizes(rows).verdict == findings.DISAGREES


def test_markdown_names_claim_evidence_and_verdict():
    found = findings.read_results(averages(3, 9), [], [], {})
    lines = findings.markdown(found)
    assert len(lines) == 2 and lines[0].startswith("- **Early site")
    assert "*agrees*" in lines[0] and "Paper:" in lines[0] and "Here:" in lines[0]


def test_fine_tuning_is_judged_by_the_paired_change_when_the_row_has_it():
    ft = {"ES": metric(98, 2), "PS": metric(70, 5), "NS": metric(60, 7)}
    none = {"ES": metric(33, 6), "PS": metric(31, 6), "NS": metric(69, 7)}
    rows = table(none=none, ft=ft)
    assert findings.fine_tuning_tradeoff(rows).verdict == findings.WITHIN  # unpaired: overlap
    change = {"ES": {**metric(65, 6), "n": 200}, "NS": {**metric(-9.5, 4), "n": 200}}
    rows[1]["change"] = change
    found = findings.fine_tuning_tradeoff(rows)
    assert found.verdict == findings.AGREES and "paired: ES +65.0" in found.evidence
    change["NS"] = {**metric(-2, 4), "n": 200}  # down, but the interval reaches zero
    assert findings.fine_tuning_tradeoff(rows).verdict == findings.WITHIN
    change["NS"] = {**metric(3, 2), "n": 200}
    assert findings.fine_tuning_tradeoff(rows).verdict == findings.DISAGREES


def test_a_paired_difference_decides_where_the_trace_keeps_one():
    """Overlapping intervals of the two sides, but the per-prompt difference clears zero (and
    the other way round); a difference of other layers than the peaks is not used."""
    trace = averages(3, 9, mlp_last_height=0.15, half=0.03)  # unpaired: not significant
    trace["paired"] = {
        "mlp_site": {"minus": [["last_subject", 3], ["last", 11]], **metric(0.05, 0.02), "n": 50}
    }
    found = findings.early_mlp_site(trace)
    assert found.verdict == findings.AGREES
    assert "paired over the same 50 prompts" in found.evidence
    assert "is 0.050 [0.030, 0.070]" in found.evidence
    trace["paired"]["mlp_site"].update(metric(0.05, 0.08))
    assert findings.early_mlp_site(trace).verdict == findings.WITHIN
    trace["paired"]["mlp_site"].update(low=float("nan"), high=float("nan"))
    assert findings.early_mlp_site(trace).verdict == findings.WITHIN
    trace["paired"]["mlp_site"].update(metric(-0.01, 0.005))
    assert findings.early_mlp_site(trace).verdict == findings.DISAGREES
    trace["paired"]["mlp_site"]["minus"] = [["last_subject", 4], ["last", 11]]  # stale
    assert findings.early_mlp_site(trace).verdict == findings.WITHIN
    assert "paired" not in findings.early_mlp_site(trace).evidence
    # attention, and the severed paths the same way
    wide = averages(3, 9, half=0.07)
    wide["paired"] = {
        "attn_site": {"minus": [["last", 9], ["last_subject", 2]], **metric(0.1, 0.05), "n": 9}
    }
    assert findings.late_attention_site(wide).verdict == findings.AGREES
    none = np.linspace(0.3, 0.0, LAYERS)
    curve = {"mean": list(none), "low": list(none - 0.2), "high": list(none + 0.2)}
    wide["severed"] = {"none": curve, "mlp": {**curve, "mean": list(none * 0.3)}, "attn": curve}
    assert findings.severed_mlp(wide).verdict == findings.WITHIN
    wide["paired"]["severed"] = {
        "minus": ["attn", "mlp"],
        "layers": [0, 6],
        **metric(0.1, 0.02),
        "n": 9,
    }
    assert findings.severed_mlp(wide).verdict == findings.AGREES
    assert "attention severed minus MLPs severed is 0.100" in findings.severed_mlp(wide).evidence


def edited(row_metrics, gain_low, **extra):
    """A Table 4 row with its paired ES gain over the unedited cases (`tables.edit_effect`)."""
    return {"metrics": row_metrics, "edit_effect": {**metric(gain_low + 3, 3), "n": 200}, **extra}


def test_a_baseline_that_did_not_edit_gives_no_ps_comparison():
    rome = {"ES": metric(99.5, 1), "PS": metric(91, 4), "NS": metric(66, 6)}
    ft_l = {"ES": metric(36.5, 6.5), "PS": metric(33, 6.5), "NS": metric(68.5, 6.5)}  # below chance
    kn = {"ES": metric(70, 5), "PS": metric(60, 6), "NS": metric(59, 6)}
    rows = [
        {"editor": "rome", **edited(rome, 60)},
        {"editor": "ft-l", **edited(ft_l, 0.8)},  # gained, significantly, yet ES under 50
        {"editor": "kn", **edited(kn, 20)},
    ]
    found = findings.rome_generalizes(rows)
    assert found.verdict == findings.AGREES and "FT-L did not edit" in found.evidence
    assert "compared with KN alone" in found.evidence
    rows[2]["metrics"]["PS"] = metric(95, 3)  # the baseline that edited generalizes better
    assert findings.rome_generalizes(rows).verdict == findings.DISAGREES
    rows[2]["collapsed"] = "no preference left"  # a collapsed KN is not compared either
    found = findings.rome_generalizes(rows)
    assert found.verdict == findings.NOT_JUDGED and "KN collapsed" in found.evidence
    rows[2].pop("collapsed")
    rows[2]["edit_effect"] = {**metric(1, 3), "n": 200}  # KN's gain's interval holds zero
    assert findings.rome_generalizes(rows).verdict == findings.NOT_JUDGED
    rows[2]["edit_effect"] = {**metric(20, 3), "n": 200}
    rows[0]["edit_effect"] = {**metric(1, 3), "n": 200}  # ROME itself did not edit
    assert findings.rome_generalizes(rows).verdict == findings.NOT_JUDGED


COLLAPSED_POINT = {
    **{k: metric(50, 7) for k in ("S", "ES", "PS", "NS")},
    **{k: {"mean": 0.0} for k in ("EM", "PM", "NM")},
}


def test_a_collapsed_point_is_never_better_and_is_listed():
    mass = {
        "memit": curve((1, 100, 0), (1000, 79, 1.5)),
        "rome": curve((1, 100, 0), (1000, 40, 2)),
    }
    assert findings.memit_holds_where_rome_collapses(mass).verdict == findings.AGREES
    mass["memit"][-1]["post"] = {**COLLAPSED_POINT, "S": metric(60, 2)}  # above ROME, collapsed
    found = findings.memit_holds_where_rome_collapses(mass)
    assert found.verdict == findings.DISAGREES and "never counted as better" in found.evidence
    sequential = {"kn": curve((1, 0, 0)), "rome": curve((1, 100, 0))}
    sequential["kn"].append({"size": 200, "post": COLLAPSED_POINT})
    sequential["rome"].append({"size": 200, "post": {**COLLAPSED_POINT, "EM": {"mean": 40.0}}})
    listed = findings.collapsed_models([], mass, sequential)
    assert listed.verdict == findings.COLLAPSED
    assert (
        "sequential kn at N = 200" in listed.evidence
        and "mass memit at N = 1000" in listed.evidence
    )
    assert "rome" not in listed.evidence.replace("memit", "")
    assert findings.collapsed_models([], {}, {"rome": sequential["rome"]}) is None


def test_the_early_site_says_what_one_layer_restoration_shows():
    trace = averages(3, 9)
    assert "not among this report's inputs" in findings.early_mlp_site(trace).evidence
    one = averages(0, 9)
    one["n_prompts"] = 40
    found = findings.early_mlp_site(trace, one)
    assert "largest effect is layer 0's, 0.200 [0.190, 0.210]" in found.evidence
    assert "no other layer's is above 0.121" in found.evidence  # the bump at layer 1: 0.2 e^-1/2
    assert found.verdict == findings.early_mlp_site(trace).verdict


def test_a_curve_point_collapses_by_its_perplexity_against_the_unedited_models():
    rate = {"mean": 100.0, "low": 90.0, "high": 100.0, "n": 20}
    post = {**dict.fromkeys(("ES", "PS", "NS"), rate), **dict.fromkeys(("EM", "PM", "NM"), 40.0)}
    point = {"size": 100, "post": post, "perplexity": {"mean": 66.0}}
    assert findings.point_collapse({**point, "unedited_perplexity": {"mean": 22.0}})  # 3x
    assert findings.point_collapse({**point, "unedited_perplexity": {"mean": 23.0}}) is None
    assert findings.point_collapse(point) is None  # no unedited value: the rule cannot fire


def test_alphaedit_against_memit_after_the_most_common_sequential_edits():
    def point(size, es, ps, ns, half=3.0):
        rates = {"ES": metric(es, half), "PS": metric(ps, half), "NS": metric(ns, half)}
        return {"size": size, "post": rates}

    sequential = {
        "alphaedit": [point(500, 99, 90, 70), point(2000, 98, 88, 69)],
        "memit": [point(500, 99, 90, 70), point(2000, 80, 70, 55), point(2500, 50, 50, 40)],
    }
    found = findings.read_results(None, [], [], {}, sequential)[-1]
    assert found.name.startswith("AlphaEdit") and "after 2,000 edits" in found.evidence
    assert found.verdict == findings.AGREES  # all three beyond the two intervals
    assert "unpaired intervals" in found.evidence and "ES 99.0 → 80.0" in found.evidence
    # The paired difference decides where the runs kept each case's scores: NS's holds zero.
    pair = {"size": 2000, "a": "alphaedit", "b": "memit", "n": 2000, "metrics": {
        "ES": metric(18, 2), "PS": metric(18, 3), "NS": metric(14, 15)}}  # fmt: skip
    paired = findings.alphaedit_holds_in_sequence(sequential, [pair])
    assert paired.verdict == findings.WITHIN and "on the same 2,000 cases" in paired.evidence
    pair["metrics"]["NS"] = metric(-1, 0.5)  # AlphaEdit below MEMIT on the neighbours
    paired = findings.alphaedit_holds_in_sequence(sequential, [pair])
    assert paired.verdict == findings.DISAGREES
    assert findings.alphaedit_holds_in_sequence({"memit": sequential["memit"]}) is None
