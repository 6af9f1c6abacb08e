"""Submit the stage chain to SLURM: one job per stage, linked with --dependency=afterok.

    python -m pipeline.slurm submit [--script slurm/multi_node.sbatch] [--sbatch-arg=--partition=gpu] \\
        -- <hydra overrides>
    python -m pipeline.slurm submit -- -m seed=0,1,2 <hydra overrides>   # a sweep: one chain per job
    python -m pipeline.slurm run-dir -- <hydra overrides>     # print the run dir they select
    python -m pipeline.slurm vllm-server --gpus 8 [--visible 0,..,7] [--nodes h1,h2,..] -- <hydra overrides>

Every job runs one stage against the shared run dir. A failed stage stops the jobs after it;
submitting the same command again skips the stages already completed with the same config and
starts from the failed one. Preempted jobs requeue themselves (slurm/common.sh).

`vllm-server` tells the sbatch scripts whether the job needs TRL's vLLM server (a stage of
VLLM_STAGES in run.stages with generation.engine=vllm, vllm.mode=server) and how it shares the
GPUs, as `key=value` lines (slurm/common.sh `plan_vllm_server` reads them): `server=0`, or
`server=1` then url, server_devices, train_devices, train_gpus, train_nodes, train_machines,
train_processes, note and one `command=` line per argument of the server's command. Without
--nodes the job is one node (single_node.sbatch): the server takes its last server_gpus GPUs and
the others train. With --nodes (multi_node.sbatch) the server takes the first node, where it uses
server_gpus GPUs, and the other nodes train: accelerate starts as many processes on every node.
Settings the scripts cannot serve exit 2 naming the field and the fix, before anything starts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import generation, sweep
from pipeline.config import compose_config
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MULTIRUN = ("-m", "--multirun")
VLLM_STAGES = ("grpo",)  # the stages whose rollouts run on TRL's vLLM (pipeline/generation.py)


def run_dir_of(cfg) -> Path:
    return Path(str(cfg.run.dir)).expanduser().resolve()


def submit(overrides: list[str], script: str, sbatch_args: list[str], sbatch: str = "sbatch") -> list[str]:
    """Submit the chain; return the job ids. Checks the whole chain before submitting anything."""
    from pipeline.runner import plan_stages, prepare_stage_dir

    cfg = compose_config(overrides)
    run_dir = run_dir_of(cfg)
    plans = plan_stages(cfg, run_dir)  # raises ConfigError on a bad stage or input
    forwarded = [o for o in overrides if not o.lstrip("+~").startswith("run.stages=")]
    job_ids: list[str] = []
    for plan in plans:
        action, _ = prepare_stage_dir(plan, run_dir / plan.name, bool(cfg.run.force))
        if action == "skip" and not job_ids:
            print(f"[slurm] {plan.name}: already completed in {run_dir}, not submitted")
            continue
        cmd = [sbatch, "--parsable", f"--job-name=pipeline-{plan.name}",
               f"--export=ALL,PIPELINE_RUN_DIR={run_dir},PIPELINE_ROOT={ROOT}"]
        if job_ids:
            cmd.append(f"--dependency=afterok:{job_ids[-1]}")
        cmd += [*sbatch_args, script, *forwarded, f"run.stages=[{plan.name}]"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
        job_id = out.split(";")[0]  # --parsable prints "id" or "id;cluster"
        job_ids.append(job_id)
        after = f" after {job_ids[-2]}" if len(job_ids) > 1 else ""
        print(f"[slurm] {plan.name}: job {job_id}{after}")
    return job_ids


def submit_sweep(overrides: list[str], script: str, sbatch_args: list[str], sbatch: str = "sbatch") -> dict[str, list[str]]:
    """One chain per job of the sweep, each in its own run dir under run.dir (as `python -m
    pipeline -m` names them); every job is checked before anything is submitted. Returns the
    job ids per run dir."""
    from pipeline.runner import plan_stages

    jobs = sweep.expand(overrides)
    root = run_dir_of(compose_config(jobs[0]))
    commands = [sweep.job_overrides(job, overrides, root) for job in jobs]
    for command in commands:  # all points checked first: a bad one submits nothing
        cfg = compose_config(command)
        plan_stages(cfg, run_dir_of(cfg))
    print(f"[slurm] sweep of {len(commands)} jobs under {root}")
    return {str(run_dir_of(compose_config(c))): submit(c, script, sbatch_args, sbatch) for c in commands}


@dataclass(frozen=True)
class VllmServer:
    """TRL's vLLM server of a job: its command, where the trainers find it, the GPU split."""

    command: list[str]
    url: str  # what the trainers get as PIPELINE_VLLM_SERVER (pipeline/generation.py SERVER_ENV)
    server_devices: list[str]  # CUDA_VISIBLE_DEVICES of the server, on the first node
    train_devices: list[str]  # single node: the trainers' CUDA_VISIBLE_DEVICES; multi-node: every GPU of their nodes
    train_nodes: list[str]  # multi-node: the nodes that train, the first holding the rendezvous
    note: str

    def lines(self) -> list[str]:
        machines = max(1, len(self.train_nodes))
        return ["server=1", f"url={self.url}", f"server_devices={','.join(self.server_devices)}",
                f"train_devices={','.join(self.train_devices)}", f"train_gpus={len(self.train_devices)}",
                f"train_nodes={','.join(self.train_nodes)}", f"train_machines={machines}",
                f"train_processes={machines * len(self.train_devices)}", f"note={self.note}",
                *(f"command={arg}" for arg in self.command)]


def vllm_server(cfg, gpus: int, visible: str = "", nodes: list[str] | None = None) -> VllmServer | None:
    """The server this job's stages need (None: none), on `gpus` GPUs per node (`visible`: their
    CUDA_VISIBLE_DEVICES, else 0..gpus-1), one node or `nodes`. ConfigError for what the
    scripts cannot serve."""
    names = [str(n) for n in cfg.run.stages]
    stage = next((n for n in names if n in VLLM_STAGES), None)
    if stage is None:
        return None
    override = cfg.stages[stage].get("generation")  # merged as trainer_settings.stage_group does, without torch
    engine = generation.Engine.of(OmegaConf.merge(OmegaConf.to_container(cfg.generation, resolve=True),
                                                  OmegaConf.to_container(override, resolve=True) if override else {}))
    if not engine.server_mode:
        return None
    gpus_key = f"generation.vllm.server_gpus (stages.{stage}.generation.vllm.server_gpus)"
    v = engine.vllm
    k, dp = v.get("server_gpus", 1), v.get("server_data_parallel_size", 1)
    if not isinstance(k, int) or not isinstance(dp, int):
        raise ConfigError(f"{gpus_key}={k!r} and generation.vllm.server_data_parallel_size={dp!r} are GPU counts: integers")
    if k == 0:  # the user runs the server (server_host:server_port or server_base_url)
        return None
    if k < 0 or dp < 1 or k % dp:
        raise ConfigError(f"{gpus_key}={k} with generation.vllm.server_data_parallel_size={dp}: the server needs "
                          "server_gpus >= 1 and a data-parallel size >= 1 that divides it (the rest is tensor parallel)")
    if v.get("server_base_url"):
        raise ConfigError(f"generation.vllm.server_base_url={v['server_base_url']} names a server of your own, and "
                          f"{gpus_key}={k} asks the sbatch script to start one: set server_base_url=null to use the "
                          "one it starts, or server_gpus=0 to use yours")
    generation.check(engine, stage)
    devices = visible.split(",") if visible else [str(i) for i in range(gpus)]
    if nodes is None:
        if k >= len(devices):
            raise ConfigError(f"{gpus_key}={k} leaves none of this node's {len(devices)} GPUs to train {stage} on: set "
                              f"it below {len(devices)}, or use slurm/multi_node.sbatch, which gives the server a node of its own")
        server, train, host, train_nodes = devices[-k:], devices[:-k], "127.0.0.1", []
        where = f"GPUs {','.join(server)} of this node; training on {','.join(train)}"
    else:
        if len(nodes) < 2:
            raise ConfigError(f"{stage} runs with generation.vllm.mode=server, and slurm/multi_node.sbatch gives TRL's vLLM "
                              f"server the first node and trains on the others, but this job has {len(nodes)} node: "
                              "submit it with --nodes=2 or more, or use slurm/single_node.sbatch (the server on "
                              "server_gpus of the node's GPUs)")
        if k > len(devices):
            raise ConfigError(f"{gpus_key}={k}, and the server's node {nodes[0]} has {len(devices)} GPUs: set it to "
                              f"{len(devices)} or less")
        server, train, host, train_nodes = devices[:k], devices, nodes[0], nodes[1:]
        idle = f"; {len(devices) - k} GPUs of {nodes[0]} idle (server_gpus={len(devices)} gives it all)" if k < len(devices) else ""
        where = f"GPUs {','.join(server)} of {nodes[0]}{idle}; training on {','.join(train_nodes)}"
    port = int(v.get("server_port", 8000))
    command = ["trl", "vllm-serve", "--model", str(vllm_model(cfg, stage)), "--tensor-parallel-size", str(k // dp),
               "--data-parallel-size", str(dp), "--host", "0.0.0.0", "--port", str(port)]
    if cfg.model.get("trust_remote_code"):
        command.append("--trust-remote-code")
    command += [str(arg) for arg in v.get("server_args") or []]
    return VllmServer(command, f"http://{host}:{port}", server, train, train_nodes,
                      f"TRL's vLLM server for {stage} on {where}")


def vllm_model(cfg, stage: str) -> Path:
    """The stage's input checkpoint, which the server starts from; it must exist when the job starts."""
    from pipeline.runner import pending_input, resolve_input

    names = [str(n) for n in cfg.run.stages]
    earlier = {n: "" for n in names[: names.index(stage)]}  # stages this job runs before `stage`
    run_dir, stage_cfg = run_dir_of(cfg), cfg.stages[stage]
    if pending_input(stage_cfg, run_dir, earlier):
        raise ConfigError(f"TRL's vLLM server starts from {stage}'s input, which a stage before it in this job writes: "
                          f"run {stage} in a job of its own (python -m pipeline.slurm submit gives each stage one), or "
                          "set generation.vllm.mode=colocate")
    path, _ = resolve_input(cfg, stage, stage_cfg, run_dir, earlier)
    if path is None:
        raise ConfigError(f"stage {stage!r} needs an input checkpoint: set stages.{stage}.input_stage or stages.{stage}.init")
    return path.resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.slurm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    submit_parser = sub.add_parser("submit", help="submit one job per stage, chained with afterok")
    submit_parser.add_argument("--script", default="slurm/single_node.sbatch", help="sbatch script run by every job")
    submit_parser.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch option, repeatable")
    sub.add_parser("run-dir", help="print the run dir the overrides select")
    server_parser = sub.add_parser("vllm-server", help="print whether and how the job runs TRL's vLLM server")
    server_parser.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    server_parser.add_argument("--visible", default="", help="their CUDA_VISIBLE_DEVICES (default 0..gpus-1)")
    server_parser.add_argument("--nodes", default=None, help="the job's nodes, comma-separated (multi_node.sbatch)")
    args, overrides = parser.parse_known_args(argv)
    overrides = [o for o in overrides if o != "--"]
    if args.command == "run-dir":
        print(run_dir_of(compose_config(overrides)))
        return 0
    if args.command == "vllm-server":
        try:
            nodes = args.nodes.split(",") if args.nodes is not None else None
            server = vllm_server(compose_config(overrides), args.gpus, args.visible, nodes)
        except (ConfigError, HydraException, OmegaConfBaseException) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print("\n".join(server.lines() if server else ["server=0"]))
        return 0
    script = str(ROOT / args.script) if not os.path.isabs(args.script) else args.script
    try:
        if any(o in MULTIRUN for o in overrides):
            submit_sweep([o for o in overrides if o not in MULTIRUN], script, args.sbatch_arg)
        else:
            submit(overrides, script, args.sbatch_arg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
