"""The grpo stage rejects bad input and config before any stage of the run computes."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.runner import ConfigError, plan_stages
from pipeline.tokenizer import train_tokenizer
from tests.conftest import compose_config

TEXTS = ["Q: 47+18-9=?\n47+18=65\n65-9=56\nA: 56\n"] * 20


def checkpoint(path: Path, adapter: bool = False) -> Path:
    """A checkpoint directory as far as validation reads it."""
    path.mkdir(parents=True)
    # a small MoE, as the demo preset's train_only scope expects (checked on the meta device)
    (path / "config.json").write_text('{"model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 64, '
                                      '"num_experts": 4, "moe_intermediate_size": 32, "vocab_size": 300}')
    save_file({"stand_in": torch.zeros(1)}, str(path / "model.safetensors"))  # weights are checked: an intact file
    if adapter:
        (path / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    train_tokenizer(TEXTS, 300).save_pretrained(path)
    return path


def plan_grpo(tmp_path: Path, *overrides: str, init: Path | None = None):
    init = init or (tmp_path / "model" if (tmp_path / "model").is_dir() else checkpoint(tmp_path / "model"))
    cfg = compose_config(["run.stages=[grpo]", f"stages.grpo.init={init}", f"run.dir={tmp_path / 'run'}", *overrides])
    return plan_stages(cfg, tmp_path / "run")


def test_valid_config_passes(tmp_path):
    (plan,) = plan_grpo(tmp_path)
    assert plan.name == "grpo" and plan.input_path.name == "model"


def test_adapter_input_is_rejected_naming_the_fix(tmp_path):
    init = checkpoint(tmp_path / "prefix-final", adapter=True)
    with pytest.raises(ConfigError, match=r"is a PEFT adapter, not a model.*stages.grpo.init=.*prefix-final/base"):
        plan_grpo(tmp_path, init=init)


def test_reward_model_checkpoint_is_accepted_and_fingerprinted(tmp_path):
    rm = checkpoint(tmp_path / "rm")
    with_rm = ["stages.grpo.reward_weights.reward_model=0.5"]
    (plan,) = plan_grpo(tmp_path, f"stages.grpo.reward_model={rm}", *with_rm)
    (unused,) = plan_grpo(tmp_path, f"stages.grpo.reward_model={rm}")  # weight 0: the model is not read
    (other,) = plan_grpo(tmp_path, f"stages.grpo.reward_model={checkpoint(tmp_path / 'rm2')}", *with_rm)
    assert len({plan.config_hash, unused.config_hash, other.config_hash}) == 3
    # auto: fine when the reward stage runs first in the same invocation
    sft = checkpoint(tmp_path / "sft")
    cfg = compose_config(["run.stages=[reward,grpo]", f"stages.reward.init={sft}", f"stages.grpo.init={sft}",
                          f"run.dir={tmp_path / 'run'}", *with_rm])
    assert [p.name for p in plan_stages(cfg, tmp_path / "run")] == ["reward", "grpo"]


def test_demo_experts_scope_on_a_dense_model_fails_when_the_chain_is_planned(tmp_path):
    """model=tiny_dense gets its own preset, whose grpo trains the last block's dense MLP; the MoE
    demo's experts pattern forced onto it (preset=demo) is refused from the model config alone,
    before pretrain computes anything."""
    dense = compose_config(["model=tiny_dense", f"run.dir={tmp_path}"])
    assert list(dense.stages.grpo.train_only) == [r"layers\.{last}\.mlp\.", r"^model\.norm\."]
    assert [p.name for p in plan_stages(dense, tmp_path)][-2:] == ["grpo", "test_time"]
    cfg = compose_config(["model=tiny_dense", "preset=demo", f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"train_only: .*experts.* matches no parameter of Qwen3ForCausalLM; "
                                          r"fix it or set stages.grpo.train_only=\[\]"):
        plan_stages(cfg, tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["peft=prefix"], r"not peft=prefix; use peft=none or peft=lora"),
        (["stages.grpo.num_generations=1", "stages.grpo.batch_size=8"], r"num_generations=1: a group needs at least 2"),
        (["stages.grpo.num_generations=6", "stages.grpo.batch_size=64"], r"batch_size \* grad_accum = 64 completions per step must be a multiple of num_generations=6"),
        (["stages.grpo.loss_type=ppo"], r"loss_type='ppo' is unknown; valid: grpo, dr_grpo, dapo"),
        (["stages.grpo.loss_type=grpo", "stages.grpo.zero_variance=filter"], r"zero_variance=filter .* loss_type=grpo averages per sequence"),
        (["stages.grpo.zero_variance=drop"], r"zero_variance='drop'; valid: keep, filter, downweight"),
        (["stages.grpo.scale_rewards=std"], r"scale_rewards='std'; valid: group, batch, none"),
        (["stages.grpo.beta=-0.1"], r"beta=-0.1 must be >= 0"),
        (["stages.grpo.filter_samples=4", "stages.grpo.filter_max_pass_rate=1.0"], r"filter_max_pass_rate=1.0 in \[0, 1\) \(1 would keep every prompt\)"),
        (["stages.grpo.filter_samples=-1"], r"filter_samples=-1 must be >= 0"),
        (["stages.grpo.scaling_warmup_fraction=1.0"], r"scaling_warmup_fraction=1.0 must be in \[0, 1\)"),
        (["stages.grpo.reward_weights.correct=0"], r"reward_weights are all 0"),
        (["+stages.grpo.reward_weights.length=1"], r"unknown rewards \['length'\]"),
        (["stages.grpo.reward_weights.reward_model=0.5"], r"reward_model=auto reads .*/run/reward/final, which does not exist"),
        (["stages.grpo.reward_model=/nowhere", "stages.grpo.reward_weights.reward_model=1"], r"reward_model=/nowhere is not a model directory"),
        (["stages.grpo.reward_weights.format=1", "stages.grpo.format_pattern='(unclosed'"], r"format_pattern='\(unclosed' is not a regular expression"),
        (["stages.grpo.generation={engine: continuous_batching}", "trainer.precision=bf16"],
         r"TRL 1.16's continuous-batching rollouts cast the policy to that dtype in place"),
        (["stages.grpo.generation={engine: vllm}"], r"generation.engine \(stages.grpo.generation.engine\)=vllm: the vllm "
                                                    r"package is not installed; pip install -e '.\[vllm\]'"),
        (["peft=lora", "stages.grpo.freeze=[self_attn]"], r"freeze applies to full fine-tuning; with peft=lora choose"),
        (["stages.grpo.freeze=['(attn']"], r"freeze: '\(attn' is not a regular expression"),
        (["peft=lora", "stages.grpo.train_only=[experts]"], r"train_only applies to full fine-tuning; with peft=lora"),
        (["stages.grpo.train_only=['layers\\.{last}\\.(']"], r"train_only: .* is not a regular expression"),
    ],
)
def test_bad_config_fails_before_compute_naming_the_field(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_grpo(tmp_path, *overrides)
