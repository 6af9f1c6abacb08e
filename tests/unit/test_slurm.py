"""The SLURM scripts and submitter against stub sbatch/srun/scontrol/trl/accelerate on PATH."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import artifacts, generation, slurm
from pipeline.runner import plan_stages
from pipeline.errors import ConfigError
from tests.conftest import ROOT, compose_config

SCRIPTS = sorted((ROOT / "slurm").glob("*.sbatch")) + [ROOT / "slurm" / "common.sh"]

STUB = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
"""
SBATCH = STUB + """n=$(grep -c '^sbatch ' "$STUB_LOG"); echo "$((1000 + n));cluster"\n"""
SCONTROL = STUB + """if [ "$1" = show ]; then printf "${STUB_HOSTS:-gpu-a01\\ngpu-a02}\\n"; fi\n"""
# srun: by default succeed; with "exec" run its command (after its options); with "stage" behave
# like a stage that checkpoints on request
SRUN = STUB + """if [[ "${STUB_SRUN_MODE:-}" == *exec* ]]; then
  while [ "${1#-}" != "$1" ]; do shift; done
  "$@"
fi
if [[ "${STUB_SRUN_MODE:-}" == *stage* ]]; then
  touch "$STUB_LOG.started"
  while [ ! -f "$PIPELINE_RUN_DIR/.preempt" ]; do sleep 0.1; done
  exit 75
fi
"""


# trl and accelerate: their arguments and the environment they were given; trl (the vLLM server)
# then runs until it is stopped
ENV_STUB = """#!/usr/bin/env bash
echo "$(basename "$0") $* [CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-} PIPELINE_VLLM_SERVER=${PIPELINE_VLLM_SERVER:-}]" >> "$STUB_LOG"
"""
TRL = ENV_STUB + """trap 'echo "trl stopped" >> "$STUB_LOG"; exit 0' TERM
for _ in $(seq 600); do sleep 0.1; done  # at most a minute, should a failed test leave it running
"""
# the interpreter the scripts ask about the config, with vllm's requirements met (this machine
# has neither vllm nor a GPU; tests/unit/test_generation.py tests the check itself)
VLLM_READY_PYTHON = """#!/usr/bin/env bash
exec "$REAL_PYTHON" -c 'import runpy, sys
from pipeline import generation
generation.check = lambda engine, stage: None
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)' "$@"
"""


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"sbatch": SBATCH, "scontrol": SCONTROL, "srun": SRUN, "trl": TRL, "accelerate": ENV_STUB,
                       "vllm-ready-python": VLLM_READY_PYTHON}.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), "SLURM_JOB_ID": "4242",
           "SLURM_SUBMIT_DIR": str(ROOT), "PIPELINE_PYTHON": sys.executable, "REAL_PYTHON": sys.executable}
    env.pop("CUDA_VISIBLE_DEVICES", None)
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


def server_overrides(tmp_path, per_stage: bool = True, **vllm) -> list[str]:
    """A grpo job with its rollouts on TRL's vLLM server (set per stage, or in the generation group),
    whose input is a checkpoint directory."""
    model = tmp_path / "policy"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    job = [f"run.dir={tmp_path / 'run'}", "run.stages=[grpo]", f"stages.grpo.init={model}"]
    if per_stage:
        settings = ", ".join(["mode: server", *(f"{k}: {v}" for k, v in vllm.items())])
        return [*job, f"stages.grpo.generation={{engine: vllm, vllm: {{{settings}}}}}"]
    return [*job, "generation.engine=vllm", "generation.vllm.mode=server", *(f"generation.vllm.{k}={v}" for k, v in vllm.items())]


def vllm_ready(env: dict) -> dict:
    env["PIPELINE_PYTHON"] = str(Path(env["PATH"].split(":")[0]) / "vllm-ready-python")
    return env


def test_single_node_server_mode_splits_the_gpus_and_stops_the_server_on_preemption(stubs, tmp_path):
    """The server on the node's last server_gpus GPUs, accelerate on the others, pointed at it;
    a preempted stage checkpoints, the server stops, then the job requeues."""
    env, log = stubs
    overrides = server_overrides(tmp_path, server_gpus=2, server_port=8123)
    vllm_ready(env).update(SLURM_GPUS_ON_NODE="4", CUDA_VISIBLE_DEVICES="4,5,6,7", STUB_SRUN_MODE="exec,stage",
                           PIPELINE_RUN_DIR=str(tmp_path / "run"))
    proc = subprocess.Popen(["bash", "slurm/single_node.sbatch", *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not Path(f"{log}.started").exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0] if proc.poll() is not None else ""
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    launch = f"accelerate launch --config_file conf/accelerate/ddp.yaml --num_processes 2 -m pipeline {' '.join(overrides)}"
    server = "http://127.0.0.1:8123"
    assert sorted(calls(log)[:3]) == sorted([
        f"trl vllm-serve --model {tmp_path / 'policy'} --tensor-parallel-size 2 --data-parallel-size 1 --host 0.0.0.0 "
        "--port 8123 [CUDA_VISIBLE_DEVICES=6,7 PIPELINE_VLLM_SERVER=]",
        f"srun --ntasks=1 env CUDA_VISIBLE_DEVICES=4,5 PIPELINE_VLLM_SERVER={server} {launch}",
        f"{launch} [CUDA_VISIBLE_DEVICES=4,5 PIPELINE_VLLM_SERVER={server}]",
    ])
    assert calls(log)[3:] == ["trl stopped", "scontrol requeue 4242"]
    assert (tmp_path / "run" / "vllm-server-4242.log").exists()


def test_multi_node_server_mode_gives_the_server_the_first_node(stubs, tmp_path):
    """The server on the first node, training on the others with rendezvous on the second; one
    node is refused before anything starts."""
    env, log = stubs
    overrides = server_overrides(tmp_path, per_stage=False)
    vllm_ready(env).update(SLURM_GPUS_ON_NODE="4", SLURM_NNODES="3", SLURM_JOB_NODELIST="gpu-a[01-03]",
                           STUB_HOSTS="gpu-a01\\ngpu-a02\\ngpu-a03", PIPELINE_RUN_DIR=str(tmp_path / "run"))
    proc = subprocess.run(["bash", "slurm/multi_node.sbatch", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "3 GPUs of gpu-a01 idle" in proc.stdout
    quoted = " ".join(overrides).replace("[grpo]", r"\[grpo\]")  # as the script's printf %q writes it
    assert sorted(calls(log)[1:3]) == sorted([
        f"trl vllm-serve --model {tmp_path / 'policy'} --tensor-parallel-size 1 --data-parallel-size 1 --host 0.0.0.0 "
        "--port 8000 [CUDA_VISIBLE_DEVICES=0 PIPELINE_VLLM_SERVER=]",
        "srun --nodes=2 --nodelist=gpu-a02,gpu-a03 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "
        "PIPELINE_VLLM_SERVER=http://gpu-a01:8000 accelerate launch --config_file conf/accelerate/multinode.yaml "
        "--num_machines 2 --num_processes 8 --machine_rank ${SLURM_PROCID} --main_process_ip gpu-a02 "
        f"--main_process_port 29500 --rdzv_backend c10d -m pipeline {quoted} ",
    ])
    assert calls(log)[3:] == ["trl stopped"]

    log.write_text("")
    env.update(SLURM_NNODES="1", SLURM_JOB_NODELIST="gpu-a01", STUB_HOSTS="gpu-a01")
    proc = subprocess.run(["bash", "slurm/multi_node.sbatch", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "submit it with --nodes=2 or more" in proc.stderr
    assert calls(log) == ["scontrol show hostnames gpu-a01"]  # nothing started


@pytest.mark.parametrize("vllm, nodes, message", ids=["no-gpu-left", "more-than-the-node", "dp", "own-server"], argvalues=[
    ({"server_gpus": 4}, None, r"generation.vllm.server_gpus \(stages.grpo.generation.vllm.server_gpus\)=4 leaves none "
                               r"of this node's 4 GPUs to train grpo on: set it below 4, or use slurm/multi_node.sbatch"),
    ({"server_gpus": 8}, "a,b", r"server_gpus\)=8, and the server's node a has 4 GPUs: set it to 4 or less"),
    ({"server_gpus": 3, "server_data_parallel_size": 2}, None, r"server_gpus\)=3 with generation.vllm.server_data_parallel_size=2"),
    ({"server_base_url": "'http://mine:8000'"}, None, r"server_base_url=http://mine:8000 names a server of your own"),
])
def test_server_settings_the_scripts_cannot_serve_exit_2(vllm, nodes, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generation, "check", lambda engine, stage: None)
    overrides = server_overrides(tmp_path, **vllm)
    assert slurm.main(["vllm-server", "--gpus", "4", *(["--nodes", nodes] if nodes else []), "--", *overrides]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_server_mode_needs_the_vllm_engines_requirements_and_an_input_that_exists(tmp_path, capsys):
    overrides = server_overrides(tmp_path)
    assert slurm.main(["vllm-server", "--gpus", "4", "--", *overrides]) == 2  # the real check: no vllm here
    assert "the vllm package is not installed" in capsys.readouterr().err
    # the server starts from the stage's input, so not in a job that writes that input first
    cfg = compose_config([f"run.dir={tmp_path / 'run'}", "run.stages=[sft,grpo]", "preset=smoke"])
    with pytest.raises(ConfigError, match="run grpo in a job of its own"):
        slurm.vllm_model(cfg, "grpo")
    assert slurm.vllm_server(compose_config(["run.stages=[grpo]"]), 4) is None  # not server mode: no server
