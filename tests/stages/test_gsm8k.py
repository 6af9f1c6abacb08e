"""task=gsm8k end to end offline: a local dataset folder in openai/gsm8k's schema (question,
answer with a final "#### n" line; train and test splits), sft -> grpo -> test_time on a tiny
Qwen3, the eval split read from `test` through task.hf_splits, answers checked by value."""

import json
from pathlib import Path

from pipeline.tasks import build_task
from tests.conftest import compose_config, run_cli
from tests.stages.test_model_families import FAMILY_RUN
from tests.tiny_models import save_tiny_family


def gsm8k_row(a: int, b: int) -> dict:
    return {"question": f"Tom has {a} apples and buys {b} more. How many apples does he have now?",
            "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}


def write_gsm8k(folder: Path) -> Path:
    """train.jsonl and test.jsonl: `datasets` reads a folder of them as a dataset with two splits."""
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("\n".join(json.dumps(gsm8k_row(a, b)) for a in range(10, 40) for b in (3, 7)))
    (folder / "test.jsonl").write_text("\n".join(json.dumps(gsm8k_row(a, 11)) for a in range(100, 130)))
    return folder


def test_gsm8k_recipe_runs_sft_grpo_test_time_on_a_local_copy(tmp_path):
    data = write_gsm8k(tmp_path / "gsm8k")
    splits = [f"task.splits.{s}={data}" for s in ("sft", "rl", "eval")]
    cfg = compose_config(["task=gsm8k", *splits])
    task = build_task(cfg.task)
    assert [p["prompt"] for p in task.eval_problems()][:1] == [gsm8k_row(100, 11)["question"]]  # the test split
    assert len(task.sft_examples()) == 60 and task.sft_examples()[0]["completion"].endswith("#### 13")
    assert task.verify("He has 10 + 3 = 13 apples. #### 13", task.rl_prompts()[0]["answer"]) == 1.0
    assert task.verify("so \\boxed{13.0}", task.rl_prompts()[0]["answer"]) == 1.0  # by value
    assert task.verify("#### 14", task.rl_prompts()[0]["answer"]) == 0.0

    model = save_tiny_family("qwen3", tmp_path / "qwen3")
    run_dir = tmp_path / "run"
    stages = [o for o in FAMILY_RUN if not o.startswith(("run.stages", "stages.dpo"))]
    run_cli("model=qwen3", f"model.path={model}", "task=gsm8k", *splits, f"run.dir={run_dir}", *stages,
            "run.stages=[sft,grpo,test_time]", "stages.sft.eval_examples=10")
    for stage in ("sft", "grpo", "test_time"):
        assert json.loads((run_dir / stage / "stage.json").read_text())["status"] == "completed", stage
    sft = json.loads((run_dir / "sft" / "metrics.json").read_text())
    assert sft["train_loss"] < sft["train_loss_first"] and sft["eval_num_problems"] == 8


def test_a_small_split_that_leaves_no_training_rows_is_refused_before_compute(tmp_path, smoke_pretrain_run):
    """30 rows in GSM8K's schema with long questions: the held-out rows and max_length (TRL drops a
    row whose prompt fills it) leave nothing to train on, which is named with the counts and the
    knob, exit 2, before any stage runs, and no run dir is left behind."""
    rows = [{**gsm8k_row(a, 5), "question": "Natalia sold clips to her friends in April. " * 8 + f"She had {a}. How many?"}
            for a in range(30)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    run_dir = tmp_path / "run"
    args = ["preset=smoke", "task=gsm8k", *[f"task.splits.{s}={data}" for s in ("sft", "rl", "eval")],
            "run.stages=[sft,grpo,test_time]", "stages.test_time.methods=[greedy,sample,majority_vote]",
            f"stages.sft.init={smoke_pretrain_run / 'pretrain' / 'final'}", f"run.dir={run_dir}"]
    done = run_cli(*args, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert ("has 30 rows: 20 held out for eval_loss (stages.sft.eval_examples), and in all 10 others the prompt "
            "fills stages.sft.max_length=128 tokens") in done.stderr
    assert "raise stages.sft.max_length above" in done.stderr
    assert not run_dir.exists()

    held_out = run_cli(*args, "stages.sft.eval_examples=30", check=False)
    assert held_out.returncode == 2
    assert "has 30 rows and stages.sft.eval_examples=30 of them are held out" in held_out.stderr
