"""A report's compact inputs, copied beside it, so that the report rebuilds from the repository.

`snapshot` copies the small text files (JSON, JSONL, YAML) of each input directory into the same
place relative to the results root under `dest`, leaving out the per-prompt trace grids
(`prompts/`), logs, locks and W&B files. The report stage copies its inputs first and then reads
only the copy, so the report committed beside its `inputs/` is exactly what
`python -m pipeline.report paths.results=<report>/inputs` writes again (tests/test_report.py).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

KEPT_SUFFIXES = {".json", ".jsonl", ".yaml"}
LEFT_OUT_DIRS = {"prompts", "logs", "wandb"}


def inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def snapshot(results: Path, sources: Sequence[Path], dest: Path) -> dict[Path, Path]:
    """Copy each existing source directory's inputs under `dest`; returns source -> copy.
    A source outside `results` cannot be placed and is left where it is (and said so)."""
    placed: dict[Path, Path] = {}
    for source in sources:
        if not source.exists():
            continue
        if not inside(source, results):
            log.warning("%s is outside %s: the report reads it in place", source, results)
            continue
        copy = dest / source.resolve().relative_to(results.resolve())
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source)
            hidden = any(part.startswith(".") for part in relative.parts)
            if (
                path.is_file()
                and path.suffix in KEPT_SUFFIXES
                and not hidden
                and not LEFT_OUT_DIRS.intersection(relative.parts[:-1])
            ):
                target = copy / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        placed[source] = copy
    return placed
