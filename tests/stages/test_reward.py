"""The reward stage on preset=smoke: in the one-command chain run (tests/conftest.py), and on
user JSONL pairs a smoke-sized model can learn."""

import json
from pathlib import Path

import pytest

from tests.conftest import python_in_fresh_process, run_cli

EXPECTED_METRICS = {
    "eval_pairwise_accuracy", "eval_loss", "eval_reward_margin", "train_loss", "train_loss_first",
    "trainable_parameters", "total_parameters",
}


def metrics(stage: Path) -> dict:
    return json.loads((stage / "metrics.json").read_text())


def test_chain_runs_every_stage_in_one_command(smoke_chain_run):
    report = (smoke_chain_run / "report.md").read_text()
    # test_time evaluates the newest policy (grpo's) and scores best-of-N with the run's reward model
    inputs = {"pretrain": None, "sft": "pretrain", "reward": "sft", "dpo": "sft", "grpo": "sft", "test_time": "grpo"}
    for stage, upstream in inputs.items():
        manifest = json.loads((smoke_chain_run / stage / "stage.json").read_text())
        assert manifest["status"] == "completed", (stage, manifest)
        if upstream:
            assert manifest["input"] == str(smoke_chain_run / upstream / "final"), (stage, manifest["input"])
        assert f"| {stage} | completed |" in report
        assert (smoke_chain_run / stage / "final" / "config.json").is_file() == (stage != "test_time")
    assert 0.0 <= metrics(smoke_chain_run / "test_time")["accuracy/best_of_n"] <= 1.0


def test_reward_in_the_chain_writes_its_metrics(smoke_chain_run):
    result = metrics(smoke_chain_run / "reward")
    assert EXPECTED_METRICS <= result.keys()
    assert {f"eval_pairwise_accuracy/{kind}" for kind in ("carried", "step", "digit")} <= result.keys()
    assert result["trainable_parameters"] == result["total_parameters"]  # full fine-tuning plus the head
    assert 0.0 <= result["eval_pairwise_accuracy"] <= 1.0


PAIRS = [
    {"prompt": f"{a}+{b}=?", "chosen": f"{a}+{b}={a + b}\nA: {a + b}", "rejected": "I do not know."}
    for a, b in zip(range(10, 90, 2), range(90, 10, -2))
]


@pytest.fixture(scope="module")
def easy_reward_run(smoke_chain_run, tmp_path_factory) -> Path:
    """The reward stage on preset=smoke with pairs a smoke-sized model can learn in seconds (the
    task's one-slip negatives need a trained model): user JSONL data through task=jsonl."""
    root = tmp_path_factory.mktemp("reward-jsonl")
    data = root / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in PAIRS))
    run_cli(
        "preset=smoke", "run.stages=[reward]", f"run.dir={root / 'run'}", "task=jsonl", f"task.splits.preference={data}",
        f"stages.reward.init={smoke_chain_run / 'sft' / 'final'}", "stages.reward.eval_pairs=8",
    )
    return root / "run" / "reward"


def test_reward_pairwise_loss_falls(easy_reward_run):
    result = metrics(easy_reward_run)
    assert EXPECTED_METRICS <= result.keys()
    assert result["train_loss"] < result["train_loss_first"] - 0.3, result
    assert result["eval_pairwise_accuracy"] >= 0.9 and result["eval_reward_margin"] > 0, result


def test_reward_model_reloads_in_a_fresh_process_and_prefers_chosen(easy_reward_run):
    """Plain transformers, no project code: the checkpoint scores chosen above its rejected twin."""
    final = easy_reward_run / "final"
    out = python_in_fresh_process(f"""
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained({str(final)!r}).eval()
tok = AutoTokenizer.from_pretrained({str(final)!r})
def reward(prompt, answer):
    messages = [{{"role": "user", "content": prompt}}, {{"role": "assistant", "content": answer}}]
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits[0, 0].item()
pairs = {PAIRS[:8]!r}
print(type(model).__name__, sum(reward(p["prompt"], p["chosen"]) > reward(p["prompt"], p["rejected"]) for p in pairs))
""").split()
    assert out == ["Qwen3MoeForSequenceClassification", "8"]


def test_reward_refuses_prompt_learning_before_compute(smoke_chain_run, tmp_path):
    proc = run_cli(
        "preset=smoke", "run.stages=[reward]", "peft=prefix", f"run.dir={tmp_path / 'run'}",
        f"stages.reward.init={smoke_chain_run / 'sft' / 'final'}", check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "peft=prefix with stage reward" in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "reward").exists()

