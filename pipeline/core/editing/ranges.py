"""Where an editor's numeric settings keep its algebra defined, each range with the reason.

Outside these ranges an edit is not a worse edit but a broken one: a singular solve (NaN, or
update norms of 1e18), or an update that is exactly zero, which the metrics would then score as
if it were an edit. Each hyperparameter class lists its ranges in `RANGES`; `check_ranges`
refuses a setting outside its range before anything runs, naming it, its value and why.
Only bounds that follow from the algebra are here, not advice on good values: a negative
v_weight_decay or kl_factor is perverse but bounded (δ is clamped), and tests use one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """low < value (or low ≤ value with `low_closed`), and value < high (≤ with `high_closed`);
    a bound of None is open. `why`: what breaks outside."""

    low: float | None = None
    high: float | None = None
    why: str = ""
    low_closed: bool = False
    high_closed: bool = False

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        low_ok = self.low is None or value > self.low or (self.low_closed and value == self.low)
        high_ok = (
            self.high is None or value < self.high or (self.high_closed and value == self.high)
        )
        return low_ok and high_ok

    def text(self) -> str:
        low = None if self.low is None else f"{'≥' if self.low_closed else '>'} {self.low:g}"
        high = None if self.high is None else f"{'≤' if self.high_closed else '<'} {self.high:g}"
        return " and ".join(bound for bound in (low, high) if bound) or "finite"


def positive(why: str) -> Range:
    return Range(0, why=why)


def at_least(low: float, why: str) -> Range:
    return Range(low, why=why, low_closed=True)


def check_ranges(hparams: Any, ranges: Mapping[str, Range]) -> None:
    """Raise ValueError naming every setting of `hparams` outside its range (None: not set)."""
    problems = []
    for name, bound in ranges.items():
        value = getattr(hparams, name)
        if value is not None and not bound.holds(float(value)):
            problems.append(f"{name}={value!r} must be {bound.text()}: {bound.why}")
    if problems:
        raise ValueError("; ".join(problems))


def settings_text(hparams: Any, ranges: Mapping[str, Range]) -> str:
    """`name=value` of the ranged settings: the ones an update's numbers rest on."""
    return ", ".join(f"{name}={getattr(hparams, name)!r}" for name in ranges)


# The v* / z optimisation that ROME, MEMIT and its successors share (`values.py`).
VALUE_RANGES: dict[str, Range] = {
    "v_num_grad_steps": at_least(
        2, "the last pass only measures, so fewer than 2 passes leave δ = 0 (no edit)"
    ),
    "v_lr": positive("Adam's step size: at 0 δ never moves from 0 (no edit)"),
    "clamp_norm_factor": positive("‖δ‖ ≤ factor · ‖v₀‖: at 0 every δ is clamped to 0 (no edit)"),
}
