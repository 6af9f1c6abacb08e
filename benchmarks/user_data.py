"""Issue 20's figures: the time to load and check a large local JSONL split before any model is
built, and the extra time per grpo step of a user reward function that does nothing.

    python benchmarks/user_data.py --init <run>/sft/final [--rows 100000] [--steps 10 --warmup 2 --repeats 3]

1. Load and check. Writes `--rows` rows of an rl split (GSM8K-sized string prompts, an answer
   and an extra column) and of an sft split in the `messages` form (four turns), then times,
   each in a fresh process, `build_task(cfg.task)` + `task.validate([split])`: what the runner
   does before any stage runs. "cold" starts from an empty `datasets` cache (the file is parsed
   into Arrow), "warm" reuses it. Then the whole CLI on the rl file with one bad row, the last:
   the time until it exits 2, and `python -c "import stages.grpo"` alone for comparison (the
   imports every invocation pays). No model is loaded in any of these (--init is only read for
   its tokenizer-free check).
2. A do-nothing user reward. grpo on the `--init` checkpoint (the demo's sft final/ is what the
   figures in RESULTS.md use; preset=demo settings) with reward_weights {correct: 1} against
   {correct: 1, noop: 1}, where noop returns 0.0 per completion. Each run is a fresh process
   (benchmarks/overhead.py's timed grpo stage). Reported: the step time of each (median over
   repeats, variants alternating), and the direct cost: the time spent in TRL's
   _calculate_rewards per step, whose difference is what the extra function adds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent
RESULT = "RESULT "
NOOP = "user_data:noop"


def noop(prompts, completions, **kwargs) -> list[float]:
    """The user reward that does nothing."""
    return [0.0] * len(completions)


# --------------------------------------------------------------------------- 1. load and check


def write_splits(folder: Path, rows: int) -> dict[str, Path]:
    question = ("Natalia sold clips to {k} of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?")
    paths = {"rl": folder / "rl.jsonl", "sft": folder / "sft.jsonl"}
    with paths["rl"].open("w") as f:
        for k in range(rows):
            f.write(json.dumps({"prompt": question.format(k=k), "answer": str(k + k // 2), "level": k % 5}) + "\n")
    with paths["sft"].open("w") as f:
        for k in range(rows):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": question.format(k=k)},
                {"role": "assistant", "content": f"In May she sold {k // 2}. Altogether {k + k // 2}."},
                {"role": "user", "content": "And in June, twice May?"},
                {"role": "assistant", "content": f"{2 * (k // 2)}."}]}) + "\n")
    return paths


def check_in_fresh_process(split: str, path: Path, cache: Path) -> float:
    code = f"""
import time
start = time.perf_counter()
from pipeline.config import compose_config
from pipeline.tasks import build_task
cfg = compose_config(["task=jsonl", "task.splits.{split}={path}"])
imported = time.perf_counter()
task = build_task(cfg.task)
task.validate([{split!r}])
print({RESULT!r} + str(time.perf_counter() - imported))
"""
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return float(next(line for line in proc.stdout.splitlines() if line.startswith(RESULT))[len(RESULT):])


def timed(command: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    return time.perf_counter() - start, proc


def load_and_check(rows: int, init: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-user-data-") as tmp:
        folder = Path(tmp)
        paths = write_splits(folder, rows)
        for split, path in paths.items():
            size = path.stat().st_size / 2**20
            cache = folder / f"cache-{split}"
            cold = check_in_fresh_process(split, path, cache)
            warm = check_in_fresh_process(split, path, cache)
            print(f"  {split} ({rows} rows, {size:.1f} MiB): load + check {cold:.2f} s cold, {warm:.2f} s warm "
                  f"({rows / cold:,.0f} / {rows / warm:,.0f} rows/s)", flush=True)
        bad = folder / "rl_bad.jsonl"
        lines = paths["rl"].read_text().splitlines()
        lines[-1] = json.dumps({"prompt": ["not", "a", "conversation"], "answer": "1", "level": 0})
        bad.write_text("\n".join(lines) + "\n")
        env = {**os.environ, "HF_DATASETS_CACHE": str(folder / "cache-bad"), "HF_DATASETS_OFFLINE": "1"}
        imports, _ = timed([sys.executable, "-c", "import pipeline.runner, stages.grpo"], env)
        seconds, proc = timed([sys.executable, "-m", "pipeline", "preset=demo", "task=jsonl", f"task.splits.rl={bad}",
                               "run.stages=[grpo]", f"stages.grpo.init={init}", f"run.dir={folder / 'run'}"], env)
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        print(f"  CLI with a bad last row: exit {proc.returncode} after {seconds:.2f} s (imports alone {imports:.2f} s); "
              f"{'no' if not (folder / 'run' / 'grpo').exists() else 'a'} grpo dir written", flush=True)
        print(f"    {last[:220]}", flush=True)


# --------------------------------------------------------------------------- 2. a do-nothing reward


VARIANTS = {"correct": [], "correct + noop": [f"+stages.grpo.reward_functions.noop={NOOP}", "+stages.grpo.reward_weights.noop=1.0"]}


def reward_part(init: Path, warmup: int, steps: int, overrides: list[str]) -> dict:
    """In this process: the grpo stage timed by overhead.py, TRL's _calculate_rewards timed too."""
    import overhead
    from stages.grpo import StageGRPOTrainer

    spent = {"seconds": 0.0, "calls": 0}
    original = StageGRPOTrainer._calculate_rewards

    def timed_rewards(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent["seconds"] += time.perf_counter() - start
            spent["calls"] += 1

    StageGRPOTrainer._calculate_rewards = timed_rewards
    with tempfile.TemporaryDirectory(prefix="bench-user-reward-") as tmp:
        result = overhead.grpo_pipeline(overrides, init, warmup, steps, Path(tmp) / "run")
    total_steps = warmup + steps
    return {"seconds_per_step": result["seconds_per_step"], "rewards_s_per_step": spent["seconds"] / total_steps,
            "reward_calls": spent["calls"], "env": overhead.environment()}


def reward_overhead(init: Path, warmup: int, steps: int, repeats: int, overrides: list[str]) -> None:
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for repeat in range(repeats):
        for name in names[repeat % 2:] + names[: repeat % 2]:
            command = [sys.executable, str(Path(__file__).resolve()), "--part", "reward", "--init", str(init),
                       "--steps", str(steps), "--warmup", str(warmup), "preset=demo", *overrides, *VARIANTS[name]]
            proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
            lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            result = json.loads(lines[-1][len(RESULT):])
            runs[name].append(result)
            print(f"  {name} (repeat {repeat + 1}): {result['seconds_per_step']:.4f} s/step, rewards "
                  f"{1000 * result['rewards_s_per_step']:.2f} ms/step", flush=True)
    step = {name: statistics.median(r["seconds_per_step"] for r in rs) for name, rs in runs.items()}
    rewards = {name: statistics.median(r["rewards_s_per_step"] for r in rs) for name, rs in runs.items()}
    extra = rewards["correct + noop"] - rewards["correct"]
    print(f"grpo step (median of {repeats}): correct {step['correct']:.4f} s, correct + noop {step['correct + noop']:.4f} s "
          f"({100 * (step['correct + noop'] / step['correct'] - 1):+.1f}% end to end, process-to-process noise included)")
    print(f"TRL's reward computation per step: {1000 * rewards['correct']:.2f} ms against {1000 * rewards['correct + noop']:.2f} ms: "
          f"the do-nothing function adds {1000 * extra:.3f} ms, {100 * extra / step['correct']:.3f}% of a step (goal < 1%)")
    print("versions:", json.dumps(runs["correct"][0]["env"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", type=Path, required=True, help="an sft final/ for grpo (the demo's, for RESULTS.md)")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("load", "reward"), default=None)
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.part == "reward":
        print(RESULT + json.dumps(reward_part(args.init.resolve(), args.warmup, args.steps, overrides)), flush=True)
        return
    if args.only in (None, "load"):
        print(f"load and check {args.rows} rows, each in a fresh process:", flush=True)
        load_and_check(args.rows, args.init.resolve())
    if args.only in (None, "reward"):
        print(f"a do-nothing user reward in grpo ({args.steps} steps after {args.warmup}, {args.repeats} repeats):", flush=True)
        reward_overhead(args.init.resolve(), args.warmup, args.steps, args.repeats, overrides)


if __name__ == "__main__":
    main()
