"""Host memory of every training stage: peak RSS against the bytes the stage must hold.

    python benchmarks/memory.py [--models 0.6b,moe] [--stages pretrain,sft,sft_lora,reward,dpo,grpo]
                                [--bf16-stages moe:grpo] [--out DIR] [--keep-runs]

What runs: each stage alone, as its own `python -m pipeline ...` process (one stage per process,
so that process's peak RSS is the stage's), for two optimizer steps at batch 2 on sequences of
about 100-140 tokens (task.digits=4, 5-6 operands; pretrain packs 128-token rows), every
evaluation, curve and problem count at its minimum, so that the training state dominates. Models
(random weights, the real vocabulary of 151,936 so the embedding has its real size; built once into
<out>/models/ the way benchmarks/gpu_check.py sizes `model=tiny_dense`: the model group composed
with model.config overrides, here saved as a checkpoint with the pipeline's own BPE tokenizer and
run with `model=hf model.path=<dir>`, i.e. the `pretrained` preset: activation checkpointing on,
sdpa, precision auto = fp32 on a CPU):

  0.6b  Qwen3-0.6B's shape: hidden 1024, 28 layers, 16 q / 8 kv heads of 128, MLP 3072, tied
        embeddings: 596.0M parameters.
  moe   a small Qwen3-MoE: hidden 512, 8 layers, 8 q / 4 kv heads of 64, 16 experts (top-4) of
        256, tied embeddings: 134.5M parameters.

Stages: pretrain, sft (full), sft_lora (sft with peft=lora), reward, dpo (pairs=task: a random
model samples no correct answer for on-policy pairs), grpo (num_generations 2, 16 new tokens; the random
policy is never right, so every group has zero variance: its default zero_variance=filter copes).
`--bf16-stages` (default moe:grpo) adds rows at trainer.precision=bf16 (CPU autocast: fp32 master
weights, bf16 matmuls, references loaded in bf16).

Time (2026-12-06, 2 cores): 50.7 min for both models, every stage and a bf16 grpo row of each,
with other jobs on the machine (load average 4-7), 0.6b stages at 185-341 s each. The 0.6b bf16
row alone took 10 min, so the default leaves it out (about 41 min under that load). At a load
average near 2 the 0.6b stages took 40-62 s each and the moe ones 19-27 s; a run of the default
set there was killed from outside after its first 3.6 min. Estimated from those stage times (not
run end to end): about 10-12 min. Each 0.6b stage writes a checkpoint of about 10 GB (weights,
AdamW state, final/) into its run dir, removed after the stage unless --keep-runs.

The table, per model and stage:
  peak      the stage process's maximum RSS (os.wait4's ru_maxrss of that child)
  (file)    of the RSS in the highest sample, the resident pages of mapped files (RssFile): mostly
            checkpoint weights that from_pretrained maps from safetensors without copying;
            counted in RSS (and in peak), reclaimable by the kernel
  weights   parameters x 4 bytes (every trained model is loaded in fp32: docs/training.md)
  grads     trainable parameters x 4
  optim     AdamW's two moments: trainable parameters x 8
  ref       a frozen reference copy in its dtype (metrics.json `reference_dtype`): dpo and grpo
            (beta 0.02 > 0) with full fine-tuning; none behind a LoRA adapter
  act       activations measured in the stage process: the bytes of the tensors autograd saves
            for backward during the largest training micro-step (torch.autograd.graph
            saved_tensors_hooks, each storage counted once, parameters not counted), plus the
            layer inputs that non-reentrant activation checkpointing keeps, plus one decoder
            layer's recomputed activations (per token from the `act` probe below)
  base      RSS of a process that only imports what a stage process imports before it loads a
            model (torch, transformers, trl, the pipeline's runner and stage modules; measured here)
  required  the sum; ratio = peak / required
  at        the phase of the stage during which the peak was reached (from RSS sampled every
            50 ms and phase marks the stage process records)

The instrumentation: each stage process gets a sitecustomize.py on PYTHONPATH (written to
<out>/probe/) that only records: phase marks around model loading, Trainer construction, the
training steps, checkpoint saves, evaluation and generation; the saved-tensor bytes of each
training step; the token count of each training forward. It changes no computation.

The `act` probe (one process per model) runs one forward + backward of 2 x 128 tokens without and
with activation checkpointing and prints the saved bytes per token per decoder layer, outside the
layers (logits and loss) and the RSS growth over the forward (activations by difference).

CPU etiquette: every child runs with OMP_NUM_THREADS=2 (or less when set lower); a child is killed
when its RSS passes --rss-limit-gib (default 17) or the machine's MemAvailable drops below 0.75 GiB,
and each stage waits (up to 2 minutes) for enough free memory before it starts. Wall times depend
on whatever else runs on the machine; the RSS figures do not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
VOCAB = 151936

# --------------------------------------------------------------------------- what runs

MODELS = {
    # name: (model group, model.config overrides)
    "0.6b": ("tiny_dense", {
        "hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "intermediate_size": 3072, "max_position_embeddings": 2048, "tie_word_embeddings": True,
    }),
    "moe": ("tiny_moe", {
        "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 64, "intermediate_size": 1024, "moe_intermediate_size": 256, "num_experts": 16,
        "num_experts_per_tok": 4, "max_position_embeddings": 2048, "tie_word_embeddings": True,
    }),
}
# the task sized so that every sequence is about 100-140 tokens with the checkpoint's tokenizer
TASK = ["task=arithmetic", "task.digits=4", "task.min_operands=5", "task.max_operands=6", "task.n_pretrain=40",
        "task.n_sft=8", "task.n_preference=8", "task.n_rl=8", "task.n_eval=4"]
STEPS = ["max_steps=2", "batch_size=2", "grad_accum=1", "save_steps=2", "logging_steps=1"]
STAGES = {
    # bench stage: (pipeline stage, overrides beyond STEPS)
    "pretrain": ("pretrain", ["stages.pretrain.seq_len=128", "stages.pretrain.eval_steps=2", "stages.pretrain.eval_problems=1",
                              "stages.pretrain.eval_batch_size=1", "stages.pretrain.max_new_tokens=8"]),
    "sft": ("sft", ["stages.sft.max_length=160", "stages.sft.eval_steps=2", "stages.sft.eval_examples=1",
                    "stages.sft.eval_problems=1", "stages.sft.eval_samples=1", "stages.sft.eval_batch_size=1",
                    "stages.sft.max_new_tokens=8"]),
    "sft_lora": ("sft", ["peft=lora", "stages.sft.max_length=160", "stages.sft.eval_steps=2", "stages.sft.eval_examples=1",
                         "stages.sft.eval_problems=1", "stages.sft.eval_samples=1", "stages.sft.eval_batch_size=1",
                         "stages.sft.max_new_tokens=8"]),
    "reward": ("reward", ["stages.reward.max_length=160", "stages.reward.eval_steps=2", "stages.reward.eval_pairs=1",
                          "stages.reward.pairs=task"]),
    "dpo": ("dpo", ["stages.dpo.pairs=task", "stages.dpo.max_length=160", "stages.dpo.eval_steps=2", "stages.dpo.eval_pairs=1",
                    "stages.dpo.eval_problems=1", "stages.dpo.eval_samples=1", "stages.dpo.eval_batch_size=1",
                    "stages.dpo.max_new_tokens=8"]),
    "grpo": ("grpo", ["stages.grpo.num_generations=2", "stages.grpo.max_new_tokens=16", "stages.grpo.eval_every=100",
                      "stages.grpo.curve_problems=1", "stages.grpo.eval_problems=1", "stages.grpo.eval_samples=1",
                      "stages.grpo.eval_batch_size=1"]),
}
COMMON = ["trainer.report_to=none", "run.force=true", "seed=0"]


def stage_overrides(stage: str, model_dir: Path, run_dir: Path, precision: str) -> list[str]:
    name, extra = STAGES[stage]
    return ["model=hf", f"model.path={model_dir}", *TASK, *COMMON, f"run.dir={run_dir}", f"run.stages=[{name}]",
            *(f"stages.{name}.{kv}" for kv in STEPS), *extra,
            *([] if precision == "fp32" else [f"trainer.precision={precision}"])]


# --------------------------------------------------------------------------- child processes


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    threads = min(int(env.get("OMP_NUM_THREADS", "2") or 2), 2)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONUNBUFFERED="1")
    return env


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def proc_status(pid: int) -> tuple[int, int, int] | None:
    """(VmRSS, VmHWM, RssFile) in bytes, None when the process is gone. RssFile: resident pages
    of mapped files, here mostly safetensors weights that from_pretrained maps without copying
    (counted in RSS, reclaimable)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:", "RssFile:")):
            key, number = line.split()[:2]
            values[key] = int(number) * 1024
    return values.get("VmRSS:", 0), values.get("VmHWM:", 0), values.get("RssFile:", 0)


@dataclass
class ChildRun:
    returncode: int
    peak: int  # ru_maxrss of the child, bytes
    seconds: float
    samples: list[tuple[float, int, int, int]]  # (time, rss, hwm, rss_file)
    killed: str | None = None
    log: Path | None = None


def run_child(cmd: list[str], log: Path, env: dict[str, str], rss_limit: int, min_available: int) -> ChildRun:
    """Run cmd, sampling its RSS every 50 ms; its own peak RSS from os.wait4 (per child, unlike
    RUSAGE_CHILDREN, which is the maximum over all children so far)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    samples: list[tuple[float, int, int, int]] = []
    killed = None
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now = proc_status(proc.pid)
            if now:
                samples.append((time.time(), *now))
                if killed is None and (now[0] > rss_limit or mem_available() < min_available):
                    killed = (f"killed: RSS {now[0] / GIB:.1f} GiB, MemAvailable {mem_available() / GIB:.1f} GiB "
                              f"(limits {rss_limit / GIB:.0f} GiB / {min_available / GIB:.2f} GiB)")
                    proc.kill()
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ChildRun(proc.returncode, usage.ru_maxrss * 1024, time.time() - start, samples, killed, log)


def wait_for_memory(need: int, timeout: float = 120.0) -> float:
    """Wait until MemAvailable >= need (bytes) or timeout; returns what is available."""
    deadline = time.time() + timeout
    while mem_available() < need and time.time() < deadline:
        time.sleep(2.0)
    return mem_available()


# --------------------------------------------------------------------------- the stage-process probe

SITECUSTOMIZE = """\
# written by benchmarks/memory.py: record memory phases of this process (MEMORY_PROBE names the output)
import os
if os.environ.get("MEMORY_PROBE"):
    import sys
    sys.path.insert(0, {bench_dir!r})
    sys.dont_write_bytecode = True  # no __pycache__ in the repository's benchmarks/
    import memory as _memory_probe
    _memory_probe.install_probe(os.environ["MEMORY_PROBE"])
"""


def install_probe(out_path: str) -> None:
    """In a stage process (through sitecustomize): record phase marks and per-step saved-tensor
    bytes; written to out_path as JSON at exit. Patches are applied right after each module
    executes (an import hook), so names imported from these modules are the wrapped ones."""
    import atexit
    import functools
    import importlib.abc
    import threading

    record: dict = {"marks": [], "steps": [], "pid": os.getpid()}
    lock = threading.Lock()

    def rss() -> int:
        status = proc_status(os.getpid())
        return status[0] if status else 0

    def mark(kind: str, name: str) -> None:
        with lock:
            record["marks"].append((time.time(), kind, name, rss()))

    def phased(name_of):
        def wrap(fn):
            @functools.wraps(fn)
            def inner(*args, **kwargs):
                name = name_of(*args, **kwargs) if callable(name_of) else name_of
                mark("begin", name)
                try:
                    return fn(*args, **kwargs)
                finally:
                    mark("end", name)
            return inner
        return wrap

    step: dict = {"active": None}  # the training step being recorded

    def storage_key(t):
        try:
            storage = t.untyped_storage()
            return storage.data_ptr(), storage.nbytes()
        except Exception:  # noqa: BLE001 - no storage (meta, sparse): nothing to count
            return None

    def pack(t):
        rec = step["active"]
        if rec is not None:
            key = storage_key(t)
            if key and key[0] not in rec["_params"] and key[0] not in rec["_seen"]:
                rec["_seen"].add(key[0])
                rec["saved"] += key[1]
                if tuple(t.shape) in rec["_param_shapes"] and t.dtype != rec["_param_dtype"]:
                    rec["cast_weights"] += key[1]  # autocast's low-precision copies of weights
        return t

    def patch_trainer(module):
        import torch

        trainer = module.Trainer
        trainer.__init__ = phased("trainer_init")(trainer.__init__)
        trainer.train = phased("train")(trainer.train)
        trainer._save_checkpoint = phased("save_checkpoint")(trainer._save_checkpoint)
        trainer.evaluate = phased("evaluate")(trainer.evaluate)
        original_step = trainer.training_step

        @functools.wraps(original_step)
        def training_step(self, model, inputs, *args, **kwargs):
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            shapes = {tuple(p.shape) for p in model.parameters()}
            rec = {"index": len(record["steps"]), "saved": 0, "cast_weights": 0, "checkpoint_inputs": 0,
                   "tokens": [], "_params": params, "_param_shapes": shapes, "_param_dtype": torch.float32, "_seen": set()}
            mark("begin", f"step {rec['index']}")
            step["active"] = rec
            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    return original_step(self, model, inputs, *args, **kwargs)
            finally:
                step["active"] = None
                mark("end", f"step {rec['index']}")
                record["steps"].append({k: v for k, v in rec.items() if not k.startswith("_")})

        trainer.training_step = training_step

    def patch_modeling(module):
        import torch

        original_from_pretrained = module.PreTrainedModel.from_pretrained.__func__

        def from_pretrained(cls, *args, **kwargs):
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            name = f"from_pretrained {cls.__name__} {str(dtype).removeprefix('torch.') if dtype is not None else ''}".strip()
            mark("begin", name)
            try:
                return original_from_pretrained(cls, *args, **kwargs)
            finally:
                mark("end", name)

        module.PreTrainedModel.from_pretrained = classmethod(from_pretrained)
        original_checkpoint = module.checkpoint

        def checkpoint(function, *args, **kwargs):
            rec = step["active"]
            if rec is not None and torch.is_grad_enabled():
                for a in args:
                    key = storage_key(a) if isinstance(a, torch.Tensor) else None
                    if key and key[0] not in rec["_seen"]:
                        rec["_seen"].add(key[0])
                        rec["checkpoint_inputs"] += key[1]
            return original_checkpoint(function, *args, **kwargs)

        module.checkpoint = checkpoint

    def patch_embedding(module):
        import torch

        original = module.Embedding.forward

        def forward(self, input):
            rec = step["active"]
            if rec is not None and torch.is_grad_enabled():
                rec["tokens"].append(list(input.shape))
            return original(self, input)

        module.Embedding.forward = forward

    def patch_attr(attr: str, name: str):
        def patch(module):
            setattr(module, attr, phased(name)(getattr(module, attr)))
        return patch

    def patch_grpo(module):
        cls = module.GRPOTrainer
        cls._generate = phased("rollout generate")(cls._generate)
        cls._generate_and_score_completions = phased("rollout + score")(cls._generate_and_score_completions)

    def patch_adamw(module):
        module.AdamW.step = phased("optimizer step")(module.AdamW.step)

    patches = {
        "transformers.trainer": [patch_trainer],
        "transformers.modeling_utils": [patch_modeling],
        "torch.nn.modules.sparse": [patch_embedding],
        "torch.optim.adamw": [patch_adamw],
        "trl.trainer.grpo_trainer": [patch_grpo],
        "pipeline.models": [patch_attr("load_model", "load_model"), patch_attr("save_peft_policy", "save_peft_policy (merge)")],
        "pipeline.artifacts": [patch_attr("save_final", "save_final")],
        "pipeline.evaluate": [patch_attr("generate", "generate (eval)")],
    }

    class PostImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in patches:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    break
            else:
                return None
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                for patch in patches[name]:
                    patch(module)

            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, PostImport())
    mark("begin", "process")

    @atexit.register
    def write() -> None:
        mark("end", "process")
        Path(out_path).write_text(json.dumps(record))


# --------------------------------------------------------------------------- helpers run as children


def build_checkpoint(name: str, directory: Path) -> None:
    """(child) A random checkpoint of MODELS[name] with the real vocab size and the pipeline's BPE
    tokenizer, trained on the task's pretraining texts (only ids below len(tokenizer) occur)."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from pipeline.config import compose_config
    from pipeline.tasks import build_task
    from pipeline.tokenizer import stop_token_ids, train_tokenizer

    group, sizes = MODELS[name]
    cfg = compose_config([f"model={group}", "preset=none", *TASK, *(f"model.config.{k}={v}" for k, v in sizes.items())])
    tokenizer = train_tokenizer(build_task(cfg.task).pretrain_texts(), 320)
    config = AutoConfig.for_model(cfg.model.arch, vocab_size=VOCAB, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                                  **OmegaConf.to_container(cfg.model.config, resolve=True))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "memory_bench.json").write_text(json.dumps({"model": name, "sizes": sizes, "vocab": VOCAB, "task": TASK}))
    tmp.replace(directory)


def bf16_copy(model_dir: Path, env: dict[str, str], rss_limit: int, min_available: int) -> Path:
    """model_dir's checkpoint saved in bf16 beside it (built once, in a child process)."""
    target = model_dir.with_name(model_dir.name + "-bf16")
    if not (target / "config.json").is_file():
        code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
                "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16); m.save_pretrained(sys.argv[2]); "
                "AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])")
        run_child([sys.executable, "-c", code, str(model_dir), str(target)], target.with_suffix(".log"), env, rss_limit,
                  min_available)
    return target


def activation_probe(model_dir: Path, out: Path, tokens: int = 128, batch: int = 2) -> None:
    """(child) One forward + backward of batch x tokens in fp32, with activation checkpointing off
    and on: the saved-tensor bytes inside the decoder layers and outside them, the checkpointed
    layer inputs, and the RSS growth over the forward."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    n_tokenizer = len(AutoTokenizer.from_pretrained(str(model_dir)))
    model.config.use_cache = False
    if hasattr(model.config, "output_router_logits"):
        model.config.output_router_logits = True
    layers = model.model.layers
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    torch.manual_seed(0)
    ids = torch.randint(0, n_tokenizer, (batch, tokens))
    results = {}
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        model.train()
        state = {"inside": 0, "in_layers": 0, "outside": 0, "ckpt_inputs": 0, "seen": set()}

        def enter(module, args, kwargs):
            state["inside"] += 1

        def leave(module, args, kwargs, output):
            state["inside"] -= 1

        handles = [m.register_forward_pre_hook(enter, with_kwargs=True) for m in layers]
        handles += [m.register_forward_hook(leave, with_kwargs=True) for m in layers]

        def pack(t):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in params and key not in state["seen"]:
                state["seen"].add(key)
                state["in_layers" if state["inside"] else "outside"] += storage.nbytes()
            return t

        def layer_input_bytes(module, args, kwargs):  # what non-reentrant checkpointing keeps per layer
            hidden = args[0] if args else kwargs.get("hidden_states")
            if checkpointing and isinstance(hidden, torch.Tensor):
                key = hidden.untyped_storage().data_ptr()
                if key not in state["seen"]:  # counted here, not again when checkpoint saves it
                    state["seen"].add(key)
                    state["ckpt_inputs"] += hidden.untyped_storage().nbytes()

        handles += [m.register_forward_pre_hook(layer_input_bytes, with_kwargs=True, prepend=True) for m in layers]
        gc.collect()
        before = proc_status(os.getpid())[0]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        after_forward = proc_status(os.getpid())[0]
        loss.backward()
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        del loss
        gc.collect()
        n = batch * tokens
        results["gc" if checkpointing else "no_gc"] = {
            "tokens": n, "layers": len(layers),
            "in_layers": state["in_layers"], "outside": state["outside"], "ckpt_inputs": state["ckpt_inputs"],
            "per_token_per_layer": state["in_layers"] / n / len(layers),
            "outside_per_token": state["outside"] / n,
            "rss_growth_forward": after_forward - before,
        }
    out.write_text(json.dumps(results))


# --------------------------------------------------------------------------- accounting


@dataclass
class Row:
    model: str
    stage: str
    precision: str
    peak: int = 0
    peak_file: int = 0  # RssFile in the sample nearest the peak
    weights: int = 0
    grads: int = 0
    optim: int = 0
    ref: int = 0
    act: int = 0
    base: int = 0
    seconds: float = 0.0
    at: str = ""
    note: str = ""
    total_params: int = 0
    trainable_params: int = 0
    ref_dtype: str = ""
    act_detail: dict = field(default_factory=dict)
    phases: list = field(default_factory=list)

    transients: int = 0  # the formula's step transients (docs/memory.md findings 2 and 3)

    @property
    def required(self) -> int:
        return self.weights + self.grads + self.optim + self.ref + self.act + self.base

    @property
    def formula(self) -> int:
        return self.required + self.transients

    @property
    def ratio(self) -> float:
        return self.peak / self.required if self.required and self.peak else float("nan")


BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def phase_table(marks: list, samples: list[tuple[float, int, int]]) -> list[dict]:
    """Each phase (begin/end mark pair, nested) with its RSS at begin and end and the highest RSS
    sampled while it was open."""
    open_: dict[str, list] = {}
    phases = []
    for t, kind, name, rss in marks:
        if kind == "begin":
            open_.setdefault(name, []).append((t, rss))
        elif open_.get(name):
            t0, rss0 = open_[name].pop()
            inside = [s[1] for s in samples if t0 <= s[0] <= t]
            phases.append({"name": name, "t0": t0, "t1": t, "rss0": rss0, "rss1": rss, "max": max(inside + [rss0, rss])})
    return sorted(phases, key=lambda p: p["t0"])


def peak_phase(phases: list[dict], samples: list[tuple[float, int, int]], peak: int) -> str:
    """The innermost phase open when the sampled high-water mark first reached (nearly) the peak."""
    hit = next((s for s in samples if s[2] >= 0.995 * peak), None) or (max(samples, key=lambda s: s[2]) if samples else None)
    if hit is None:
        return "?"
    t = hit[0]
    previous = max((s[0] for s in samples if s[0] < t), default=t)
    candidates = [p for p in phases if p["name"] != "process" and p["t0"] <= t and p["t1"] >= previous]
    if not candidates:
        return "outside the marked phases"
    inner = min(candidates, key=lambda p: p["t1"] - p["t0"])
    outer = [p["name"] for p in candidates if p is not inner and p["name"] not in ("train",)]
    return inner["name"] + (f" (in {outer[-1]})" if outer and outer[-1] != inner["name"] else "")


LM_HEAD_STAGES = ("sft", "sft_lora", "dpo", "grpo")  # TRL's chunked LM head (trl.trainer.utils, chunk 32,768)
HEAD_CHUNK, HEAD_TILES = 32768, 7


def step_transients(row: Row, config: dict) -> int:
    """The formula's transients of one training step (docs/memory.md): a tied embedding trained in
    full holds a second full-size gradient in backward (V h 4 bytes, finding 2); TRL's chunked
    LM head on a CPU holds about 7 tiles of min(T, 4096) x 32,768 fp32 entries (finding 3)."""
    vocab, hidden = int(config["vocab_size"]), int(config["hidden_size"])
    tied = config.get("tie_word_embeddings", False) and not row.stage.endswith("_lora")
    tokens = int(row.act_detail.get("tokens", 0))
    head = HEAD_TILES * min(tokens, 4096) * HEAD_CHUNK * 4 if row.stage in LM_HEAD_STAGES else 0
    return (vocab * hidden * 4 if tied else 0) + head


def account(row: Row, metrics: dict, probe: dict, act_probe: dict | None, base: int) -> None:
    """Fill row's components from the stage's metrics.json and its probe record."""
    total = int(metrics.get("total_parameters", 0))
    trainable = int(metrics.get("trainable_parameters", total))
    row.total_params, row.trainable_params = total, trainable
    # the model as loaded, in its dtype (a LoRA base in bf16 from a bf16 checkpoint under bf16),
    # plus an adapter's fp32 weights; 4 bytes per parameter when the stage does not report it
    adapter = trainable if row.stage.endswith("_lora") else 0
    loaded = metrics.get("weights_mb_at_load")
    row.weights = int(loaded * 2**20) + 4 * adapter if loaded is not None else 4 * total
    row.grads, row.optim = 4 * trainable, 8 * trainable
    ref_dtype = metrics.get("reference_dtype")
    if ref_dtype:
        row.ref_dtype = ref_dtype
        # the reference has the policy's architecture without an adapter: the policy's count
        row.ref = BYTES.get(ref_dtype, 4) * total
    row.base = base
    steps = probe.get("steps", [])
    if steps:
        largest = max(steps, key=lambda s: s["saved"] + s["checkpoint_inputs"])
        tokens = max((a * b for a, b in (t[:2] for t in largest["tokens"] if len(t) >= 2)), default=0)
        recompute = 0
        if act_probe and tokens and largest["checkpoint_inputs"]:
            recompute = int(act_probe["no_gc"]["per_token_per_layer"] * tokens)  # one layer, recomputed in backward
        row.act = largest["saved"] + largest["checkpoint_inputs"] + recompute
        row.act_detail = {"saved": largest["saved"], "checkpoint_inputs": largest["checkpoint_inputs"],
                          "one_layer_recompute": recompute, "tokens": tokens, "cast_weights": largest["cast_weights"],
                          "forward_shapes": largest["tokens"]}


# --------------------------------------------------------------------------- main


def gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def format_table(rows: list[Row]) -> str:
    head = ["model", "stage", "prec", "peak", "(file)", "weights", "grads", "optim", "ref", "act", "base", "required", "ratio",
            "+transients", "peak/formula", "wall s", "peak at"]
    lines = []
    for r in rows:
        if r.note and not r.peak:
            lines.append([r.model, r.stage, r.precision, *["-"] * 12, f"{r.seconds:.0f}", r.note])
            continue
        lines.append([r.model, r.stage, r.precision, gib(r.peak), gib(r.peak_file), gib(r.weights), gib(r.grads), gib(r.optim),
                      gib(r.ref) + (f" {SHORT.get(r.ref_dtype, r.ref_dtype)}" if r.ref else ""), gib(r.act), gib(r.base), gib(r.required),
                      f"{r.ratio:.2f}", gib(r.formula), f"{r.peak / r.formula:.2f}" if r.formula else "-", f"{r.seconds:.0f}",
                      r.at + (f"; {r.note}" if r.note else "")])
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    fmt = lambda cells: " | ".join(str(c).ljust(w) if i in (0, 1, 2, 16) else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths), *map(fmt, lines)])


def versions() -> str:
    from importlib.metadata import version

    names = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "safetensors")
    return ", ".join(f"{n} {version(n)}" for n in names) + f"; Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="0.6b,moe", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}; "
                        "'act' alone runs only the activation probes")
    parser.add_argument("--bf16-stages", default="moe:grpo",
                        help="MODEL:STAGE pairs (or STAGE: every model) also run at trainer.precision=bf16; '' for none. "
                             "0.6b:grpo takes about 10 min on 2 busy cores (bf16 autocast is slow on a CPU)")
    parser.add_argument("--no-act-probe", action="store_true", help="skip the per-model forward+backward activation probe")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "memory_bench")
    parser.add_argument("--keep-runs", action="store_true", help="keep each stage's run dir (about 10 GB per 0.6b stage)")
    parser.add_argument("--rss-limit-gib", type=float, default=17.0)
    parser.add_argument("--table-from", type=Path, metavar="RESULTS_JSON",
                        help="print the table of an earlier run's results.json (no stage runs)")
    parser.add_argument("--_build", nargs=2, metavar=("MODEL", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--_act", nargs=2, metavar=("MODEL_DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._build:
        build_checkpoint(args._build[0], Path(args._build[1]))
        return 0
    if args._act:
        activation_probe(Path(args._act[0]), Path(args._act[1]))
        return 0
    if args.table_from:
        saved = json.loads(args.table_from.read_text())
        fields = set(Row.__dataclass_fields__)
        rows = [Row(**{k: v for k, v in r.items() if k in fields}) for r in saved["rows"]]
        for row in rows:
            config = args.table_from.parent / "models" / (row.model + ("-bf16" if row.stage.endswith("_lora") and row.precision == "bf16" else ""))
            if row.peak and (config / "config.json").is_file():
                row.transients = step_transients(row, json.loads((config / "config.json").read_text()))
        print(f"memory: {saved['date']}; {saved['versions']}; {len(rows)} stage runs in {saved['wall_s'] / 60:.1f} min\n")
        print(format_table(rows))
        return 0

    models = [m for m in args.models.split(",") if m]
    stages = [s for s in args.stages.split(",") if s]
    bf16 = [tuple(s.split(":", 1)) if ":" in s else (None, s) for s in args.bf16_stages.split(",") if s]
    unknown = ([m for m in models if m not in MODELS] + [s for s in stages if s not in STAGES and s != "act"]
               + [f"{m}:{s}" for m, s in bf16 if s not in STAGES or (m is not None and m not in MODELS)])
    if unknown:
        parser.error(f"unknown: {unknown}")
    out = args.out.expanduser().resolve()
    (out / "probe").mkdir(parents=True, exist_ok=True)
    (out / "probe" / "sitecustomize.py").write_text(SITECUSTOMIZE.format(bench_dir=str(Path(__file__).resolve().parent)))
    env = child_env()
    rss_limit, min_available = int(args.rss_limit_gib * GIB), int(0.75 * GIB)
    started = time.time()
    print(f"memory: {datetime.datetime.now().isoformat(timespec='seconds')}; {versions()}")
    print(f"memory: host {os.cpu_count()} CPUs, MemTotal {int(Path('/proc/meminfo').read_text().split()[1]) / 2**20:.1f} GiB, "
          f"MemAvailable {mem_available() / GIB:.1f} GiB, load {os.getloadavg()[0]:.2f}; OMP_NUM_THREADS={env['OMP_NUM_THREADS']}; "
          f"out {out}", flush=True)

    # the baseline: a process that only imports torch, transformers and trl
    python = sys.executable
    base_run = run_child([python, "-c", "import torch, transformers, trl"], out / "logs" / "baseline.log", env, rss_limit, min_available)
    pipeline_run = run_child([python, "-c", "import pipeline.runner, stages.sft, stages.grpo, stages.dpo, stages.reward"],
                             out / "logs" / "baseline_pipeline.log", env, rss_limit, min_available)
    base = pipeline_run.peak  # a stage process imports these before it loads a model
    print(f"memory: baseline RSS: import torch+transformers+trl {gib(base)} GiB; + the pipeline's stage modules "
          f"{gib(pipeline_run.peak)} GiB", flush=True)

    rows: list[Row] = []
    act_probes: dict[str, dict] = {}
    for model in models:
        model_dir = out / "models" / model
        if not (model_dir / "config.json").is_file():
            t = time.time()
            built = run_child([python, __file__, "--_build", model, str(model_dir)], out / "logs" / f"build-{model}.log", env,
                              rss_limit, min_available)
            if built.returncode:
                print(f"memory: building {model} failed (exit {built.returncode}); see {built.log}")
                continue
            print(f"memory: built {model_dir} in {time.time() - t:.0f} s", flush=True)

        if not args.no_act_probe:
            probe_out = out / f"act-{model}.json"
            run = run_child([python, __file__, "--_act", str(model_dir), str(probe_out)], out / "logs" / f"act-{model}.log", env,
                            rss_limit, min_available)
            if run.returncode == 0:
                act_probes[model] = json.loads(probe_out.read_text())
                a, g = act_probes[model]["no_gc"], act_probes[model]["gc"]
                print(f"memory: {model} activations, fp32, 2 x 128 tokens ({run.seconds:.0f} s): no checkpointing "
                      f"{a['per_token_per_layer'] / 1024:.1f} KiB/token/layer in the layers + {a['outside_per_token'] / 1024:.0f} "
                      f"KiB/token outside (logits, loss) = {gib(a['in_layers'] + a['outside'])} GiB saved, RSS +"
                      f"{gib(a['rss_growth_forward'])} GiB over the forward; checkpointing: {gib(g['in_layers'] + g['outside'])} "
                      f"GiB saved + {g['ckpt_inputs'] / 2**20:.1f} MiB layer inputs, RSS +{gib(g['rss_growth_forward'])} GiB", flush=True)
            else:
                print(f"memory: {model} activation probe failed (exit {run.returncode}); see {run.log}", flush=True)
        if stages == ["act"]:
            continue

        jobs = [(s, "fp32") for s in stages if s != "act"] + [(s, "bf16") for m, s in bf16 if s in stages and m in (None, model)]
        for stage, precision in jobs:
            label = f"{model}-{stage}-{precision}"
            model_dir = out / "models" / model
            if precision == "bf16" and stage.endswith("_lora"):
                # the frozen base loads in bf16 only from a bf16 checkpoint (a hub model's dtype)
                model_dir = bf16_copy(out / "models" / model, env, rss_limit, min_available)
            run_dir = out / "runs" / label
            shutil.rmtree(run_dir, ignore_errors=True)
            probe_file = out / "probe" / f"{label}.json"
            probe_file.unlink(missing_ok=True)
            hydra_args = stage_overrides(stage, model_dir, run_dir, precision)
            cmd = [python, "-m", "pipeline", *hydra_args]
            child = dict(env, MEMORY_PROBE=str(probe_file), PYTHONPATH=os.pathsep.join(
                [str(out / "probe"), str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]))
            weights = (model_dir / "model.safetensors").stat().st_size
            wait_for_memory(min(4 * weights + base, 14 * GIB))
            print(f"memory: {label}: python -m pipeline {' '.join(shlex.quote(a) for a in hydra_args)}", flush=True)
            run = run_child(cmd, out / "logs" / f"{label}.log", child, rss_limit, min_available)
            row = Row(model, stage, precision, peak=run.peak, seconds=run.seconds)
            stage_name = STAGES[stage][0]
            metrics_file = run_dir / stage_name / "metrics.json"
            probe = json.loads(probe_file.read_text()) if probe_file.is_file() else {}
            row.phases = phase_table(probe.get("marks", []), run.samples)
            row.at = peak_phase(row.phases, run.samples, run.peak)
            if run.samples:
                row.peak_file = max(run.samples, key=lambda s: s[1])[3]
            if run.returncode or not metrics_file.is_file():
                tail = run.log.read_text().strip().splitlines()[-3:] if run.log and run.log.is_file() else []
                row.note = (run.killed or f"exit {run.returncode}") + ": " + " / ".join(tail)[-300:]
                (out / "logs").mkdir(exist_ok=True)
                if (run_dir / stage_name / "error.log").is_file():
                    shutil.copy(run_dir / stage_name / "error.log", out / "logs" / f"{label}.error.log")
            else:
                metrics = json.loads(metrics_file.read_text())
                account(row, metrics, probe, act_probes.get(model), base)
                row.transients = step_transients(row, json.loads((model_dir / "config.json").read_text()))
                shutil.copy(metrics_file, out / "logs" / f"{label}.metrics.json")
            rows.append(row)
            if not args.keep_runs:
                shutil.rmtree(run_dir, ignore_errors=True)
            print(f"memory: {label}: peak {gib(row.peak)} GiB (file-backed {gib(row.peak_file)}), required {gib(row.required)} GiB, ratio {row.ratio:.2f}, "
                  f"{run.seconds:.0f} s, peak at {row.at}{'; ' + row.note if row.note else ''}", flush=True)
            key = [p for p in row.phases if p["name"] != "process" and not p["name"].startswith(("step ", "optimizer step"))]
            print("  phases (RSS GiB begin -> end, max): " + "; ".join(
                f"{p['name']} {gib(p['rss0'])}->{gib(p['rss1'])} ({gib(p['max'])})" for p in key), flush=True)

    total = time.time() - started
    table = format_table(rows)
    print(f"\nmemory: {len(rows)} stage runs in {total:.0f} s ({total / 60:.1f} min) wall; GiB = 2^30 bytes; "
          f"base = import of the pipeline's stage modules\n")
    print(table)
    for r in rows:
        if r.act_detail:
            d = r.act_detail
            print(f"  {r.model} {r.stage} {r.precision}: params {r.total_params / 1e6:.1f}M, trainable {r.trainable_params / 1e6:.2f}M; "
                  f"act = saved {gib(d['saved'])} + checkpointed layer inputs {gib(d['checkpoint_inputs'])} + one layer "
                  f"recomputed {gib(d['one_layer_recompute'])} GiB over {d['tokens']} tokens of the largest forward "
                  f"{d['forward_shapes']}" + (f"; autocast weight copies among the saved: {gib(d['cast_weights'])} GiB"
                                               if d["cast_weights"] else ""))
    (out / "results.json").write_text(json.dumps({
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "versions": versions(), "wall_s": total,
        "baseline": base, "baseline_pipeline": pipeline_run.peak, "activation_probes": act_probes,
        "rows": [dict(r.__dict__, required=r.required, ratio=r.ratio, formula=r.formula) for r in rows]}, indent=1, default=str))
    (out / "table.txt").write_text(table + "\n")
    print(f"\nmemory: results in {out / 'results.json'}, logs in {out / 'logs'}")
    return 0 if all(not r.note or r.peak for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
