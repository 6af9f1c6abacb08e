"""Print the test-time figures on a trained policy (default: the demo SFT checkpoint).

    python benchmarks/power_sampling.py compare [--problems 32] [--model DIR]
        the fast and the reference power sampler side by side, in one process, on the same
        model, prompts, settings and random streams: wall time, generated tokens/s, acceptance
        rate, and the fast/reference throughput ratio
    python benchmarks/power_sampling.py methods [--problems 500] [--reward-model DIR]
        held-out accuracy and generated tokens per problem of greedy, sampling (T=1), low
        temperature (T=1/alpha), power sampling, majority vote and best-of-N (with a reward model)

Settings default to conf/stages/test_time.yaml's (alpha, mcmc_steps, block_size, num_samples,
max_new_tokens, batch_size); the problems are the first held-out problems of the default task.
Hold the bench lock: flock /work/demo/bench.lock nice -n 5 python benchmarks/power_sampling.py ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import compose_config  # noqa: E402
from pipeline.evaluate import render_prompts  # noqa: E402
from pipeline.models import load_policy  # noqa: E402
from pipeline.reward_model import RewardScorer
from pipeline.sampling import (  # noqa: E402
    METHODS, TestTimeSettings, power_sample, power_sample_reference, run_method,
)
from pipeline.tasks import build_task  # noqa: E402
from pipeline.tokenizer import load_chat_tokenizer, stop_token_ids  # noqa: E402

DEMO_MODEL = "/work/demo/sft/sft/final"


def compare(model, tokenizer, task, n: int, settings: TestTimeSettings) -> None:
    problems = task.eval_problems()[:n]
    prompts = render_prompts(tokenizer, task, [p["prompt"] for p in problems], "chat")
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    options = dict(alpha=settings.alpha, mcmc_steps=settings.mcmc_steps, block_size=settings.block_size,
                   max_new_tokens=settings.max_new_tokens, stop_ids=stop_token_ids(tokenizer), seed=settings.seed)
    rows = {}
    for name, run in (
        ("fast", lambda: power_sample(model, ids, pad_id=tokenizer.pad_token_id, batch_size=settings.batch_size, **options)),
        ("reference", lambda: power_sample_reference(model, ids, **options)),
    ):
        start = time.perf_counter()
        result = run()
        wall = time.perf_counter() - start
        tokens = sum(result.generated_tokens)
        accuracy = sum(task.verify(tokenizer.decode(t, skip_special_tokens=True), p["answer"])
                       for t, p in zip(result.token_ids, problems)) / n
        rows[name] = (result, wall, tokens / wall, accuracy)
        print(f"  {name:<9}  wall {wall:7.1f} s  generated tokens {tokens:7d}  tokens/s {tokens / wall:7.0f}  "
              f"acceptance {result.acceptance_rate:.3f}  accuracy {accuracy:.3f}", flush=True)
    fast, reference = rows["fast"][0], rows["reference"][0]
    same = sum(a == b for a, b in zip(fast.token_ids, reference.token_ids))
    print(f"  throughput ratio fast / reference: {rows['fast'][2] / rows['reference'][2]:.1f}x; "
          f"wall-time ratio: {rows['reference'][1] / rows['fast'][1]:.1f}x; identical chains: {same}/{n}")


def methods(model, tokenizer, task, n: int, settings: TestTimeSettings, reward_path: str | None) -> None:
    problems = task.eval_problems()[:n]
    reward = None
    if reward_path:
        reward = RewardScorer.load(reward_path, batch_size=settings.batch_size)
    candidates: dict = {}
    print(f"  {'method':<16} {'accuracy':>8} {'tokens/problem':>15} {'wall (s)':>9}")
    for method in METHODS:
        if method == "best_of_n" and reward is None:
            print(f"  {method:<16} (no --reward-model)")
            continue
        r = run_method(method, model, tokenizer, task, problems, settings, reward, candidates)
        extra = f"  acceptance {r.extras['acceptance_rate']:.3f}" if "acceptance_rate" in r.extras else ""
        print(f"  {method:<16} {r.accuracy:8.3f} {r.tokens_per_problem:15.1f} {r.wall_time_s:9.1f}{extra}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["compare", "methods"])
    parser.add_argument("--model", default=DEMO_MODEL)
    parser.add_argument("--problems", type=int, default=None, help="default: 32 for compare, 500 for methods")
    parser.add_argument("--reward-model", default=None, help="a reward stage's final/ for best_of_n")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. stages.test_time.mcmc_steps=4")
    args = parser.parse_args()
    cfg = compose_config(args.overrides)
    settings = TestTimeSettings.of(cfg.stages.test_time, cfg.seed)
    model, tokenizer = load_policy(args.model), load_chat_tokenizer(args.model)
    task = build_task(cfg.task)
    n = args.problems or (32 if args.mode == "compare" else 500)
    print(f"{args.mode}: {args.model}, {n} held-out problems, alpha={settings.alpha:g}, mcmc_steps={settings.mcmc_steps}, "
          f"block_size={settings.block_size}, max_new_tokens={settings.max_new_tokens}, batch_size={settings.batch_size}, "
          f"torch threads={torch.get_num_threads()}")
    if args.mode == "compare":
        compare(model, tokenizer, task, n, settings)
    else:
        methods(model, tokenizer, task, n, settings, args.reward_model)


if __name__ == "__main__":
    main()
