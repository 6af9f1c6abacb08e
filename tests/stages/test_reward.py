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



@pytest.fixture
def pipeline_process(monkeypatch):
    """run_pipeline in this process installs the preemption handlers; give pytest its own back."""
    import signal

    from pipeline import preemption

    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    monkeypatch.setattr(preemption, "_requested", False)
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("pairs", ["on_policy", "mix"])
def test_on_policy_pairs_train_the_reward_model_and_both_accuracies_are_reported(
        smoke_chain_run, tmp_path, monkeypatch, pipeline_process, pairs):
    """The smoke policy is never right, so its sampler is replaced by one that answers each rl
    prompt right twice and wrong twice: every prompt gives two (correct, wrong) pairs. The reward
    model trains on them (with the task's pairs too for mix); held-out prompts are not trained on,
    and metrics.json reports the on-policy and the task-pair accuracy apart."""
    from pipeline import policy_pairs
    from pipeline.runner import run_pipeline
    from tests.conftest import compose_config

    overrides = ["preset=smoke", f"run.dir={tmp_path / 'run'}", "run.stages=[reward]", "trainer.report_to=none",
                 f"stages.reward.init={smoke_chain_run / 'sft' / 'final'}", f"stages.reward.pairs={pairs}",
                 "stages.reward.pair_prompts=24", "stages.reward.samples_per_prompt=4", "stages.reward.eval_pairs=8"]
    cfg = compose_config(overrides)
    from pipeline.tasks import build_task

    answers = {p["prompt"]: p["answer"] for p in build_task(cfg.task).rl_prompts()[:24]}
    seen = []

    def fake_generate(model, tokenizer, prompts, *, temperature, num_samples, max_new_tokens, batch_size, **_):
        texts = []
        for rendered in prompts:
            answer = int(next(a for q, a in answers.items() if q in rendered))
            texts.append([f"A: {answer}", f"A: {answer + 1}", f"A: {answer}", f"A: {answer - 10}"])
        seen.append(len(prompts))
        return texts, [[4] * num_samples for _ in prompts]

    monkeypatch.setattr(policy_pairs, "generate", fake_generate)
    run_pipeline(cfg)
    result = metrics(tmp_path / "run" / "reward")
    assert sum(seen) == 24
    assert result["pairs_on_policy"] == 48 and result["pair_samples_correct"] == 0.5
    held_out = 8  # whole prompts (2 pairs each) from the end: 4 prompts
    task_pairs = len(build_task(cfg.task).preference_pairs()) - cfg.stages.reward.eval_pairs
    assert result["train_pairs"] == 48 - held_out + (task_pairs if pairs == "mix" else 0)
    assert {"eval_pairwise_accuracy_on_policy", "eval_pairwise_accuracy_task"} <= result.keys()
    assert result["eval_pairwise_accuracy"] == result["eval_pairwise_accuracy_on_policy"]
    assert result["eval_num_pairs"] == held_out
