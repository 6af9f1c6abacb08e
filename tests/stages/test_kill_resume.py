"""Kill -9 in the middle of a stage, rerun the same command: every tensor of every final/ equals
an uninterrupted run's (issue 17). Real process kills, on the MoE and the dense model and LoRA.

The uninterrupted runs differ from the killed ones only in save_steps (more checkpoints, so
the kill lands mid-stage), which changes no weight.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline import artifacts
from tests.conftest import ROOT, run_cli

# (stage, its save_steps in the killed runs, the checkpoint after which it is killed)
MOE_KILLS = [("pretrain", 5, 10), ("sft", 5, 10), ("reward", 5, 5), ("dpo", 5, 10), ("grpo", 2, 2)]


PIPELINE = [sys.executable, "-m", "pipeline"]


def run_until_checkpoint(args: list[str], stage_dir: Path, step: int, timeout: float = 300, command=PIPELINE,
                         env: dict | None = None) -> None:
    """Start `python -m pipeline args` (or `command args`), SIGKILL its whole process group as
    soon as stage_dir/checkpoint-<step> is complete on disk, and check the stage was cut mid-way."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.Popen([*command, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not (stage_dir / f"checkpoint-{step}" / "trainer_state.json").exists():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {stage_dir.name} saved checkpoint-{step}"
        assert time.time() < deadline, f"no checkpoint-{step} in {stage_dir}"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # a real kill: no handler, no cleanup
    proc.wait()
    manifest = json.loads((stage_dir / "stage.json").read_text())
    assert manifest["status"] == "running" and not (stage_dir / "final").exists(), "the kill did not land mid-stage"


def final_tensors(final: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(final.glob("*.safetensors")):
        tensors.update(load_file(file))
    assert tensors, f"no weights in {final}"
    return tensors


def assert_same_weights(resumed: Path, uninterrupted: Path) -> None:
    a, b = final_tensors(resumed), final_tensors(uninterrupted)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ from the uninterrupted run, e.g. {differ[:4]}"


def killed_run_args(base_args: list[str], run_dir: Path, kills: list[tuple[str, int, int]]) -> list[str]:
    return [*base_args, f"run.dir={run_dir}"] + [f"stages.{stage}.save_steps={every}" for stage, every, _ in kills]


def kill_in_each_then_finish(args: list[str], run_dir: Path, kills: list[tuple[str, int, int]]) -> dict[str, int]:
    """Kill the run once in each listed stage, then rerun it to the end; returns {stage: the
    step it resumed from}."""
    for stage, _, step in kills:
        run_until_checkpoint(args, run_dir / stage, step)
    out = run_cli(*args)
    assert "There were missing keys" not in out.stdout + out.stderr
    resumed = {stage: json.loads((run_dir / stage / "stage.json").read_text())["resumed_from"] for stage, _, _ in kills}
    assert all(resumed.values()), resumed  # each stage resumed rather than started over
    return {stage: int(name.split("-")[1]) for stage, name in resumed.items()}


def test_moe_chain_killed_in_every_training_stage_equals_the_uninterrupted_run(smoke_chain_run, tmp_path):
    """pretrain, sft, reward, dpo, grpo on the default (MoE) model, each killed once; pretrain's
    newest checkpoint is also truncated, as a kill mid-save on another filesystem would leave it."""
    run_dir = tmp_path / "killed"
    base = ["preset=smoke", "run.stages=[pretrain,sft,reward,dpo,grpo]"]
    args = killed_run_args(base, run_dir, MOE_KILLS)
    run_until_checkpoint(args, run_dir / "pretrain", 10)
    newest = artifacts.find_resume_checkpoint(run_dir / "pretrain")
    step = int(newest.name.split("-")[1])
    with open(newest / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(newest / "model.safetensors") // 2)
    resumed = kill_in_each_then_finish(args, run_dir, MOE_KILLS[1:])
    assert all(resumed[stage] >= at for stage, _, at in MOE_KILLS[1:]), resumed
    # the truncated checkpoint was passed over, and set aside
    assert json.loads((run_dir / "pretrain" / "stage.json").read_text())["resumed_from"] == f"checkpoint-{step - 5}"
    assert list((run_dir / "superseded").glob(f"pretrain-checkpoint-{step}-unusable-*"))
    for stage, _, _ in MOE_KILLS:
        assert_same_weights(run_dir / stage / "final", smoke_chain_run / stage / "final")
        metrics = json.loads((run_dir / stage / "metrics.json").read_text())
        reference = json.loads((smoke_chain_run / stage / "metrics.json").read_text())
        assert metrics["train_steps"] == reference["train_steps"]  # exactly max_steps, not one more


def test_dense_model_and_lora_killed_mid_stage_equal_the_uninterrupted_run(smoke_chain_run, tmp_path):
    # 15 steps each (the smoke preset's 30 and 40 are not needed to cut a stage after checkpoint-10)
    dense = ["preset=smoke", "model=tiny_dense", "run.stages=[pretrain,sft]", "stages.pretrain.max_steps=15",
             "stages.sft.max_steps=15"]
    run_cli(*dense, f"run.dir={tmp_path / 'dense'}")
    kills = [("pretrain", 5, 10), ("sft", 5, 10)]
    kill_in_each_then_finish(killed_run_args(dense, tmp_path / "dense-killed", kills), tmp_path / "dense-killed", kills)
    for stage in ("pretrain", "sft"):
        assert_same_weights(tmp_path / "dense-killed" / stage / "final", tmp_path / "dense" / stage / "final")

    lora = ["preset=smoke", "peft=lora", "run.stages=[sft]", "stages.sft.max_steps=15",
            f"stages.sft.init={smoke_chain_run / 'pretrain' / 'final'}"]
    run_cli(*lora, f"run.dir={tmp_path / 'lora'}")
    kills = [("sft", 5, 10)]
    kill_in_each_then_finish(killed_run_args(lora, tmp_path / "lora-killed", kills), tmp_path / "lora-killed", kills)
    assert_same_weights(tmp_path / "lora-killed" / "sft" / "final", tmp_path / "lora" / "sft" / "final")
    assert_same_weights(tmp_path / "lora-killed" / "sft" / "final" / "adapter", tmp_path / "lora" / "sft" / "final" / "adapter")


def test_resume_from_the_last_checkpoint_trains_no_extra_step(smoke_pretrain_run, tmp_path):
    """Killed after the checkpoint at max_steps, before final/: the rerun trains no step."""
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_pretrain_run, run_dir)
    stage = run_dir / "pretrain"
    shutil.rmtree(stage / "final")
    (stage / "metrics.json").unlink()
    manifest = json.loads((stage / "stage.json").read_text())
    artifacts.write_manifest(stage, {**manifest, "status": "running"})
    run_cli("preset=smoke", "run.stages=[pretrain]", f"run.dir={run_dir}")
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["train_steps"] == 30 and metrics["resumed_at_step"] == 30
    assert_same_weights(stage / "final", smoke_pretrain_run / "pretrain" / "final")


def test_killed_after_final_was_committed_is_finished_without_training(smoke_pretrain_run, tmp_path):
    """A kill between the final/ rename and the manifest write: the rerun records the stage as
    completed from what final/ holds, and final/ stays exactly as it was."""
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_pretrain_run, run_dir)
    stage = run_dir / "pretrain"
    manifest = json.loads((stage / "stage.json").read_text())
    artifacts.write_manifest(stage, {**manifest, "status": "running"})
    metrics = json.loads((stage / "metrics.json").read_text())
    (stage / "metrics.json").unlink()
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (stage / "final").iterdir() if p.is_file()}
    out = run_cli("preset=smoke", "run.stages=[pretrain]", f"run.dir={run_dir}")
    assert "no training" in out.stdout and "resuming" not in out.stdout
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (stage / "final").iterdir() if p.is_file()} == before
    assert json.loads((stage / "metrics.json").read_text()) == metrics
    assert json.loads((stage / "stage.json").read_text())["status"] == "completed"
    assert not (run_dir / "superseded").exists()
