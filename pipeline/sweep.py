"""Sweeps (`python -m pipeline -m seed=0,1,2 ...`, or `python -m pipeline.slurm submit -- -m
...`): each job runs in its own run dir, `<run.dir>/<the job's swept overrides>` (e.g.
outputs/default/seed-1), so the jobs of a sweep never replace each other's stages, and each has
its own lock, skip and resume. After each job the sweep root gets sweep.md and sweep.json: one
row per job dir found there, with its stages' status and headline metrics.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, open_dict

from pipeline import artifacts
from pipeline.report import HEADLINE, format_value

SUMMARY_MD, SUMMARY_JSON = "sweep.md", "sweep.json"


def parsed(argv: list[str]) -> list:
    """Hydra's parse of each override in argv (flags and what does not parse left out)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, overrides = OverridesParser.create(), []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            overrides += parser.parse_overrides([arg])
        except Exception:  # Hydra has parsed the command line already; a flag's value lands here
            continue
    return overrides


def swept_keys(argv: list[str]) -> list[str]:
    """The keys the command line sweeps over (seed=0,1; lr=range(...); x=choice(...))."""
    return [o.key_or_group for o in parsed(argv) if o.is_sweep_override()]


def expand(argv: list[str]) -> list[list[str]]:
    """The jobs of a sweep, as Hydra's basic sweeper makes them: one override list per point of
    the product of the swept values, the other overrides as they are."""
    jobs: list[list[str]] = [[]]
    for override in parsed(argv):
        key = override.get_key_element()
        if override.is_sweep_override():
            jobs = [job + [f"{key}={value}"] for job in jobs for value in override.sweep_string_iterator()]
        else:
            jobs = [job + [override.input_line] for job in jobs]
    return jobs


def job_name(job_overrides: list[str], keys: list[str]) -> str:
    """`key-value` of the job's swept overrides, in command-line order, joined by `+`
    (seed-1+optim.lr-0.001): characters a Hydra override takes unquoted, so the dir's path can be
    passed on as stages.<name>.init=...; any other character becomes `_`."""
    parts = []
    for line in job_overrides:
        key, _, value = line.lstrip("+~").partition("=")
        if key in keys:
            parts.append(f"{key}-{value}")
    return re.sub(r"[^\w.+\-]", "_", "+".join(parts))


def job_config(cfg: DictConfig, overrides: list[str], argv: list[str]) -> DictConfig:
    """The job's config with run.dir set to its own dir under the sweep's run.dir and
    run.sweep_job to its name. A sweep over run.dir or run.name alone already separates its jobs."""
    root = Path(str(cfg.run.dir))
    keys = [k for k in swept_keys(argv) if k not in ("run.dir", "run.name")]
    name = job_name(overrides, keys)
    if not name:
        return cfg
    with open_dict(cfg):
        cfg.run.dir = str(root / name)
        cfg.run.sweep_job = name
    return cfg


def job_overrides(job: list[str], argv: list[str], root: Path) -> list[str]:
    """A job's overrides as a command line that runs it alone, in its own run dir (SLURM)."""
    name = job_name(job, [k for k in swept_keys(argv) if k not in ("run.dir", "run.name")])
    if not name:
        return job
    return [*(o for o in job if not o.lstrip("+~").startswith("run.dir=")), f"run.dir={root / name}", f"run.sweep_job={name}"]


def jobs_in(root: Path) -> list[Path]:
    """The run dirs directly under root (a config.yaml marks one)."""
    return sorted(d for d in root.iterdir() if d.is_dir() and (d / "config.yaml").is_file()) if root.is_dir() else []


def write_summary(root: Path) -> Path | None:
    """sweep.md and sweep.json in root: each job dir, its stages' status and headline metrics."""
    jobs = []
    for job in jobs_in(root):
        stages = {}
        for stage_dir in sorted(d for d in job.iterdir() if (d / artifacts.MANIFEST).is_file()):
            manifest = artifacts.read_manifest(stage_dir) or {}
            metrics = artifacts.read_metrics(stage_dir) or {}
            stages[stage_dir.name] = {"status": manifest.get("status", "?"), "started": manifest.get("started", ""),
                                      "metrics": {k: v for k, v in metrics.items() if k in HEADLINE}}
        order = sorted(stages, key=lambda s: stages[s]["started"])
        jobs.append({"run_dir": job.name, "stages": {s: stages[s] for s in order}})
    if not jobs:
        return None
    artifacts.write_json_atomic(root / SUMMARY_JSON, jobs)
    columns = []  # (stage, metric) pairs some job has, in stage order
    for job in jobs:
        for stage, record in job["stages"].items():
            columns += [(stage, m) for m in HEADLINE if m in record["metrics"] and (stage, m) not in columns]
    lines = ["# Sweep summary", "", f"Sweep root: `{root}`; one run dir per job (its report.md has the details).", "",
             "| run dir | stages | " + " | ".join(f"{s} {m}" for s, m in columns) + " |",
             "| --- | --- |" + " --- |" * len(columns)]
    for job in jobs:
        status = ", ".join(f"{s} {r['status']}" for s, r in job["stages"].items())
        values = [format_value(job["stages"].get(s, {}).get("metrics", {}).get(m, "")) for s, m in columns]
        lines.append(f"| [{job['run_dir']}]({job['run_dir']}/report.md) | {status} | " + " | ".join(values) + " |")
    artifacts.write_text_atomic(root / SUMMARY_MD, "\n".join(lines) + "\n")
    return root / SUMMARY_MD
