"""The reward model as the RL reward: grpo from the demo's sft with reward_weights
{reward_model: 1} and no verifier reward, beside the same grpo with the verifier reward
{correct: 1}, both scored on the same fresh held-out problems as the sft they start from.

    python benchmarks/reward_model_rl.py --run RUN [--out DIR] [--n 1000] [--samples 4] [hydra overrides...]

RUN is a finished demo run dir (sft/final and reward/final; e.g. `python -m pipeline
run.dir=RUN`). Each grpo runs as `python -m pipeline run.dir=DIR/<name> run.stages=[grpo]
stages.grpo.init=RUN/sft/final ...` (completed runs are skipped on a rerun); the held-out figures
come from benchmarks/heldout_eval.py (temperature-1 accuracy, mean of --samples per problem,
paired differences to sft with their standard errors).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

RUNS = {
    "verifier": ["stages.grpo.reward_weights.correct=1.0", "stages.grpo.reward_weights.reward_model=0.0"],
    "reward_model": ["stages.grpo.reward_weights.correct=0.0", "stages.grpo.reward_weights.reward_model=1.0"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished demo run dir (sft/ and reward/)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "reward_model_rl")
    parser.add_argument("--n", type=int, default=1000, help="fresh held-out problems")
    parser.add_argument("--samples", type=int, default=4, help="completions per problem at temperature 1")
    args, overrides = parser.parse_known_args()
    run, out = args.run.resolve(), args.out.resolve()
    for name, weights in RUNS.items():
        cmd = [sys.executable, "-m", "pipeline", f"run.dir={out / name}", "run.stages=[grpo]",
               f"stages.grpo.init={run / 'sft' / 'final'}", f"stages.grpo.reward_model={run / 'reward' / 'final'}",
               *weights, *overrides]
        print(f"{name}: {shlex.join(['python', *cmd[1:]])}", flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)

    import heldout_eval
    from omegaconf import OmegaConf

    from pipeline.tasks import build_task

    task = build_task(OmegaConf.load(run / "config.yaml").task)
    problems = task.fresh_eval_problems(args.n, 0)
    policies = {"sft": run / "sft" / "final", **{name: out / name / "grpo" / "final" for name in RUNS}}
    scores = {name: heldout_eval.score_policy(path, task, problems, args.samples)["sampled"] for name, path in policies.items()}
    result = {"n": args.n, "samples": args.samples, "reward_pairwise_on_policy":
              json.loads((run / "reward" / "metrics.json").read_text()).get("eval_pairwise_accuracy_on_policy")}
    print(f"\nheld-out sampled accuracy (T=1, {args.samples} samples x {args.n} fresh problems):")
    for name, values in scores.items():
        mean, se = heldout_eval.mean_and_se(values)
        line = f"  {name:13s} {mean:.3f} ± {se:.3f}"
        result[name] = mean
        if name != "sft":
            diff, diff_se = heldout_eval.mean_and_se([b - a for a, b in zip(scores["sft"], values)])
            line += f"   vs sft {diff:+.3f} ± {diff_se:.3f}"
            result[f"{name}_minus_sft"], result[f"{name}_minus_sft_se"] = diff, diff_se
        print(line)
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'summary.json'}")


if __name__ == "__main__":
    main()
