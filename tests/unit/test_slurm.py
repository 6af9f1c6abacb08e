"""The SLURM scripts and submitter against stub sbatch/srun/scontrol on PATH."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import artifacts
from pipeline.runner import plan_stages
from tests.conftest import ROOT, compose_config

SCRIPTS = sorted((ROOT / "slurm").glob("*.sbatch")) + [ROOT / "slurm" / "common.sh"]

STUB = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
"""
SBATCH = STUB + """n=$(grep -c '^sbatch ' "$STUB_LOG"); echo "$((1000 + n));cluster"\n"""
SCONTROL = STUB + """if [ "$1" = show ]; then printf 'gpu-a01\\ngpu-a02\\n'; fi\n"""
# srun: by default succeed; in "stage" mode behave like a stage that checkpoints on request
SRUN = STUB + """if [ "${STUB_SRUN_MODE:-}" = stage ]; then
  touch "$STUB_LOG.started"
  while [ ! -f "$PIPELINE_RUN_DIR/.preempt" ]; do sleep 0.1; done
  exit 75
fi
"""


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"sbatch": SBATCH, "scontrol": SCONTROL, "srun": SRUN}.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), "SLURM_JOB_ID": "4242",
           "SLURM_SUBMIT_DIR": str(ROOT), "PIPELINE_PYTHON": sys.executable}
    return env, log


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_single_node_script_launches_accelerate_on_all_gpus(stubs, tmp_path):
    env, log = stubs
    env.update(SLURM_GPUS_ON_NODE="4", PIPELINE_RUN_DIR=str(tmp_path / "run"))
    proc = subprocess.run(["bash", "slurm/single_node.sbatch", "preset=smoke", "run.stages=[pretrain]"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert calls(log) == [
        "srun --ntasks=1 accelerate launch --config_file conf/accelerate/ddp.yaml --num_processes 4 "
        "-m pipeline preset=smoke run.stages=[pretrain]"
    ]


def test_multi_node_script_uses_c10d_on_the_head_node(stubs, tmp_path):
    env, log = stubs
    env.update(SLURM_GPUS_ON_NODE="8", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-a[01-02]",
               ACCELERATE_CONFIG="conf/accelerate/zero3.yaml")
    env.pop("PIPELINE_RUN_DIR", None)  # resolved from the overrides
    proc = subprocess.run(["bash", "slurm/multi_node.sbatch", f"run.dir={tmp_path / 'run'}", "stages.pretrain.lr=1e-3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert calls(log) == [
        "scontrol show hostnames gpu-a[01-02]",
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c accelerate launch --config_file conf/accelerate/zero3.yaml "
        "--num_machines 2 --num_processes 16 --machine_rank ${SLURM_NODEID} --main_process_ip gpu-a01 "
        f"--main_process_port 29500 --rdzv_backend c10d -m pipeline run.dir={tmp_path / 'run'} stages.pretrain.lr=1e-3 ",
    ]
    assert (tmp_path / "run").is_dir()  # the run dir came from the overrides


def test_preemption_warning_checkpoints_then_requeues(stubs, tmp_path):
    env, log = stubs
    run_dir = tmp_path / "run"
    env.update(STUB_SRUN_MODE="stage", PIPELINE_RUN_DIR=str(run_dir))
    proc = subprocess.Popen(["bash", "slurm/single_node.sbatch", "preset=smoke"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not Path(f"{log}.started").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends the batch shell
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert calls(log)[-1] == "scontrol requeue 4242"
    assert "preemption warning" in out and not (run_dir / ".preempt").exists()


def test_failed_stage_is_not_requeued(stubs, tmp_path):
    env, log = stubs
    (Path(env["PATH"].split(":")[0]) / "srun").write_text(STUB + "exit 3\n")
    env["PIPELINE_RUN_DIR"] = str(tmp_path / "run")
    proc = subprocess.run(["bash", "slurm/single_node.sbatch"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 3
    assert not [c for c in calls(log) if c.startswith("scontrol")]


def test_submitter_chains_one_job_per_stage(stubs, tmp_path):
    env, log = stubs
    run_dir = tmp_path / "run"
    stages = [s for s in ("pretrain", "sft", "reward") if (ROOT / "stages" / f"{s}.py").exists()]
    overrides = [f"run.dir={run_dir}", f"run.stages=[{','.join(stages)}]", "preset=smoke"]
    proc = subprocess.run([sys.executable, "-m", "pipeline.slurm", "submit", "--sbatch-arg=--partition=gpu", "--", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    script = ROOT / "slurm" / "single_node.sbatch"
    export = f"--export=ALL,PIPELINE_RUN_DIR={run_dir},PIPELINE_ROOT={ROOT}"
    expected = []
    for i, stage in enumerate(stages):
        dependency = [f"--dependency=afterok:{1000 + i}"] if i else []
        expected.append(" ".join(["sbatch", "--parsable", f"--job-name=pipeline-{stage}", export, *dependency,
                                  "--partition=gpu", str(script), f"run.dir={run_dir}", "preset=smoke", f"run.stages=[{stage}]"]))
    assert calls(log) == expected


def test_resubmitting_skips_completed_stages(stubs, tmp_path):
    env, log = stubs
    run_dir = tmp_path / "run"
    overrides = [f"run.dir={run_dir}", "run.stages=[pretrain]", "preset=smoke"]
    (plan,) = plan_stages(compose_config(overrides), run_dir)
    stage = run_dir / "pretrain"
    (stage / "final").mkdir(parents=True)
    (stage / "final" / "config.json").write_text("{}")
    artifacts.write_manifest(stage, {"status": "completed", "config_hash": plan.config_hash})
    proc = subprocess.run([sys.executable, "-m", "pipeline.slurm", "submit", "--", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "pretrain: already completed" in proc.stdout and calls(log) == []

    proc = subprocess.run([sys.executable, "-m", "pipeline.slurm", "submit", "--", "run.stages=[nope]"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown stage 'nope'" in proc.stderr and calls(log) == []


def test_a_sweep_submits_one_chain_per_job_each_in_its_own_run_dir(stubs, tmp_path):
    """`submit -- -m seed=0,1`: a chain per sweep point, named as `python -m pipeline -m` names
    its jobs, each a job of the sweep; a bad point submits nothing."""
    env, log = stubs
    root = tmp_path / "sweep"
    overrides = ["-m", "seed=0,1", f"run.dir={root}", "run.stages=[pretrain,sft]", "preset=smoke"]
    proc = subprocess.run([sys.executable, "-m", "pipeline.slurm", "submit", "--", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    submitted = calls(log)
    assert len(submitted) == 4
    for n, (seed, stage) in enumerate([(0, "pretrain"), (0, "sft"), (1, "pretrain"), (1, "sft")]):
        job = root / f"seed-{seed}"
        assert f"PIPELINE_RUN_DIR={job}," in submitted[n]
        assert submitted[n].endswith(f"seed={seed} preset=smoke run.dir={job} run.sweep_job=seed-{seed} run.stages=[{stage}]")
        assert ("--dependency=afterok:" in submitted[n]) == (stage == "sft")

    # a job as submitted is a sweep job of that root (its summary: tests/e2e/test_sweep.py)
    job_args = submitted[0].split(str(ROOT / "slurm" / "single_node.sbatch"))[1].split()
    cfg = compose_config(job_args)
    assert cfg.run.dir == str(root / "seed-0") and cfg.run.sweep_job == "seed-0" and cfg.seed == 0

    bad = subprocess.run([sys.executable, "-m", "pipeline.slurm", "submit", "--", "-m", "seed=0,-1", f"run.dir={root}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "seed=-1" in bad.stderr
    assert len(calls(log)) == 4  # a bad point submits nothing
