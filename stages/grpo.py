"""Stage `grpo`: reinforcement learning with verifiable rewards on TRL's GRPOTrainer.

For every task prompt (rendered with the input checkpoint's chat template) the policy samples
num_generations completions with the KV cache; each gets a reward, a weighted sum of the task's
verifier (1 for a correct final answer, else 0), an optional format reward and an optional
reward model; rewards are normalised within each group into advantages, and the policy takes a
step on TRL's loss of choice (cispo by default: truncated, stop-gradient importance weights, as
in ScaleRL) with a KL penalty to the frozen input policy (beta; with peft=lora the reference is
the adapter-disabled base). TRL owns generation, scoring, advantages, losses and the loop.

Written here because TRL 1.16 lacks it: filtering or down-weighting zero-variance groups (all
completions right or all wrong) in the loss normaliser and KL (`zero_variance`), and the
held-out pass-rate curve with its ScaleRL sigmoid fit (pipeline.scaling), the compute being the
tokens of every rollout plus the tokens trained on.

Hand-off as sft's: a plain checkpoint in final/ (LoRA merged, adapter in final/adapter/).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import gather
from datasets import Dataset
from transformers import TrainerCallback, set_seed
from trl import GRPOConfig, GRPOTrainer

from pipeline import artifacts, distributed, preemption, rewards, trainer_settings
from pipeline.adapters import build_peft_config, check_peft_config
from pipeline.evaluate import evaluate, held_out_accuracy
from pipeline.models import (
    check_trainable_input, check_trainable_scope, count_parameters, load_model, restrict_trainable, router_logits_off,
    save_policy, set_router_aux_loss,
)
from pipeline.optim import optimizer_cls_and_kwargs, stage_optim, trainer_kwargs
from pipeline.report import plot_curves
from pipeline.resume import ExactResume
from pipeline.runner import ConfigError, completed_manifest, log
from pipeline.scaling import fit_scaling, plot_scaling
from pipeline.tasks.base import as_turns

SPLITS = ("rl",)
OPTIONAL_SPLITS = ("eval",)  # the pass-rate curve and held-out accuracy, when the task has problems with answers
USES = ("task", "optim", "peft")

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")  # trl 1.16
TOKEN_MEAN_LOSSES = ("dapo", "cispo", "bnpo")  # where a per-token loss weight is a weighted token mean
SCALE_REWARDS = ("group", "batch", "none")
ZERO_VARIANCE = ("keep", "filter", "downweight")
CURVE_FILE = "pass_rate_curve.jsonl"
FILTER_FILE = "prompt_pass_rates.json"
LOG_FILE = "log_history.json"


# --------------------------------------------------------------------------- config checks


def validate(cfg, input_path: Path | None) -> None:
    """Config and input errors, raised as ConfigError before any compute."""
    try:
        check_peft_config(cfg.peft)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    check_objective(cfg)
    check_rewards(cfg)
    if input_path is not None:
        check_trainable_input(input_path, "grpo", bool(cfg.model.trust_remote_code))
    check_trainable_scope(cfg, "grpo", input_path)


def check_objective(cfg) -> None:
    """Rollout, loss and training knobs."""
    stage = cfg.stages.grpo
    if cfg.peft.method not in ("none", "lora"):
        raise ConfigError(f"grpo trains the full model or a LoRA adapter, not peft={cfg.peft.method}; use peft=none or peft=lora")
    if stage.num_generations < 2:
        raise ConfigError(f"stages.grpo.num_generations={stage.num_generations}: a group needs at least 2 completions to compare")
    if (stage.batch_size * stage.grad_accum) % stage.num_generations:
        raise ConfigError(
            f"stages.grpo.batch_size * grad_accum = {stage.batch_size * stage.grad_accum} completions per step must be a "
            f"multiple of num_generations={stage.num_generations} (whole groups per step)"
        )
    if stage.loss_type not in LOSS_TYPES:
        raise ConfigError(f"stages.grpo.loss_type={stage.loss_type!r} is unknown; valid: {', '.join(LOSS_TYPES)}")
    if stage.scale_rewards not in SCALE_REWARDS:
        raise ConfigError(f"stages.grpo.scale_rewards={stage.scale_rewards!r}; valid: {', '.join(SCALE_REWARDS)}")
    if stage.beta < 0:
        raise ConfigError(f"stages.grpo.beta={stage.beta} must be >= 0 (0: no reference model)")
    if stage.zero_variance not in ZERO_VARIANCE:
        raise ConfigError(f"stages.grpo.zero_variance={stage.zero_variance!r}; valid: {', '.join(ZERO_VARIANCE)}")
    if stage.zero_variance != "keep" and stage.loss_type not in TOKEN_MEAN_LOSSES:
        raise ConfigError(
            f"stages.grpo.zero_variance={stage.zero_variance} weights tokens in a token-mean loss; loss_type="
            f"{stage.loss_type} averages per sequence first, where that weight cancels. Use loss_type="
            f"{'|'.join(TOKEN_MEAN_LOSSES)} or zero_variance=keep"
        )
    if not 0.0 <= stage.zero_variance_weight <= 1.0:
        raise ConfigError(f"stages.grpo.zero_variance_weight={stage.zero_variance_weight} must be in [0, 1]")
    if stage.filter_samples < 0 or not 0.0 <= stage.filter_max_pass_rate < 1.0:
        raise ConfigError(
            f"stages.grpo.filter_samples={stage.filter_samples} must be >= 0 (0: no prompt filter) and "
            f"filter_max_pass_rate={stage.filter_max_pass_rate} in [0, 1) (1 would keep every prompt)"
        )
    if stage.eval_every < 1 or stage.curve_problems < 1:
        raise ConfigError("stages.grpo.eval_every and stages.grpo.curve_problems must be >= 1")
    if not 0.0 <= stage.scaling_warmup_fraction < 1.0:
        raise ConfigError(f"stages.grpo.scaling_warmup_fraction={stage.scaling_warmup_fraction} must be in [0, 1)")
    if stage.use_vllm and not torch.cuda.is_available():
        raise ConfigError("stages.grpo.use_vllm=true needs a GPU (and the vllm package); set stages.grpo.use_vllm=false")


def check_rewards(cfg) -> None:
    rewards.check(cfg.stages.grpo, "grpo", list(cfg.run.stages), Path(str(cfg.run.dir)).expanduser())


def extra_inputs(cfg, run_dir: Path, planned: dict[str, str]) -> str | None:
    """Part of the config hash: the user's reward function sources and the reward model's identity."""
    return rewards.fingerprint(cfg.stages.grpo, run_dir, planned,
                               lambda stage: (completed_manifest(run_dir, stage) or {}).get("config_hash"))


def check_data(cfg, task) -> None:
    """The built-in rewards that compare with the reference answer need the rl split's answers."""
    if task.has_column("rl", "answer"):
        return
    needs_answer = [f"reward_weights.{name}" for name in rewards.active(cfg.stages.grpo) if name in ("correct", "math")]
    needs_answer += ["filter_samples"] if cfg.stages.grpo.filter_samples else []
    if needs_answer:
        raise ConfigError(f"stages.grpo.{', '.join(needs_answer)} compare with the reference answer, and the rl split has "
                          "no answer column: set task.columns.answer, or set those to 0 and score with your own reward "
                          "functions or the reward model")


# --------------------------------------------------------------------------- zero-variance groups


def zero_variance_weights(rewards: torch.Tensor, num_generations: int, weight: float) -> torch.Tensor:
    """Per-completion loss weights: `weight` for completions of a group whose rewards are all
    equal (no learning signal: their advantage is 0), 1.0 for the others.

    rewards: (N,) total reward per completion, groups of num_generations consecutive rows
    (TRL's layout). Returns (N,) float. NaN rewards (unscorable) are ignored within a group.
    """
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    grouped = rewards.view(-1, num_generations)
    lo = torch.where(grouped.isnan(), torch.inf, grouped).amin(dim=1)
    hi = torch.where(grouped.isnan(), -torch.inf, grouped).amax(dim=1)
    flat = ~(hi - lo > 1e-6)  # also true for an all-NaN group
    per_group = torch.where(flat, torch.as_tensor(weight, dtype=torch.float32), torch.tensor(1.0))
    return per_group.to(rewards.device).repeat_interleave(num_generations)


class StageGRPOTrainer(ExactResume, GRPOTrainer):
    """TRL's GRPOTrainer plus: zero-variance group weighting, router logits off while
    generating, and timers for the generation share of each step."""

    def __init__(self, *args, zero_variance: str = "keep", zero_variance_weight: float = 0.0, **kwargs):
        self.zero_variance = zero_variance
        self.zero_variance_weight = 0.0 if zero_variance == "filter" else float(zero_variance_weight)
        self.generation_seconds = 0.0  # rollouts of training steps (not the held-out curve)
        self.train_step_seconds = 0.0
        self._group_rewards: torch.Tensor | None = None
        super().__init__(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch):
        start = time.perf_counter()
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self.train_step_seconds += time.perf_counter() - start

    def _generate(self, prompts):
        start = time.perf_counter()
        # MoE: router logits belong to the loss only; generate() with them on crashes (DESIGN.md s.5)
        with router_logits_off(self.accelerator.unwrap_model(self.model)):
            out = super()._generate(prompts)
        if self.model.training:
            self.generation_seconds += time.perf_counter() - start
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._group_rewards = rewards_per_func  # gathered over processes, groups of num_generations rows
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.zero_variance == "keep" or not self.model.training:
            return output
        total = (self._group_rewards * self.reward_weights.to(self._group_rewards.device)).nansum(dim=1)
        total[self._group_rewards.isnan().all(dim=1)] = torch.nan
        weights = zero_variance_weights(total, self.num_generations, self.zero_variance_weight)
        n_local = output["completion_ids"].size(0)
        start = self.accelerator.process_index * n_local
        local = weights[start : start + n_local].to(output["completion_mask"].device)
        # TRL multiplies completion_mask by `tool_mask` for the loss, its normaliser, the KL and the
        # entropy (and nothing else), so a per-row weight there reweights these rows' tokens; the
        # dapo/cispo normaliser must then count weighted tokens.
        base = output.get("tool_mask", torch.ones_like(output["completion_mask"]))
        output["tool_mask"] = base.float() * local.unsqueeze(1)
        output["num_items_in_batch"] = gather((output["completion_mask"] * output["tool_mask"]).sum()).sum()
        self._metrics["train"]["zero_variance_weighted_frac"].append(float((weights < 1.0).float().mean()))
        return output


# --------------------------------------------------------------------------- held-out pass-rate curve


class PassRateCurve(TrainerCallback):
    """Held-out pass rate against compute, before the first step and every `every` steps.

    compute = (1 + num_iterations) * tokens of every rollout so far (TRL's num_input_tokens_seen,
    prompt + completion): each rollout token is generated (or prefilled) once and trained on
    num_iterations times. Points are appended to a JSONL file so a resumed run keeps them.
    Every rank measures (sharded models need all ranks to generate); the main process writes.
    """

    def __init__(self, measure: Callable[[torch.nn.Module], float], every: int, num_iterations: int, path: Path, seed: int):
        self.measure, self.every, self.path, self.seed = measure, every, path, seed
        self.tokens_to_compute = 1 + num_iterations
        self.points: list[dict] = []
        self.seconds = 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # points of an earlier, interrupted attempt up to the checkpoint it resumes from
        self.points = [p for p in read_curve(self.path) if p["step"] <= state.global_step]
        if distributed.is_main_process():
            artifacts.write_text_atomic(self.path, "".join(json.dumps(p) + "\n" for p in self.points))
        if not self.points or self.points[-1]["step"] < state.global_step:
            self.record(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            self.record(state, model)

    def record(self, state, model) -> None:
        start = time.perf_counter()
        # own seed per point, and the training RNG streams left as they were
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            torch.manual_seed(self.seed + state.global_step)
            rate = self.measure(model)
        self.seconds += time.perf_counter() - start
        tokens = int(state.num_input_tokens_seen)
        point = {"step": state.global_step, "tokens": tokens, "compute": self.tokens_to_compute * tokens, "pass_rate": rate}
        self.points.append(point)
        if distributed.is_main_process():
            with self.path.open("a") as f:
                f.write(json.dumps(point) + "\n")
        log(f"grpo step {state.global_step}: held-out pass rate {rate:.3f} at compute {point['compute']:.3g} tokens")


def read_curve(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def scaling_metrics(points: list[dict], warmup_fraction: float, stage_dir: Path) -> dict[str, float]:
    """Fit the ScaleRL curve to the pass-rate points (R0 fixed to the step-0 point when there is
    one), plot it, and return the fit parameters; a fit that cannot be made is logged and
    reported as scaling_fit_ok=0."""
    compute = [p["compute"] for p in points]
    rates = [p["pass_rate"] for p in points]
    r0 = next((p["pass_rate"] for p in points if p["compute"] == 0), None)
    metrics = {"scaling_points": float(len(points))}
    try:
        fit = fit_scaling(compute, rates, r0=r0, warmup_fraction=warmup_fraction)
    except ValueError as err:
        log(f"grpo: scaling fit skipped: {err} (stages.grpo.eval_every sets how often the pass rate is measured)")
        fit = None
    if distributed.is_main_process() and points:
        plot_scaling(stage_dir / "scaling_fit.png", compute, rates, fit, xlabel="compute (rollout + trained tokens)")
    metrics["scaling_fit_ok"] = float(fit is not None)
    if fit is not None:
        metrics.update(fit.as_metrics("scaling"))
    return metrics


# --------------------------------------------------------------------------- trainer


def build_dataset(task) -> Dataset:
    """Conversational prompts (TRL renders them with the chat template; a string prompt is one
    user turn) and the task's other columns (the reference `answer`, and any a user's data has),
    which TRL hands to the reward functions as keyword arguments."""
    return Dataset.from_list([{**row, "prompt": as_turns(row["prompt"], "user")} for row in task.rl_prompts()])


def prompt_pass_rates(model, tokenizer, task, rows: list[dict], stage_cfg, seed: int) -> list[float]:
    """Each RL prompt's pass rate over stage_cfg.filter_samples completions of `model` at the
    rollout temperature. The ranks split the prompts and gather the rates, so all keep the same rows."""
    rank, world = distributed.state().process_index, distributed.world_size()
    mine = rows[rank::world]
    set_seed(seed + rank)
    samples = int(stage_cfg.filter_samples)
    result = evaluate(model, tokenizer, task, mine, temperature=float(stage_cfg.temperature), num_samples=samples,
                      max_new_tokens=int(stage_cfg.max_new_tokens), batch_size=int(stage_cfg.eval_batch_size))
    rates = [sum(task.verify(t, r["answer"]) >= 1.0 for t in texts) / samples for texts, r in zip(result.completions, mine)]
    if world == 1:
        return rates
    shards: list = [None] * world
    torch.distributed.all_gather_object(shards, rates)
    return [shards[i % world][i // world] for i in range(len(rows))]


def filter_prompts(rows: list[dict], rates: list[float], max_pass_rate: float, per_step: int) -> list[dict]:
    """The rows whose pass rate is at most max_pass_rate (offline difficulty filtering: a prompt
    the policy always solves gives a group of equal rewards, so no signal, only cost)."""
    kept = [row for row, rate in zip(rows, rates) if rate <= max_pass_rate]
    if len(kept) < per_step:
        raise ConfigError(
            f"the prompt filter kept {len(kept)} of {len(rows)} RL prompts (pass rate <= {max_pass_rate}), fewer than the "
            f"{per_step} one step takes: raise stages.grpo.filter_max_pass_rate or task.n_rl, or set stages.grpo.filter_samples=0"
        )
    return kept


def selected_prompts(model, tokenizer, task, stage_cfg, seed: int, stage_dir: Path) -> tuple[Dataset, dict[str, float]]:
    """The training prompts: every RL prompt, or with filter_samples > 0 the ones the input
    policy does not always solve. The pass rates are saved, so a resumed run trains on the same rows."""
    data = build_dataset(task)
    if not stage_cfg.filter_samples:
        return data, {}
    rows = data.to_list()
    path = stage_dir / FILTER_FILE
    start = time.perf_counter()
    if path.exists():
        rates = json.loads(path.read_text())
    else:
        rates = prompt_pass_rates(model, tokenizer, task, task.rl_prompts(), stage_cfg, seed)
        if distributed.is_main_process():
            artifacts.write_json_atomic(path, rates)
    per_step = int(stage_cfg.batch_size * stage_cfg.grad_accum * distributed.world_size()) // int(stage_cfg.num_generations)
    kept = filter_prompts(rows, rates, float(stage_cfg.filter_max_pass_rate), per_step)
    log(f"stage grpo: prompt filter kept {len(kept)} of {len(rows)} RL prompts (input policy's mean pass rate "
        f"{sum(rates) / len(rates):.3f} over {stage_cfg.filter_samples} samples)")
    return Dataset.from_list(kept), {
        "filter_kept_prompts": len(kept),
        "filter_prompts": len(rows),
        "filter_pass_rate_mean": sum(rates) / len(rates),
        "filter_seconds": time.perf_counter() - start,
    }


def training_args(stage_cfg, optim_cfg, peft_cfg, output_dir: Path, seed: int, reward_weights: list[float],
                  shared: dict | None = None) -> GRPOConfig:
    """`shared`: trainer_settings.arguments() (precision, checkpointing, tracking); None: PLAIN."""
    lr = stage_cfg.lr if stage_cfg.lr is not None else peft_cfg.get("lr")
    optimizer = trainer_kwargs(optim_cfg, lr)
    if stage_cfg.adam_epsilon is not None:
        optimizer["adam_epsilon"] = float(stage_cfg.adam_epsilon)
    return GRPOConfig(
        output_dir=str(output_dir),
        max_steps=stage_cfg.max_steps,
        per_device_train_batch_size=stage_cfg.batch_size,
        gradient_accumulation_steps=stage_cfg.grad_accum,
        num_generations=stage_cfg.num_generations,
        max_completion_length=stage_cfg.max_new_tokens,
        temperature=float(stage_cfg.temperature),
        top_p=1.0,
        top_k=0,
        mask_truncated_completions=bool(stage_cfg.mask_truncated_completions),
        use_vllm=bool(stage_cfg.use_vllm),
        vllm_mode=str(stage_cfg.vllm_mode),
        loss_type=str(stage_cfg.loss_type),
        beta=float(stage_cfg.beta),
        epsilon=float(stage_cfg.epsilon),
        epsilon_high=float(stage_cfg.epsilon_high) if stage_cfg.epsilon_high is not None else None,
        num_iterations=int(stage_cfg.num_iterations),
        scale_rewards=str(stage_cfg.scale_rewards),
        entropy_coef=float(stage_cfg.entropy_coef),
        reward_weights=reward_weights,
        save_strategy="steps",
        save_steps=stage_cfg.save_steps,
        save_total_limit=stage_cfg.save_total_limit,
        logging_steps=stage_cfg.logging_steps,
        seed=seed,
        router_aux_loss_coef=None if stage_cfg.router_aux_loss_coef is None else float(stage_cfg.router_aux_loss_coef),
        **(shared if shared is not None else trainer_settings.PLAIN),  # TRL's own default is bf16
        **optimizer,
    )


def build_trainer(model, tokenizer, train_data: Dataset, args: GRPOConfig, rewards: tuple, stage_cfg, peft_config=None,
                  optim_cfg=None) -> StageGRPOTrainer:
    funcs, _ = rewards
    trainer = StageGRPOTrainer(
        model=model, reward_funcs=funcs, args=args, train_dataset=train_data, processing_class=tokenizer,
        peft_config=peft_config,
        zero_variance=str(stage_cfg.zero_variance), zero_variance_weight=float(stage_cfg.zero_variance_weight),
    )
    if optim_cfg is not None:  # GRPOTrainer's constructor has no optimizer_cls_and_kwargs (trl 1.16)
        trainer.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(optim_cfg, args.learning_rate)
    return trainer


def pass_rate_curve(ctx, tokenizer) -> PassRateCurve:
    """The held-out pass-rate callback on the first curve_problems eval problems."""
    cfg = ctx.stage_cfg
    problems = ctx.task.eval_problems()[: cfg.curve_problems]

    def measure(policy) -> float:
        with trainer_settings.autocast(ctx.cfg, ctx.name):
            return evaluate(policy, tokenizer, ctx.task, problems, temperature=float(cfg.curve_temperature),
                            prompt_format="chat", max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size).accuracy

    return PassRateCurve(measure, int(cfg.eval_every), int(cfg.num_iterations), ctx.stage_dir / CURVE_FILE, ctx.cfg.seed)


def logged(log_history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in log_history if e.get(key) is not None]


def run(ctx) -> dict[str, float]:
    cfg = ctx.stage_cfg
    if ctx.input_path is None:
        raise ConfigError("grpo needs an input checkpoint: set stages.grpo.input_stage or stages.grpo.init")
    validate(ctx.cfg, ctx.input_path)  # again: an earlier stage of this run may have just written it
    trust = bool(ctx.cfg.model.trust_remote_code)
    tokenizer = check_trainable_input(ctx.input_path, "grpo", trust)
    tokenizer.padding_side = "left"  # TRL generates from left-padded prompts
    model = load_model(str(ctx.input_path.resolve()), trust, trainer_settings.attn_implementation(ctx.cfg, ctx.name))
    # (resolved: TRL reloads the reference from it)
    set_router_aux_loss(model, False)  # TRL asks for router logits per forward when it needs the aux loss
    restrict_trainable(model, cfg, "grpo")
    peft_config = build_peft_config(ctx.cfg.peft, model)
    reward_funcs = rewards.build(cfg, "grpo", ctx.task, ctx.run_dir, trust, int(cfg.eval_batch_size),
                                 trainer_settings.forward_dtype(ctx.cfg, ctx.name))
    shared = {**trainer_settings.arguments(ctx.cfg, ctx.name, ctx.stage_dir), **trainer_settings.reference(ctx.cfg, ctx.name)}
    args = training_args(cfg, stage_optim(ctx.cfg, ctx.name), ctx.cfg.peft, ctx.stage_dir, ctx.cfg.seed, reward_funcs[1], shared)
    if cfg.filter_samples:
        model = distributed.to_device_unless_sharded(model)
    with trainer_settings.autocast(ctx.cfg, ctx.name):
        train_data, filter_metrics = selected_prompts(model, tokenizer, ctx.task, cfg, ctx.cfg.seed, ctx.stage_dir)
    trainer = build_trainer(model, tokenizer, train_data, args, reward_funcs, cfg, peft_config, stage_optim(ctx.cfg, ctx.name))

    curve = None
    if ctx.task.has_split("eval"):
        curve = pass_rate_curve(ctx, tokenizer)
        trainer.add_callback(curve)
    train_output = preemption.train(trainer, ctx)

    trainable, total = count_parameters(trainer.model)
    model = save_policy(trainer, tokenizer, ctx.stage_dir, trainer_settings.save_dtype(ctx.cfg, ctx.name, ctx.input_path))
    accuracy = held_out_accuracy(model, tokenizer, ctx.task, cfg, ctx.cfg.seed,
                                 trainer_settings.autocast(ctx.cfg, ctx.name), ctx.name)

    history = trainer.state.log_history
    reward_curve, kl_curve = logged(history, "reward"), logged(history, "kl")
    if distributed.is_main_process():
        artifacts.write_json_atomic(ctx.stage_dir / LOG_FILE, history)  # the reward/KL curves, for benchmarks
    if distributed.is_main_process() and reward_curve:
        curves = {"reward (mean)": tuple(map(list, zip(*reward_curve)))}
        plot_curves(ctx.stage_dir / "reward.png", curves, "step", "reward", "grpo training reward")
    steps = trainer.state.global_step
    metrics = {
        **accuracy,
        "reward_mean": reward_curve[-1][1] if reward_curve else float("nan"),
        "reward_mean_first": reward_curve[0][1] if reward_curve else float("nan"),
        "train_steps": steps,
        "train_runtime_s": train_output.metrics.get("train_runtime", 0.0),
        "step_time_s": trainer.train_step_seconds / steps if steps else 0.0,
        "generation_share": trainer.generation_seconds / trainer.train_step_seconds if trainer.train_step_seconds else 0.0,
        "curve_eval_s": curve.seconds if curve else 0.0,
        "rollout_tokens": float(trainer.state.num_input_tokens_seen),
        "trainable_parameters": trainable,
        **trainer_settings.reference_dtype(trainer),
        "total_parameters": total,
        **filter_metrics,
    }
    if kl_curve:  # beta = 0: no reference model, no KL
        metrics["kl"] = kl_curve[-1][1]
    zero_std = [v for _, v in logged(history, "frac_reward_zero_std")]
    if zero_std:
        metrics["frac_reward_zero_std"] = sum(zero_std) / len(zero_std)
    if curve:
        metrics.update(scaling_metrics(curve.points, float(cfg.scaling_warmup_fraction), ctx.stage_dir))
    return metrics
