"""The bad-input table: every case (also the cases of tests/unit/test_bad_inputs.py) run as a real
`python -m pipeline` subprocess, as a user types it. Prints case, exit code, seconds to fail and
the first line of the message.

    python benchmarks/bad_inputs.py                  # every case (about 5 s each on 2 cores)
    python benchmarks/bad_inputs.py --only jsonl     # the cases whose name contains "jsonl"

Run it alone: the seconds are mostly interpreter start and imports, which other processes on
the same cores slow down.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]

JSONL = ["task=jsonl", "run.stages=[pretrain]", "task.splits.eval={files}/good.jsonl"]
MUON_ZERO = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "none"}

# (case, overrides ({files}: the bad files' directory), environment, text the message must contain)
CASES = [
    # --- values: type and range of stage keys
    ("max_steps not an integer", ["stages.pretrain.max_steps=abc"], {}, "stages.pretrain.max_steps=abc"),
    ("max_steps 0", ["stages.pretrain.max_steps=0"], {}, "stages.pretrain.max_steps=0: must be an integer >= 1"),
    ("max_steps a float", ["stages.sft.max_steps=1.5"], {}, "stages.sft.max_steps=1.5"),
    ("batch_size 0", ["stages.pretrain.batch_size=0"], {}, "stages.pretrain.batch_size=0"),
    ("batch_size negative", ["stages.reward.batch_size=-4"], {}, "stages.reward.batch_size=-4"),
    ("lr negative", ["stages.pretrain.lr=-1"], {}, "stages.pretrain.lr=-1"),
    ("lr 0", ["stages.reward.lr=0"], {}, "stages.reward.lr=0"),
    ("lr a word", ["stages.dpo.lr=fast"], {}, "stages.dpo.lr=fast"),
    ("grad_accum 0", ["stages.pretrain.grad_accum=0"], {}, "stages.pretrain.grad_accum=0"),
    ("seq_len 0", ["stages.pretrain.seq_len=0"], {}, "stages.pretrain.seq_len=0"),
    ("save_steps 0", ["stages.sft.save_steps=0"], {}, "stages.sft.save_steps=0"),
    ("model vocab below the tokenizer's", ["model=tiny_dense", "+model.config.vocab_size=100"], {},
     "model.config.vocab_size=100 is below stages.pretrain.tokenizer_vocab_size=320"),
    ("model token id set by hand", ["model=tiny_dense", "+model.config.eos_token_id=3"], {}, "model.config.eos_token_id is set from the tokenizer"),
    ("dpo beta a word", ["stages.dpo.beta=abc"], {}, "stages.dpo.beta=abc"),
    ("grpo num_generations a word", ["stages.grpo.num_generations=abc"], {}, "stages.grpo.num_generations=abc"),
    ("grpo temperature 0", ["stages.grpo.temperature=0"], {}, "stages.grpo.temperature=0"),
    # --- the calculator demo's three settings must agree (conf/preset/demo_tools.yaml)
    ("calculator traces, tokenizer without tool markers", ["task.calculator=true"], {},
     "set stages.pretrain.tokenizer_tools=true"),
    ("calculator traces, grpo without the tool", ["preset=demo_tools", "~stages.grpo.tools.calculator"], {},
     "stages.grpo.tools.calculator=pipeline.tasks.arithmetic:calculator"),
    ("unknown generation engine", ["generation.engine=paged"], {}, "generation.engine=paged"),
    ("vllm requested on a machine without it", ["stages.grpo.generation={engine: vllm}"], {},
     "stages.grpo.generation.engine)=vllm"),
    ("held-out operands reversed", ["task.eval_min_operands=5", "task.eval_max_operands=4"], {},
     "eval_min_operands"),
    ("test_time alpha a word", ["stages.test_time.alpha=abc"], {}, "stages.test_time.alpha=abc"),
    ("packing not a bool", ["stages.sft.packing=maybe"], {}, "stages.sft.packing=maybe"),
    # --- values: top level and groups
    ("seed not an integer", ["seed=abc"], {}, "seed=abc"),
    ("seed negative", ["seed=-1"], {}, "seed=-1"),
    ("run.force not a bool", ["run.force=maybe"], {}, "run.force=maybe"),
    ("optim lr 0", ["optim.lr=0"], {}, "optim.lr=0"),
    ("optim weight_decay negative", ["optim.weight_decay=-0.1"], {}, "optim.weight_decay=-0.1"),
    ("optim betas one value", ["optim.betas=[0.9]"], {}, "optim.betas=[0.9]"),
    ("optim warmup_ratio 1.5", ["optim.warmup_ratio=1.5"], {}, "optim.warmup_ratio=1.5"),
    ("optim scheduler unknown", ["optim.scheduler=nosuch"], {}, "optim.scheduler=nosuch"),
    ("muon momentum 1.5", ["optim=muon", "optim.momentum=1.5"], {}, "optim.momentum=1.5"),
    ("lora rank 0", ["peft=lora", "peft.rank=0"], {}, "peft.rank=0"),
    ("lora alpha 0", ["peft=lora", "peft.alpha=0"], {}, "peft.alpha=0"),
    ("prefix virtual tokens 0", ["peft=prefix", "peft.num_virtual_tokens=0"], {}, "peft.num_virtual_tokens=0"),
    ("task digits 0", ["task.digits=0"], {}, "task.digits=0"),
    ("task n_pretrain a word", ["task.n_pretrain=abc"], {}, "task.n_pretrain=abc"),
    ("jsonl max_chars 0", ["task=jsonl", "task.max_chars=0"], {}, "task.max_chars=0"),
    # --- Hydra's own errors
    ("unknown key", ["stages.sft.nosuchkey=1"], {}, "stages.sft.nosuchkey"),
    ("unknown group option", ["optim=nosuch"], {}, "optim/nosuch"),
    ("malformed override", ["stages.pretrain.max_steps=[1,"], {}, "stages.pretrain.max_steps=[1,"),
    # --- launch: optim=muon under DeepSpeed ZeRO
    ("muon under ZeRO-3 without reduce_scatter", ["optim=muon"], {**MUON_ZERO, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
     "reduce_scatter"),
    ("muon with clipping under ZeRO-2", ["optim=muon", "optim.max_grad_norm=1.0"],
     {**MUON_ZERO, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "optim.max_grad_norm=0"),
    # --- model files
    ("model.path without weights", ["model=hf", "model.path={files}/no_weights"], {}, "model.path={files}/no_weights"),
    ("model.path truncated safetensors", ["model=hf", "model.path={files}/truncated"], {}, "{files}/truncated/model.safetensors"),
    ("model.path safetensors header garbage", ["model=hf", "model.path={files}/garbage"], {}, "{files}/garbage/model.safetensors"),
    ("model.path shard missing", ["model=hf", "model.path={files}/missing_shard"], {}, "model-00002-of-00002.safetensors"),
    ("pretrain.init an adapter", ["stages.pretrain.init={files}/adapter"], {}, "stages.pretrain.init={files}/adapter"),
    ("sft.init truncated safetensors", ["run.stages=[sft]", "stages.sft.init={files}/truncated"], {},
     "{files}/truncated/model.safetensors"),
    # --- task=jsonl data files
    ("jsonl empty file", [*JSONL, "task.splits.pretrain={files}/empty.jsonl"], {}, "{files}/empty.jsonl"),
    ("jsonl only blank lines", [*JSONL, "task.splits.pretrain={files}/blank.jsonl"], {}, "{files}/blank.jsonl"),
    ("jsonl malformed line", [*JSONL, "task.splits.pretrain={files}/malformed.jsonl"], {}, "malformed.jsonl' line 3"),
    ("jsonl line not an object", [*JSONL, "task.splits.pretrain={files}/not_object.jsonl"], {}, "not_object.jsonl' line 2"),
    ("jsonl null value", [*JSONL, "task.splits.pretrain={files}/null.jsonl"], {}, "null.jsonl) row 2 (line 2), column 'text'"),
    ("jsonl list value", [*JSONL, "task.splits.pretrain={files}/list.jsonl"], {}, "list.jsonl' line 2, column 'text' is a list where line 1 has a string"),
    ("jsonl number as text", [*JSONL, "task.splits.pretrain={files}/number.jsonl"], {}, "number.jsonl) row 1"),
    ("jsonl row over max_chars", [*JSONL, "task.splits.pretrain={files}/long.jsonl", "task.max_chars=100"], {},
     "long.jsonl) row 2 (line 3), column 'text': 300 characters, more than task.max_chars=100"),
    ("jsonl file missing", [*JSONL, "task.splits.pretrain={files}/nowhere.jsonl"], {}, "{files}/nowhere.jsonl"),
]


def safetensors_file(path: Path) -> None:
    save_file({"weight": torch.zeros(64, 64), "bias": torch.zeros(64)}, str(path))


def make_bad_files(root: Path) -> Path:
    """The bad model directories and data files the cases point at ({files}), under root."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("no_weights", "truncated", "garbage", "missing_shard", "adapter"):
        (root / name).mkdir()
    for name in ("no_weights", "truncated", "garbage", "missing_shard"):
        (root / name / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    safetensors_file(root / "truncated" / "model.safetensors")
    data = (root / "truncated" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (root / "garbage" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(64))
    safetensors_file(root / "missing_shard" / "model-00001-of-00002.safetensors")
    weight_map = {"weight": "model-00001-of-00002.safetensors", "bias": "model-00002-of-00002.safetensors"}
    (root / "missing_shard" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    safetensors_file(root / "adapter" / "adapter_model.safetensors")

    rows = [json.dumps({"text": f"Q: {i}+1=?\nA: {i + 1}", "prompt": f"{i}+1", "answer": str(i + 1)}) for i in range(4)]
    (root / "good.jsonl").write_text("\n".join(rows) + "\n")
    (root / "empty.jsonl").write_text("")
    (root / "blank.jsonl").write_text("\n   \n")
    (root / "malformed.jsonl").write_text(rows[0] + "\n" + rows[1] + "\n" + '{"text": "cut off\n' + rows[2] + "\n")
    (root / "not_object.jsonl").write_text(rows[0] + "\n[1, 2]\n")
    (root / "null.jsonl").write_text(rows[0] + '\n{"text": null}\n')
    (root / "list.jsonl").write_text(rows[0] + '\n{"text": ["a", "b"]}\n')
    (root / "number.jsonl").write_text('{"text": 12}\n')
    (root / "long.jsonl").write_text(rows[0] + "\n\n" + json.dumps({"text": "x" * 300}) + "\n")
    return root


def first_message_line(stderr: str) -> str:
    """The pipeline's "error: ..." line, else the first line Hydra printed."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    chosen = next((line for line in lines if line.startswith("error:")), lines[0] if lines else "")
    return chosen if len(chosen) <= 200 else chosen[:197] + "..."


def run_case(overrides: list[str], env: dict[str, str], run_dir: Path) -> tuple[int, float, str]:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", *overrides, f"run.dir={run_dir}"], check=False, cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=600)
    return proc.returncode, time.perf_counter() - start, first_message_line(proc.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the cases whose name contains this text")
    args = parser.parse_args()
    # the runaway row, too big for the unit test: one 60 MB line under the default task.max_chars
    huge = ("jsonl one 60 MB row", ["task=jsonl", "run.stages=[pretrain]", "task.splits.eval={files}/good.jsonl",
                                    "task.splits.pretrain={files}/huge.jsonl"], {}, "huge.jsonl")
    cases = [case for case in [*CASES, huge] if args.only in case[0]]
    with tempfile.TemporaryDirectory() as tmp:
        files = make_bad_files(Path(tmp) / "files")
        if huge in cases:
            (files / "huge.jsonl").write_text(json.dumps({"text": "x" * 60_000_000}) + "\n")
        print("| case | exit code | seconds to fail | message (first line) |")
        print("| --- | --- | --- | --- |")
        codes = []
        for index, (name, overrides, env, _) in enumerate(cases):
            code, seconds, message = run_case([o.replace("{files}", str(files)) for o in overrides], env,
                                              Path(tmp) / f"run-{index}")
            codes.append(code)
            message = message.replace(str(files), "<files>").replace("|", "\\|")
            print(f"| {name} | {code} | {seconds:.1f} | {message} |", flush=True)
    print(f"\n{sum(c == 2 for c in codes)} of {len(codes)} cases exited 2")


if __name__ == "__main__":
    main()
