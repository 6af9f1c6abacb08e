"""What TRL's tool loop costs a grpo step: the same grpo run with a tool that does nothing
(`stages.grpo.tools.noop`) and without tools, from the same checkpoint, alternating.

    python benchmarks/tool_overhead.py --model PATH [--group qwen3] [--preset smoke] [--steps 10] \
        [--repeats 2] [--out DIR] [hydra overrides...]

PATH is a checkpoint whose chat template renders tools (a Qwen3 or Llama 3.1/3.2 model, a tiny
random one with Qwen3's template, or the demo's sft model trained with
stages.pretrain.tokenizer_tools: `--group tiny_moe --preset demo_tools task.calculator=false
'~stages.grpo.tools.calculator'`). Each run is `python -m pipeline model=GROUP model.path=PATH
preset=PRESET run.stages=[grpo] stages.grpo.max_steps=STEPS ...`; the script prints, per run, the
step time and generation share from grpo's metrics.json, the tool calls per completion, and the
prompt length with and without the tool's schema rendered. A model that never calls the tool
measures the loop's fixed cost (the schema in every prompt, parsing every reply); the calls
themselves add a generation round each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NOOP = '''
def noop(x: int) -> int:
    """Return the integer it is given.

    Args:
        x: any integer
    """
    return x
'''


def run(model: Path, out: Path, name: str, steps: int, tools: bool, overrides: list[str], group: str = "qwen3",
        preset: str = "smoke") -> dict:
    run_dir = out / name
    command = [sys.executable, "-m", "pipeline", f"model={group}", f"model.path={model}", f"preset={preset}",
               f"run.dir={run_dir}", "run.stages=[grpo]", f"stages.grpo.max_steps={steps}", "trainer.report_to=none",
               "stages.grpo.eval_problems=8", "stages.grpo.curve_problems=4", f"stages.grpo.save_steps={steps}",
               f"stages.grpo.eval_every={steps}", *(["+stages.grpo.tools.noop=noop_tools:noop"] if tools else []),
               *overrides]
    env = {**os.environ, "PYTHONPATH": f"{out}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return json.loads((run_dir / "grpo" / "metrics.json").read_text())


def prompt_lengths(model: Path, out: Path, preset: str = "smoke") -> tuple[int, int]:
    import importlib

    from transformers.utils import get_json_schema

    from pipeline.config import compose_config
    from pipeline.tasks import build_task
    from pipeline.tokenizer import load_chat_tokenizer

    sys.path.insert(0, str(out))
    noop = importlib.import_module("noop_tools").noop
    tokenizer = load_chat_tokenizer(model)
    prompt = [{"role": "user", "content": build_task(compose_config([f"preset={preset}"]).task).rl_prompts()[0]["prompt"]}]
    plain = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with_tool = tokenizer.apply_chat_template(prompt, tools=[get_json_schema(noop)], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"]
    return len(plain), len(with_tool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--group", default="qwen3", help="the model group (conf/model/<group>.yaml)")
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "tool_overhead")
    args, overrides = parser.parse_known_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "noop_tools.py").write_text(NOOP)
    figures: dict[str, list[dict]] = {"no tool": [], "noop tool": []}
    for repeat in range(args.repeats):  # alternating, so a slow spell of the machine hits both
        for label, tools in (("no tool", False), ("noop tool", True)):
            name = f"{label.replace(' ', '_')}_{repeat}"
            figures[label].append(run(args.model.resolve(), out, name, args.steps, tools, overrides, args.group,
                                      args.preset))
    plain, with_tool = prompt_lengths(args.model.resolve(), out, args.preset)
    print(f"prompt tokens: {plain} without the tool, {with_tool} with its schema rendered")
    print("| run | step time (s) | generation share | tool calls per completion |")
    print("| --- | --- | --- | --- |")
    for label, runs in figures.items():
        for k, m in enumerate(runs):
            print(f"| {label} #{k} | {m['step_time_s']:.3f} | {m['generation_share']:.2f} | "
                  f"{m.get('tool_calls_per_completion', 0.0):.2f} |")
    base = statistics.mean(m["step_time_s"] for m in figures["no tool"])
    tool = statistics.mean(m["step_time_s"] for m in figures["noop tool"])
    print(f"mean step time: {base:.3f} s without, {tool:.3f} s with the tool ({(tool / base - 1) * 100:+.0f}%)")


if __name__ == "__main__":
    main()
