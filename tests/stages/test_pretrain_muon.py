"""The pretrain stage with optim=muon, single process, through the real entry point."""

import json

from tests.conftest import python_in_fresh_process


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
