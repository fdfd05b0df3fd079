"""The command line around Hydra: quick `--help` and `--cfg`, and a hint for a misspelt key.

`python -m pipeline.<stage> --help` (or `--cfg job`, `--info`, ...) only needs the config, but
the stage's module imports torch and the model code first (several seconds). `answer_from_config`
runs from `pipeline/__init__.py`, before the stage's module is executed: when the command line
asks Hydra only about the configuration, the same Hydra app (same config, same flags) answers
without the stage's imports and the process exits. Every other command goes on to the stage.

Every other command line is checked first too (`check_overrides`, from the same place): a
misspelt key (`modle=gpt2`, `data.limt=5`) or group option (`editor=memmit`) stops in a second
naming the closest valid one, instead of after the stage's imports (6-8 s). What the check
cannot judge (sweep functions, Hydra's own settings, flags that change the config search) goes
on to Hydra, whose own error is followed by the same hints (`with_suggestions`).
"""

from __future__ import annotations

import contextlib
import difflib
import io
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
    """For `python -m pipeline.<stage> --help|--cfg ...`: answer and exit, importing only Hydra.
    Any other command line of a stage: its overrides checked (`check_overrides`)."""
    name = stage_of(getattr(sys, "orig_argv", ()))
    if name is None:
        return
    if not only_asks_about_config(sys.argv[1:]):
        check_overrides(name, sys.argv[1:])
        return
    import hydra

    register_resolvers()

    @hydra.main(config_path=str(CONF_DIR), config_name=name, version_base="1.3")
    def config_only(cfg: Any) -> None:  # pragma: no cover - Hydra answers before calling it
        raise RuntimeError("the configuration flags run no task")

    if not any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        with_suggestions(config_only, name)
        sys.exit(0)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            with_suggestions(config_only, name)
    finally:
        print(readable_data_only(name, out.getvalue()), end="")
    sys.exit(0)


def readable_data_only(name: str, help_text: str) -> str:
    """The help's `data:` line less the options whose records the stage does not read (its
    `data_kinds`): evaluate offered data=known, which it refuses."""
    from omegaconf import OmegaConf

    kinds = OmegaConf.load(CONF_DIR / f"{name}.yaml").get("data_kinds")
    if not kinds:
        return help_text
    readable = [
        option
        for option in group_options("data")
        if OmegaConf.load(CONF_DIR / "data" / f"{option}.yaml").get("kind") in kinds
    ]
    return "\n".join(
        f"data: {', '.join(readable)}" if line.startswith("data: ") else line
        for line in help_text.split("\n")
    )


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


# Flags that change where the config comes from: the check leaves such a command to Hydra.
CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_overrides(name: str, args: Sequence[str]) -> None:
    """Stop (exit 1) on an override that names no setting or no option of its group, with the
    closest valid one, before the stage's imports; anything this cannot judge goes to Hydra."""
    if any(arg.split("=", 1)[0] in CONFIG_FLAGS for arg in args):
        return
    try:
        problems = override_problems(name, args)
    except Exception:  # noqa: BLE001 - Hydra itself reports what composing could not
        return
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        sys.exit(1)


def override_problems(name: str, args: Sequence[str]) -> list[str]:
    """A line per override naming an option its group lacks, then (composed with the valid
    group choices, so each option's own keys count) per key the config lacks."""
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"}
    problems, chosen = [], []
    for arg in args:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if key not in groups or "(" in value:  # sweep functions: Hydra's to parse
            continue
        options = group_options(key)
        values = [v.strip() for v in value.split(",")]
        wrong = [v for v in values if v not in options and v != "null"]
        for option in wrong:
            close = difflib.get_close_matches(option, options, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(
                f"'{option}' is not an option of {key}: {hint}(options: {', '.join(options)})"
            )
        if not wrong:
            chosen.append(f"{key}={values[0]}")
    if problems:
        return problems
    return suggestions(name, args, chosen)


def config_keys(name: str, overrides: Sequence[str] = ()) -> tuple[set[str], set[str]]:
    """Every dotted key of stage `name`'s composed config (with `overrides`, group choices),
    and its config group names."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides))
    GlobalHydra.instance().clear()
    tree = OmegaConf.to_container(cfg, resolve=False)
    keys = set(_dotted(tree))
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} | {"hydra/launcher"}
    return keys, groups


def _dotted(tree: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield f"{prefix}{key}"
            yield from _dotted(value, f"{prefix}{key}.")


def suggestions(name: str, args: Sequence[str], chosen: Sequence[str] = ()) -> list[str]:
    """A line per override whose key the stage's config lacks (composed with the group
    choices `chosen`), naming the closest valid key."""
    keys, groups = config_keys(name, chosen)
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
