"""The pretrain stage with optim=muon, single process, through the real entry point."""

import json

from tests.conftest import python_in_fresh_process, run_cli


def metrics(run_dir):
    return json.loads((run_dir / "pretrain" / "metrics.json").read_text())


def test_smoke_pretrain_with_muon_learns(smoke_muon_run, smoke_pretrain_run):
    muon, adamw = metrics(smoke_muon_run), metrics(smoke_pretrain_run)
    assert muon["train_loss"] < muon["train_loss_first"] - 1.0, muon
    assert muon["eval_perplexity"] < 40
    # one momentum buffer per hidden matrix (nearly all weights here) where AdamW keeps two moments
    assert 0.45 < muon["optimizer_state_mb"] / adamw["optimizer_state_mb"] < 0.6
    assert 13 < adamw["optimizer_state_mb"] < 14.5  # 2 moments x 1.81M float32 parameters
    assert "name: muon" in (smoke_muon_run / "config.yaml").read_text()


def test_muon_final_loads_with_plain_transformers(smoke_muon_run):
    out = python_in_fresh_process(f"""
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(smoke_muon_run / "pretrain" / "final")!r})
print(type(model).__name__)
""")
    assert out.split() == ["Qwen3MoeForCausalLM"]


def test_muon_reaches_a_lower_loss_than_adamw_at_the_same_steps(smoke_muon_run, smoke_pretrain_run):
    """Why the demo pretrains with Muon: at the same steps and lr its held-out loss is lower."""
    muon, adamw = metrics(smoke_muon_run), metrics(smoke_pretrain_run)
    assert muon["train_steps"] == adamw["train_steps"]
    assert muon["eval_loss"] < adamw["eval_loss"], (muon["eval_loss"], adamw["eval_loss"])  # 2.63 vs 2.66 here


def test_a_stage_can_switch_to_muon_over_the_adamw_group(tmp_path, smoke_muon_run):
    """stages.pretrain.optim={name: muon, ...} over optim=adamw trains exactly as optim=muon does."""
    run_dir = tmp_path / "run"
    run_cli("preset=smoke", "run.stages=[pretrain]", f"run.dir={run_dir}",
            "stages.pretrain.optim={name:muon,max_grad_norm:0.0}")
    mine, reference = metrics(run_dir), metrics(smoke_muon_run)
    assert abs(mine["optimizer_state_mb"] - reference["optimizer_state_mb"]) < 1e-6
    assert mine["eval_loss"] == reference["eval_loss"]
