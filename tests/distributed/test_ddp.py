"""Two CPU processes (DDP over gloo) through accelerate launch, as on a multi-GPU node."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, free_port


def launch(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "conf/accelerate/ddp.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "pipeline", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_two_ranks_share_one_run_dir_and_agree(tmp_path, smoke_pretrain_run):
    run_dir = tmp_path / "run"
    first = launch("preset=smoke", "run.stages=[pretrain]", f"run.dir={run_dir}")
    assert "[pipeline rank 0/2] stage pretrain: decision start" in first.stdout
    assert "[pipeline rank 1/2] stage pretrain: decision start" in first.stdout
    # one run dir, one manifest, written once: nothing per rank, nothing left half-written
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "pretrain", "report.md"]
    stage = run_dir / "pretrain"
    assert json.loads((stage / "stage.json").read_text())["status"] == "completed"
    assert (stage / "final" / "model.safetensors").exists()
    assert not [p.name for p in stage.iterdir() if p.name.startswith(".")]
    metrics = json.loads((stage / "metrics.json").read_text())
    single = json.loads((smoke_pretrain_run / "pretrain" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train_steps"] == single["train_steps"]
    # the data is split across ranks, not duplicated: the same steps cover twice the data
    assert metrics["train_epochs"] > 1.8 * single["train_epochs"]
    assert metrics["train_tokens"] == 2 * single["train_tokens"]

    again = launch("preset=smoke", "run.stages=[pretrain]", f"run.dir={run_dir}")
    assert "[pipeline rank 0/2] stage pretrain: decision skip" in again.stdout
    assert "[pipeline rank 1/2] stage pretrain: decision skip" in again.stdout
