"""A report's compact inputs, copied beside it, so that the report rebuilds from the repository.

`snapshot` copies the small text files (JSON, JSONL, YAML) of each input directory into the same
place relative to the results root under `dest`, leaving out the per-prompt trace grids
(`prompts/`), logs, locks and W&B files. The report stage copies its inputs first and then reads
only the copy, so the report committed beside its `inputs/` is exactly what
`python -m pipeline.report paths.results=<report>/inputs` writes again (tests/test_report.py).

The same copy carries runs in progress between checkouts: `save` is `snapshot` from the command
line, and `restore` copies a saved copy back into an empty results directory, where the runs
resume (each stage resumes from its `cases-*.jsonl`, `mass.json` and `run.json`; a sequential
run's weights, `sequential-progress.pt`, are not copied: it makes its edits again and keeps the
checkpoints it scored where the weights come out the same). A JSONL file is
copied up to its last complete line, since a run may be writing it.

    python -m pipeline.app.snapshot save RESULTS SAVED DIR...   # DIRs under RESULTS
    python -m pipeline.app.snapshot restore SAVED RESULTS
"""

from __future__ import annotations

import argparse
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
                copy_complete(path, copy / relative)
        placed[source] = copy
    return placed


def copy_complete(path: Path, target: Path) -> None:
    """A copy of `path`; of a JSONL file, only its complete lines (a torn last line is left out)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        text = path.read_bytes()
        target.write_bytes(text[: text.rfind(b"\n") + 1])
    else:
        shutil.copyfile(path, target)


def restore(saved: Path, results: Path) -> list[Path]:
    """Copy each file of a saved copy that `results` lacks back into it; returns those copied.
    A file already in `results` is kept: it is the same run's later work, or another run's."""
    copied = []
    for path in sorted(saved.rglob("*")):
        target = results / path.relative_to(saved)
        if path.is_file() and not target.exists():
            copy_complete(path, target)
            copied.append(target)
    return copied


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.app.snapshot", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    save = commands.add_parser("save", help="copy DIRs' small files from RESULTS to SAVED")
    save.add_argument("results", type=Path)
    save.add_argument("saved", type=Path)
    save.add_argument("dirs", type=Path, nargs="+")
    back = commands.add_parser("restore", help="copy SAVED's files that RESULTS lacks into it")
    back.add_argument("saved", type=Path)
    back.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    if args.command == "save":
        placed = snapshot(args.results, args.dirs, args.saved)
        print(f"saved {len(placed)} of {len(args.dirs)} directories to {args.saved}")
    else:
        copied = restore(args.saved, args.results) if args.saved.is_dir() else []
        print(f"restored {len(copied)} files from {args.saved} to {args.results}")


if __name__ == "__main__":
    main()
