"""A thin Weights & Biases layer that never kills a run.

Offline by default (no account needed; `wandb sync <dir>` uploads later). Any W&B failure — no
network, no login, a broken install — is logged once and the tracker turns itself off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
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
    ):
        if mode not in MODES:
            raise ValueError(f"tracking.mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.run = None
        self.directory: Path | None = None
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
                reinit="finish_previous",
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
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

    def finish(self) -> None:
        self._call("finish", lambda: self.run.finish())
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


def from_config(tracking: Mapping[str, Any], **kwargs: Any) -> Tracker:
    """A tracker from the `tracking` config group; env vars WANDB_MODE etc. still apply."""
    mode = os.environ.get("WANDB_MODE", tracking.get("mode", "offline"))
    sweep_group = kwargs.pop("group", None)  # a --multirun's own group, unless one is configured
    if mode == "dryrun":
        mode = "offline"
    return Tracker(
        mode=mode,
        project=tracking.get("project", "rome-pipeline"),
        entity=tracking.get("entity"),
        group=tracking.get("group") or sweep_group,
        tags=list(tracking.get("tags") or ()),
        **kwargs,
    )


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """The history rows and summary stored in an offline run's `.wandb` file.

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
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        which = record.WhichOneof("record_type")
        if which == "history":
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
    return {"history": history, "summary": summary}


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)
