"""Every config of every stage composed with every option of each of its groups, and checked by
the schema (`pipeline.app.schema.validate_config`), as lightning-hydra-template's
tests/test_configs.py does: a yaml that no longer composes, or composes into a value the schema
refuses, fails here rather than in a user's run. Only data a stage cannot read (`data_kinds`)
is refused, and by the schema, naming the option."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from pipeline.app.cli import register_resolvers
from pipeline.app.schema import ConfigError, validate_config
from tests.conftest import ROOT

CONF = ROOT / "conf"
STAGES = sorted(p.stem for p in CONF.glob("*.yaml") if p.stem != "common")


def groups_of(stage: str) -> list[str]:
    """The config groups in a stage's defaults list (Hydra's own groups aside)."""
    defaults = OmegaConf.load(CONF / f"{stage}.yaml").get("defaults", [])
    return [
        next(iter(entry))
        for entry in defaults
        if not isinstance(entry, str) and not next(iter(entry)).startswith(("hydra", "override"))
    ]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


CASES = [
    (stage, group, option)
    for stage in STAGES
    for group in groups_of(stage)
    for option in options(group)
]


def composed(stage: str, *overrides: str):
    """The stage's config as a run sees it: Hydra's own part set (sweeps read `${hydra:...}`),
    then left out."""
    cfg = compose(stage, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def mandatory(tree, prefix: str = "") -> list[str]:
    """The dotted keys left `???` (OmegaConf.missing_keys resolves interpolations, and fails
    on one that reads a missing value)."""
    if isinstance(tree, dict):
        return [k for key, value in tree.items() for k in mandatory(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if tree == "???" else []


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def test_every_stage_has_groups_to_compose():
    assert {"evaluate", "trace", "stats", "known", "report", "summarize"} <= set(STAGES)
    assert {"model", "data", "editor", "experiment"} <= set(groups_of("evaluate"))
    assert len(CASES) > 100


@pytest.mark.parametrize(("stage", "data"), [("evaluate", "known"), ("trace", "counterfact")])
def test_data_a_stage_cannot_read_is_refused_by_the_schema(stage, data):
    """evaluate with data=known used to pass the schema and stop only after the model loaded."""
    with pytest.raises(ConfigError, match=r"data \(\S+\) holds \w+ records, which this stage"):
        validate_config(composed(stage, f"data={data}"))


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_composes_as_it_is(stage):
    cfg = composed(stage)
    validate_config(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize(("stage", "group", "option"), CASES)
def test_every_group_option_composes_and_passes_the_schema(stage, group, option):
    cfg = composed(stage, f"{group}={option}")
    kinds = cfg.get("data_kinds")
    if group == "data" and kinds is not None and cfg.data.kind not in kinds:
        with pytest.raises(ConfigError, match=rf"data \({cfg.data.name}\) holds {cfg.data.kind}"):
            validate_config(cfg)
        return
    validate_config(cfg)
    for key in mandatory(OmegaConf.to_container(cfg, resolve=False)):
        OmegaConf.update(cfg, key, "given")  # what the user must give (sweep=named: its name)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
