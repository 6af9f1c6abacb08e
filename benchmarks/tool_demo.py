"""The tool-use demo beside the same chain without the tool: held-out accuracy on problems longer
than pretraining saw (5-6 operands), tool calls per problem, the share of failed calls, and each
stage's wall time.

    python benchmarks/tool_demo.py [--out DIR] [--seed 0] [hydra overrides...]

Two chains, one after the other (the figures include wall times; completed stages are skipped,
so rerunning resumes):
  with     python -m pipeline preset=demo_tools run.dir=OUT/with seed=S OVERRIDES
  without  python -m pipeline preset=demo_tools task.calculator=false '~stages.grpo.tools.calculator'
           run.stages=[sft,grpo,test_time] stages.sft.init=OUT/with/pretrain/final run.dir=OUT/without ...
The second chain starts from the first one's pretrained model (the same tokenizer with tool
markers, the same weights), so the arms differ only in sft's traces (calculator calls or worked
steps) and grpo's tool. Output: OUT/<arm>.log, OUT/summary.json, OUT/summary.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import datetime
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed")
METHODS = ("greedy", "sample", "majority_vote")
WITHOUT = ["task.calculator=false", "~stages.grpo.tools.calculator"]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_arm(name: str, out: Path, seed: int, arm_overrides: list[str], overrides: list[str]) -> None:
    command = [sys.executable, "-m", "pipeline", "preset=demo_tools", f"run.dir={out / name}", f"run.name={name}",
               f"seed={seed}", *arm_overrides, *overrides]
    print("$", " ".join(command[1:]), flush=True)
    with open(out / f"{name}.log", "a") as log:
        subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)


def figures(run_dir: Path) -> dict[str, float | None]:
    """The arm's figures from its stages' metrics.json and stage.json."""
    metrics = {stage: read_json(run_dir / stage / "metrics.json") for stage in ("pretrain", "sft", "grpo", "test_time")}
    sft, grpo, test_time = metrics["sft"], metrics["grpo"], metrics["test_time"]
    rows: dict[str, float | None] = {
        "pretrain greedy (text format)": metrics["pretrain"].get("eval_accuracy"),
        "sft greedy": sft.get("eval_accuracy"), "sft sampled (T=1)": sft.get("eval_accuracy_sampled"),
        "sft tool calls per problem": sft.get("eval_tool_calls_per_problem"),
        "sft failed-call share": sft.get("eval_tool_failure_share"),
        "grpo greedy": grpo.get("eval_accuracy"), "grpo sampled (T=1)": grpo.get("eval_accuracy_sampled"),
        "grpo tool calls per problem": grpo.get("eval_tool_calls_per_problem"),
        "grpo failed-call share": grpo.get("eval_tool_failure_share"),
        "grpo tool calls per training completion": grpo.get("tool_calls_per_completion"),
        "grpo step time (s)": grpo.get("step_time_s"),
    }
    for method in METHODS:
        rows[f"test_time {method}"] = test_time.get(f"accuracy/{method}")
        rows[f"test_time {method} tool calls per problem"] = test_time.get(f"tool_calls_per_problem/{method}")
        rows[f"test_time {method} failed-call share"] = test_time.get(f"tool_failure_share/{method}")
    for stage in ("pretrain", "sft", "grpo", "test_time"):
        rows[f"wall {stage} (s)"] = read_json(run_dir / stage / "stage.json").get("wall_time_s")
    return rows


def cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) and abs(value) < 100 else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/tool_demo"))
    parser.add_argument("--seed", type=int, default=0)
    args, overrides = parser.parse_known_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_arm("with", out, args.seed, [], overrides)
    pretrained = out / "with" / "pretrain" / "final"
    run_arm("without", out, args.seed, [*WITHOUT, "run.stages=[sft,grpo,test_time]", f"stages.sft.init={pretrained}"],
            overrides)
    arms = {name: figures(out / name) for name in ("with", "without")}
    arms["without"]["pretrain greedy (text format)"] = arms["with"]["pretrain greedy (text format)"]  # one pretrain
    arms["without"]["wall pretrain (s)"] = None  # shared: run once, in the first arm
    versions = {name: metadata.version(name) for name in LIBRARIES}
    lines = [f"# Tool-use demo, seed {args.seed} ({datetime.now():%Y-%m-%d %H:%M})", "",
             "Held-out: the task's eval split, 5-6 operands (pretraining saw 2-3, sft and grpo 2-6).", "",
             "| figure | with the calculator | without |", "| --- | --- | --- |"]
    lines += [f"| {key} | {cell(arms['with'][key])} | {cell(arms['without'][key])} |" for key in arms["with"]]
    lines += ["", "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f", Python {platform.python_version()}",
              f"overrides: {' '.join(overrides) or '(none)'}"]
    (out / "summary.json").write_text(json.dumps({"seed": args.seed, "arms": arms, "versions": versions,
                                                  "overrides": overrides}, indent=2) + "\n")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
