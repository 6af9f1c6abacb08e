"""Step time of the demo model's pretrain and grpo at trainer.precision=fp32 against bf16, and
the cost of TensorBoard logging on pretrain (trainer.report_to=tensorboard against none).

    python benchmarks/precision.py --init <run>/sft/final [--steps 100 --warmup 10]
                                   [--grpo-steps 10 --grpo-warmup 2] [--repeats 3] [hydra overrides...]

Each measurement is one of benchmarks/overhead.py's pipeline parts in a fresh process: the
stage's real run() up to the end of training, timed from the end of step `warmup` to the end
of step `warmup + steps` with eval and save intervals beyond the run, so only training steps
(and their logging) are inside the window. Pretrain runs with AdamW (overhead.py's comparison
is AdamW; the demo's pretrain uses Muon, whose extra work is fp32 in both precisions). The
variants alternate `--repeats` times and the figures are medians. On a CPU, bf16 is torch's CPU
autocast: master weights and optimizer stay fp32, matmuls run in bf16, which can be slower than
fp32 on cores without native bf16 units; the figure is reported as measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (benchmarks/overhead.py: the timed stage parts)

PRETRAIN = {  # name: overrides
    "fp32, tensorboard": ["trainer.precision=fp32", "trainer.report_to=tensorboard"],
    "bf16, tensorboard": ["trainer.precision=bf16", "trainer.report_to=tensorboard"],
    "fp32, none": ["trainer.precision=fp32", "trainer.report_to=none"],
}
GRPO = {
    "fp32": ["trainer.precision=fp32"],
    "bf16": ["trainer.precision=bf16"],
}


def measure(part: str, variants: dict[str, list[str]], args, overrides: list[str]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    names = list(variants)
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:  # each variant goes first in turn
            extra = variants[name]
            result = overhead.run_part(part, args, [*overrides, *extra])
            runs[name].append(result)
            seconds = result["seconds"] / (args.steps if part.startswith("pretrain") else args.grpo_steps)
            print(f"  {part} {name} (repeat {repeat + 1}): {seconds:.4f} s/step", flush=True)
    return runs


def per_step(runs: list[dict], steps: int) -> float:
    return statistics.median(r["seconds"] for r in runs) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--grpo-steps", type=int, default=10)
    parser.add_argument("--grpo-warmup", type=int, default=2)
    parser.add_argument("--init", type=Path, default=None, help="grpo's input (an sft final/ of the demo); none: pretrain only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only-tensorboard", action="store_true", help="pretrain with and without TensorBoard only")
    args, overrides = parser.parse_known_args()

    variants = {k: v for k, v in PRETRAIN.items() if k.startswith("fp32")} if args.only_tensorboard else PRETRAIN
    pretrain = measure("pretrain-pipeline", variants, args, overrides)
    grpo = measure("grpo-pipeline", GRPO, args, overrides) if args.init is not None and not args.only_tensorboard else {}

    env = next(iter(pretrain.values()))[0]["env"]
    overhead.print_env(env)
    print(f"\npretrain ({args.steps} timed steps after {args.warmup}, median of {args.repeats}):")
    base = per_step(pretrain["fp32, tensorboard"], args.steps)
    for name, runs in pretrain.items():
        seconds = per_step(runs, args.steps)
        print(f"  {name:<20} {seconds * 1000:8.2f} ms/step  {seconds / base:6.3f}x fp32+tensorboard")
    tb, none = pretrain["fp32, tensorboard"], pretrain["fp32, none"]
    pairs = [100 * (a["seconds"] - b["seconds"]) / b["seconds"] for a, b in zip(tb, none)]
    print(f"  TensorBoard logging overhead: {100 * (per_step(tb, 1) - per_step(none, 1)) / per_step(none, 1):+.2f}% "
          f"(medians of separate processes; per repeat {', '.join(f'{x:+.1f}%' for x in pairs)}; goal < 2%)")
    own = statistics.median(r["callback_seconds"].get("TensorBoardCallback", 0.0) for r in tb)
    window = statistics.median(r["seconds"] for r in tb) * (args.steps + args.warmup) / args.steps
    print(f"  TensorBoardCallback's own time: {own * 1000:.1f} ms over {args.steps + args.warmup} steps, "
          f"{100 * own / window:.3f}% of their time (the direct cost)")
    if grpo:
        print(f"\ngrpo ({args.grpo_steps} timed steps after {args.grpo_warmup}, median of {args.repeats}, from {args.init}):")
        fp32 = per_step(grpo["fp32"], args.grpo_steps)
        for name, runs in grpo.items():
            seconds = per_step(runs, args.grpo_steps)
            print(f"  {name:<20} {seconds:8.3f} s/step  {seconds / fp32:6.3f}x fp32")


if __name__ == "__main__":
    main()
