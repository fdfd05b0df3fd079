"""The report's reading of its results against the paper's findings.

Each finding names a claim of Meng et al. 2022 (or, for editing at scale and in sequence, of
the MEMIT and r-ROME papers), the numbers this run gives for it, and a verdict by a rule stated
beside it, so that any rerun is read by the same rules rather than by a sentence written for one
set of numbers:

- **agrees**: the effect goes the paper's way and, where the numbers carry 95% intervals, the
  interval of the two things' paired difference excludes zero where both come from the same
  prompts or cases and the result files keep that difference, else the two things' own
  intervals do not overlap (or the rank test is significant);
- **the paper's direction, not significant at this n**: the paper's way, but that interval
  holds zero, or the two intervals overlap (or the rank test is not significant);
- **does not agree**: the other way.

Layers are counted from 0; MLP and attention effects are placed at the centre of their window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from pipeline.core.patching import BUCKETS

AGREES = "agrees"
WITHIN = "the paper's direction, not significant at this n"
DISAGREES = "does not agree"


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


def early_mlp_site(averages: dict[str, Any]) -> Finding | None:
    """The MLP effect at the last subject token peaks in the lower half of the network and
    above the MLP effect at the last token (the two peaks' intervals compared)."""
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
        + _paired_note(paired, "the last subject token's peak minus the last token's"),
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


def rank_correlation(x: np.ndarray, y: np.ndarray, resamples: int = 9999) -> tuple[float, float]:
    """Spearman's ρ and its one-sided permutation p-value (ρ > 0): exact over every pairing up
    to 8 points, else from `resamples` seeded random pairings. Unlike the t approximation it
    cannot call three points in a row significant."""
    rx, ry = scipy_stats.rankdata(x), scipy_stats.rankdata(y)

    def pearson(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        a = a - a.mean(axis=axis, keepdims=True)
        b = b - b.mean(axis=axis, keepdims=True)
        return (a * b).sum(axis) / np.sqrt((a * a).sum(axis) * (b * b).sum(axis))

    if np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return float("nan"), 1.0
    test = scipy_stats.permutation_test(
        (rx, ry),
        pearson,
        permutation_type="pairings",
        vectorized=True,
        alternative="greater",
        n_resamples=resamples,
        rng=np.random.default_rng(0),
    )
    return float(test.statistic), float(test.pvalue)


def edit_where_trace_peaks(
    rows: list[dict[str, Any]], averages: dict[str, Any] | None, alpha: float = 0.05
) -> Finding | None:
    """ROME's score by edited layer rises and falls with the MLP's causal effect there: a
    Spearman rank correlation between the two over the swept layers, positive and significant
    at `alpha` by a permutation test."""
    mlp = _row(averages, "mlp", "last_subject") if averages else None
    if mlp is None or len(rows) < 3:
        return None
    layers = [r["layer"] for r in rows if r["layer"] < len(mlp)]
    scores = [r["post"]["S"]["mean"] for r in rows if r["layer"] < len(mlp)]
    if len(layers) < 3:
        return None
    rho, p = rank_correlation(mlp[layers], np.asarray(scores, dtype=float))
    best = layers[int(np.argmax(scores))]
    significant = AGREES if p < alpha else WITHIN
    verdict = significant if np.isfinite(rho) and rho > 0 else DISAGREES
    return Finding(
        "Editing works best where the trace peaks",
        "ROME's edits generalize best at the layers whose MLPs carry the largest causal effect",
        f"over {len(layers)} edited layers, S peaks at layer {best} "
        f"({max(scores):.1f}) and the MLP's effect at layer {int(np.nanargmax(mlp))}; "
        f"Spearman ρ between the MLP's AIE and S by layer = {rho:.2f} (p = {p:.2g})",
        verdict,
    )


def memit_holds_where_rome_collapses(mass: dict[str, list[dict[str, Any]]]) -> Finding | None:
    """At the largest number of edits both were run with, MEMIT's S is above ROME's."""
    if "memit" not in mass or "rome" not in mass:
        return None
    memit = {p["size"]: p for p in mass["memit"]}
    rome = {p["size"]: p for p in mass["rome"]}
    common = sorted(set(memit) & set(rome))
    if not common:
        return None
    size, smallest = common[-1], common[0]
    return Finding(
        "MEMIT holds up where ROME's edits pile up",
        "written together, thousands of MEMIT edits keep their scores, while ROME applied one "
        "edit after another degrades (the MEMIT paper's scaling curves)",
        f"at N = {size:,} edits S is {_pct(memit[size]['post']['S'])} for MEMIT and "
        f"{_pct(rome[size]['post']['S'])} for ROME (at N = {smallest}: "
        f"{memit[smallest]['post']['S']['mean']:.1f} and {rome[smallest]['post']['S']['mean']:.1f})",
        _compare(memit[size]["post"]["S"], rome[size]["post"]["S"]),
    )


def r_rome_keeps_the_neighbours(sequential: dict[str, list[dict[str, Any]]]) -> Finding | None:
    """After the most edits both were run with, one after another, r-ROME's NS is above ROME's.

    The claim is about damage beyond the edited facts, which NS measures; S is shown beside it."""
    if "r-rome" not in sequential or "rome" not in sequential:
        return None
    r_rome = {p["size"]: p["post"] for p in sequential["r-rome"]}
    rome = {p["size"]: p["post"] for p in sequential["rome"]}
    common = sorted(set(r_rome) & set(rome))
    if not common:
        return None
    size = common[-1]
    return Finding(
        "r-ROME keeps the neighbours where sequential ROME does not",
        "ROME's edits made one after another damage the model beyond the edited facts; r-ROME, "
        "whose key is the same in the update's numerator and denominator, does not (Gupta et "
        "al. 2024)",
        f"after {size:,} sequential edits NS is {_pct(r_rome[size]['NS'])} for r-ROME and "
        f"{_pct(rome[size]['NS'])} for ROME (S {_pct(r_rome[size]['S'])} and "
        f"{_pct(rome[size]['S'])})",
        _compare(r_rome[size]["NS"], rome[size]["NS"]),
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
    verdict = (
        DISAGREES if DISAGREES in verdicts else AGREES if set(verdicts) == {AGREES} else WITHIN
    )
    return Finding(
        "Fine-tuning: efficacy at the neighbours' cost",
        "FT reaches high efficacy but lowers neighbourhood success (Table 4)",
        evidence,
        verdict,
    )


def rome_generalizes(table: list[dict[str, Any]]) -> Finding | None:
    """ROME's paraphrase score above the best of the constrained baselines FT-L and KN."""
    rows = {r["editor"]: r["metrics"] for r in table}
    baselines = [name for name in ("ft-l", "kn") if name in rows]
    if "rome" not in rows or not baselines:
        return None
    best = max(baselines, key=lambda name: rows[name]["PS"]["mean"])
    return Finding(
        "ROME generalizes where FT-L and KN do not",
        "of the specific methods, only ROME's edits carry to paraphrases (Table 4: PS)",
        f"PS: ROME {_pct(rows['rome']['PS'])}, "
        + ", ".join(f"{name.upper()} {_pct(rows[name]['PS'])}" for name in baselines),
        _compare(rows["rome"]["PS"], rows[best]["PS"]),
    )


def read_results(
    averages: dict[str, Any] | None,
    sweep: list[dict[str, Any]],
    table: list[dict[str, Any]],
    mass: dict[str, list[dict[str, Any]]],
    sequential: dict[str, list[dict[str, Any]]] | None = None,
) -> list[Finding]:
    """Every finding the given results can speak to, in the paper's order (then the later
    papers': MEMIT at scale, r-ROME in sequence)."""
    found = []
    if averages:
        found += [early_mlp_site(averages), late_attention_site(averages), severed_mlp(averages)]
    found += [
        edit_where_trace_peaks(sweep, averages),
        rome_generalizes(table),
        fine_tuning_tradeoff(table),
        memit_holds_where_rome_collapses(mass),
        r_rome_keeps_the_neighbours(sequential or {}),
    ]
    return [f for f in found if f is not None]


def markdown(found: list[Finding]) -> list[str]:
    lines = []
    for f in found:
        lines.append(f"- **{f.name}**: *{f.verdict}*. Paper: {f.claim}. Here: {f.evidence}.")
    return lines
