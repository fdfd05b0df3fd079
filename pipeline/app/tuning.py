"""Tuning studies read back from their trials' directories (`conf/tune/*.yaml`).

A study is a named sweep, `sweeps/tune-<editor>/evaluate/<model>/<data>/<editor>/<overrides>/`,
one directory per trial named by the values it tried. The objective is the one Optuna maximised,
recomputed from each trial's cases (`pipeline.app.stage.headline`: S, or S - 100 where the
paired ES change's interval reaches 0); the chosen trial is the first best in the order the
trials ran (Optuna keeps the first of equal values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pipeline.app.results import read_jsonl, summarize_records
from pipeline.app.stage import headline
from pipeline.core import files


@dataclass
class Trial:
    params: dict[str, float]  # the values tried, as the directory names them
    summary: dict[str, Any]  # summarize_records over the trial's cases
    objective: float
    started: str
    dir: Path


@dataclass
class Study:
    editor: str
    data: str
    trials: list[Trial] = field(default_factory=list)

    @property
    def best(self) -> Trial:
        return max(self.trials, key=lambda t: (t.objective, -self.trials.index(t)))

    @property
    def cases(self) -> list[int]:
        """The number of cases of each trial (one budget: all equal in a finished study)."""
        return sorted({t.summary["n_cases"] for t in self.trials})


def params_of(name: str) -> dict[str, float]:
    """`editor.layer=13,editor.lr=0.0047,tune=ft-l` -> {"editor.layer": 13, "editor.lr": 0.0047}."""
    params: dict[str, float] = {}
    for item in name.split(","):
        key, _, value = item.partition("=")
        if key.startswith("editor."):
            number = float(value)
            params[key] = int(number) if number.is_integer() and "." not in value else number
    return params


def read_studies(sweeps_dir: Path, model: str, seed: int = 0) -> list[Study]:
    """Every `tune-*` study under `sweeps_dir` for `model`, its trials in the order they ran."""
    studies = []
    for study_dir in sorted(sweeps_dir.glob("tune-*")):
        for editor_dir in sorted(study_dir.glob(f"evaluate/{model}/*/*")):
            study = Study(editor=editor_dir.name, data=editor_dir.parent.name)
            for job in sorted(p for p in editor_dir.iterdir() if (p / "config.yaml").exists()):
                records = read_jsonl(sorted(job.glob("cases-*.jsonl")))
                if not records:
                    continue
                summary = summarize_records(records, seed=seed)
                meta = files.read_json(job / "run.json") if (job / "run.json").exists() else {}
                limit = OmegaConf.select(OmegaConf.load(job / "config.yaml"), "data.limit")
                if limit is not None and summary["n_cases"] < int(limit):
                    continue  # a trial still running (or stopped): not part of the study yet
                score = headline("evaluate", summary)
                study.trials.append(
                    Trial(
                        params=params_of(job.name),
                        summary=summary,
                        objective=math.nan if score is None else score,
                        started=str(meta.get("started", "")),
                        dir=job,
                    )
                )
            study.trials.sort(key=lambda t: t.started)
            if study.trials:
                studies.append(study)
    return studies
