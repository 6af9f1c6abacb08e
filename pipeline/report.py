"""The run report: one table of every finished stage's metrics, each stage's own summary.md
(if it writes one), plus each stage's plots."""

from __future__ import annotations

from pathlib import Path

from pipeline import artifacts


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


STAGE_SUMMARY = "summary.md"  # markdown a stage writes into its dir for the report


def write_report(run_dir: Path, stage_order: list[str], sweep_job: str | None = None) -> Path:
    """report.md in run_dir; `sweep_job`: the job's swept overrides, when it is a job of a sweep
    (the sweep's summary, sweep.md, is in the parent dir)."""
    present = [d.name for d in sorted(run_dir.iterdir()) if d.is_dir() and (d / artifacts.MANIFEST).exists()]
    order = [s for s in stage_order if s in present] + [s for s in present if s not in stage_order]
    lines = ["# Run report", "", f"Run directory: `{run_dir}`", ""]
    if sweep_job:
        lines += [f"Sweep job `{sweep_job}`; every job of the sweep: [../sweep.md](../sweep.md)", ""]
    lines += summary_table(run_dir, order)
    for stage in order:  # a stage's own summary (e.g. test_time's methods side by side)
        section = run_dir / stage / STAGE_SUMMARY
        if section.is_file():
            lines += ["", section.read_text().rstrip()]
    lines += ["", "## All metrics", "", "| stage | status | wall time (s) | metric | value |", "| --- | --- | --- | --- | --- |"]
    plots = []
    for stage in order:
        manifest = artifacts.read_manifest(run_dir / stage) or {}
        metrics = artifacts.read_metrics(run_dir / stage) or {}
        status = manifest.get("status", "?")
        wall = format_value(manifest.get("wall_time_s", ""))
        if not metrics:
            lines.append(f"| {stage} | {status} | {wall} | | |")
        for i, (name, value) in enumerate(sorted(metrics.items())):
            head = f"| {stage} | {status} | {wall} " if i == 0 else "| | | "
            lines.append(f"{head}| {name} | {format_value(value)} |")
        plots += sorted((run_dir / stage).glob("*.png"))
    samples = [f for stage in order for f in sorted((run_dir / stage).glob("*samples.jsonl"))]
    if samples:  # each problem's answers with their verdicts (and test_time's candidates and picks)
        lines += ["", "## Samples", ""]
        lines += [f"- [{f.relative_to(run_dir)}]({f.relative_to(run_dir)})" for f in samples]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({p.relative_to(run_dir)})" for p in plots]
    path = run_dir / "report.md"
    artifacts.write_text_atomic(path, "\n".join(lines) + "\n")
    return path


HEADLINE = ("eval_accuracy", "eval_accuracy_sampled", "eval_pairwise_accuracy", "eval_loss")


def summary_table(run_dir: Path, order: list[str]) -> list[str]:
    """One row per stage with the headline metrics every stage shares, side by side."""
    rows = {stage: artifacts.read_metrics(run_dir / stage) or {} for stage in order}
    columns = [m for m in HEADLINE if any(m in metrics for metrics in rows.values())]
    if not columns:  # e.g. only test_time, whose numbers are per method (its own table follows)
        return []
    lines = ["| stage | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for stage, metrics in rows.items():
        lines.append(f"| {stage} | " + " | ".join(format_value(metrics.get(m, "")) for m in columns) + " |")
    return lines


def plot_curves(path: Path, curves: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, title: str) -> Path:
    """Save a line plot of named (x, y) curves as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=name, marker="." if len(xs) < 30 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def first_and_last_loss(log_history: list[dict]) -> tuple[float, float]:
    """The first and last logged training loss of a Trainer run (nan if none was logged)."""
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return (losses[0], losses[-1]) if losses else (float("nan"), float("nan"))


def plot_loss(log_history: list[dict], path: Path, title: str, eval_key: str = "eval_loss") -> None:
    """Train and eval loss against step, from a Trainer's log history (`eval_key`: the eval
    loss's name there; a trainer with several evaluation sets logs eval_<set>_loss)."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e[eval_key]) for e in log_history if eval_key in e]
    curves = {name: tuple(map(list, zip(*points))) for name, points in (("train", train), ("eval", evals)) if points}
    if curves:
        plot_curves(path, curves, "step", "loss", title)
