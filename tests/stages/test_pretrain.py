"""The pretrain stage through the real entry point, on preset=smoke."""

import json
import signal
import subprocess
import sys
import time

import torch

from pipeline import artifacts
from tests.conftest import ROOT, python_in_fresh_process, run_cli

EXPECTED_METRICS = {"eval_loss", "eval_perplexity", "eval_accuracy", "train_tokens", "tokens_per_second", "train_loss", "train_loss_first"}


def test_smoke_pretrain_learns_and_writes_the_contract(smoke_pretrain_run):
    stage = smoke_pretrain_run / "pretrain"
    metrics = json.loads((stage / "metrics.json").read_text())
    assert EXPECTED_METRICS <= metrics.keys()
    assert metrics["train_loss"] < metrics["train_loss_first"] - 1.0, metrics  # it learned something
    assert metrics["eval_perplexity"] < 40  # vs ~260 for a uniform guess over the vocabulary
    assert metrics["train_tokens"] == 30 * 8 * 128 and metrics["tokens_per_second"] > 0
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    manifest = json.loads((stage / "stage.json").read_text())
    assert manifest["status"] == "completed" and manifest["versions"]["torch"]
    assert (smoke_pretrain_run / "config.yaml").exists()
    report = (smoke_pretrain_run / "report.md").read_text()
    assert "| pretrain | completed |" in report and "eval_loss" in report
    assert (stage / "loss.png").exists()
    # no temporary or half-written directories are left behind
    assert not [p.name for p in stage.iterdir() if p.name.startswith(".")]


def test_final_loads_with_plain_transformers_in_a_fresh_process(smoke_pretrain_run):
    final = smoke_pretrain_run / "pretrain" / "final"
    assert (final / "model.safetensors").exists()
    out = python_in_fresh_process(f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(final)!r})
tok = AutoTokenizer.from_pretrained({str(final)!r})
batch = tok(["Q: 12+34=?\\n", "Q: 1+2-3=?\\n"], return_tensors="pt", padding=True, padding_side="left")
out = model.generate(**batch, max_new_tokens=8, do_sample=False)
print(type(model).__name__, out.shape[0], out.shape[1] > batch["input_ids"].shape[1], tok.chat_template is not None)
""")
    assert out.split() == ["Qwen3MoeForCausalLM", "2", "True", "True"]


def test_completed_stage_is_skipped_on_rerun(smoke_pretrain_run):
    before = (smoke_pretrain_run / "pretrain" / "stage.json").read_text()
    proc = run_cli("preset=smoke", f"run.dir={smoke_pretrain_run}", "run.stages=[pretrain]")
    assert "stage pretrain: already completed" in proc.stdout
    assert (smoke_pretrain_run / "pretrain" / "stage.json").read_text() == before


def test_continue_any_local_model_on_user_jsonl_data(smoke_pretrain_run, tmp_path):
    """model=hf + task=jsonl: a local HF model directory and local JSONL files, through the
    same code paths that load hub names."""
    pretrain = tmp_path / "corpus.jsonl"
    pretrain.write_text("\n".join(json.dumps({"content": f"Q: {a}+{b}=?\n{a}+{b}={a + b}\nA: {a + b}\n"})
                                  for a in range(10, 40) for b in range(10, 20)))
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("\n".join(json.dumps({"prompt": f"Q: {a}+7=?", "answer": str(a + 7)}) for a in range(50, 70)))
    run_dir = tmp_path / "run"
    base = smoke_pretrain_run / "pretrain" / "final"
    run_cli("preset=smoke", "run.stages=[pretrain]", f"run.dir={run_dir}", "model=hf", f"model.path={base}", "task=jsonl",
            f"task.splits.pretrain={pretrain}", f"task.splits.eval={held_out}", "task.columns.text=content",
            "stages.pretrain.max_steps=6", "stages.pretrain.eval_steps=3", "stages.pretrain.save_steps=3",
            "stages.pretrain.logging_steps=1", "stages.pretrain.lr=1e-5")  # first loss = the loaded weights' loss
    metrics = json.loads((run_dir / "pretrain" / "metrics.json").read_text())
    fresh = json.loads((smoke_pretrain_run / "pretrain" / "metrics.json").read_text())
    # it continued from the trained weights: its first loss is far below a fresh model's
    assert metrics["train_loss_first"] < fresh["train_loss_first"] - 1.0
    assert metrics["eval_num_problems"] == 20
    assert (run_dir / "pretrain" / "final" / "tokenizer.json").exists()

    proc = run_cli("preset=smoke", "run.stages=[pretrain]", f"run.dir={tmp_path / 'bad'}", "task=jsonl", f"task.splits.pretrain={pretrain}",
                   f"task.splits.eval={held_out}", check=False)
    assert proc.returncode != 0
    assert "no column 'text'" in proc.stderr and "task.columns.text" in proc.stderr


def test_sigusr1_saves_a_checkpoint_and_exits_with_the_requeue_code(tmp_path):
    from pipeline.preemption import REQUEUE_EXIT_CODE

    run_dir = tmp_path / "run"
    # no periodic checkpoint before step 1000: any checkpoint on disk comes from the signal
    args = ["preset=smoke", "run.stages=[pretrain]", f"run.dir={run_dir}", "stages.pretrain.max_steps=150", "stages.pretrain.save_steps=1000",
            "stages.pretrain.eval_steps=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    stage = run_dir / "pretrain"
    deadline = time.time() + 300
    while not (stage / "tokenizer").exists():  # the tokenizer is saved just before training starts
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    time.sleep(4)  # a few steps in
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, output[-2000:]
    assert "received SIGUSR1" in output
    manifest = json.loads((stage / "stage.json").read_text())
    assert manifest["status"] == "preempted"
    checkpoint = artifacts.find_resume_checkpoint(stage)
    step = int(checkpoint.name.split("-")[1])
    assert 0 < step < 150

    out = run_cli(*args)
    assert f"resuming from checkpoint-{step}" in out.stdout
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["resumed_at_step"] == step and metrics["train_steps"] == 150


def test_same_seed_reproduces_the_run_and_another_seed_does_not(tmp_path):
    """The model built from config is initialised from `seed`: two runs of one config give the
    same weights bit for bit, and seed=1 gives other weights."""
    from safetensors.torch import load_file

    def weights(name: str, *extra: str) -> dict:
        run_dir = tmp_path / name
        run_cli("preset=smoke", "run.stages=[pretrain]", f"run.dir={run_dir}", "stages.pretrain.max_steps=3",
                "stages.pretrain.eval_problems=4", *extra)
        return load_file(run_dir / "pretrain" / "final" / "model.safetensors")

    first, again, other = weights("a"), weights("b"), weights("c", "seed=1")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
