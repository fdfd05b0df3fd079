"""The pipeline's stages (`python -m pipeline.<stage>`), their plumbing (`app`), the data
(`data`) and the algorithms (`core`)."""

import sys as _sys

if "-m" in getattr(_sys, "orig_argv", ()):  # `python -m pipeline.<stage> --help`: answer now,
    from pipeline.app.cli import answer_from_config  # before the stage imports torch

    answer_from_config()
