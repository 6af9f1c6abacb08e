"""Wall time of the smoke pretrain stage with 1 process vs 2 CPU processes (DDP over gloo).

    python benchmarks/ddp_smoke.py [extra hydra overrides...]

Both runs do the same number of optimizer steps; with 2 ranks each step sees twice the data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict, run_dir: Path) -> tuple[float, dict, dict]:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    stage = run_dir / "pretrain"
    return wall, json.loads((stage / "metrics.json").read_text()), json.loads((stage / "stage.json").read_text())


def main(overrides: list[str]) -> None:
    base = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    args = ["-m", "pipeline", "preset=smoke", "run.stages=[pretrain]", "stages.pretrain.max_steps=100", *overrides]
    one = [sys.executable, *args, f"run.dir={base / 'one'}"]
    two = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "conf/accelerate/ddp.yaml",
           "--num_processes", "2", *args, f"run.dir={base / 'two'}"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    print("launch                     command wall (s)  stage wall (s)  steps  train tokens  tokens/s")
    for name, cmd, run_dir, threads in (("1 process (2 threads)", one, base / "one", "2"),
                                        ("2 processes x 1 thread", two, base / "two", "1")):
        wall, metrics, manifest = timed(cmd, {**env, "OMP_NUM_THREADS": threads}, run_dir)
        print(f"{name:<26} {wall:>16.1f}  {manifest['wall_time_s']:>14.1f}  {metrics['train_steps']:>5}  "
              f"{metrics['train_tokens']:>12,}  {metrics['tokens_per_second']:>8,.0f}")


if __name__ == "__main__":
    main(sys.argv[1:])
