"""Submit the stage chain to SLURM: one job per stage, linked with --dependency=afterok.

    python -m pipeline.slurm submit [--script slurm/multi_node.sbatch] [--sbatch-arg=--partition=gpu] \\
        -- <hydra overrides>
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

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


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
    from pipeline.runner import ConfigError

    try:
        submit(overrides, str(ROOT / args.script) if not os.path.isabs(args.script) else args.script, args.sbatch_arg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
