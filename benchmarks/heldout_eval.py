"""Held-out accuracy of several policies on more problems than the stages evaluate, with
standard errors and paired differences, for the arithmetic task.

    python benchmarks/heldout_eval.py --run-config RUN/config.yaml [--n 2000] [--samples 4] \
        sft=RUN/sft/final grpo=RUN/grpo/final ...

The problems are drawn fresh from the run's task config, disjoint from every split of it (the
stages' own 500 held-out problems included), so none of them was trained on. Every policy sees
the same problems; each line after the first gives its difference to the first policy, paired
by problem, with the standard error of that difference (greedy: one answer per problem;
sampled: the mean of --samples completions at temperature 1 per problem).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402
from transformers import set_seed  # noqa: E402

from pipeline.evaluate import evaluate  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.tasks import build_task  # noqa: E402
from pipeline.tokenizer import load_chat_tokenizer  # noqa: E402


def mean_and_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def per_problem_scores(model, tokenizer, task, problems: list[dict], temperature: float, samples: int, seed: int,
                       max_new_tokens: int, batch_size: int) -> list[float]:
    """Mean verifier reward per problem, through the stages' evaluation (chat format)."""
    set_seed(seed)
    result = evaluate(model, tokenizer, task, problems, temperature=temperature, num_samples=samples,
                      max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [sum(task.verify(t, p["answer"]) for t in row) / len(row) for row, p in zip(result.completions, problems)]


def score_policy(path: str | Path, task, problems: list[dict], samples: int, seed: int = 0, max_new_tokens: int = 72,
                 batch_size: int = 128) -> dict[str, list[float]]:
    """Per-problem scores of the policy at PATH: {"greedy": [...], "sampled": [...]}."""
    model, tokenizer = load_model(str(path)), load_chat_tokenizer(path)
    options = {"seed": seed, "max_new_tokens": max_new_tokens, "batch_size": batch_size}
    return {
        "greedy": per_problem_scores(model, tokenizer, task, problems, 0.0, 1, **options),
        "sampled": per_problem_scores(model, tokenizer, task, problems, 1.0, samples, **options),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", type=Path, required=True, help="a run's config.yaml (its task section is used)")
    parser.add_argument("--n", type=int, default=2000, help="fresh held-out problems")
    parser.add_argument("--samples", type=int, default=4, help="completions per problem at temperature 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=72)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("policies", nargs="+", help="NAME=PATH to a policy's final/; the first is the baseline")
    args = parser.parse_args()
    named = [p.split("=", 1) for p in args.policies]
    if any(len(p) != 2 or not Path(p[1]).is_dir() for p in named):
        parser.error(f"policies are NAME=PATH with PATH a checkpoint directory, got {args.policies}")
    cfg = OmegaConf.load(args.run_config)
    if cfg.task.name != "arithmetic":
        parser.error(f"task {cfg.task.name!r}: fresh held-out problems exist only for the arithmetic task")
    task = build_task(cfg.task)
    problems = task.fresh_eval_problems(args.n, args.seed)
    print(f"{args.n} fresh held-out problems (disjoint from every split of {args.run_config}); "
          f"sampled = mean of {args.samples} completions at temperature 1 per problem")
    results: dict[str, dict[str, list[float]]] = {}
    for name, path in named:
        start = time.perf_counter()
        results[name] = score_policy(path, task, problems, args.samples, args.seed, args.max_new_tokens, args.batch_size)
        line = [f"{name:>10}"]
        for mode, scores in results[name].items():
            mean, se = mean_and_se(scores)
            line.append(f"{mode} {mean:.4f} +- {se:.4f}")
        base = named[0][0]
        if name != base:
            for mode in ("greedy", "sampled"):
                diff, se = mean_and_se([b - a for a, b in zip(results[base][mode], results[name][mode])])
                line.append(f"{mode} vs {base} {100 * diff:+.2f} +- {100 * se:.2f} points")
        print("  ".join(line) + f"  ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
