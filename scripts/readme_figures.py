"""The README's figures (docs/figures/), regenerated from traced prompts on disk.

    python scripts/readme_figures.py results/trace/smollm2-135m/known_1000 docs/figures

Trace figures come from the prompts under `<trace dir>/prompts/` (whatever has been traced);
the layer-sweep panel uses the README's five-case SmolLM2 sweep (successes per layer as the
README reports them; S without an interval, since its per-case rows are not kept).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metrics.counterfact import harmonic_mean  # noqa: E402
from metrics.intervals import wilson_ci  # noqa: E402
from pipeline.app import figures  # noqa: E402
from pipeline.trace import aggregate  # noqa: E402

# Edited layer: successes (of 5) for ES, PS, NS, as the README's first layer sweep reports them.
README_SWEEP = {0: (5, 5, 4), 6: (5, 4, 4), 14: (5, 4, 2)}


def main(trace_dir: Path, out: Path) -> None:
    records = [json.loads(p.read_text()) for p in sorted(trace_dir.glob("prompts/*.json"))]
    averages = aggregate(records, ["hidden", "mlp", "attn"])
    model = f"SmolLM2-135M, first {len(records)} known facts"
    figures.example_heatmap(out, records[0], "mlp", "example_mlp", "SmolLM2-135M")
    for kind in ("mlp", "attn"):
        figures.average_heatmap(out, averages, kind, model)
    paper = figures.average_heatmap(out / "paper", figures.pooled(averages, "paper"), "mlp", model)
    paper.replace(out / "average_mlp_paper.png")
    figures.last_subject_lines(out, averages, model)
    figures.severed_bars(out, averages, model)
    rows = []
    for layer, successes in README_SWEEP.items():
        post = {
            name: {k: v * 100 if k != "n" else v for k, v in wilson_ci(x, 5).items()}
            for name, x in zip(("ES", "PS", "NS"), successes, strict=True)
        }
        score = harmonic_mean([x / 5 for x in successes]) * 100
        post["S"] = {"mean": score, "low": math.nan, "high": math.nan, "n": 5}
        rows.append({"layer": layer, "n": 5, "post": post})
    figures.layer_sweep(out, rows, averages, "SmolLM2-135M (the README's 5-case sweep)")
    for pdf in out.rglob("*.pdf"):
        pdf.unlink()
    print(f"{len(records)} prompts -> {sorted(p.name for p in out.glob('*.png'))}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
