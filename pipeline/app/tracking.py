"""A thin Weights & Biases layer that never kills a run.

Offline by default (no account needed; `wandb sync <dir>` uploads later). Any W&B failure — no
network, no login, a broken install — is logged once and the tracker turns itself off.

A run's id comes from its results directory, shard and sweep (`run_id`), so a requeued or rerun
job resumes its W&B run instead of starting another, and a sweep job starts its own; a `--multirun`'s group comes from the sweep's
own overrides (`sweep_group`), so continuing a sweep stays in its group. Each stage logs its
results directory as an artifact (`log_directory`) and declares the directories it read
(`use_directory`): online W&B draws the lineage known -> trace -> report and stats -> evaluate
-> summarize / report; offline (where W&B cannot record a use) the inputs' names and digests go
into the run's config under `inputs`, and equal the digests of the artifacts the upstream runs
logged. After `wandb sync`, `link_inputs` turns that config key into W&B's own lineage (each
synced run uses the upstream artifact version of that digest):

    wandb sync results/wandb/offline-run-*
    python -m pipeline.app.tracking <entity>/<project>
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")


class Tracker:
    def __init__(
        self,
        *,
        mode: str = "offline",
        project: str = "rome-pipeline",
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
        job_type: str | None = None,
        config: Mapping[str, Any] | None = None,
        directory: str | Path | None = None,
        run_id: str | None = None,
        system_metrics: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"tracking.mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.run = None
        self.directory: Path | None = None
        self.inputs: dict[str, dict[str, str]] = {}
        if mode == "disabled":
            return
        try:
            import wandb

            if directory is not None:
                self.directory = Path(directory)
                self.directory.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                mode=mode,
                project=project,
                entity=entity,
                group=group,
                name=name,
                tags=list(tags),
                job_type=job_type,
                config=dict(config or {}),
                dir=str(self.directory) if self.directory else None,
                id=run_id,
                resume="allow" if run_id else None,
                reinit="finish_previous",
                settings=wandb.Settings(
                    silent=True, console="off", x_disable_stats=not system_metrics
                ),
            )
        except Exception as error:  # noqa: BLE001 - tracking must never kill a run
            self._disable("init", error)

    @property
    def active(self) -> bool:
        return self.run is not None

    @property
    def run_dir(self) -> Path | None:
        """The directory of this run's W&B files (offline runs: `wandb/offline-run-*`)."""
        return Path(self.run.dir).parent if self.run is not None else None

    def _disable(self, what: str, error: Exception) -> None:
        log.warning(
            "W&B %s failed (%s: %s); continuing without tracking", what, type(error).__name__, error
        )
        self.run = None

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001
            self._disable(what, error)

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self._call("log", lambda: self.run.log(dict(metrics), step=step))

    def summary(self, values: Mapping[str, Any]) -> None:
        def update():
            for key, value in _flatten(values).items():
                self.run.summary[key] = value

        self._call("summary", update)

    def table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        def log_table():
            import wandb

            self.run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

        self._call("table", log_table)

    def image(self, key: str, path: str | Path) -> None:
        def log_image():
            import wandb

            self.run.log({key: wandb.Image(str(path))})

        self._call("image", log_image)

    def images(self, paths: Mapping[str, str | Path]) -> None:
        """Several images in one step (a report's figures side by side on one W&B page)."""
        if not paths:
            return

        def log_images():
            import wandb

            self.run.log({key: wandb.Image(str(path)) for key, path in paths.items()})

        self._call("images", log_images)

    def histogram(self, key: str, values: Sequence[float]) -> None:
        def log_histogram():
            import wandb

            self.run.log({key: wandb.Histogram(list(values))})

        self._call("histogram", log_histogram)

    def log_directory(self, directory: str | Path, kind: str, name: str) -> None:
        """The directory's result files as artifact `name` of type `kind` (the run's output)."""

        def log_artifact():
            artifact = directory_artifact(directory, kind, name)
            if artifact is not None:
                self.run.log_artifact(artifact)

        self._call("artifact", log_artifact)

    def use_directory(self, directory: str | Path, kind: str, name: str) -> None:
        """Declare a results directory this run read (an upstream run's artifact)."""

        def use():
            artifact = directory_artifact(directory, kind, name)
            if artifact is None:
                return
            self.inputs[name] = {"type": kind, "digest": artifact.digest, "path": str(directory)}
            self.run.config.update({"inputs": self.inputs}, allow_val_change=True)
            if self.mode == "online":  # offline runs cannot record a use; the config has it
                self.run.use_artifact(artifact)

        self._call("use_artifact", use)

    def finish(self, exit_code: int = 0) -> None:
        """End the run; a non-zero exit code shows it as failed (crashed), not finished."""
        self._call("finish", lambda: self.run.finish(exit_code=exit_code))
        self.run = None


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{name}/"))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
    return flat


def chosen_mode(tracking: Mapping[str, Any]) -> tuple[str, str]:
    """The W&B mode a run uses and where it comes from.

    An explicit `tracking.mode` (the command line, an experiment, or `ROME_WANDB_MODE` through
    the config's default) wins over W&B's own `WANDB_MODE`, so an exported `WANDB_MODE=online`
    never uploads a run meant to stay local; `WANDB_MODE` applies where `tracking.mode` is null
    (no choice made), and offline where neither is set. (wandb.init's `mode=` beats the
    environment itself, so the mode chosen here is the mode W&B runs in.)
    """
    configured, exported = tracking.get("mode"), os.environ.get("WANDB_MODE")
    if configured is not None:
        mode, source = configured, "tracking.mode"
        if exported and exported != configured:
            log.info("tracking.mode=%s wins over the exported WANDB_MODE=%s", mode, exported)
    elif exported:
        mode, source = exported, "WANDB_MODE"
    else:
        mode, source = "offline", "default"
    return ("offline" if mode == "dryrun" else mode), source


def from_config(tracking: Mapping[str, Any], **kwargs: Any) -> Tracker:
    """A tracker from the `tracking` config group, in the mode `chosen_mode` gives."""
    mode, _ = chosen_mode(tracking)
    sweep_group = kwargs.pop("group", None)  # a --multirun's own group, unless one is configured
    system = tracking.get("system_metrics", "auto")
    return Tracker(
        mode=mode,
        project=tracking.get("project", "rome-pipeline"),
        entity=tracking.get("entity"),
        group=tracking.get("group") or sweep_group,
        tags=list(tracking.get("tags") or ()),
        system_metrics=gpu_visible() if system == "auto" else bool(system),
        **kwargs,
    )


def gpu_visible() -> bool:
    """Whether this process sees a CUDA device (system metrics matter there, and cost nothing)."""
    torch = sys.modules.get("torch")  # never imported just for this
    try:
        return bool(torch is not None and torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def run_id(out_dir: str | Path, part: str = "", group: str | None = None) -> str:
    """A W&B run id that is the same for every run of one job: its results directory, part
    (the shard, or the merge) and sweep group (None: not in a sweep), so a requeued or rerun job
    resumes its W&B run, while a sweep job never adopts the run of a standalone run (or of
    another sweep) that wrote the same directory: it would move that run into its group and
    overwrite its summary."""
    key = f"{Path(out_dir).resolve()}|{part}" + (f"|{group}" if group else "")
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# Overrides that say where or how a job runs, not what it computes: a sweep resumed on another
# launcher, results root or device is the same sweep.
PLACE_KEYS = ("hydra/", "hydra.", "tracking.", "paths.", "device=", "shard.index=")


def sweep_group(stage: str, overrides: Iterable[str]) -> str:
    """The W&B group of a --multirun, from the sweep's own overrides (not its start time).

    `overrides` are the sweep's command-line overrides as given (`editor.layer=0,6,14`); the
    same sweep started again gets the same group.
    """
    kept = sorted(o for o in overrides if not o.lstrip("+~").startswith(PLACE_KEYS))
    text = " ".join(kept) or "defaults"
    if len(text) > 80:
        text = text[:60] + "... " + hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{stage}: {text}"


ARTIFACT_SUFFIXES = (".json", ".jsonl", ".yaml", ".md", ".csv", ".tex")


def artifact_name(relative: str | Path) -> str:
    """A valid artifact name (letters, digits, - _ .) for a results directory's relative path."""
    name = re.sub(r"[^\w.-]+", "-", str(relative)).strip("-")
    if len(name) > 120:
        name = name[:100] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return name


def directory_artifact(directory: str | Path, kind: str, name: str):
    """A W&B artifact of a results directory: its result files (JSON, JSONL, YAML, tables,
    index) and figures/*.png; per-prompt files and PDFs stay out. None if there are none."""
    import wandb

    directory = Path(directory)
    paths = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in ARTIFACT_SUFFIXES)
    paths += sorted((directory / "figures").glob("*.png"))
    if not paths:
        return None
    artifact = wandb.Artifact(name, type=kind, metadata={"path": str(directory)})
    for path in paths:
        artifact.add_file(str(path), name=str(path.relative_to(directory)))
    return artifact


def link_inputs(api: Any, project: str) -> list[str]:
    """Record, on every synced run of `project` ("entity/project") that read results offline,
    the use of each input's artifact version (`inputs` in its config: name, type, digest) as
    W&B lineage, which an offline run cannot record itself. Idempotent: a run already using
    that version is left as it is. `api` is a `wandb.Api()`; returns a line per link made, and
    per input whose version is not (yet) synced."""
    done = []
    for run in api.runs(project):
        inputs = (run.config or {}).get("inputs") or {}
        if not inputs:
            continue
        used = {(a.name.split(":")[0], a.digest) for a in run.used_artifacts()}
        for name, entry in sorted(inputs.items()):
            if (name, entry["digest"]) in used:
                continue
            versions = api.artifacts(entry["type"], f"{project}/{name}")
            match = next((v for v in versions if v.digest == entry["digest"]), None)
            if match is None:
                done.append(f"{run.id}: no synced version of {name} with digest {entry['digest']}")
                continue
            run.use_artifact(match)
            done.append(f"{run.id} uses {name}:{match.version}")
    return done


class RunningRates:
    """Running ES, PS, NS (percent) over the cases finished so far, for logging as a run goes."""

    NAMES = ("ES", "PS", "NS")

    def __init__(self, metrics: Iterable[Mapping[str, float]] = ()):
        self.sums = dict.fromkeys(self.NAMES, 0.0)
        self.counts = dict.fromkeys(self.NAMES, 0)
        self.cases = 0
        self.add(metrics)

    def add(self, metrics: Iterable[Mapping[str, float]]) -> dict[str, float]:
        for case in metrics:
            self.cases += 1
            for name in self.NAMES:
                value = case.get(name, math.nan)
                if not math.isnan(value):
                    self.sums[name] += value
                    self.counts[name] += 1
        return self.values()

    def values(self) -> dict[str, float]:
        out = {"progress/cases_done": self.cases}
        for name in self.NAMES:
            if self.counts[name]:
                out[f"progress/{name}"] = 100 * self.sums[name] / self.counts[name]
        return out


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """What an offline run's `.wandb` file holds: history rows, summary, the run's id, group and
    config, the artifacts it logged and its exit code (None if it never finished).

    The file is W&B's append-only log (a 7-byte header, then 32 KiB blocks of leveldb-style
    records holding protobuf `Record`s); reading it back checks what a run really logged
    without `wandb sync`.
    """
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    path = next(Path(run_dir).glob("*.wandb"))
    data = path.read_bytes()
    header, block = 7, 32768
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    records: list[bytes] = []
    pending = b""
    offset = header
    while offset + 7 <= len(data):
        room = block - (offset % block)
        if room < 7:
            offset += room
            continue
        length, kind = struct.unpack("<HB", data[offset + 4 : offset + 7])
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 1:  # FULL
            records.append(chunk)
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            records.append(pending + chunk)
            pending = b""
        elif kind == 0 and length == 0:  # zero padding at a block's end
            offset += room - 7
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    run: dict[str, Any] = {}
    artifacts: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    exit_code = None
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        which = record.WhichOneof("record_type")
        if which == "run":
            r = record.run
            run = {"id": r.run_id, "group": r.run_group, "job_type": r.job_type,
                   "name": r.display_name, "resumed": r.resumed}  # fmt: skip
            for item in r.config.update:
                config[_item_key(item)] = json.loads(item.value_json)
        elif which == "config":
            for item in record.config.update:
                config[_item_key(item)] = json.loads(item.value_json)
        elif which == "exit":
            exit_code = record.exit.exit_code
        elif which == "artifact":
            a = record.artifact
            artifacts.append(
                {
                    "name": a.name,
                    "type": a.type,
                    "digest": a.digest,
                    "files": sorted(e.path for e in a.manifest.contents),
                    "metadata": json.loads(a.metadata) if a.metadata else {},
                }
            )
        elif which == "history":
            items = record.history.item
            history.append({_item_key(i): json.loads(i.value_json) for i in items})
        elif which == "request" and record.request.WhichOneof("request_type") == "partial_history":
            # Depending on timing, a `log` call may be stored as the request rather than as the
            # history row the service derives from it.
            items = record.request.partial_history.item
            history.append({_item_key(i): json.loads(i.value_json) for i in items})
        elif which == "summary":
            for item in record.summary.update:
                summary[_item_key(item)] = json.loads(item.value_json)
    return {
        "history": history,
        "summary": summary,
        "run": run,
        "config": config,
        "artifacts": artifacts,
        "exit_code": exit_code,
    }


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


if __name__ == "__main__":  # after `wandb sync`: python -m pipeline.app.tracking entity/project
    import wandb

    for line in link_inputs(wandb.Api(), sys.argv[1]):
        print(line)
