"""The trainer group: what every training stage's arguments get, and what is refused up front."""

import pytest

from pipeline import trainer_settings
from pipeline.config_check import check_config
from pipeline.errors import ConfigError
from tests.conftest import compose_config


CKPT = trainer_settings.CHECKPOINTING  # activation_checkpointing from transformers 5.24 on


def test_defaults_on_this_cpu_machine(tmp_path):
    cfg = compose_config(["run.name=exp"])  # the demo preset: no activation checkpointing on the tiny model
    args = trainer_settings.arguments(cfg, "sft", tmp_path)
    assert (args["bf16"], args["fp16"], args[CKPT]) == (False, False, False)
    assert args["report_to"] == ["tensorboard"] and args["run_name"] == "exp/sft"
    assert trainer_settings.precision(cfg, "sft") == "fp32"  # auto without a GPU
    assert trainer_settings.attn_implementation(cfg, "sft") is None  # auto: transformers' choice
    general = trainer_settings.arguments(compose_config(["preset=none"]), "sft", tmp_path)
    assert general[CKPT] and general[f"{CKPT}_kwargs"] == {"use_reentrant": False}  # on, as in TRL's configs


def test_a_stage_overrides_the_group(tmp_path):
    cfg = compose_config(["trainer.precision=bf16", "trainer.gradient_checkpointing=true",
                          "stages.grpo.trainer={precision:fp32,report_to:none}"])
    sft, grpo = trainer_settings.arguments(cfg, "sft", tmp_path), trainer_settings.arguments(cfg, "grpo", tmp_path)
    assert sft["bf16"] and sft[f"{CKPT}_kwargs"] == {"use_reentrant": False}
    assert not grpo["bf16"] and grpo["report_to"] == [] and grpo[CKPT]
    assert cfg.trainer.precision == "bf16"  # the group is untouched


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.attn_implementation=flash_attention_2"], r"trainer.attn_implementation=flash_attention_2 needs a CUDA GPU \(none here\); use sdpa or eager"),
        (["trainer.attn_implementation=magic"], r"trainer.attn_implementation=magic: must be one of auto, sdpa, eager"),
        (["trainer.precision=fp16"], r"trainer.precision=fp16 needs a CUDA GPU \(none here\); use bf16 \(CPU autocast\) or fp32"),
        (["trainer.precision=fp8"], r"trainer.precision=fp8: must be one of auto, bf16, fp16, fp32"),
        (["trainer.use_liger_kernel=true"], r"trainer.use_liger_kernel=true needs a CUDA GPU"),
        (["trainer.report_to=[tensorboard,nope]"], r"trainer.report_to=nope: must be none or any of tensorboard, wandb, mlflow, trackio"),
        (["stages.sft.trainer={precision:fp16}"], r"stages.sft.trainer.precision=fp16 needs a CUDA GPU"),
        (["stages.sft.trainer={nope:1}"], r"stages.sft.trainer.nope: not a key of the trainer group"),
    ],
)
def test_impossible_settings_fail_before_compute(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_config(["run.stages=[pretrain,sft]", *overrides]))


def test_a_tracker_that_is_not_installed_is_named(monkeypatch):
    real = trainer_settings.importlib.util.find_spec
    monkeypatch.setattr(trainer_settings.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError, match=r"trainer.report_to=wandb needs the wandb package \(pip install wandb\); or set trainer.report_to=none"):
        check_config(compose_config(["run.stages=[sft]", "trainer.report_to=wandb"]))
