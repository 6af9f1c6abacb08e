"""Print the grpo figures of the demo preset: held-out accuracy (greedy and sampled) before
(the SFT checkpoint) and after GRPO, the training reward curve, the scaling fit (A, B, C_mid),
wall time per GRPO step and the share of it spent generating.

    python benchmarks/grpo_demo.py --init /work/demo/sft/sft/final [--run-dir DIR] [overrides...]

Runs `python -m pipeline run.stages=[grpo] stages.grpo.init=INIT` into --run-dir (default: a
fresh temporary dir; an existing completed run with the same config is read back, not rerun).
The "before" numbers are the SFT stage's own metrics.json next to INIT when it evaluated the
same number of problems, else INIT is evaluated here exactly as grpo evaluates its final/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def before_metrics(init: Path, num_problems: int, overrides: list[str]) -> tuple[dict, str]:
    """(greedy/sampled accuracy of the input checkpoint, where they come from)."""
    sibling = init.parent / "metrics.json"
    if sibling.is_file():
        metrics = json.loads(sibling.read_text())
        if metrics.get("eval_num_problems") == num_problems:
            return metrics, str(sibling)
    from transformers import set_seed

    from pipeline.evaluate import evaluate
    from pipeline.models import load_model
    from pipeline.tasks import build_task
    from pipeline.tokenizer import load_chat_tokenizer
    from pipeline.config import compose_config

    cfg = compose_config(overrides)
    stage, task = cfg.stages.grpo, build_task(cfg.task)
    model, tokenizer = load_model(str(init)), load_chat_tokenizer(init)
    problems = task.eval_problems()[:num_problems]
    options = dict(prompt_format="chat", max_new_tokens=stage.max_new_tokens, batch_size=stage.eval_batch_size)
    greedy = evaluate(model, tokenizer, task, problems, **options)
    set_seed(cfg.seed)
    sampled = evaluate(model, tokenizer, task, problems, temperature=1.0, **options)
    return {"eval_accuracy": greedy.accuracy, "eval_accuracy_sampled": sampled.accuracy}, "evaluated here"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", type=Path, required=True, help="the SFT final/ to start from")
    parser.add_argument("--run-dir", type=Path, default=None)
    args, overrides = parser.parse_known_args()
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="bench-grpo-")) / "run"
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pipeline", "run.stages=[grpo]", f"stages.grpo.init={args.init}", f"run.dir={run_dir}",
         *overrides],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
    )
    command_wall = time.perf_counter() - start
    stage = run_dir / "grpo"
    after = json.loads((stage / "metrics.json").read_text())
    manifest = json.loads((stage / "stage.json").read_text())
    before, source = before_metrics(args.init.resolve(), int(after["eval_num_problems"]), overrides)
    history = json.loads((stage / "log_history.json").read_text())
    points = [json.loads(line) for line in (stage / "pass_rate_curve.jsonl").read_text().splitlines()]

    n = int(after["eval_num_problems"])
    rows = [
        ("command wall time (s, incl. startup)", f"{command_wall:.0f}"),
        ("stage wall time (s)", f"{manifest.get('wall_time_s', float('nan')):.0f}"),
        ("train steps", f"{after['train_steps']}"),
        ("wall time per GRPO step (s, training steps only)", f"{after['step_time_s']:.2f}"),
        ("share of a step spent generating rollouts", f"{after['generation_share']:.1%}"),
        ("held-out curve evaluations (s, total)", f"{after['curve_eval_s']:.0f}"),
        (f"greedy accuracy, {n} held-out: SFT -> GRPO",
         f"{before['eval_accuracy']:.3f} -> {after['eval_accuracy']:.3f} ({100 * (after['eval_accuracy'] - before['eval_accuracy']):+.1f} pts)"),
        (f"sampled accuracy (T=1), {n} held-out: SFT -> GRPO",
         f"{before['eval_accuracy_sampled']:.3f} -> {after['eval_accuracy_sampled']:.3f} "
         f"({100 * (after['eval_accuracy_sampled'] - before['eval_accuracy_sampled']):+.1f} pts)"),
        ("final KL to the reference", f"{after.get('kl', float('nan')):.4f}"),
        ("frac of groups with zero reward variance (mean)", f"{after.get('frac_reward_zero_std', float('nan')):.2f}"),
    ]
    if "filter_kept_prompts" in after:
        rows.append(("prompt filter: kept / RL prompts (input policy's mean pass rate, s)",
                     f"{after['filter_kept_prompts']:.0f} / {after['filter_prompts']:.0f} "
                     f"({after['filter_pass_rate_mean']:.3f}, {after['filter_seconds']:.0f} s)"))
    if after.get("scaling_fit_ok"):
        rows += [
            ("scaling fit A (asymptote)", f"{after['scaling_A']:.3f}"),
            ("scaling fit B (exponent)", f"{after['scaling_B']:.2f}"),
            ("scaling fit C_mid (tokens)", f"{after['scaling_C_mid']:.3g}"),
            ("scaling fit R0 / rmse / points", f"{after['scaling_R0']:.3f} / {after['scaling_rmse']:.4f} / {after['scaling_num_points']:.0f}"),
        ]
    else:
        rows.append(("scaling fit", "skipped (see the stage log)"))
    width = max(len(name) for name, _ in rows)
    print(f"grpo demo figures (run dir {run_dir}; SFT numbers: {source})")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print("  training reward (mean over each logging window), by step:")
    print("    " + "  ".join(f"{e['step']}:{e['reward']:.3f}" for e in history if e.get("reward") is not None))
    print("  held-out pass rate (curve subset), by compute (tokens):")
    print("    " + "  ".join(f"{p['compute']:.3g}:{p['pass_rate']:.3f}" for p in points))
    print(f"  plots: {stage / 'reward.png'}, {stage / 'scaling_fit.png'}")


if __name__ == "__main__":
    main()
