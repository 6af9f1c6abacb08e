"""One-GPU check of the pipeline: tokens/s, MFU, GRPO step time and its generation share, and
peak GPU memory of each stage of pretrain -> sft -> grpo -> test_time.

    python benchmarks/gpu_check.py [--run-dir DIR] [--engine E] [hydra overrides...]   # on a node with one CUDA GPU
    python benchmarks/gpu_check.py --cpu-dry-run [--run-dir DIR]          # the same code path, tiny, on CPU

--engine generate|continuous_batching|vllm sets generation.engine for every stage (grpo's rollouts
and all sampling); run it once per engine to compare grpo's step time and generation share.

Without a GPU and without --cpu-dry-run it exits 2 and says so.

What runs: the pipeline's own stages (run.stages=[pretrain,sft,grpo,test_time]) at
trainer.precision=bf16 and trainer.attn_implementation=sdpa on `model=tiny_dense` (Qwen3, built
from config with the pipeline's own tokenizer, no download) resized to the body of Qwen3-0.6B:
hidden 1024, 28 layers, 16 query / 8 key-value heads of 128, MLP 3072, which with the task's
~260-token vocabulary is 440.7M parameters (printed). `preset=none` and every stage size on
the command line (SIZES below), so the demo and smoke presets do not reach it. The composed
configs go in-process to pipeline.runner.run_pipeline, one call per stage into the same run dir
(each stage starts from the previous one's final/ there), so the peak GPU memory is per stage.
Extra arguments are Hydra overrides applied last (e.g. stages.grpo.batch_size=128 on a smaller GPU).

Figures (per stage, read from <run.dir>/<stage>/metrics.json, grpo's log_history.json and a
step clock this script adds to each Trainer):
  tok/s(stage)  the stage's own figure: pretrain `tokens_per_second` (evaluations subtracted, the
                checkpoint save at the last step included); sft `train_tokens` / `train_runtime_s`
                (non-padding tokens; evaluations and saves included); grpo `rollout_tokens` /
                (`step_time_s` x steps), TRL's training_step time (generation included, the
                optimizer step not); test_time generated tokens / wall time of its methods.
  tok/s(steps)  the same tokens over the clock of the optimizer steps alone (on_step_begin to
                on_step_end, GPU synchronised): forward, backward, clipping, optimizer; not the
                data loading (fetched before on_step_begin), evaluation, logging or checkpoint
                saves. The first (warm-up) step is included.
  MFU           6 * N FLOPs per trained token (N = all parameters; attention-score FLOPs, another
                7% at pretrain's 512 causal tokens, are not counted) x tok/s(steps) / the GPU's
                dense bf16 peak (PEAK_TFLOPS by torch.cuda.get_device_name(); an unknown GPU: a
                timed bf16 torch.matmul).
                grpo: (6N + 2N for the reference forward when beta > 0) per rollout token over
                the steps' time minus generation, i.e. the MFU of its training part.
  gen           share of grpo's training_step time spent generating (`generation_share`).
  peak GiB      torch.cuda.max_memory_allocated() during the stage (reset before each).
A second table sets each training stage's peak beside its model states from docs/memory.md's
formula (weights as loaded, gradients, AdamW state, reference), as benchmarks/memory.py does for
host memory on a CPU.

Expected time on one H100 SXM (989 TFLOP/s bf16), from FLOPs: training is 6N x 4.9M pretrain
tokens + 6N x ~1.1M sft tokens + 8N x ~0.5M grpo rollout tokens = 1.3e16 + 3.0e15 + 1.7e15 ~
1.8e16 FLOPs, 45 s at 40% MFU, 90 s at 20%; grpo's generation (30 steps x 256 completions x
<= 64 tokens, HF generate) about 30-60 s; evaluations, three checkpoint saves of about 7 GB each
(fp32 weights and AdamW state, and final/: give --run-dir a local disk with 25 GB free) and
start-up about 1-2 min; test_time (power sampling on the GPU) 1-2 min. About 5-7
minutes in all, under 10.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and "--cpu-dry-run" in sys.argv[1:]:
    # hide any GPU before torch or transformers first ask CUDA for its devices: a dry run on a GPU
    # node runs on the CPU too
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch
from omegaconf import DictConfig
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("pretrain", "sft", "grpo", "test_time")
NO_GPU_EXIT_CODE = 2
CONFIG_ERROR_EXIT_CODE = 2  # as `python -m pipeline`
NO_GPU_MESSAGE = ("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False). Run it on a node with "
                  "one GPU, or pass --cpu-dry-run for the tiny CPU run of the same code path.")

# Dense bf16 tensor-core peak, TFLOP/s (no sparsity), matched in order (word boundaries, any case)
# against torch.cuda.get_device_name(), so more specific names come first. NVIDIA datasheets;
# A10G from AWS's A10G datasheet (70, not the A10's 125); RTX 4090 with fp32 accumulation, as
# torch's bf16 matmul runs (Ada whitepaper; 330 would be fp16 accumulation).
PEAK_TFLOPS = (
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),  # 40GB and 80GB, SXM and PCIe
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
)

# Hydra key: (value on the GPU, value in --cpu-dry-run). One table, so the dry run sets every key
# the GPU run does. save_steps = eval_steps = max_steps: one evaluation and one checkpoint, at the
# end (the Trainer saves at max_steps whatever save_steps says).
SIZES = {
    "model.config.hidden_size": (1024, 64),
    "model.config.num_hidden_layers": (28, 2),
    "model.config.num_attention_heads": (16, 4),
    "model.config.num_key_value_heads": (8, 2),
    "model.config.head_dim": (128, 16),
    "model.config.intermediate_size": (3072, 128),
    "model.config.max_position_embeddings": (512, 128),
    "task.n_pretrain": (60000, 300),
    "task.n_sft": (4000, 64),
    "task.n_rl": (4000, 32),
    "task.n_eval": (500, 16),
    "stages.pretrain.tokenizer_vocab_size": (320, 320),
    "stages.pretrain.seq_len": (512, 64),
    "stages.pretrain.batch_size": (32, 8),
    "stages.pretrain.grad_accum": (1, 1),
    "stages.pretrain.max_steps": (300, 8),
    "stages.pretrain.save_steps": (300, 8),
    "stages.pretrain.eval_steps": (300, 8),
    "stages.pretrain.logging_steps": (20, 4),
    "stages.pretrain.eval_problems": (128, 8),
    "stages.pretrain.eval_batch_size": (128, 8),
    "stages.pretrain.max_new_tokens": (64, 16),
    "stages.sft.max_length": (128, 96),
    "stages.sft.packing": ("false", "false"),
    "stages.sft.batch_size": (64, 8),
    "stages.sft.grad_accum": (1, 1),
    "stages.sft.max_steps": (300, 8),
    "stages.sft.save_steps": (300, 8),
    "stages.sft.eval_steps": (300, 8),
    "stages.sft.logging_steps": (20, 4),
    "stages.sft.eval_examples": (200, 8),
    "stages.sft.eval_problems": (128, 8),
    "stages.sft.eval_samples": (1, 1),
    "stages.sft.eval_batch_size": (128, 8),
    "stages.sft.max_new_tokens": (64, 16),
    "stages.grpo.num_generations": (8, 4),
    "stages.grpo.batch_size": (256, 8),
    "stages.grpo.grad_accum": (1, 1),
    "stages.grpo.num_iterations": (1, 1),  # one pass per rollout batch: no old-log-prob forward (MFU's 6N + 2N)
    "stages.grpo.max_steps": (30, 3),
    "stages.grpo.max_new_tokens": (64, 16),
    "stages.grpo.lr": (1.0e-5, 1.0e-5),  # the stage default (3e-3) is tuned for the demo's last-block-only updates
    "stages.grpo.filter_samples": (0, 0),
    "stages.grpo.save_steps": (30, 3),
    "stages.grpo.logging_steps": (1, 1),  # TRL's step_time for every step
    "stages.grpo.eval_every": (30, 3),  # the held-out curve at step 0 and at the end only
    "stages.grpo.curve_problems": (64, 4),
    "stages.grpo.eval_problems": (128, 8),
    "stages.grpo.eval_samples": (1, 1),
    "stages.grpo.eval_batch_size": (128, 8),
    "stages.test_time.methods": ("[greedy,sample,power,majority_vote]", "[greedy,sample,power,majority_vote]"),
    "stages.test_time.eval_problems": (32, 4),
    "stages.test_time.num_samples": (4, 2),
    "stages.test_time.mcmc_steps": (2, 1),
    "stages.test_time.block_size": (16, 8),
    "stages.test_time.max_new_tokens": (64, 16),
    "stages.test_time.batch_size": (32, 4),
}
COMMON = ["preset=none", "model=tiny_dense", "task=arithmetic", "optim=adamw", "peft=none", "trainer.precision=bf16",
          "trainer.attn_implementation=sdpa", "trainer.report_to=none", "run.name=gpu_check", "run.force=true"]


def overrides(dry_run: bool, run_dir: Path, extra: list[str], engine: str = "generate") -> list[str]:
    column = 1 if dry_run else 0
    return [*COMMON, f"run.dir={run_dir}", f"generation.engine={engine}",
            *(f"{key}={values[column]}" for key, values in SIZES.items()), *extra]


# --------------------------------------------------------------------------- GPU peak


def table_peak_tflops(device_name: str) -> float | None:
    """PEAK_TFLOPS's entry for a torch.cuda.get_device_name(), None for an unknown GPU."""
    for name, tflops in PEAK_TFLOPS:
        if re.search(rf"\b{re.escape(name)}\b", device_name, re.IGNORECASE):
            return tflops
    return None


def measured_bf16_tflops(size: int = 8192, iterations: int = 20) -> float:
    """A bf16 size^3 torch.matmul loop on the current GPU, TFLOP/s (a few tenths of a second)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * iterations / (time.perf_counter() - start) / 1e12


def gpu_peak() -> tuple[str, float, str]:
    """(device name, dense bf16 peak TFLOP/s, where the peak comes from)."""
    name = torch.cuda.get_device_name()
    tflops = table_peak_tflops(name)
    if tflops is not None:
        return name, tflops, "datasheet"
    return name, measured_bf16_tflops(), "measured bf16 matmul (not in the table)"


# --------------------------------------------------------------------------- running the stages


class StepClock(TrainerCallback):
    """Wall time of the optimizer steps alone, GPU synchronised: from on_step_begin to on_step_end
    (forward, backward, clipping, optimizer, scheduler). Evaluation, logging and saving run after
    on_step_end, outside it; the clock goes first in the callback list so that other callbacks'
    on_step_end work (grpo's held-out curve) is outside it too."""

    def __init__(self) -> None:
        self.seconds, self.steps, self._start = 0.0, 0, 0.0

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += self._now() - self._start
        self.steps += 1


@contextlib.contextmanager
def step_clocks():
    """Every training stage calls pipeline.preemption.train(trainer, ctx); while this is open that
    call first puts a StepClock at the head of the trainer's callbacks. Yields {stage: clock}."""
    from pipeline import preemption

    clocks: dict[str, StepClock] = {}
    original = preemption.train

    def clocked_train(trainer, ctx):
        clocks[ctx.name] = StepClock()
        trainer.callback_handler.callbacks.insert(0, clocks[ctx.name])
        return original(trainer, ctx)

    preemption.train = clocked_train
    try:
        yield clocks
    finally:
        preemption.train = original


@dataclass
class StageRun:
    name: str
    metrics: dict
    wall_s: float
    clock: StepClock | None
    peak_gib: float | None  # None: no GPU
    held_gib: float | None  # GPU memory still allocated when the stage started


def gpu_memory_gib(kind: str) -> float | None:
    if not torch.cuda.is_available():
        return None
    return getattr(torch.cuda, kind)() / 2**30


def run_stages(args: list[str], run_dir: Path) -> tuple[dict[str, StageRun], DictConfig]:
    """Run STAGES in order, one run_pipeline call each; returns the runs and the composed config."""
    from pipeline.config import compose_config
    from pipeline.runner import run_pipeline

    runs: dict[str, StageRun] = {}
    with step_clocks() as clocks:
        for stage in STAGES:
            cfg = compose_config([*args, f"run.stages=[{stage}]"])
            gc.collect()  # the previous stage's models and trainer, before measuring this one's peak
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            held = gpu_memory_gib("memory_allocated")
            start = time.perf_counter()
            run_pipeline(cfg)
            wall = time.perf_counter() - start
            metrics = json.loads((run_dir / stage / "metrics.json").read_text())
            if stage != "test_time" and stage not in clocks:
                raise RuntimeError(f"stage {stage} did not train through pipeline.preemption.train, where the step "
                                   "clock hooks in; update step_clocks()")
            runs[stage] = StageRun(stage, metrics, wall, clocks.get(stage), gpu_memory_gib("max_memory_allocated"), held)
    return runs, cfg


# --------------------------------------------------------------------------- the table


@dataclass
class Row:
    stage: str
    tokens: float  # trained tokens; grpo: rollout tokens; test_time: generated tokens
    stage_tokens_per_s: float
    peak_gib: float | None
    steps: int | None = None  # None: not a training stage (no step clock)
    step_tokens_per_s: float | None = None
    mfu: float | None = None  # fraction of the peak
    step_s: float | None = None
    generation_share: float | None = None

    def cells(self) -> list[str]:
        def fmt(value, spec: str, none: str = "n/a") -> str:
            return none if value is None else format(value, spec)

        trained = self.steps is not None
        return [
            self.stage, fmt(self.steps, "d", "-"), f"{self.tokens:,.0f}", f"{self.stage_tokens_per_s:,.0f}",
            fmt(self.step_tokens_per_s, ",.0f", "n/a" if trained else "-"),
            fmt(None if self.mfu is None else 100 * self.mfu, ".1f") + ("%" if self.mfu is not None else ""),
            fmt(self.step_s, ".3f", "-"), fmt(self.generation_share, ".0%", "-"), fmt(self.peak_gib, ".2f"),
        ]


COLUMNS = ("stage", "steps", "tokens", "tok/s(stage)", "tok/s(steps)", "MFU", "step(s)", "gen", "peak GiB")
WIDTHS = (10, 5, 11, 12, 12, 6, 8, 5, 8)


def format_table(rows: list[Row]) -> str:
    def line(cells) -> str:
        return " ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, WIDTHS)))

    header = line(COLUMNS)
    return "\n".join([header, "-" * len(header), *(line(r.cells()) for r in rows)])


def training_row(run: StageRun, tokens: float, stage_tokens_per_s: float, flops_per_token: float,
                 train_seconds: float, peak_flops: float | None, generation_share: float | None = None) -> Row:
    """A training stage's row; MFU over train_seconds (the step clock's, less grpo's generation)."""
    clock = run.clock
    mfu = flops_per_token * tokens / train_seconds / peak_flops if peak_flops and train_seconds > 0 else None
    return Row(run.name, tokens, stage_tokens_per_s, run.peak_gib, steps=int(run.metrics["train_steps"]),
               step_tokens_per_s=tokens / clock.seconds if clock.seconds else None, mfu=mfu,
               step_s=clock.seconds / max(clock.steps, 1), generation_share=generation_share)


def rows_and_notes(runs: dict[str, StageRun], cfg: DictConfig, run_dir: Path,
                   peak_flops: float | None) -> tuple[list[Row], list[str]]:
    rows, notes = [], []
    n_params = float(runs["pretrain"].metrics["total_parameters"])
    for name in ("pretrain", "sft"):
        run = runs[name]
        rows.append(training_row(run, float(run.metrics["train_tokens"]), float(run.metrics["tokens_per_second"]),
                                 6 * n_params, run.clock.seconds, peak_flops))

    run, m = runs["grpo"], runs["grpo"].metrics
    share, tokens = float(m["generation_share"]), float(m["rollout_tokens"])
    step_seconds = float(m["step_time_s"]) * int(m["train_steps"])  # the stage's training_step time
    flops_per_token = (6 + (2 if float(cfg.stages.grpo.beta) != 0 else 0)) * n_params
    rows.append(training_row(run, tokens, tokens / step_seconds if step_seconds else 0.0, flops_per_token,
                             run.clock.seconds - share * step_seconds, peak_flops, share))
    history = json.loads((run_dir / "grpo" / "log_history.json").read_text())
    trl_step_times = [e["step_time"] for e in history if "step_time" in e]
    if trl_step_times:
        notes.append(f"grpo: the stage's step_time_s {m['step_time_s']:.3f} s (training_step: generation, scoring, "
                     f"forward, backward; no optimizer step), TRL's logged step_time median "
                     f"{statistics.median(trl_step_times):.3f} s over {len(trl_step_times)} entries, generation "
                     f"{share:.0%} of it; step(s) is the step clock's, optimizer step included")

    run, m = runs["test_time"], runs["test_time"].metrics
    methods = [x for x in cfg.stages.test_time.methods if f"wall_time_s/{x}" in m]  # best_of_n may be left out
    generated = sum(m[f"tokens_per_problem/{x}"] for x in methods) * m["eval_num_problems"]
    seconds = sum(m[f"wall_time_s/{x}"] for x in methods)
    rows.append(Row("test_time", generated, generated / seconds if seconds else 0.0, run.peak_gib))
    dtype = f", weights in {m['model_dtype']}" if "model_dtype" in m else ""
    notes.append(f"test_time: {generated:,.0f} tokens generated by {', '.join(methods)} ({m['eval_num_problems']} "
                 f"problems each{dtype}) in {seconds:.1f} s; no MFU: decoding is bound by memory and kernel launches")
    if run.peak_gib is not None and run.peak_gib < 0.05:
        notes.append(f"test_time allocated {run.peak_gib * 1024:.0f} MB of GPU memory: it ran on the CPU "
                     "(stages/test_time.py moves its policy to the process's device: has that been undone?)")
    for name, r in runs.items():
        if r.held_gib and r.peak_gib and r.held_gib > 0.01 * r.peak_gib:
            notes.append(f"{name}: {r.held_gib:.2f} GiB were still allocated when it started (counted in its peak)")
    return rows, notes


BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def memory_table(runs: dict[str, StageRun]) -> str:
    """Per training stage, the CUDA allocator's peak beside the model states docs/memory.md's
    formula gives (the benchmarks/memory.py table's columns): the weights as the stage loaded them
    (metrics.json weights_mb_at_load), fp32 gradients and AdamW's two moments of the trained
    parameters, and the frozen reference in its dtype. Activations, the KV cache and the step
    transients are the rest of the peak."""
    lines = ["stage      peak GiB  weights  grads  optim  ref    states  peak/states"]
    for name, run in runs.items():
        m = run.metrics
        if "weights_mb_at_load" not in m:
            continue
        total, trainable = int(m["total_parameters"]), int(m["trainable_parameters"])
        weights = m["weights_mb_at_load"] * 2**20 / 2**30
        grads, optim = 4 * trainable / 2**30, 8 * trainable / 2**30
        ref = BYTES.get(m.get("reference_dtype", ""), 0) * total / 2**30
        states = weights + grads + optim + ref
        peak = "n/a" if run.peak_gib is None else f"{run.peak_gib:.2f}"
        ratio = "n/a" if run.peak_gib is None else f"{run.peak_gib / states:.2f}"
        lines.append(f"{name:<10} {peak:>8} {weights:>8.2f} {grads:>6.2f} {optim:>6.2f} {ref:>5.2f} {states:>7.2f} {ratio:>12}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU: the same code path, no figures")
    parser.add_argument("--run-dir", type=Path, default=None, help="where the stages write (default: a temporary dir, removed)")
    parser.add_argument("--engine", default="generate", choices=("generate", "continuous_batching", "vllm"),
                        help="generation.engine of every stage: grpo's rollouts and all sampling (run once per engine "
                             "to compare grpo's step time and generation share)")
    args, extra = parser.parse_known_args()
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return NO_GPU_EXIT_CODE
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with contextlib.ExitStack() as stack:
        run_dir = args.run_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check-")))
        run_dir = run_dir.expanduser().resolve()
        where = f"run dir {run_dir}" + ("" if args.run_dir else " (removed at exit; --run-dir keeps it)")
        hydra_args = overrides(args.cpu_dry_run, run_dir, extra, args.engine)
        command = [*hydra_args, f"run.stages=[{','.join(STAGES)}]"]
        print(f"gpu_check: python -m pipeline {' '.join(shlex.quote(a) for a in command)}")
        print("gpu_check: run here in-process, one run_pipeline call per stage into the same run dir", flush=True)
        device, peak_tflops, peak_source = ("CPU (dry run)", None, "") if args.cpu_dry_run else gpu_peak()

        from pipeline.errors import ConfigError

        start = time.perf_counter()
        try:
            runs, cfg = run_stages(hydra_args, run_dir)
        except ConfigError as err:
            print(f"gpu_check: error: {err}", file=sys.stderr)
            return CONFIG_ERROR_EXIT_CODE
        total = time.perf_counter() - start
        rows, notes = rows_and_notes(runs, cfg, run_dir, peak_tflops * 1e12 if peak_tflops else None)

        pretrain = runs["pretrain"].metrics
        peak = f"{peak_tflops:.0f} TFLOP/s bf16 dense ({peak_source})" if peak_tflops else "no GPU peak: MFU n/a"
        print(f"\ndevice: {device}; {peak}; generation engine {args.engine}")
        print(f"model: qwen3 (model=tiny_dense), {int(pretrain['total_parameters']):,} parameters; trainer mixed "
              f"precision {pretrain.get('mixed_precision')}; torch {torch.__version__}; {where}")
        print(f"total {total:.0f} s; stage wall times: " + ", ".join(f"{r.name} {r.wall_s:.0f} s" for r in runs.values()))
        print("\n" + format_table(rows) + "\n")
        print("memory (GiB; states = weights + grads + optim + ref, docs/memory.md):\n" + memory_table(runs) + "\n")
        for note in notes:
            print("note: " + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
