"""DeepSpeed ZeRO with 2 CPU processes over gloo, through `accelerate launch` and the real entry
point. One ZeRO-2 smoke runs by default; the rest carry the `distributed` marker:

    python -m pytest -q -m distributed
"""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.muon import EXPERT_MUON, MUON, parameter_roles
from tests.conftest import ROOT, python_in_fresh_process, run_accelerate
from tests.distributed.muon_steps import initial_model

STEPS, BATCH, SEQ_LEN, RANKS = 4, 8, 128, 2


def pretrain_under_zero(stage: int, run_dir, *overrides: str) -> dict:
    run_accelerate(f"zero{stage}", "-m", "pipeline", "preset=smoke", "run.stages=[pretrain]", f"run.dir={run_dir}",
                   f"stages.pretrain.max_steps={STEPS}", "stages.pretrain.save_steps=2", "stages.pretrain.eval_steps=2",
                   "stages.pretrain.logging_steps=1", *overrides)
    return json.loads((run_dir / "pretrain" / "metrics.json").read_text())


def assert_final_is_plain_hf(run_dir) -> None:
    out = python_in_fresh_process(f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
path = {str(run_dir / "pretrain" / "final")!r}
model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
out = model.generate(**tok(["Q: 12+34=?\\n"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
print(type(model).__name__, sum(p.numel() for p in model.parameters()), out.shape[1])
""")
    name, parameters, _ = out.split()
    assert name == "Qwen3MoeForCausalLM" and int(parameters) == 1_808_640  # whole weights, not a shard


def assert_half_the_optimizer_state(sharded: dict, single: dict) -> None:
    """ZeRO-1/2/3 keep each rank's share of the optimizer state (plus a little padding)."""
    assert 0.45 < sharded["optimizer_state_mb"] / single["optimizer_state_mb"] < 0.56, (sharded, single)


def test_zero2_adamw_two_processes(tmp_path, smoke_pretrain_run):
    metrics = pretrain_under_zero(2, tmp_path / "run")
    assert metrics["train_steps"] == STEPS and metrics["train_tokens"] == STEPS * BATCH * SEQ_LEN * RANKS
    assert metrics["train_loss"] < metrics["train_loss_first"]
    single = json.loads((smoke_pretrain_run / "pretrain" / "metrics.json").read_text())
    assert_half_the_optimizer_state(metrics, single)
    assert_final_is_plain_hf(tmp_path / "run")


@pytest.mark.distributed
@pytest.mark.parametrize("stage, optim", [(3, "adamw"), (1, "muon"), (2, "muon"), (3, "muon")])
def test_zero_two_processes(tmp_path, smoke_pretrain_run, smoke_muon_run, stage, optim):
    metrics = pretrain_under_zero(stage, tmp_path / "run", f"optim={optim}")
    assert metrics["train_steps"] == STEPS and metrics["train_loss"] < metrics["train_loss_first"]
    single_run = smoke_muon_run if optim == "muon" else smoke_pretrain_run
    single = json.loads((single_run / "pretrain" / "metrics.json").read_text())
    assert_half_the_optimizer_state(metrics, single)
    if stage == 3:  # built after its arguments, so partitioned as it was built: each rank holds half
        assert 0.45 < metrics["weights_mb_at_load"] / single["weights_mb_at_load"] < 0.56, (metrics, single)
    else:
        assert metrics["weights_mb_at_load"] == single["weights_mb_at_load"]
    assert_final_is_plain_hf(tmp_path / "run")


@pytest.mark.distributed
def test_muon_with_gradient_clipping_is_refused_under_zero(tmp_path):
    with pytest.raises(AssertionError, match=r"needs optim.max_grad_norm=0"):
        pretrain_under_zero(2, tmp_path / "zero", "optim=muon", "optim.max_grad_norm=1.0")
    assert not list((tmp_path / "zero" / "pretrain").glob("checkpoint-*"))  # refused before training


def weight_deltas(out_dir, initial: dict) -> dict[str, torch.Tensor]:
    final = AutoModelForCausalLM.from_pretrained(out_dir)
    return {name: param.detach() - initial[name] for name, param in final.named_parameters()}


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_muon_under_zero_takes_the_single_process_steps(tmp_path, stage):
    """Two steps on one batch: DeepSpeed's Muon under ZeRO (with our groups and per-shape lrs)
    moves the weights as the single-process hybrid does."""
    steps = ["-m", "tests.distributed.muon_steps"]
    settings = ["2", "scheduler=constant", "warmup_ratio=0"]
    subprocess.run([sys.executable, *steps, str(tmp_path / "single"), *settings], cwd=ROOT, check=True, capture_output=True)
    run_accelerate(f"zero{stage}", *steps, str(tmp_path / "zero"), *settings)

    model = initial_model()
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}
    roles = {name: role for name, (role, _) in parameter_roles(model).items()}
    single, zero = weight_deltas(tmp_path / "single", initial), weight_deltas(tmp_path / "zero", initial)
    # torch.optim.Muon iterates in bfloat16, DeepSpeed's Muon and ExpertMuon in float32 (on CPU)
    tolerance = {MUON: 0.08}  # measured 0.03; a wrong lr scale or grouping gives 0.2 to 0.6
    for role in set(roles.values()):
        names = [name for name in roles if roles[name] == role]
        difference = torch.cat([(single[n] - zero[n]).flatten() for n in names]).norm()
        moved = torch.cat([single[n].flatten() for n in names]).norm()
        assert moved > 0 and difference / moved < tolerance.get(role, 5e-3), role
    assert EXPERT_MUON in roles.values()


@pytest.mark.distributed
def test_post_training_chain_under_zero3_loads_partitioned(tmp_path, smoke_pretrain_run):
    """sft -> dpo (on-policy pairs, precomputed reference) -> grpo (prompt filter) under ZeRO-3:
    each stage builds its arguments first, so every rank loads half the policy, and the sampling
    done before a Trainer exists gathers it."""
    run_dir = tmp_path / "run"
    run_accelerate("zero3", "-m", "pipeline", "preset=smoke", f"run.dir={run_dir}", "run.stages=[sft,dpo,grpo]",
                   f"stages.sft.init={smoke_pretrain_run / 'pretrain' / 'final'}", "stages.sft.max_steps=4",
                   "stages.dpo.max_steps=4", "stages.dpo.pair_prompts=16", "stages.grpo.max_steps=2",
                   "stages.grpo.filter_samples=2")
    whole_mb = 1_808_640 * 4 / 2**20
    for stage in ("sft", "dpo", "grpo"):
        metrics = json.loads((run_dir / stage / "metrics.json").read_text())
        assert 0.45 < metrics["weights_mb_at_load"] / whole_mb < 0.56, (stage, metrics["weights_mb_at_load"])
        assert metrics["total_parameters"] == 1_808_640
    dpo = json.loads((run_dir / "dpo" / "metrics.json").read_text())
    assert dpo["reference"] == "precomputed" and "reference_dtype" not in dpo
