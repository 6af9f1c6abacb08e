"""Submit the stage chain to SLURM: one job per stage, linked with --dependency=afterok.

    python -m pipeline.slurm submit [--script slurm/multi_node.sbatch] [--sbatch-arg=--partition=gpu] \\
        -- <hydra overrides>
    python -m pipeline.slurm submit -- -m seed=0,1,2 <hydra overrides>   # a sweep: one chain per job
    python -m pipeline.slurm run-dir -- <hydra overrides>     # print the run dir they select

Every job runs one stage against the shared run dir. A failed stage stops the jobs after it;
submitting the same command again skips the stages already completed with the same config and
starts from the failed one. Preempted jobs requeue themselves (slurm/common.sh).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from pipeline import sweep
from pipeline.config import compose_config
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MULTIRUN = ("-m", "--multirun")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.slurm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    submit_parser = sub.add_parser("submit", help="submit one job per stage, chained with afterok")
    submit_parser.add_argument("--script", default="slurm/single_node.sbatch", help="sbatch script run by every job")
    submit_parser.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch option, repeatable")
    sub.add_parser("run-dir", help="print the run dir the overrides select")
    args, overrides = parser.parse_known_args(argv)
    overrides = [o for o in overrides if o != "--"]
    if args.command == "run-dir":
        print(run_dir_of(compose_config(overrides)))
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
