"""The pipeline's training overhead against bare loops on the same model, data and settings.

    python benchmarks/overhead.py [--steps 100 --warmup 10] [--grpo-steps 10 --grpo-warmup 2]
                                  [--init SFT_FINAL] [--only pretrain|grpo] [--repeats 1] [hydra overrides...]

1. pretrain: tokens/s of a bare PyTorch loop (forward, backward, clip, AdamW step, scheduler
   step, zero_grad) against the pipeline's pretrain stage (stages/pretrain.py's run(): its
   LMTrainer, TrainingArguments, collator and callbacks). Both build the composed config's
   model (demo: tiny_moe, router aux loss on) from the same seed, train on the stage's `pack`ed
   blocks in the Trainer's batch order, batch_size x seq_len, with the stage's AdamW settings
   (the Trainer's weight-decay groups, gradient clipping, warmup + schedule over warmup + steps),
   so their logged losses agree (printed); a stage set to another optimizer (preset=demo's
   Muon for pretrain) is set back to AdamW here.
2. grpo: seconds per step of a plain `trl.GRPOTrainer` against the pipeline's grpo stage
   (stages/grpo.py's run(): StageGRPOTrainer, its GRPOConfig and callbacks) from the same
   checkpoint (--init, an sft final/; default: one built here with preset=smoke, mechanics
   only), on the same prompts, reward functions, trainable parameters and TRL settings
   (the GRPOConfig fields that differ are printed). The pipeline runs with
   stages.grpo.zero_variance=keep, TRL's loss, so both sample and train on the same
   completions and their logged losses and rewards must be equal (printed); pass
   stages.grpo.zero_variance=filter to time the pipeline's own weighting instead.

Each measurement runs in its own process. Timed window: from the end of step `warmup` to the
end of step `warmup + steps`, everything inside the training loop included (data, callbacks,
logging); eval and save intervals (grpo: the held-out curve's) are set beyond the run, so
neither loop evaluates or saves inside the window. The pipeline stage runs its real code up
to the end of training, then the benchmark stops it (no final evaluation, no final/).
With --repeats R the two alternate R times; the figures are medians. Extra arguments are
Hydra overrides for both sides (e.g. preset=smoke, stages.grpo.batch_size=64).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.config import compose_config  # noqa: E402

RESULT = "RESULT "  # prefix of a part's JSON line on stdout
BEYOND = 10**9  # an eval/save interval no run reaches
NOTES: list[str] = []  # what a part changed in the composed config, for the report


# --------------------------------------------------------------------------- shared


def step_clock():
    """A TrainerCallback recording wall and CPU time at each on_step_end and the logged losses;
    benchmarks put it first in the callback list, so a step's time ends before any other
    callback of that step runs."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.wall: dict[int, float] = {}
            self.cpu: dict[int, float] = {}
            self.losses: list[float] = []
            self.callback_seconds: dict[str, float] = {}  # the stage's callbacks, over the whole run

        def on_step_end(self, args, state, control, **kwargs):
            self.wall[state.global_step] = time.perf_counter()
            self.cpu[state.global_step] = time.process_time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepClock()


def window(wall: dict[int, float], cpu: dict[int, float], warmup: int, steps: int) -> dict[str, float]:
    return {"seconds": wall[warmup + steps] - wall[warmup], "cpu_seconds": cpu[warmup + steps] - cpu[warmup]}


def time_callback(callback, spent: dict[str, float]) -> None:
    """Add the time `callback`'s event methods take to spent[its class name]."""
    name = type(callback).__name__
    for event in [e for e in dir(callback) if e.startswith("on_")]:
        method = getattr(callback, event)

        def timed(*args, _method=method, **kwargs):
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

        setattr(callback, event, timed)


class _Trained(Exception):
    def __init__(self, trainer) -> None:
        super().__init__("training finished")
        self.trainer = trainer


def train_stage(cfg, stage: str, run_dir: Path, clock):
    """Run stages/<stage>.py's run() as the runner's run_stage does (the stage's input is its
    `init`), with `clock` first among the trainer's callbacks; stop it once trainer.train() has
    returned. Returns the trainer."""
    from transformers import set_seed

    from pipeline import distributed, preemption
    from pipeline.runner import StageContext, load_stage_module
    from pipeline.tasks import build_task

    distributed.state()
    module, stage_cfg = load_stage_module(stage, cfg), cfg.stages[stage]
    input_path = Path(str(stage_cfg.init)).expanduser().resolve() if stage_cfg.get("init") else None
    stage_dir = run_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(stage, cfg, stage_cfg, run_dir, stage_dir, input_path, None, build_task(cfg.task))
    original = preemption.train

    def train(trainer, stage_ctx):
        trainer.callback_handler.callbacks.insert(0, clock)
        for callback in trainer.callback_handler.callbacks[1:]:
            time_callback(callback, clock.callback_seconds)
        original(trainer, stage_ctx)
        raise _Trained(trainer)

    preemption.train = train
    set_seed(int(cfg.seed))  # as the runner does before every stage
    try:
        module.run(ctx)
    except _Trained as done:
        return done.trainer
    finally:
        preemption.train = original
    raise RuntimeError(f"stages/{stage}.py's run() returned without calling preemption.train")


def environment() -> dict:
    import torch
    import transformers
    import trl

    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "cpus": os.cpu_count(),
    }


# --------------------------------------------------------------------------- pretrain


def stage_optim(cfg, stage: str):
    """The optim settings the stage trains with: its own `stages.<stage>.optim` merged over the
    optim group where the pipeline has that key, else the group."""
    try:
        from pipeline.optim import stage_optim as merged
    except ImportError:
        return cfg.optim
    return merged(cfg, stage)


def compose_stage(stage: str, fixed: list[str], overrides: list[str], defaults: list[str] = ()):
    """The config both sides of a comparison read: `defaults` (the user's overrides win over
    them), the user's overrides, then `fixed` (the run length and intervals). A stage whose own
    optim settings (stages.<stage>.optim, e.g. preset=demo's Muon) leave AdamW is set back to
    the optim group: both loops here are AdamW, as the comparison asks."""
    cfg = compose_config([*defaults, *overrides, *fixed])
    if cfg.stages[stage].get("optim") and not any(o.lstrip("+").startswith(f"stages.{stage}.optim") for o in overrides):
        NOTES.append(f"stages.{stage}.optim={dict(cfg.stages[stage].optim)} set to null (the optim group's AdamW)")
        cfg = compose_config([*defaults, *overrides, *fixed, f"stages.{stage}.optim=null"])
    if stage_optim(cfg, stage).name != "adamw":
        raise SystemExit(f"the bare {stage} loop here is AdamW; the stage would train with "
                         f"optim={stage_optim(cfg, stage).name} (set optim=adamw / stages.{stage}.optim=null)")
    return cfg


def pretrain_config(overrides: list[str], warmup: int, steps: int, run_dir: Path):
    return compose_stage("pretrain", ["run.stages=[pretrain]", f"stages.pretrain.max_steps={warmup + steps}",
                                      f"stages.pretrain.eval_steps={BEYOND}", f"stages.pretrain.save_steps={BEYOND}",
                                      f"run.dir={run_dir}"], overrides)


def pretrain_bare(overrides: list[str], warmup: int, steps: int, run_dir: Path) -> dict:
    import torch
    from transformers import get_scheduler, set_seed

    from pipeline.models import build_model, set_router_aux_loss
    from pipeline.tasks import build_task
    from pipeline.tokenizer import train_tokenizer
    from stages.pretrain import pack

    cfg = pretrain_config(overrides, warmup, steps, run_dir)
    stage, optim = cfg.stages.pretrain, stage_optim(cfg, "pretrain")
    total = warmup + steps
    set_seed(int(cfg.seed))  # the stage's model is initialised after the same seeding
    task = build_task(cfg.task)
    tokenizer = train_tokenizer(task.pretrain_texts(), int(stage.tokenizer_vocab_size))
    model = build_model(cfg.model, tokenizer)
    set_router_aux_loss(model, True)
    model.train()
    blocks = torch.tensor(pack(tokenizer, task.pretrain_texts(), int(stage.seq_len))["input_ids"])

    # the Trainer's AdamW parameter groups: no weight decay on biases and norms
    no_decay = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not no_decay.search(n)], "weight_decay": float(optim.weight_decay)},
        {"params": [p for n, p in named if no_decay.search(n)], "weight_decay": 0.0},
    ]
    lr = float(stage.lr if stage.lr is not None else optim.lr)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(float(b) for b in optim.betas), eps=float(optim.eps))
    ratio = float(optim.warmup_ratio)
    warmup_steps = math.ceil(ratio * total) if ratio < 1 else int(ratio)  # a ratio below 1, as the Trainer reads it
    scheduler = get_scheduler(str(optim.scheduler), optimizer, num_warmup_steps=warmup_steps, num_training_steps=total)
    batch_size, accum, clip = int(stage.batch_size), int(stage.grad_accum), float(optim.max_grad_norm)

    batches = trainer_order(blocks, batch_size, int(cfg.seed))
    wall, cpu, losses = {}, {}, []
    for step in range(1, total + 1):
        step_loss = 0.0
        for _ in range(accum):
            batch = next(batches)
            loss = model(input_ids=batch, labels=batch).loss / accum
            loss.backward()
            step_loss += loss.detach()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        wall[step], cpu[step] = time.perf_counter(), time.process_time()
        losses.append(step_loss)
    timing = window(wall, cpu, warmup, steps)
    tokens = steps * batch_size * accum * int(stage.seq_len)
    every = int(stage.logging_steps)  # the loss the Trainer logs: the mean over each logging window
    logged = [float(sum(losses[i - every : i]) / every) for i in range(every, total + 1, every)]
    return {**timing, "tokens": tokens, "tokens_per_second": tokens / timing["seconds"], "losses": logged,
            "parameters": sum(p.numel() for p in model.parameters()), "batch": f"{batch_size} x {stage.seq_len}",
            "lr": lr}


def trainer_order(blocks, batch_size: int, seed: int):
    """The Trainer's training batches (accelerate's seedable sampler): epoch e visits the
    blocks in torch.randperm order from a generator seeded with seed + e, the last batch of an
    epoch partial."""
    import torch

    epoch = 0
    while True:
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, len(blocks), batch_size):
            yield blocks[order[i : i + batch_size]]
        epoch += 1


def pretrain_pipeline(overrides: list[str], warmup: int, steps: int, run_dir: Path) -> dict:
    cfg = pretrain_config(overrides, warmup, steps, run_dir)
    stage = cfg.stages.pretrain
    clock = step_clock()
    trainer = train_stage(cfg, "pretrain", run_dir, clock)
    timing = window(clock.wall, clock.cpu, warmup, steps)
    tokens = steps * int(stage.batch_size) * int(stage.grad_accum) * int(stage.seq_len)
    own = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "Throughput")
    return {**timing, "tokens": tokens, "tokens_per_second": tokens / timing["seconds"],
            "stage_tokens_per_second": own.tokens_per_second,  # the stage's metric: every step, saves included
            "losses": clock.losses, "callback_seconds": clock.callback_seconds}


# --------------------------------------------------------------------------- grpo


def grpo_config(overrides: list[str], init: Path, warmup: int, steps: int, run_dir: Path):
    defaults = [
        "stages.grpo.zero_variance=keep",  # TRL's loss on both sides (the pipeline's weighting is its own)
        "stages.grpo.curve_problems=4",  # the held-out curve's step-0 point runs before the first step: keep it short
    ]
    fixed = ["run.stages=[grpo]", f"stages.grpo.init={init}", f"stages.grpo.max_steps={warmup + steps}",
             f"stages.grpo.save_steps={BEYOND}", f"stages.grpo.eval_every={BEYOND}", "stages.grpo.filter_samples=0",
             f"run.dir={run_dir}"]
    return compose_stage("grpo", fixed, overrides, defaults)


COMPARED_ARGS = (  # GRPOConfig fields that decide what a step computes
    "per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "num_generations",
    "max_completion_length", "max_prompt_length", "temperature", "top_p", "top_k", "mask_truncated_completions",
    "use_vllm", "loss_type", "beta", "epsilon", "epsilon_high", "num_iterations", "scale_rewards", "entropy_coef",
    "reward_weights", "logging_steps", "seed", "bf16", "fp16", "router_aux_loss_coef", "learning_rate", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler_type", "warmup_steps", "max_grad_norm", "optim",
    "steps_per_generation", "generation_batch_size", "shuffle_dataset", "dataloader_num_workers", "top_entropy_quantile",
    "log_completions", "include_num_input_tokens_seen",
)


def compared_args(args) -> dict:
    return {k: getattr(args, k) for k in COMPARED_ARGS if hasattr(args, k)}


def grpo_bare(overrides: list[str], init: Path, warmup: int, steps: int, run_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import GRPOConfig, GRPOTrainer

    from pipeline.tasks import build_task

    cfg = grpo_config(overrides, init, warmup, steps, run_dir)
    s, optim = cfg.stages.grpo, stage_optim(cfg, "grpo")
    weights = {k: float(v) for k, v in s.reward_weights.items() if float(v) != 0.0}
    if "reward_model" in weights or cfg.peft.method != "none":
        raise SystemExit("the bare grpo run covers verifier/format rewards and full fine-tuning only")
    set_seed(int(cfg.seed))
    task = build_task(cfg.task)
    tokenizer = AutoTokenizer.from_pretrained(str(init))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(init), dtype=torch.float32)
    model.config.output_router_logits = False  # as saved; TRL asks for router logits itself
    freeze_as_configured(model, s)

    def text(completion) -> str:
        return completion if isinstance(completion, str) else completion[-1]["content"]

    def correct(prompts, completions, answer, **kwargs):
        return [float(task.verify(text(c), a)) for c, a in zip(completions, answer, strict=True)]

    pattern = re.compile(str(s.format_pattern))

    def format(prompts, completions, **kwargs):  # the reward's name in TRL's logs, as the stage's
        return [1.0 if pattern.search(text(c)) else 0.0 for c in completions]

    funcs = [{"correct": correct, "format": format}[name] for name in weights]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                              for r in task.rl_prompts()])
    lr = s.lr if s.lr is not None else cfg.peft.get("lr") or optim.lr
    args = GRPOConfig(
        output_dir=str(run_dir / "bare-grpo"), max_steps=warmup + steps, per_device_train_batch_size=int(s.batch_size),
        gradient_accumulation_steps=int(s.grad_accum), gradient_checkpointing=bool(s.gradient_checkpointing),
        num_generations=int(s.num_generations), max_completion_length=int(s.max_new_tokens),
        temperature=float(s.temperature), top_p=1.0, top_k=0, mask_truncated_completions=bool(s.mask_truncated_completions),
        loss_type=str(s.loss_type), beta=float(s.beta), epsilon=float(s.epsilon),
        epsilon_high=float(s.epsilon_high) if s.epsilon_high is not None else None, num_iterations=int(s.num_iterations),
        scale_rewards=str(s.scale_rewards), entropy_coef=float(s.entropy_coef), reward_weights=list(weights.values()),
        router_aux_loss_coef=None if s.router_aux_loss_coef is None else float(s.router_aux_loss_coef),
        learning_rate=float(lr), weight_decay=float(optim.weight_decay), adam_beta1=float(optim.betas[0]),
        adam_beta2=float(optim.betas[1]), adam_epsilon=float(s.adam_epsilon if s.adam_epsilon is not None else optim.eps),
        lr_scheduler_type=str(optim.scheduler), warmup_steps=float(optim.warmup_ratio),
        max_grad_norm=float(optim.max_grad_norm), optim="adamw_torch_fused",  # the pipeline's (and TRL's default)
        save_strategy="no", logging_steps=int(s.logging_steps), report_to=[], seed=int(cfg.seed), bf16=False,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=data, processing_class=tokenizer)
    clock = step_clock()
    trainer.callback_handler.callbacks.insert(0, clock)
    trainer.train()
    return grpo_result(trainer, clock, warmup, steps)


def freeze_as_configured(model, stage_cfg) -> None:
    """stages.grpo.train_only / freeze on the bare model: the same parameters train on both sides."""
    names = [n for n, _ in model.named_parameters()]
    layers = [int(m.group(1)) for m in map(re.compile(r"\.layers\.(\d+)\.").search, names) if m]
    last = str(max(layers)) if layers else ""

    def regexes(field):
        return [re.compile(str(p).replace("{last}", last)) for p in stage_cfg.get(field) or []]

    only, frozen = regexes("train_only"), regexes("freeze")
    for name, param in model.named_parameters():
        if (only and not any(r.search(name) for r in only)) or any(r.search(name) for r in frozen):
            param.requires_grad_(False)


def grpo_result(trainer, clock, warmup: int, steps: int) -> dict:
    history = trainer.state.log_history
    return {**window(clock.wall, clock.cpu, warmup, steps),
            "seconds_per_step": (clock.wall[warmup + steps] - clock.wall[warmup]) / steps,
            "losses": clock.losses, "rewards": [e["reward"] for e in history if "reward" in e],
            "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "args": {k: repr(v) for k, v in compared_args(trainer.args).items()}}


def grpo_pipeline(overrides: list[str], init: Path, warmup: int, steps: int, run_dir: Path) -> dict:
    cfg = grpo_config(overrides, init, warmup, steps, run_dir)
    clock = step_clock()
    trainer = train_stage(cfg, "grpo", run_dir, clock)
    result = grpo_result(trainer, clock, warmup, steps)
    result["zero_variance"] = str(cfg.stages.grpo.zero_variance)
    # the stage's own step_time_s: training_step alone, over every step (warmup included)
    result["stage_step_time_s"] = trainer.train_step_seconds / trainer.state.global_step
    return result


def build_checkpoint(overrides: list[str]) -> Path:
    """An sft final/ to start grpo from: preset=smoke pretrain + sft (mechanics only)."""
    run_dir = Path(tempfile.mkdtemp(prefix="bench-overhead-init-")) / "run"
    print(f"building a grpo input checkpoint (preset=smoke pretrain + sft) in {run_dir} ...", flush=True)
    model_overrides = [o for o in overrides if o.startswith(("model", "seed"))]
    proc = subprocess.run([sys.executable, "-m", "pipeline", "preset=smoke", "run.stages=[pretrain,sft]", 
                           f"run.dir={run_dir}", *model_overrides], cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"building the checkpoint failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return run_dir / "sft" / "final"


# --------------------------------------------------------------------------- driver

PARTS = {"pretrain-bare": pretrain_bare, "pretrain-pipeline": pretrain_pipeline,
         "grpo-bare": grpo_bare, "grpo-pipeline": grpo_pipeline}


def run_part(part: str, args, overrides: list[str]) -> dict:
    """One measurement in a fresh interpreter; its RESULT line parsed."""
    command = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--grpo-steps", str(args.grpo_steps), "--grpo-warmup", str(args.grpo_warmup)]
    if args.init is not None:
        command += ["--init", str(args.init)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*command, *overrides], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{part} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT):])


def part_main(args, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix=f"bench-overhead-{args.part}-") as tmp:  # the end-of-training checkpoint
        run_dir = Path(tmp) / "run"
        if args.part.startswith("pretrain"):
            result = PARTS[args.part](overrides, args.warmup, args.steps, run_dir)
        else:
            result = PARTS[args.part](overrides, args.init, args.grpo_warmup, args.grpo_steps, run_dir)
    result["env"], result["notes"] = environment(), sorted(set(NOTES))
    print(RESULT + json.dumps(result), flush=True)


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report_pretrain(bare: list[dict], pipe: list[dict], args) -> None:
    b, p = median(bare, "tokens_per_second"), median(pipe, "tokens_per_second")
    first = bare[0]
    print(f"pretrain: {first['parameters']:,} parameters, batch {first['batch']}, AdamW lr {first['lr']:g}, "
          f"{args.warmup} warmup + {args.steps} timed steps, {len(bare)} run(s) each (median)")
    for name, runs in (("bare PyTorch loop", bare), ("pipeline pretrain stage", pipe)):
        print(f"  {name:<26} {median(runs, 'tokens_per_second'):>9,.0f} tokens/s   "
              f"{median(runs, 'seconds') / args.steps:.4f} s/step (cpu {median(runs, 'cpu_seconds') / args.steps:.4f})")
    print(f"  {'stage metric':<26} {median(pipe, 'stage_tokens_per_second'):>9,.0f} tokens/s   "
          "(the stage's tokens_per_second: every step, warmup and the final save included)")
    print(f"  ratio pipeline / bare      {p / b:.3f}   (goal >= 0.95)")
    print(f"  logged losses: {compare_losses(bare[0]['losses'], pipe[0]['losses'])}")
    print_notes(pipe)


def compare_losses(bare: list[float], pipe: list[float]) -> str:
    """The two logged loss curves side by side (the same batches in the same order on both sides)."""
    if not bare or len(bare) != len(pipe):
        return f"bare {bare}, pipeline {pipe}"
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(bare, pipe))
    return (f"bare {bare[0]:.4f} -> {bare[-1]:.4f}, pipeline {pipe[0]:.4f} -> {pipe[-1]:.4f} over {len(bare)} "
            f"logging windows; largest relative difference {worst:.1e}")


def report_grpo(bare: list[dict], pipe: list[dict], args, init: Path) -> None:
    b, p = median(bare, "seconds_per_step"), median(pipe, "seconds_per_step")
    a = bare[0]["args"]
    prompts = int(a["per_device_train_batch_size"]) * int(a["gradient_accumulation_steps"]) // int(a["num_generations"])
    print(f"grpo: init {init}, {prompts} prompts x {a['num_generations']} completions per step, "
          f"max {a['max_completion_length']} tokens, loss {a['loss_type']}, beta {a['beta']}, "
          f"{args.grpo_warmup} warmup + {args.grpo_steps} timed steps, {len(bare)} run(s) each (median)")
    for name, runs in (("bare TRL GRPOTrainer", bare), ("pipeline grpo stage", pipe)):
        print(f"  {name:<26} {median(runs, 'seconds_per_step'):>9.3f} s/step   "
              f"(cpu {median(runs, 'cpu_seconds') / args.grpo_steps:.3f})   trainable {runs[0]['trainable']:,}")
    print(f"  {'stage metric step_time_s':<26} {median(pipe, 'stage_step_time_s'):>9.3f} s/step   "
          "(the stage's figure: training_step alone, every step, warmup included)")
    print(f"  ratio pipeline / bare      {p / b:.3f}   (goal <= 1.05)")
    differing = {k: (a[k], pipe[0]["args"].get(k)) for k in a if a[k] != pipe[0]["args"].get(k)}
    print(f"  GRPOConfig fields that differ: {differing or 'none'}; pipeline zero_variance={pipe[0]['zero_variance']}")
    if pipe[0]["zero_variance"] == "keep":
        same = bare[0]["losses"] == pipe[0]["losses"] and bare[0]["rewards"] == pipe[0]["rewards"]
        print(f"  logged losses and rewards equal: {'yes' if same else 'NO'} ({bare[0]['losses']} vs {pipe[0]['losses']})")
    print_notes(pipe)


def print_notes(runs: list[dict]) -> None:
    for note in runs[0]["notes"]:
        print(f"  note: {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="pretrain: timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="pretrain: untimed steps first")
    parser.add_argument("--grpo-steps", type=int, default=10)
    parser.add_argument("--grpo-warmup", type=int, default=2)
    parser.add_argument("--init", type=Path, default=None, help="grpo's input checkpoint (an sft final/)")
    parser.add_argument("--only", choices=("pretrain", "grpo"), default=None)
    parser.add_argument("--repeats", type=int, default=1, help="alternate bare and pipeline this many times")
    parser.add_argument("--part", choices=sorted(PARTS), default=None, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.part:
        return part_main(args, overrides)

    env = None
    if args.only in (None, "pretrain"):
        bare, pipe = [], []
        for _ in range(args.repeats):
            bare.append(run_part("pretrain-bare", args, overrides))
            pipe.append(run_part("pretrain-pipeline", args, overrides))
        env = bare[0]["env"]
        print_env(env)
        report_pretrain(bare, pipe, args)
    if args.only in (None, "grpo"):
        if args.init is None:
            args.init = build_checkpoint(overrides)
        bare, pipe = [], []
        for _ in range(args.repeats):
            bare.append(run_part("grpo-bare", args, overrides))
            pipe.append(run_part("grpo-pipeline", args, overrides))
        if env is None:
            print_env(bare[0]["env"])
        report_grpo(bare, pipe, args, args.init.resolve())


def print_env(env: dict) -> None:
    print(f"torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}; torch threads {env['threads']} "
          f"(OMP_NUM_THREADS={env['OMP_NUM_THREADS']}), {env['cpus']} CPUs")


if __name__ == "__main__":
    main()
