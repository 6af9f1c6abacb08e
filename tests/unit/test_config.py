from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pipeline import artifacts
from pipeline.stage import Stage
from pipeline.runner import ConfigError, StagePlan, plan_stages, prepare_stage_dir
from tests.conftest import CONF, compose_config, run_cli
from tests.unit.test_artifacts import make_checkpoint

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("accelerate", "deepspeed"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_composes(group):
    options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert options, f"conf/{group} is empty"
    for option in options:
        for preset in ("demo", "smoke"):
            choice = f"{group}=[{option}]" if group == "stages" else f"{group}={option}"
            cfg = compose_config([choice, f"preset={preset}"])
            # every interpolation resolves; ??? (a value the user must give) is allowed
            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
            assert cfg.run.dir == "outputs/default"


def test_presets_only_set_sizes_and_steps():
    demo, smoke = compose_config(["preset=demo"]), compose_config(["preset=smoke"])
    for key in ("model", "optim", "peft", "run", "seed"):
        assert demo[key] == smoke[key], f"preset changed {key}"
    assert smoke.stages.pretrain.max_steps < demo.stages.pretrain.max_steps
    assert smoke.stages.sft.max_steps < demo.stages.sft.max_steps


def test_overrides_apply_and_unknown_keys_fail():
    cfg = compose_config(["stages.pretrain.max_steps=50", "model=tiny_dense", "run.dir=/tmp/x"])
    assert cfg.stages.pretrain.max_steps == 50 and cfg.model.arch == "qwen3" and cfg.run.dir == "/tmp/x"
    with pytest.raises(ConfigCompositionException, match="nope"):
        compose_config(["stages.pretrain.nope=1"])
    with pytest.raises(ConfigCompositionException, match="tiny_moe"):  # lists the valid choices
        compose_config(["model=huge"])


def test_unknown_stage_names_valid_ones(tmp_path):
    cfg = compose_config(["run.stages=[pretrain,pretrian]"])
    with pytest.raises(ConfigError, match=r"unknown stage 'pretrian'.*valid stages: pretrain"):
        plan_stages(cfg, tmp_path)


def test_missing_input_checkpoint_fails_before_compute(tmp_path):
    cfg = compose_config([f"stages.pretrain.init={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match=r"stages.pretrain.init=.*nowhere is not a checkpoint directory"):
        plan_stages(cfg, tmp_path)


def test_cli_errors_are_clear_and_fast(tmp_path):
    proc = run_cli("run.stages=[bogus]", f"run.dir={tmp_path}", check=False, timeout=120)
    assert proc.returncode == 2
    assert "unknown stage 'bogus'" in proc.stderr and "valid stages: pretrain" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written
    proc = run_cli("stages.pretrain.nope=1", check=False, timeout=120)
    assert proc.returncode != 0 and "nope" in proc.stderr
    proc = run_cli("--cfg", "job", "preset=smoke", timeout=120)
    assert "max_steps: 30" in proc.stdout and "arch: qwen3_moe" in proc.stdout


def write_stage(stage_dir: Path, config_hash: str, status: str, final=True, checkpoints=()):
    """final: True (a final/), False (none) or the config hash recorded in final/ by commit_final."""
    stage_dir.mkdir(parents=True)
    artifacts.write_manifest(stage_dir, {"status": status, "config_hash": config_hash})
    if final:
        (stage_dir / "final").mkdir()
        (stage_dir / "final" / "config.json").write_text("{}")
    if isinstance(final, str):
        artifacts.write_json_atomic(stage_dir / "final" / artifacts.FINAL_RECORD, {"config_hash": final, "metrics": {}})
    for step in checkpoints:
        make_checkpoint(stage_dir, step)


@pytest.mark.parametrize(
    "status, stored_hash, final, checkpoints, force, expected",
    [
        ("completed", "h1", True, (), False, ("skip", None)),
        ("completed", "h1", True, (), True, ("replace", None)),
        ("completed", "h0", True, (), False, ("replace", None)),  # config changed
        ("completed", "h1", False, (), False, ("start", None)),  # final/ went missing
        ("running", "h1", False, (10, 20), False, ("resume", "checkpoint-20")),
        ("failed", "h1", False, (10,), False, ("resume", "checkpoint-10")),
        ("running", "h0", False, (10,), False, ("replace", None)),  # never resume another config
        ("running", "h1", False, (), False, ("start", None)),
        # killed after final/ was committed: record it, do not train again
        ("running", "h1", "h1", (10, 20), False, ("finish", None)),
        ("failed", "h1", "h1", (), False, ("finish", None)),
        ("running", "h1", "h0", (10,), False, ("resume", "checkpoint-10")),  # a final/ of another config
        ("running", "h1", True, (10,), False, ("resume", "checkpoint-10")),  # a final/ with no record
    ],
)
def test_skip_resume_decisions(tmp_path, status, stored_hash, final, checkpoints, force, expected):
    stage_dir = tmp_path / "pretrain"
    write_stage(stage_dir, stored_hash, status, final, checkpoints)
    action, checkpoint = prepare_stage_dir(StagePlan("pretrain", Stage("pretrain", run=lambda ctx: {}, splits=(), uses=()), None, None, "h1"), stage_dir, force)
    assert (action, checkpoint.name if checkpoint else None) == expected


def test_model_hf_needs_a_real_path(tmp_path):
    with pytest.raises(ConfigError, match=r"model=hf needs model.path: a local model directory or a hub name"):
        plan_stages(compose_config(["model=hf"]), tmp_path)
    with pytest.raises(ConfigError, match=r"model.path=.* is not a checkpoint directory"):
        plan_stages(compose_config(["model=hf", f"model.path={tmp_path}"]), tmp_path)


def test_a_malformed_override_is_named_even_after_a_flag_with_a_value():
    done = run_cli("--cfg", "job", "stages.pretrain.max_steps=[1,", check=False)
    assert done.returncode == 2
    assert "cannot parse the override 'stages.pretrain.max_steps=[1,'" in done.stderr
    assert "'job'" not in done.stderr
