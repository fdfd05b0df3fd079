"""The command line around Hydra: quick `--help` and `--cfg`, and a hint for a misspelt key.

`python -m pipeline.<stage> --help` (or `--cfg job`, `--info`, ...) only needs the config, but
the stage's module imports torch and the model code first (several seconds). `answer_from_config`
runs from `pipeline/__init__.py`, before the stage's module is executed: when the command line
asks Hydra only about the configuration, the same Hydra app (same config, same flags) answers
without the stage's imports and the process exits. Every other command goes on to the stage.

A misspelt key (`modle=gpt2`, `data.limt=5`) gets Hydra's own error followed by the closest
valid key (`with_suggestions`).
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Hydra's flags that print something about the configuration and run no task.
INFO_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion")


def stage_of(argv: Sequence[str]) -> str | None:
    """The stage a `python [options] -m pipeline.<stage> ...` command line runs, if any."""
    for index, arg in enumerate(argv[:-1]):
        if arg == "-m":
            module = argv[index + 1]
            if module.startswith("pipeline.") and module.count(".") == 1:
                name = module.split(".", 1)[1]
                if (CONF_DIR / f"{name}.yaml").exists():
                    return name
            return None
    return None


def only_asks_about_config(args: Sequence[str]) -> bool:
    return any(arg in INFO_FLAGS or arg.startswith("--cfg=") for arg in args)


def register_resolvers() -> None:
    """The config's own interpolations: `${mode_dir:${eval.mode}}` in conf/evaluate.yaml gives a
    protocol other than the paper's (independent) a directory of its own, <editor>/mass or
    <editor>/sequential."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("mode_dir"):
        OmegaConf.register_new_resolver(
            "mode_dir", lambda mode: "" if mode == "independent" else f"/{mode}"
        )


def answer_from_config() -> None:
    """For `python -m pipeline.<stage> --help|--cfg ...`: answer and exit, importing only Hydra."""
    name = stage_of(getattr(sys, "orig_argv", ()))
    if name is None or not only_asks_about_config(sys.argv[1:]):
        return
    import hydra

    register_resolvers()

    @hydra.main(config_path=str(CONF_DIR), config_name=name, version_base="1.3")
    def config_only(cfg: Any) -> None:  # pragma: no cover - Hydra answers before calling it
        raise RuntimeError("the configuration flags run no task")

    with_suggestions(config_only, name)
    sys.exit(0)


def with_suggestions(entry: Callable[[], Any], name: str) -> Any:
    """Run a Hydra entry point; if it fails, name the closest valid key of each unknown one."""
    try:
        return entry()
    except SystemExit as stop:
        if stop.code not in (0, None):
            try:
                hints = suggestions(name, sys.argv[1:])
            except Exception:  # noqa: BLE001 - a hint must never hide Hydra's own error
                hints = []
            for hint in hints:
                print(hint, file=sys.stderr)
        raise


def config_keys(name: str) -> tuple[set[str], set[str]]:
    """Every dotted key of stage `name`'s composed config, and its config group names."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=name)
    tree = OmegaConf.to_container(cfg, resolve=False)
    keys = set(_dotted(tree))
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} | {"hydra/launcher"}
    return keys, groups


def _dotted(tree: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield f"{prefix}{key}"
            yield from _dotted(value, f"{prefix}{key}.")


def suggestions(name: str, args: Sequence[str]) -> list[str]:
    """A line per override whose key the stage's config lacks, naming the closest valid key."""
    keys, groups = config_keys(name)
    known = keys | groups
    out = []
    for arg in args:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue  # flags, and keys added or removed on purpose
        key = arg.split("=", 1)[0]
        if key in known or key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else "no setting has a similar name."
        out.append(
            f"'{key}' is not a setting of pipeline.{name}: {hint} "
            f"(`python -m pipeline.{name} --cfg job` shows them all)"
        )
    return out
