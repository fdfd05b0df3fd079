"""What each run cost: its compute time as its own files record it, for the report's cost table
and the README's totals.

- An independent run (Table 4, zsRE) records each case's seconds (`cases-*.jsonl`,
  `zsre-cases-*.jsonl`: its batch's wall time over its cases, generation included), so its cost
  is their sum whatever sittings it took; a case whose unedited texts another run had already
  sampled (`GenerationCache`) costs that much less.
- A mass or sequential run is one long computation: its cost is the sum of its sittings' wall
  times (run.json), each sitting's `seconds` at its end or, for one stopped before it,
  `seconds_so_far`, which the protocols write where they save their progress
  (`Run.note_time`). A sitting with neither (stopped before its first save, or run before
  these were recorded) is counted as untimed, and the total is then a lower bound; a run.json
  from before sittings were recorded counts as one sitting, timed by its summary's `seconds`.

Times are wall-clock on the machine and threads each run records, so they compare runs made
alike (the reference report's: one torch thread each, two jobs sharing two cores).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.app.results import read_jsonl
from pipeline.core import files

CASE_FILES = ("cases-*.jsonl", "zsre-cases-*.jsonl")


def run_cost(directory: Path) -> dict[str, Any] | None:
    """{"seconds", "cases" (None for a curve), "basis", "untimed" (sittings without a time),
    "threads"} of one run directory; None when it records no time at all."""
    meta_path = directory / "run.json"
    meta = files.read_json(meta_path) if meta_path.exists() else {}
    threads = (meta.get("machine") or {}).get("torch_threads")
    paths = sorted(p for pattern in CASE_FILES for p in directory.glob(pattern))
    records = read_jsonl(paths) if paths else []
    timed = [r["seconds"] for r in records if r.get("seconds") is not None]
    if timed:
        return {
            "seconds": float(sum(timed)),
            "cases": len(timed),
            "basis": "per-case seconds",
            "untimed": 0,
            "threads": threads,
        }
    sittings = meta.get("sittings")
    if sittings is None:  # a run.json from before sittings: one, timed by its summary
        summary_path = directory / "summary.json"
        summary = files.read_json(summary_path) if summary_path.exists() else {}
        sittings = [{"seconds": summary["seconds"]}] if "seconds" in summary else []
    times = [s.get("seconds", s.get("seconds_so_far")) for s in sittings]
    if not any(t is not None for t in times):
        return None
    return {
        "seconds": float(sum(t for t in times if t is not None)),
        "cases": None,
        "basis": f"{len(sittings)} sitting{'s' if len(sittings) > 1 else ''}",
        "untimed": sum(t is None for t in times),
        "threads": threads,
    }


def markdown(costs: dict[str, dict[str, Any]]) -> list[str]:
    """The cost table (label -> `run_cost`), its total last."""
    lines = [
        "| run | hours | cases | seconds per case | from | torch threads |",
        "|---|---|---|---|---|---|",
    ]
    for label, cost in costs.items():
        per_case = f"{cost['seconds'] / cost['cases']:.1f}" if cost["cases"] else "–"
        basis = cost["basis"]
        if cost["untimed"]:
            basis += f", {cost['untimed']} untimed (a lower bound)"
        lines.append(
            f"| {label} | {cost['seconds'] / 3600:.2f} | {cost['cases'] or '–'} | {per_case} | "
            f"{basis} | {cost['threads'] or '?'} |"
        )
    total = sum(c["seconds"] for c in costs.values()) / 3600
    bound = " (a lower bound)" if any(c["untimed"] for c in costs.values()) else ""
    lines.append(f"| **all** | **{total:.1f}**{bound} | | | | |")
    return lines
