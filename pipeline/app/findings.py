"""The report's reading of its results against the paper's findings.

Each finding names a claim of Meng et al. 2022 (or, for editing at scale and in sequence, of
the MEMIT, r-ROME and AlphaEdit papers), the numbers this run gives for it, and a verdict by a rule stated
beside it, so that any rerun is read by the same rules rather than by a sentence written for one
set of numbers:

- **agrees**: the effect goes the paper's way and, where the numbers carry 95% intervals, the
  interval of the two things' paired difference excludes zero where both come from the same
  prompts or cases and the result files keep that difference, else the two things' own
  intervals do not overlap (or the rank test is significant);
- **the paper's direction, not significant at this n**: the paper's way, but that interval
  holds zero, or the two intervals overlap (or the rank test is not significant);
- **does not agree**: the other way;
- **not judged**: a side of the comparison did not edit or is collapsed (below), so the
  comparison would read scores of edits that did not happen; the evidence says which.

Two rules decide what may be compared at all (`tables.did_not_edit`, `metrics.collapse`):
an editor that **did not edit** (its ES not above the same cases' unedited ES beyond the paired
interval, or not above chance) has no PS or NS comparison drawn from it, and a **collapsed** row
or checkpoint is never the better side: a claim that it is better reads "does not agree".

Layers are counted from 0; MLP and attention effects are placed at the centre of their window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from metrics.collapse import collapsed
from pipeline.app.tables import did_not_edit
from pipeline.core.patching import BUCKETS

AGREES = "agrees"
WITHIN = "the paper's direction, not significant at this n"
DISAGREES = "does not agree"
NOT_JUDGED = "not judged"
COLLAPSED = "collapsed"  # the verdict of the finding that lists collapsed rows


@dataclass(frozen=True)
class Finding:
    name: str
    claim: str  # what the paper found, in one sentence
    evidence: str  # this run's numbers
    verdict: str  # AGREES, WITHIN or DISAGREES


def _row(averages: dict[str, Any], kind: str, bucket: str) -> np.ndarray | None:
    stats = averages.get("kinds", {}).get(kind)
    if stats is None:
        return None
    row = np.asarray(stats["mean"][BUCKETS.index(bucket)], dtype=float)
    return row if np.isfinite(row).any() else None


def _bound(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _compare(higher: dict[str, Any], lower: dict[str, Any]) -> str:
    """Verdict for "`higher` is above `lower`" from two {mean, low, high} summaries."""
    if higher["mean"] <= lower["mean"]:
        return DISAGREES
    return AGREES if _bound(higher["low"]) > _bound(lower["high"]) else WITHIN


def _paired(difference: dict[str, Any]) -> str:
    """Verdict for "A is above B" from the {mean, low, high} of their per-prompt difference."""
    if difference["mean"] <= 0:
        return DISAGREES
    return AGREES if _bound(difference["low"]) > 0 else WITHIN


def _contrast(averages: dict[str, Any], name: str, **expected: Any) -> dict[str, Any] | None:
    """The trace's paired difference `name` (see `pipeline.trace.paired_contrasts`), where it
    has one and it compares what the caller does (`expected`: its fields); NaN bounds -> None."""
    contrast = (averages.get("paired") or {}).get(name)
    if contrast is None or any(contrast.get(k) != v for k, v in expected.items()):
        return None
    bounds = {k: contrast.get(k) for k in ("low", "high")}
    finite = all(v is not None and np.isfinite(v) for v in bounds.values())
    return {**contrast, **(bounds if finite else {"low": None, "high": None})}


def _pct(metric: dict[str, Any], digits: int = 1) -> str:
    """`mean [low, high]`, or the mean alone where there is no interval."""
    low, high = metric.get("low"), metric.get("high")
    if low is None or high is None:
        return f"{metric['mean']:.{digits}f}"
    return f"{metric['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _peak(averages: dict[str, Any], kind: str, bucket: str) -> dict[str, Any] | None:
    """The {layer, layers, mean, low, high} of a (kind, bucket) row at its highest mean."""
    row = _row(averages, kind, bucket)
    if row is None:
        return None
    layer, stats, index = int(np.nanargmax(row)), averages["kinds"][kind], BUCKETS.index(bucket)

    def at(key: str) -> float | None:  # None where there is no interval (one prompt: NaN)
        values = stats.get(key)
        value = None if values is None else values[index][layer]
        return None if value is None or not np.isfinite(value) else float(value)

    return {
        "layer": layer,
        "layers": len(row),
        "mean": float(row[layer]),
        "low": at("low"),
        "high": at("high"),
    }


def one_layer_note(one_layer: dict[str, Any] | None) -> str:
    """What restoring one MLP at a time (a trace with `trace.window=1`) shows at the last
    subject token: its largest layer with the interval, and the next largest layer's effect.
    A 10-layer window places an effect only to within its width; one layer at a time shows
    whether one layer carries it (docs/tracing.md, "One layer at a time")."""
    if one_layer is None:
        return (
            "; restoring one MLP at a time (a trace with trace.window=1, the report's "
            "`one_layer_trace_dir`) is not among this report's inputs, so where within the "
            "10-layer window the effect sits is not shown here"
        )
    peak = _peak(one_layer, "mlp", "last_subject")
    if peak is None:
        return "; the one-layer trace has no MLP row at the last subject token"
    row = _row(one_layer, "mlp", "last_subject")
    others = np.delete(row, peak["layer"])
    return (
        f"; restoring one MLP at a time (window 1, {one_layer.get('n_prompts', '?')} prompts) "
        f"the last subject token's largest effect is layer {peak['layer']}'s, {_pct(peak, 3)}, "
        f"and no other layer's is above {np.nanmax(others):.3f}"
    )


def early_mlp_site(
    averages: dict[str, Any], one_layer: dict[str, Any] | None = None
) -> Finding | None:
    """The MLP effect at the last subject token peaks in the lower half of the network and
    above the MLP effect at the last token (the two peaks' intervals compared). The evidence
    says what one-layer restoration shows (`one_layer_note`); it does not change the verdict,
    which is about the paper's 10-layer windows."""
    subject, last = _peak(averages, "mlp", "last_subject"), _peak(averages, "mlp", "last")
    if subject is None or last is None:
        return None
    layers = subject["layers"]
    lower_half = subject["layer"] < layers / 2
    paired = _contrast(
        averages, "mlp_site", minus=[["last_subject", subject["layer"]], ["last", last["layer"]]]
    )
    return Finding(
        "Early site: MLP at the last subject token",
        "in GPT-2 XL the MLP's indirect effect peaks at the last subject token in the middle "
        "layers (about 15-20 of 48), far above the MLP's effect at the last token",
        f"the MLP's AIE at the last subject token peaks at layer {subject['layer']} of {layers} "
        f"({'lower' if lower_half else 'upper'} half) at {_pct(subject, 3)}; at the last "
        f"token its peak is {_pct(last, 3)} (layer {last['layer']})"
        + _paired_note(paired, "the last subject token's peak minus the last token's")
        + one_layer_note(one_layer),
        DISAGREES if not lower_half else _paired(paired) if paired else _compare(subject, last),
    )


def _paired_note(paired: dict[str, Any] | None, difference: str) -> str:
    if paired is None:
        return ""
    return f"; paired over the same {paired['n']} prompts, {difference} is {_pct(paired, 3)}"


def late_attention_site(averages: dict[str, Any]) -> Finding | None:
    """Attention's effect is largest at the last token, above the MLP's early-site peak layer
    (attention's peaks at the last token and at the last subject token compared)."""
    last, subject = _peak(averages, "attn", "last"), _peak(averages, "attn", "last_subject")
    mlp = _peak(averages, "mlp", "last_subject")
    if last is None or subject is None or mlp is None:
        return None
    later = last["layer"] > mlp["layer"]
    paired = _contrast(
        averages, "attn_site", minus=[["last", last["layer"]], ["last_subject", subject["layer"]]]
    )
    return Finding(
        "Late site: attention at the last token",
        "attention's indirect effect is concentrated at the last token, in layers above the "
        "MLP's early site",
        f"attention's AIE at the last token peaks at layer {last['layer']} at {_pct(last, 3)} "
        f"(MLP early-site peak: layer {mlp['layer']}); at the last subject token attention "
        f"peaks at {_pct(subject, 3)}"
        + _paired_note(paired, "the last token's peak minus the last subject token's"),
        DISAGREES if not later else _paired(paired) if paired else _compare(last, subject),
    )


def severed_mlp(averages: dict[str, Any]) -> Finding | None:
    """With the MLPs above a restored state frozen, the last subject token's hidden state loses
    more of its effect in the lower half of the layers than with attention frozen.

    Each curve is averaged over the lower half, its interval as the average of the layers'
    bounds: no narrower than the interval of the average itself (the half-width of a mean of
    estimates is at most the mean of their half-widths), so that comparison errs towards "not
    significant". The three curves come from the same prompts: where the trace keeps the paired
    difference (attention severed minus MLPs severed over the same layers, per prompt), its
    interval decides instead."""
    severed = averages.get("severed") or {}
    if not {"none", "mlp", "attn"} <= set(severed):
        return None
    half = len(severed["none"]["mean"]) // 2

    def lower_half(curve: dict[str, Any]) -> dict[str, Any]:
        def mean(key: str) -> float | None:
            values = curve.get(key)
            if values is None or any(v is None for v in values[:half]):
                return None
            value = float(np.mean(np.asarray(values[:half], dtype=float)))
            return value if np.isfinite(value) else None  # one prompt: no interval

        return {"mean": mean("mean"), "low": mean("low"), "high": mean("high")}

    none, mlp, attn = (lower_half(severed[k]) for k in ("none", "mlp", "attn"))
    drop_mlp, drop_attn = none["mean"] - mlp["mean"], none["mean"] - attn["mean"]
    paired = _contrast(averages, "severed", minus=["attn", "mlp"], layers=[0, half])
    verdict = _compare(attn, mlp) if paired is None else _paired(paired)
    return Finding(
        "Severed paths: the early site works through the MLPs",
        "severing the MLPs above a restored last-subject state removes much of its effect in "
        "the lower layers; severing attention removes far less",
        f"averaged over layers 0-{half - 1}, the hidden state's AIE is {_pct(none, 3)} with "
        f"nothing severed, {_pct(mlp, 3)} with the MLPs severed (a drop of {drop_mlp:.3f}) and "
        f"{_pct(attn, 3)} with attention severed (a drop of {drop_attn:.3f})"
        + ("; each interval is the average of the layers' own" if none["low"] is not None else "")
        + _paired_note(paired, "attention severed minus MLPs severed"),
        verdict if drop_mlp > 0 else DISAGREES,
    )


def rho_interval(
    effect: np.ndarray,
    rates: np.ndarray,
    *,
    confidence: float = 0.95,
    seed: int = 0,
    resamples: int = 2000,
) -> dict[str, float]:
    """Spearman's ρ between `effect` (one value per layer) and S by layer, with a percentile
    bootstrap over cases.

    `rates` is (layers, cases, 3): each case's ES, PS and NS after the edit at each layer, the
    same cases at every layer. A resample draws case indices once, for every layer together (a
    layer's score and its neighbours' rest on the same cases, so the layers are not
    exchangeable and are never permuted), recomputes each layer's S = hmean(ES, PS, NS) and
    ρ; the interval is the resampled ρ's percentiles. A resample whose S is the same at every
    layer has no rank order to follow the effect: it counts as ρ = 0 (leaving it out would
    keep only the resamples that hold the few cases making the difference)."""

    def spearman(scores: np.ndarray) -> float:
        if np.ptp(scores) == 0 or np.ptp(effect) == 0:
            return float("nan")
        return float(scipy_stats.spearmanr(effect, scores).statistic)

    def scores(index: np.ndarray) -> np.ndarray:
        means = rates[:, index].mean(axis=1)  # (layers, 3)
        with np.errstate(divide="ignore"):
            hmean = means.shape[1] / (1 / means).sum(axis=1)
        return np.where((means <= 0).any(axis=1), 0.0, hmean)

    n = rates.shape[1]
    rho = spearman(scores(np.arange(n)))
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    rhos = np.nan_to_num([spearman(scores(index)) for index in draws], nan=0.0)
    alpha = 1 - confidence
    low, high = np.quantile(rhos, [alpha / 2, 1 - alpha / 2])
    return {"mean": rho, "low": float(low), "high": float(high), "n": n}


def _sweep_rates(rows: list[dict[str, Any]]) -> np.ndarray | None:
    """(layers, cases, 3) ES, PS, NS of the cases every layer's job scored, or None where the
    rows carry no per-case values (or fewer than two cases in common)."""
    if not all(r.get("cases") for r in rows):
        return None
    common = sorted(set.intersection(*(set(r["cases"]) for r in rows)), key=str)
    if len(common) < 2:
        return None
    rates = np.array(
        [[[r["cases"][i][k] for k in ("ES", "PS", "NS")] for i in common] for r in rows],
        dtype=float,
    )
    return None if np.isnan(rates).any() else rates


def edit_where_trace_peaks(
    rows: list[dict[str, Any]], averages: dict[str, Any] | None, seed: int = 0
) -> Finding | None:
    """ROME's score by edited layer rises and falls with the MLP's causal effect there:
    Spearman's ρ between the two over the swept layers, positive, with a bootstrap interval over
    cases (`rho_interval`) that excludes zero. Without per-case scores, ρ alone (never
    "agrees")."""
    mlp = _row(averages, "mlp", "last_subject") if averages else None
    if mlp is None or len(rows) < 3:
        return None
    rows = [r for r in rows if r["layer"] < len(mlp)]
    layers = [r["layer"] for r in rows]
    scores = [r["post"]["S"]["mean"] for r in rows]
    if len(layers) < 3:
        return None
    best = layers[int(np.argmax(scores))]
    rates = _sweep_rates(rows)
    if rates is not None:
        rho = rho_interval(mlp[layers], rates, seed=seed)
        note = (
            f"{_pct(rho, 2)} (95% interval by a bootstrap over the {rho['n']} cases every "
            "layer was scored on, resampled jointly for all layers)"
        )
    else:
        rank = scipy_stats.spearmanr(mlp[layers], scores).statistic if np.ptp(scores) else np.nan
        rho = {"mean": float(rank), "low": None, "high": None}
        note = f"{rho['mean']:.2f} (no per-case scores: no interval)"
    positive = np.isfinite(rho["mean"]) and rho["mean"] > 0
    verdict = DISAGREES if not positive else _paired(rho) if rho["low"] is not None else WITHIN
    return Finding(
        "Editing works best where the trace peaks",
        "ROME's edits generalize best at the layers whose MLPs carry the largest causal effect",
        f"over {len(layers)} edited layers, S peaks at layer {best} "
        f"({max(scores):.1f}) and the MLP's effect at layer {int(np.nanargmax(mlp))}; "
        f"Spearman ρ between the MLP's AIE and S by layer = {note}",
        verdict,
    )


def point_collapse(point: dict[str, Any]) -> str | None:
    """`metrics.collapse.collapsed` for a mass or sequential curve point: its perplexity on
    the held-out text against the unedited model's (`unedited_perplexity`, which the report
    takes from the run's summary), where the point has them."""
    post = point.get("post") or {}
    return collapsed(post, point.get("perplexity"), point.get("unedited_perplexity"))


def _never_better(verdict: str, better: dict[str, Any], name: str, size: int) -> tuple[str, str]:
    """A claimed-better curve point that is collapsed cannot agree: (verdict, note)."""
    reason = point_collapse(better)
    if reason is None:
        return verdict, ""
    return DISAGREES, f"; {name} at N = {size:,} is collapsed ({reason}): never counted as better"


def _common_points(
    curves: dict[str, list[dict[str, Any]]], a: str, b: str
) -> tuple[dict[int, dict], dict[int, dict], list[int]] | None:
    """Editors `a` and `b`'s curve points by size and the sizes both reached (ascending);
    None where either has no curve or they share no size."""
    if a not in curves or b not in curves:
        return None
    points_a = {p["size"]: p for p in curves[a]}
    points_b = {p["size"]: p for p in curves[b]}
    common = sorted(set(points_a) & set(points_b))
    return (points_a, points_b, common) if common else None


def _all_of(verdicts: list[str]) -> str:
    """One verdict for a claim on several metrics: does not agree if any does not, agrees if
    all agree, else the paper's direction without significance."""
    return DISAGREES if DISAGREES in verdicts else AGREES if set(verdicts) == {AGREES} else WITHIN


def memit_holds_where_rome_collapses(mass: dict[str, list[dict[str, Any]]]) -> Finding | None:
    """At the largest number of edits both were run with, MEMIT's S is above ROME's."""
    found = _common_points(mass, "memit", "rome")
    if found is None:
        return None
    memit, rome, common = found
    size, smallest = common[-1], common[0]
    verdict, note = _never_better(
        _compare(memit[size]["post"]["S"], rome[size]["post"]["S"]), memit[size], "MEMIT", size
    )
    return Finding(
        "MEMIT holds up where ROME's edits pile up",
        "written together, thousands of MEMIT edits keep their scores, while ROME applied one "
        "edit after another degrades (the MEMIT paper's scaling curves)",
        f"at N = {size:,} edits S is {_pct(memit[size]['post']['S'])} for MEMIT and "
        f"{_pct(rome[size]['post']['S'])} for ROME (at N = {smallest}: "
        f"{memit[smallest]['post']['S']['mean']:.1f} and {rome[smallest]['post']['S']['mean']:.1f})"
        + note,
        verdict,
    )


def r_rome_keeps_the_neighbours(sequential: dict[str, list[dict[str, Any]]]) -> Finding | None:
    """After the most edits both were run with, one after another, r-ROME's NS is above ROME's.

    The claim is about damage beyond the edited facts, which NS measures; S is shown beside it."""
    found = _common_points(sequential, "r-rome", "rome")
    if found is None:
        return None
    points, rome_points, common = found
    r_rome = {size: p["post"] for size, p in points.items()}
    rome = {size: p["post"] for size, p in rome_points.items()}
    size = common[-1]
    verdict, note = _never_better(
        _compare(r_rome[size]["NS"], rome[size]["NS"]), points[size], "r-ROME", size
    )
    return Finding(
        "r-ROME keeps the neighbours where sequential ROME does not",
        "ROME's edits made one after another damage the model beyond the edited facts; r-ROME, "
        "whose key is the same in the update's numerator and denominator, does not (Gupta et "
        "al. 2024)",
        f"after {size:,} sequential edits NS is {_pct(r_rome[size]['NS'])} for r-ROME and "
        f"{_pct(rome[size]['NS'])} for ROME (S {_pct(r_rome[size]['S'])} and "
        f"{_pct(rome[size]['S'])})" + note,
        verdict,
    )


def alphaedit_holds_in_sequence(
    sequential: dict[str, list[dict[str, Any]]], pairs: list[dict[str, Any]] | None = None
) -> Finding | None:
    """After the most edits both were run with in sequence, AlphaEdit's ES, PS and NS are above
    MEMIT's (Fang et al. 2025, Table 1: 2,000 edits in batches of 100). Each metric is judged on
    the paired AlphaEdit − MEMIT difference over the cases both scored at that checkpoint where
    the runs kept each case's scores (`pairs`, `pairwise.scaling_comparisons`), else on the two
    points' own intervals. Agrees when all three agree; does not agree when any goes the other
    way (AlphaEdit not above MEMIT); else the paper's direction, not significant. MEMIT's own
    decline, first checkpoint to last, is shown beside it (different case sets: unpaired)."""
    found = _common_points(sequential, "alphaedit", "memit")
    if found is None:
        return None
    alpha, memit, common = found
    size, first = common[-1], common[0]
    paired = next(
        (
            c
            for c in pairs or []
            if c["size"] == size
            and c["a"].split(" (")[0] == "alphaedit"
            and c["b"].split(" (")[0] == "memit"
        ),
        None,
    )
    verdicts, parts = [], []
    for name in ("ES", "PS", "NS"):
        a, m = alpha[size]["post"][name], memit[size]["post"][name]
        if paired is not None and name in paired["metrics"]:
            d = paired["metrics"][name]
            verdicts.append(_paired(d))
            parts.append(
                f"{name} {a['mean']:.1f} against {m['mean']:.1f}, paired "
                f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"
            )
        else:
            verdicts.append(_compare(a, m))
            parts.append(f"{name} {_pct(a)} against {_pct(m)}")
    verdict = _all_of(verdicts)
    verdict, note = _never_better(verdict, alpha[size], "AlphaEdit", size)
    how = f"on the same {paired['n']:,} cases" if paired is not None else "unpaired intervals"
    decline = ", ".join(
        f"{name} {memit[first]['post'][name]['mean']:.1f} → {memit[size]['post'][name]['mean']:.1f}"
        for name in ("ES", "PS", "NS")
    )
    return Finding(
        "AlphaEdit keeps its edits where MEMIT's decline in sequence",
        "edits written batch after batch wear MEMIT's efficacy, generalization and specificity "
        "down, while AlphaEdit's projection onto the preserved keys' null space keeps them "
        "(Fang et al. 2025, Table 1: 2,000 edits in batches of 100)",
        f"after {size:,} edits, AlphaEdit against MEMIT ({how}): "
        + "; ".join(parts)
        + f"; MEMIT from {first:,} to {size:,} edits: {decline}"
        + note,
        verdict,
    )


def _change(change: dict[str, Any], sign: float) -> str:
    """Verdict for a paired change expected to have `sign` (+1 up, -1 down)."""
    mean, low, high = (sign * change[k] for k in ("mean", "low", "high"))
    if not mean > 0:
        return DISAGREES
    return AGREES if min(low, high) > 0 else WITHIN


def fine_tuning_tradeoff(table: list[dict[str, Any]]) -> Finding | None:
    """Unconstrained fine-tuning reaches its target (ES up) at the neighbours' cost (NS down):
    the change each case's scores make from before the edit to after it, paired case by case
    where the row has it, else the unedited row's interval against FT's."""
    rows = {r["editor"]: r for r in table}
    if "ft" not in rows:
        return None
    ft = rows["ft"]["metrics"]
    change = rows["ft"].get("change") or {}
    if {"ES", "NS"} <= set(change) and change["NS"].get("n", 0) >= 2:
        es, ns = change["ES"], change["NS"]
        verdicts = (_change(es, +1), _change(ns, -1))
        evidence = (
            f"FT: ES {_pct(ft['ES'])}, NS {_pct(ft['NS'])}; the edit's change on the same "
            f"{ns['n']} cases, paired: ES {es['mean']:+.1f} [{es['low']:+.1f}, {es['high']:+.1f}],"
            f" NS {ns['mean']:+.1f} [{ns['low']:+.1f}, {ns['high']:+.1f}] points"
        )
    elif "none" in rows:
        none = rows["none"]["metrics"]
        verdicts = (_compare(ft["ES"], none["ES"]), _compare(none["NS"], ft["NS"]))
        evidence = (
            f"FT: ES {_pct(ft['ES'])}, NS {_pct(ft['NS'])}; unedited: ES {_pct(none['ES'])}, "
            f"NS {_pct(none['NS'])}"
        )
    else:
        return None
    verdict = _all_of(verdicts)
    return Finding(
        "Fine-tuning: efficacy at the neighbours' cost",
        "FT reaches high efficacy but lowers neighbourhood success (Table 4)",
        evidence,
        verdict,
    )


def _standing(row: dict[str, Any]) -> str | None:
    """Why a Table 4 row cannot be compared ("did not edit", "collapsed"), or None."""
    if did_not_edit(row):
        effect = row["edit_effect"]
        return (
            f"did not edit: ES {_pct(row['metrics']['ES'])}, {effect['mean']:+.1f} "
            f"[{effect['low']:+.1f}, {effect['high']:+.1f}] points over the same cases unedited"
        )
    return f"collapsed ({row['collapsed']})" if row.get("collapsed") else None


def rome_generalizes(table: list[dict[str, Any]]) -> Finding | None:
    """ROME's paraphrase score above the best of the constrained baselines FT-L and KN that
    edited and did not collapse; not judged if none did, or if ROME itself did not edit."""
    rows = {r["editor"]: r for r in table}
    present = [name for name in ("ft-l", "kn") if name in rows]
    if "rome" not in rows or not present:
        return None
    excluded = {name: _standing(rows[name]) for name in ["rome", *present]}
    baselines = [name for name in present if excluded[name] is None]
    ps = {name: rows[name]["metrics"]["PS"] for name in rows}
    evidence = f"PS: ROME {_pct(ps['rome'])}, " + ", ".join(
        f"{name.upper()} {_pct(ps[name])}" for name in present
    )
    notes = "".join(f"; {name.upper()} {why}" for name, why in excluded.items() if why)
    if excluded["rome"] or not baselines:
        return Finding(
            "ROME generalizes where FT-L and KN do not",
            "of the specific methods, only ROME's edits carry to paraphrases (Table 4: PS)",
            evidence + notes + "; no PS comparison is drawn from an edit that did not happen",
            NOT_JUDGED,
        )
    best = max(baselines, key=lambda name: ps[name]["mean"])
    against = f"; ROME is compared with {best.upper()} alone" if notes else ""
    return Finding(
        "ROME generalizes where FT-L and KN do not",
        "of the specific methods, only ROME's edits carry to paraphrases (Table 4: PS)",
        evidence + notes + against,
        _compare(ps["rome"], ps[best]),
    )


def collapsed_models(
    table: list[dict[str, Any]],
    mass: dict[str, list[dict[str, Any]]],
    sequential: dict[str, list[dict[str, Any]]],
    more: list[MoreCurves] = (),
) -> Finding | None:
    """Every Table 4 row and curve point the collapse rule marks, by editor and protocol (and
    data, for curves on further data)."""
    found = [f"{r['editor']} ({r['collapsed']})" for r in table if r.get("collapsed")]
    sets = [("mass", "", mass), ("sequential", "", sequential)]
    sets += [(m.mode, f" on `{m.data}`", m.curves) for m in more]
    for mode, where, curves in sets:
        for editor, curve in sorted(curves.items()):
            sizes = [p["size"] for p in curve if point_collapse(p)]
            if sizes:
                reason = point_collapse(next(p for p in curve if p["size"] == sizes[0]))
                at = ", ".join(map(str, sizes))
                found.append(f"{mode} {editor}{where} at N = {at} ({reason})")
    if not found:
        return None
    return Finding(
        "Collapsed models",
        "(this benchmark's rule, `metrics/collapse.py`) an edited model that no longer prefers "
        "either answer, or whose perplexity is several times the unedited model's, is "
        "collapsed: its S, near 50 by chance, is never counted as better than another's",
        "; ".join(found),
        COLLAPSED,
    )


@dataclass(frozen=True)
class MoreCurves:
    """Scaling curves on a further data set than the report's first for that mode (e.g. ROME's
    mass curve on the reduced schema beside the full-schema curves): a claim whose editors the
    first data lacks is read here, on one data set, never across two."""

    mode: str  # mass or sequential
    data: str
    curves: dict[str, list[dict[str, Any]]]
    pairs: list[dict[str, Any]] | None = None  # editor against editor at each size


def _on_one_data(
    claim: Callable[[dict[str, list[dict[str, Any]]], list[dict[str, Any]] | None], Any],
    mode: str,
    first: dict[str, list[dict[str, Any]]],
    first_pairs: list[dict[str, Any]] | None,
    more: list[MoreCurves],
    editors: tuple[str, str],
) -> Finding | None:
    """`claim(curves, pairs)` on the first data whose curves hold both `editors` (the report's
    own first, then `more` in order); read elsewhere than the first, the evidence names its
    data."""
    if all(e in first for e in editors):
        return claim(first, first_pairs)
    for extra in more:
        if extra.mode == mode and all(e in extra.curves for e in editors):
            found = claim(extra.curves, extra.pairs)
            return found and replace(found, evidence=f"{found.evidence} (on `{extra.data}`)")
    return claim(first, first_pairs)  # as without further data: its own "not run" answer


def read_results(
    averages: dict[str, Any] | None,
    sweep: list[dict[str, Any]],
    table: list[dict[str, Any]],
    mass: dict[str, list[dict[str, Any]]],
    sequential: dict[str, list[dict[str, Any]]] | None = None,
    one_layer: dict[str, Any] | None = None,
    seed: int = 0,
    sequential_pairs: list[dict[str, Any]] | None = None,
    more: list[MoreCurves] = (),
) -> list[Finding]:
    """Every finding the given results can speak to, in the paper's order (then the later
    papers': MEMIT at scale, r-ROME and AlphaEdit in sequence; then the rows the collapse rule
    marks). `sequential_pairs`: editor against editor at each sequential checkpoint.
    `one_layer`: the averages of a one-layer (window 1) MLP trace, where there is one.
    `more`: curves on further data, read where the first data lacks a claim's editors."""
    found = []
    if averages:
        traced = [early_mlp_site(averages, one_layer), late_attention_site(averages)]
        traced = [*traced, severed_mlp(averages)]
        if averages.get("estimate"):  # an attribution-patching trace: say so in each reading
            traced = [
                f and replace(f, evidence=f"ESTIMATED by attribution patching, {f.evidence}")
                for f in traced
            ]
        found += traced
    found += [
        edit_where_trace_peaks(sweep, averages, seed=seed),
        rome_generalizes(table),
        fine_tuning_tradeoff(table),
        _on_one_data(
            lambda curves, _: memit_holds_where_rome_collapses(curves),
            "mass",
            mass,
            None,
            more,
            ("memit", "rome"),
        ),
        _on_one_data(
            lambda curves, _: r_rome_keeps_the_neighbours(curves),
            "sequential",
            sequential or {},
            None,
            more,
            ("r-rome", "rome"),
        ),
        _on_one_data(
            alphaedit_holds_in_sequence,
            "sequential",
            sequential or {},
            sequential_pairs,
            more,
            ("alphaedit", "memit"),
        ),
        collapsed_models(table, mass, sequential or {}, more),
    ]
    return [f for f in found if f is not None]


def markdown(found: list[Finding]) -> list[str]:
    lines = []
    for f in found:
        lines.append(f"- **{f.name}**: *{f.verdict}*. Paper: {f.claim}. Here: {f.evidence}.")
    return lines
