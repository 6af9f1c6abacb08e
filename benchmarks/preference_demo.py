"""Print the reward and dpo figures of the demo preset: the reward model's held-out pairwise
accuracy (overall and per kind of negative), and DPO's held-out accuracy against the SFT model
it started from (greedy and sampled at temperature 1, the same problems).

    python benchmarks/preference_demo.py                    # pretrain -> sft -> reward -> dpo
    python benchmarks/preference_demo.py SFT_STAGE_DIR [overrides...]   # reuse a finished sft stage

SFT_STAGE_DIR is a run's sft/ directory (its final/ is the input, its metrics.json the baseline).
Each run goes into a fresh temporary run dir, so nothing is skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read(stage: Path) -> tuple[dict, dict]:
    return json.loads((stage / "metrics.json").read_text()), json.loads((stage / "stage.json").read_text())


def main(args: list[str]) -> None:
    sft_dir = Path(args[0]).resolve() if args and "=" not in args[0] else None
    overrides = args[1:] if sft_dir else args
    run_dir = Path(tempfile.mkdtemp(prefix="bench-preference-")) / "run"
    if sft_dir:
        final = sft_dir / "final"
        stages = ["run.stages=[reward,dpo]", f"stages.reward.init={final}", f"stages.dpo.init={final}"]
    else:
        stages = ["run.stages=[pretrain,sft,reward,dpo]"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", *stages, f"run.dir={run_dir}", *overrides],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    command_wall = time.perf_counter() - start
    sft, _ = read(sft_dir or run_dir / "sft")
    reward, reward_manifest = read(run_dir / "reward")
    dpo, dpo_manifest = read(run_dir / "dpo")

    print(f"reward + dpo demo figures (run dir {run_dir}; command {command_wall:.0f} s)")
    print(f"reward model  ({reward['eval_num_pairs']} held-out pairs, stage {reward_manifest['wall_time_s']:.0f} s)")
    print(f"  eval_pairwise_accuracy      {reward['eval_pairwise_accuracy']:.3f}")
    for key in sorted(k for k in reward if k.startswith("eval_pairwise_accuracy/")):
        print(f"    negatives '{key.split('/')[1]}'{'':<{10 - len(key.split('/')[1])}}  {reward[key]:.3f}")
    print(f"  eval_loss                   {reward['eval_loss']:.4f}")
    print(f"  mean reward margin          {reward['eval_reward_margin']:.3f}")
    print(f"  train loss first -> last    {reward['train_loss_first']:.3f} -> {reward['train_loss']:.3f}")
    n = dpo["eval_num_problems"]
    print(f"dpo  (stage {dpo_manifest['wall_time_s']:.0f} s; {n} held-out problems, chat format)")
    print(f"  {'':<22}{'greedy':>8}{'sampled T=1':>13}")
    print(f"  {'SFT (input)':<22}{sft['eval_accuracy']:>8.3f}{sft['eval_accuracy_sampled']:>13.3f}")
    print(f"  {'DPO':<22}{dpo['eval_accuracy']:>8.3f}{dpo['eval_accuracy_sampled']:>13.3f}")
    gain = 100 * (dpo["eval_accuracy_sampled"] - sft["eval_accuracy_sampled"])
    print(f"  sampled gain: {gain:+.1f} points (target >= +3)")
    print(f"  implicit reward on held-out pairs: accuracy {dpo['eval_reward_accuracy']:.3f}, margin {dpo['eval_reward_margin']:.3f}")
    print(f"  on training pairs: margin {dpo['train_probe_reward_margin_before']:.3f} before -> {dpo['train_probe_reward_margin']:.3f} after")


if __name__ == "__main__":
    main(sys.argv[1:])
