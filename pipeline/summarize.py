"""Stage `summarize`: evaluation runs as the paper's Table 4 (Markdown, LaTeX, CSV), every
pair of editors run on the same cases compared case by case (`app/pairwise.py`), and the zsRE
runs as a table of their own (`zsre_table.*`: efficacy, paraphrase, specificity).

    python -m pipeline.summarize [runs_dir=results/evaluate] [allow_partial=true]

Each run directory `<model>/<data>/<editor>/` is summarized again from its per-case files. Per
model and data, the unedited model comes first (the `editor=none` run, or else the "pre" scores
every run records), then one row per editor. Cells are `mean [low, high]` with the 95% interval
(Wilson for ES/PS/NS, bootstrap for S, t for the rest); n is the number of cases.

An unfinished run (a sharded run not merged, or merged with `--allow-partial`: see
`tables.partial_run`) stops the stage with the list, as `pipeline.merge` stops on the same
directory; `allow_partial=true` includes such rows, marked "partial".
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from pipeline.app import pairwise
from pipeline.app.stage import Run, stage
from pipeline.app.tables import collect, collect_zsre, markdown, write_table, write_zsre_table


@stage("summarize")
def main(cfg: DictConfig, run: Run) -> None:
    table = collect(Path(cfg.runs_dir), seed=int(cfg.seed))
    zsre = collect_zsre(Path(cfg.runs_dir))
    if not table and not zsre:
        raise SystemExit(f"no evaluation runs under {cfg.runs_dir}")
    unfinished = [f"  {r['dir']}: {r['partial']}" for r in table if r.get("partial")]
    if unfinished and not cfg.allow_partial:
        raise SystemExit(
            "unfinished runs (their rows would average over part of the cases):\n"
            + "\n".join(unfinished)
            + "\nMerge them when every shard is done (python -m pipeline.merge DIR), or include "
            "them marked partial: allow_partial=true."
        )
    for directory in sorted({row["dir"] for row in table + zsre}):
        run.uses(Path(directory), "evaluate")  # W&B lineage: evaluate -> summarize
    found = []
    if table:
        write_table(run, table)
        found = pairwise.comparisons(table, seed=int(cfg.seed))
        pairwise.write(run, found)
        print(markdown(table))
    if zsre:
        print(write_zsre_table(run, zsre)["md"])
    run.write_summary(
        {
            "rows": len(table),
            "zsre_rows": len(zsre),
            "pairs": len(found),
            "partial": [r["dir"] for r in table if r.get("partial")],
            "runs_dir": str(cfg.runs_dir),
        }
    )


if __name__ == "__main__":
    main()
