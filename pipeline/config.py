"""The composed config in-process, as `python -m pipeline <overrides>` composes it (tests,
benchmarks, notebooks, `python -m pipeline.slurm`), and a built-in stage's defaults as its
YAML file writes them (the one place a default lives; code that needs one reads it here)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides or []))


def group_defaults(group: str, option: str) -> DictConfig:
    """conf/<group>/<option>.yaml as written (no preset, no overrides)."""
    return OmegaConf.load(CONF_DIR / group / f"{option}.yaml")


def stage_defaults(stage: str) -> DictConfig:
    """conf/stages/<stage>.yaml as written."""
    return group_defaults("stages", stage)
