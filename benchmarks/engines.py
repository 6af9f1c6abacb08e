"""The generation engines on the demo, on this machine: grpo's step time and generation share, and
test_time's wall time, with `generation.engine=generate` against `continuous_batching`, from the
same sft model, alternating so that a slow spell of the machine hits both.

    python benchmarks/engines.py --init SFT_FINAL [--steps 5] [--problems 200] [--repeats 2] \
        [--out DIR] [hydra overrides...]

SFT_FINAL is the demo's sft/final (python -m pipeline run.stages=[pretrain,sft]). Each run is
`python -m pipeline preset=demo generation.engine=E run.stages=[grpo] stages.grpo.init=SFT_FINAL
stages.grpo.max_steps=STEPS ...` (held-out evaluation and the pass-rate curve cut to a few problems,
so the figures are the rollouts'), then `run.stages=[test_time] stages.test_time.init=SFT_FINAL
stages.test_time.methods=[greedy,sample] stages.test_time.eval_problems=PROBLEMS`. On a GPU
node the same script measures the GPU figures (add generation.engine=vllm runs by hand).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("generate", "continuous_batching")
LIBRARIES = ("torch", "transformers", "trl")


def pipeline(out: Path, name: str, overrides: list[str]) -> Path:
    run_dir = out / name
    command = [sys.executable, "-m", "pipeline", "preset=demo", f"run.dir={run_dir}", "run.force=true",
               "trainer.report_to=none", *overrides]
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    return run_dir


def grpo(out: Path, name: str, init: Path, engine: str, steps: int, extra: list[str]) -> dict:
    run_dir = pipeline(out, name, [f"generation.engine={engine}", "run.stages=[grpo]", f"stages.grpo.init={init}",
                                   f"stages.grpo.max_steps={steps}", f"stages.grpo.save_steps={steps}",
                                   f"stages.grpo.eval_every={steps}", "stages.grpo.curve_problems=8",
                                   "stages.grpo.eval_problems=8", "stages.grpo.eval_samples=1", *extra])
    return json.loads((run_dir / "grpo" / "metrics.json").read_text())


def test_time(out: Path, name: str, init: Path, engine: str, problems: int, extra: list[str]) -> dict:
    run_dir = pipeline(out, name, [f"generation.engine={engine}", "run.stages=[test_time]", f"stages.test_time.init={init}",
                                   "stages.test_time.methods=[greedy,sample]", f"stages.test_time.eval_problems={problems}",
                                   *extra])
    metrics = json.loads((run_dir / "test_time" / "metrics.json").read_text())
    metrics["wall_s"] = json.loads((run_dir / "test_time" / "stage.json").read_text())["wall_time_s"]
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", type=Path, required=True, help="the demo's sft/final")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "engines")
    args, extra = parser.parse_known_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    init = args.init.resolve()
    runs: dict[str, list[tuple[dict, dict]]] = {e: [] for e in ENGINES}
    for repeat in range(args.repeats):
        for engine in ENGINES:
            runs[engine].append((grpo(out, f"grpo_{engine}_{repeat}", init, engine, args.steps, extra),
                                 test_time(out, f"test_time_{engine}_{repeat}", init, engine, args.problems, extra)))
    print(f"demo sft model {init}; grpo {args.steps} steps of the demo's 32 prompts x 8; test_time greedy + sample on "
          f"{args.problems} held-out problems")
    print("| engine | run | grpo step (s) | generation share | test_time wall (s) | greedy | sample |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for engine, pairs in runs.items():
        for k, (g, t) in enumerate(pairs):
            print(f"| {engine} | #{k} | {g['step_time_s']:.2f} | {g['generation_share']:.2f} | {t['wall_s']:.0f} | "
                  f"{t['accuracy/greedy']:.3f} | {t['accuracy/sample']:.3f} |")
    base, cb = (statistics.mean(g["step_time_s"] for g, _ in runs[e]) for e in ENGINES)
    print(f"mean grpo step: generate {base:.2f} s, continuous_batching {cb:.2f} s ({cb / base:.1f}x)")
    print("versions: " + ", ".join(f"{name} {metadata.version(name)}" for name in LIBRARIES)
          + f", Python {platform.python_version()}")


if __name__ == "__main__":
    main()
