"""Print the pretrain figures of the demo preset: wall time, tokens/s, eval loss, accuracy.

    python benchmarks/pretrain_demo.py [extra hydra overrides...]

Runs `python -m pipeline run.stages=[pretrain]` into a fresh temporary run dir (so nothing is
skipped) and reads the numbers back from the stage's manifest and metrics.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(overrides: list[str]) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="bench-pretrain-")) / "run"
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pipeline", "run.stages=[pretrain]", f"run.dir={run_dir}", *overrides],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
    )
    command_wall = time.perf_counter() - start
    stage = run_dir / "pretrain"
    metrics = json.loads((stage / "metrics.json").read_text())
    manifest = json.loads((stage / "stage.json").read_text())
    rows = [
        ("command wall time (s, incl. startup, data, tokenizer)", f"{command_wall:.0f}"),
        ("stage wall time (s)", f"{manifest['wall_time_s']:.0f}"),
        ("train steps", f"{metrics['train_steps']}"),
        ("train tokens", f"{metrics['train_tokens']:,}"),
        ("tokens_per_second (training steps only)", f"{metrics['tokens_per_second']:,.0f}"),
        ("parameters", f"{metrics['total_parameters']:,}"),
        ("train loss first -> last", f"{metrics['train_loss_first']:.3f} -> {metrics['train_loss']:.3f}"),
        ("eval_loss", f"{metrics['eval_loss']:.4f}"),
        ("eval_perplexity", f"{metrics['eval_perplexity']:.3f}"),
        (f"eval_accuracy (greedy, text format, {metrics['eval_num_problems']} held-out)", f"{metrics['eval_accuracy']:.3f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"pretrain demo figures (run dir {run_dir})")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main(sys.argv[1:])
