"""benchmarks/gpu_check.py: its CPU dry run goes through the same code path as the GPU run (the
real stages, the step clock, the table), so the benchmark cannot rot on a machine without a GPU;
without a GPU and without --cpu-dry-run it refuses with exit code 2; its GPU peak table and MFU
arithmetic, checked without a GPU."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
STAGES = ("pretrain", "sft", "grpo", "test_time")


@functools.cache
def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "CUDA_VISIBLE_DEVICES": ""}  # no GPU, also on a GPU machine
    return subprocess.run([sys.executable, str(SCRIPT), *args], check=False, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def table_rows(stdout: str) -> dict[str, dict[str, str]]:
    """The printed table: {stage: {column: cell}}."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stage ") and "tok/s(stage)" in line)
    columns = ["stage", "steps", "tokens", "tok/s(stage)", "tok/s(steps)", "MFU", "step(s)", "gen", "peak"]
    assert lines[start].split()[: len(columns) - 1] == columns[:-1]
    rows = {}
    for line in lines[start + 2 :]:
        cells = line.split()
        if len(cells) != len(columns):
            break
        rows[cells[0]] = dict(zip(columns, cells))
    return rows


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


@pytest.mark.slow
def test_cpu_dry_run_prints_every_stage(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_script("--cpu-dry-run", "--run-dir", str(run_dir), timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    rows = table_rows(proc.stdout)
    assert set(rows) == set(STAGES), proc.stdout[-3000:]
    for stage in STAGES:
        row = rows[stage]
        assert number(row["tokens"]) > 0 and number(row["tok/s(stage)"]) > 0, row
        assert row["MFU"] == "n/a" and row["peak"] == "n/a", row  # no GPU: no peak, no memory
    for stage in ("pretrain", "sft", "grpo"):
        assert number(rows[stage]["tok/s(steps)"]) > 0 and number(rows[stage]["step(s)"]) > 0, rows[stage]
        assert int(rows[stage]["steps"]) > 0
        assert (run_dir / stage / "final" / "config.json").is_file(), f"{stage}/final/ missing"
    assert 0 < number(rows["grpo"]["gen"]) <= 100, rows["grpo"]
    memory = proc.stdout.split("memory (GiB;")[1].splitlines()[2:5]  # the training stages' rows
    assert [line.split()[0] for line in memory] == ["pretrain", "sft", "grpo"], memory
    for line in memory:
        peak, weights, grads, optim, ref, states, ratio = line.split()[1:]
        assert peak == ratio == "n/a" and float(states) == pytest.approx(float(weights) + float(grads) + float(optim) + float(ref), abs=0.02)
        assert float(optim) == pytest.approx(2 * float(grads), abs=0.01)
    # test_time evaluates only: no final/ (WRITES_FINAL = False), a completed manifest and metrics
    assert json.loads((run_dir / "test_time" / "stage.json").read_text())["status"] == "completed"
    assert (run_dir / "test_time" / "metrics.json").is_file()
    command = next(line for line in proc.stdout.splitlines() if line.startswith("gpu_check: python -m pipeline "))
    for override in ("preset=none", "model=tiny_dense", "trainer.precision=bf16", "trainer.attn_implementation=sdpa",
                     "generation.engine=generate",
                     "'run.stages=[pretrain,sft,grpo,test_time]'"):
        assert f" {override}" in command, override


def test_the_vllm_engine_without_vllm_or_a_gpu_exits_2_naming_the_fix(tmp_path):
    proc = run_script("--cpu-dry-run", "--engine", "vllm", "--run-dir", str(tmp_path / "run"), timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "generation.engine" in proc.stderr and "vllm" in proc.stderr
    assert " generation.engine=vllm" in proc.stdout  # the command it ran says which engine
    assert not (tmp_path / "run" / "pretrain" / "final").exists()  # refused before any stage ran


def test_without_a_gpu_it_exits_2_and_says_why():
    proc = run_script(timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU is visible" in proc.stderr and "--cpu-dry-run" in proc.stderr


@pytest.mark.parametrize(("device_name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-40GB", 312.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA A10G", 70.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA L40", None),  # not the L4 nor the L40S: measured
    ("Tesla V100-SXM2-16GB", None),
])
def test_peak_table(device_name, tflops):
    assert load_gpu_check().table_peak_tflops(device_name) == tflops


def test_mfu_arithmetic(tmp_path):
    """pretrain/sft: 6N per trained token over the step clock; grpo: 8N (beta > 0: reference
    forward) per rollout token over the step clock less generation."""
    gc = load_gpu_check()
    n = 1_000_000
    metrics = {
        "pretrain": {"total_parameters": n, "train_steps": 10, "train_tokens": 4000, "tokens_per_second": 800.0},
        "sft": {"total_parameters": n, "train_steps": 10, "train_tokens": 2000, "tokens_per_second": 400.0},
        "grpo": {"total_parameters": n, "train_steps": 4, "rollout_tokens": 1000, "step_time_s": 0.5,
                 "generation_share": 0.6},
        "test_time": {"eval_num_problems": 10, "tokens_per_problem/greedy": 20.0, "wall_time_s/greedy": 2.0},
    }
    seconds = {"pretrain": 4.0, "sft": 5.0, "grpo": 2.4}
    runs = {}
    for stage, m in metrics.items():
        clock = None
        if stage in seconds:
            clock = gc.StepClock()
            clock.seconds, clock.steps = seconds[stage], m["train_steps"]
        runs[stage] = gc.StageRun(stage, m, 1.0, clock, 10.0, 0.0)
    (tmp_path / "grpo").mkdir()
    (tmp_path / "grpo" / "log_history.json").write_text(json.dumps([{"step": 1, "step_time": 0.5}]))
    cfg = OmegaConf.create({"stages": {"grpo": {"beta": 0.02}, "test_time": {"methods": ["greedy", "best_of_n"]}}})
    rows, notes = gc.rows_and_notes(runs, cfg, tmp_path, peak_flops=1e12)
    by_stage = {r.stage: r for r in rows}
    assert by_stage["pretrain"].mfu == pytest.approx(6 * n * 4000 / 4.0 / 1e12)
    assert by_stage["pretrain"].step_tokens_per_s == pytest.approx(1000.0)
    assert by_stage["sft"].mfu == pytest.approx(6 * n * 2000 / 5.0 / 1e12)
    # grpo: training_step time 4 x 0.5 = 2 s, 60% generating: 2.4 - 1.2 = 1.2 s of training part
    assert by_stage["grpo"].mfu == pytest.approx(8 * n * 1000 / 1.2 / 1e12)
    assert by_stage["grpo"].stage_tokens_per_s == pytest.approx(1000 / 2.0)
    assert by_stage["grpo"].step_s == pytest.approx(0.6)
    assert by_stage["test_time"].stage_tokens_per_s == pytest.approx(200 / 2.0) and by_stage["test_time"].mfu is None
    assert any(note.startswith("grpo:") for note in notes)
    assert gc.format_table(rows).splitlines()[-1].split() == ["test_time", "-", "200", "100", "-", "n/a", "-", "-", "10.00"]
