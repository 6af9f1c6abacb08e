"""The runner's input resolution: `input_stage` as one stage or a list of candidates in order of
preference (stages planned in this invocation first, then stages completed in the run dir)."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline import artifacts
from pipeline.stage import Stage
from pipeline.runner import ConfigError, StagePlan, prepare_stage_dir, resolve_input, upstream_stage
from tests.conftest import compose_config

CANDIDATES = OmegaConf.create({"input_stage": ["grpo", "dpo", "sft", "pretrain"], "init": None})


def completed(run_dir: Path, stage: str, config_hash: str, final: bool = True) -> None:
    (run_dir / stage).mkdir(parents=True)
    artifacts.write_manifest(run_dir / stage, {"stage": stage, "status": "completed", "config_hash": config_hash})
    if final:
        (run_dir / stage / "final").mkdir()
        (run_dir / stage / "final" / "config.json").write_text("{}")


def test_planned_candidates_win_in_order_of_preference(tmp_path):
    completed(tmp_path, "dpo", "d0")  # an older result in the run dir
    planned = {"pretrain": "p1", "sft": "s1"}
    assert upstream_stage(CANDIDATES, tmp_path, planned) == "sft"
    path, fingerprint = resolve_input(compose_config(), "test_time", CANDIDATES, tmp_path, planned)
    assert path == tmp_path / "sft" / "final" and fingerprint == "s1"


def test_completed_candidates_in_order_of_preference_when_none_is_planned(tmp_path):
    completed(tmp_path, "pretrain", "p0")
    completed(tmp_path, "sft", "s0")
    completed(tmp_path, "grpo", "g0", final=False)  # no final/: not a usable input
    path, fingerprint = resolve_input(compose_config(), "test_time", CANDIDATES, tmp_path, {})
    assert path == tmp_path / "sft" / "final" and fingerprint == "s0"


def test_no_candidate_names_them_all(tmp_path):
    with pytest.raises(ConfigError, match=r"first of grpo, dpo, sft, pretrain that runs before it.*stages.test_time.init"):
        resolve_input(compose_config(), "test_time", CANDIDATES, tmp_path, {})
    single = OmegaConf.create({"input_stage": "pretrain", "init": None})
    with pytest.raises(ConfigError, match=r"starts from pretrain/final/, which is not in"):
        resolve_input(compose_config(), "sft", single, tmp_path, {})


def test_test_time_hash_follows_its_reward_model(tmp_path):
    from stages import test_time

    cfg = compose_config(["run.stages=[test_time]"])
    assert test_time.extra_inputs(cfg, tmp_path, {}) is None  # auto, and no reward stage in the run
    completed(tmp_path, "reward", "r0")
    assert test_time.extra_inputs(cfg, tmp_path, {}) == "reward:r0"
    assert test_time.extra_inputs(cfg, tmp_path, {"reward": "r1"}) == "reward:r1"  # rerun in this invocation
    no_best_of_n = compose_config(["stages.test_time.methods=[greedy]"])
    assert test_time.extra_inputs(no_best_of_n, tmp_path, {"reward": "r1"}) is None


def test_a_stage_without_final_is_skipped_when_completed(tmp_path):
    evaluates = Stage("test_time", run=lambda ctx: {}, splits=(), uses=(), writes_final=False)
    trains = Stage("sft", run=lambda ctx: {}, splits=(), uses=())
    stage_dir = tmp_path / "test_time"
    stage_dir.mkdir()
    artifacts.write_manifest(stage_dir, {"status": "completed", "config_hash": "h1"})
    assert prepare_stage_dir(StagePlan("test_time", evaluates, None, None, "h1"), stage_dir, False) == ("skip", None)
    assert prepare_stage_dir(StagePlan("sft", trains, None, None, "h1"), stage_dir, False) == ("start", None)
    assert json.loads((stage_dir / "stage.json").read_text())["status"] == "completed"
