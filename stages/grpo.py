"""Stage `grpo`: reinforcement learning with verifiable rewards on TRL's GRPOTrainer.

For every task prompt (rendered with the input checkpoint's chat template) the policy samples
num_generations completions with the KV cache; each gets a reward, a weighted sum of the task's
verifier (1 for a correct final answer, else 0), an optional format reward and an optional
reward model; rewards are normalised within each group into advantages, and the policy takes a
step on TRL's loss of choice (cispo by default: truncated, stop-gradient importance weights, as
in ScaleRL) with a KL penalty to the frozen input policy (beta; with peft=lora the reference is
the adapter-disabled base). TRL owns generation, scoring, advantages, losses and the loop.

Written in pipeline/ because TRL 1.16 lacks them: the rewards of pipeline/rewards.py (built-ins
and the user's functions, shared with test_time's best-of-N), filtering or down-weighting
zero-variance groups in the loss normaliser and KL (pipeline/grpo_trainer.py), the offline
prompt filter (pipeline/prompt_filter.py) and the held-out pass-rate curve with its ScaleRL
sigmoid fit (pipeline/pass_rate_curve.py), the compute being the tokens of every rollout plus
the tokens trained on.

Hand-off as sft's: a plain checkpoint in final/ (LoRA merged, adapter in final/adapter/).
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from trl import GRPOConfig

from pipeline import distributed, preemption, rewards, tools, trainer_settings
from pipeline.adapters import build_peft_config
from pipeline.generation import Engine
from pipeline.evaluate import EVAL_SAMPLES, EvalSettings, evaluate, held_out_accuracy
from pipeline.models import (
    check_trainable_scope, count_parameters, load_model, restrict_trainable,
    save_policy, set_router_aux_loss,
)
from pipeline.optim import optimizer_cls_and_kwargs
from pipeline.grpo_trainer import StageGRPOTrainer, training_metrics
from pipeline.pass_rate_curve import CURVE_FILE, PassRateCurve, scaling_metrics
from pipeline.prompt_filter import FILTER_FILE, prompt_pass_rates, selected_prompts
from pipeline.errors import ConfigError
from pipeline.tasks.base import as_turns
from pipeline.tokenizer import load_chat_tokenizer
from pipeline.tool_loop import ToolSetup
from pipeline.training_args import build_training_args

SPLITS = ("rl",)
OPTIONAL_SPLITS = ("eval",)  # the pass-rate curve and held-out accuracy, when the task has problems with answers
USES = ("task", "optim", "peft", "trainer", "model", "generation")  # model: train_only/freeze checked against its parameters
TRAINS_INPUT = True  # the runner checks the input: a model, not a saved adapter, with a chat template

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")  # trl 1.16
TOKEN_MEAN_LOSSES = ("dapo", "cispo", "bnpo")  # where a per-token loss weight is a weighted token mean
SCALE_REWARDS = ("group", "batch", "none")
ZERO_VARIANCE = ("keep", "filter", "downweight")


# --------------------------------------------------------------------------- config checks


def validate(cfg, input_path: Path | None) -> None:
    """Config and input errors, raised as ConfigError before any compute."""
    check_objective(cfg)
    check_rewards(cfg)
    check_trainable_scope(cfg.stages.grpo, "grpo", cfg.peft.method, cfg.model, input_path)
    tools.check(cfg.stages.grpo, "grpo")
    engine = Engine.of(trainer_settings.stage_group(cfg, "generation", "grpo"))
    if engine.name == "continuous_batching" and trainer_settings.precision(cfg, "grpo") != "fp32":
        raise ConfigError(f"generation.engine=continuous_batching with trainer.precision={trainer_settings.precision(cfg, 'grpo')} "
                          "in grpo: TRL 1.16's continuous-batching rollouts cast the policy to that dtype in place, so "
                          "training would lose its fp32 master weights; use stages.grpo.trainer.precision=fp32, or "
                          "generation.engine=generate or vllm for grpo")
    if cfg.task.get("calculator") and not tools.uses_tools(cfg.stages.grpo):
        raise ConfigError("task.calculator=true trains sft to call the calculator, and grpo offers no tools; set "
                          "stages.grpo.tools.calculator=pipeline.tasks.arithmetic:calculator (preset=demo_tools does), "
                          "or task.calculator=false")
    if input_path is not None and tools.uses_tools(cfg.stages.grpo):
        tools.check_tokenizer(load_chat_tokenizer(input_path, bool(cfg.model.trust_remote_code)), "grpo", str(input_path))


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


def check_rewards(cfg) -> None:
    rewards.check(cfg.stages.grpo, "grpo", list(cfg.run.stages), Path(str(cfg.run.dir)).expanduser())


def extra_inputs(cfg, run_dir: Path, planned: dict[str, str]) -> str | None:
    """Part of the config hash: the sources of the user's reward functions and tools, and the
    reward model's identity."""
    parts = [rewards.fingerprint(cfg.stages.grpo, run_dir, planned), tools.fingerprint(cfg.stages.grpo)]
    return "|".join(p for p in parts if p) or None


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


# --------------------------------------------------------------------------- trainer


def build_dataset(task) -> Dataset:
    """Conversational prompts (TRL renders them with the chat template; a string prompt is one
    user turn) and the task's other columns (the reference `answer`, and any a user's data has),
    which TRL hands to the reward functions as keyword arguments."""
    return Dataset.from_list([{**row, "prompt": as_turns(row["prompt"], "user")} for row in task.rl_prompts()])


def training_args(stage_cfg, optim_cfg, peft_cfg, output_dir: Path, seed: int, reward_weights: list[float],
                  shared: dict | None = None, engine: Engine | None = None) -> GRPOConfig:
    """GRPOConfig: the shared fields (pipeline/training_args.py; no eval loop: the stage measures
    its own pass rate), GRPO's own, and the rollouts' engine (TRL's continuous batching or vLLM)."""
    extra = {} if stage_cfg.adam_epsilon is None else {"adam_epsilon": float(stage_cfg.adam_epsilon)}
    extra.update((engine or Engine()).trl_fields())
    return build_training_args(
        GRPOConfig, stage_cfg, optim_cfg, peft_cfg, output_dir, seed, shared, evaluate=False,
        num_generations=stage_cfg.num_generations,
        max_completion_length=stage_cfg.max_new_tokens,
        temperature=float(stage_cfg.temperature),
        top_p=1.0,
        top_k=0,
        mask_truncated_completions=bool(stage_cfg.mask_truncated_completions),
        loss_type=str(stage_cfg.loss_type),
        beta=float(stage_cfg.beta),
        epsilon=float(stage_cfg.epsilon),
        epsilon_high=float(stage_cfg.epsilon_high) if stage_cfg.epsilon_high is not None else None,
        num_iterations=int(stage_cfg.num_iterations),
        scale_rewards=str(stage_cfg.scale_rewards),
        entropy_coef=float(stage_cfg.entropy_coef),
        reward_weights=reward_weights,
        router_aux_loss_coef=None if stage_cfg.router_aux_loss_coef is None else float(stage_cfg.router_aux_loss_coef),
        max_tool_calling_iterations=stage_cfg.get("max_tool_calling_iterations"),
        ds3_gather_for_generation=bool(stage_cfg.ds3_gather_for_generation),
        **extra,
    )


def build_trainer(model, tokenizer, train_data: Dataset, args: GRPOConfig, rewards: tuple, stage_cfg, peft_config=None,
                  optim_cfg=None) -> StageGRPOTrainer:
    funcs, _ = rewards
    trainer = StageGRPOTrainer(
        model=model, reward_funcs=funcs, args=args, train_dataset=train_data, processing_class=tokenizer,
        peft_config=peft_config,
        zero_variance=str(stage_cfg.zero_variance), zero_variance_weight=float(stage_cfg.zero_variance_weight),
        tools=tools.load_tools(stage_cfg, "grpo") or None, environment_factory=tools.load_environment(stage_cfg, "grpo"),
    )
    if optim_cfg is not None:  # GRPOTrainer's constructor has no optimizer_cls_and_kwargs (trl 1.16)
        trainer.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(optim_cfg, args.learning_rate)
    return trainer


def training_prompts(model, tokenizer, ctx) -> tuple[Dataset, dict[str, float]]:
    """Every RL prompt, or with filter_samples > 0 those the input policy does not always solve."""
    cfg, data = ctx.stage_cfg, build_dataset(ctx.task)
    if not cfg.filter_samples:
        return data, {}
    options = dict(samples=int(cfg.filter_samples), temperature=float(cfg.temperature), max_new_tokens=int(cfg.max_new_tokens),
                   batch_size=int(cfg.eval_batch_size), seed=int(ctx.cfg.seed))
    per_step = int(cfg.batch_size * cfg.grad_accum * distributed.world_size()) // int(cfg.num_generations)
    with distributed.gathered(model):  # whole on every rank for sampling, under ZeRO-3
        return selected_prompts(data, lambda rows: prompt_pass_rates(model, tokenizer, ctx.task, rows, **options),
                                ctx.stage_dir / FILTER_FILE, float(cfg.filter_max_pass_rate), per_step)


def pass_rate_curve(ctx, tokenizer) -> PassRateCurve:
    """The held-out pass rate on the first curve_problems eval problems, every eval_every steps."""
    cfg = ctx.stage_cfg
    problems = ctx.task.eval_problems()[: cfg.curve_problems]

    setup = ToolSetup.of(cfg, "grpo")  # the curve measures the agent, with the tools it trains with

    def measure(policy) -> float:
        with ctx.autocast():
            return evaluate(policy, tokenizer, ctx.task, problems, temperature=float(cfg.curve_temperature),
                            prompt_format="chat", max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                            tools=setup).accuracy

    return PassRateCurve(measure, int(cfg.eval_every), int(cfg.num_iterations), ctx.stage_dir / CURVE_FILE, ctx.seed)


def run(ctx) -> dict[str, float]:
    cfg = ctx.stage_cfg
    trust = ctx.trust_remote_code
    tokenizer = load_chat_tokenizer(ctx.input_path, trust)
    tokenizer.padding_side = "left"  # TRL generates from left-padded prompts
    # a reward model that scores loads whole, before the arguments; the policy after them: under a
    # ZeRO-3 launch from_pretrained then loads it partitioned (TRL builds the reference after too)
    reward_funcs = rewards.build(cfg, "grpo", ctx.task, ctx.run_dir, trust, int(cfg.eval_batch_size), ctx.forward_dtype())
    args = training_args(cfg, ctx.optim, ctx.peft, ctx.stage_dir, ctx.seed, reward_funcs[1], ctx.shared_arguments(reference=True),
                         ctx.generation)
    model = load_model(str(ctx.input_path.resolve()), trust, ctx.attn_implementation(), ctx.policy_dtype())
    # (resolved: TRL reloads the reference from it)
    weights_at_load = distributed.resident_parameter_bytes(model)
    set_router_aux_loss(model, False)  # TRL asks for router logits per forward when it needs the aux loss
    restrict_trainable(model, cfg, "grpo")
    peft_config = build_peft_config(ctx.peft, model)
    if cfg.filter_samples:
        model = distributed.to_device_unless_sharded(model)
    with ctx.autocast():
        train_data, filter_metrics = training_prompts(model, tokenizer, ctx)
    ctx.generation.wait_for_server()  # vllm server mode: every rank, with a clear error (pipeline/generation.py)
    trainer = build_trainer(model, tokenizer, train_data, args, reward_funcs, cfg, peft_config, ctx.optim)

    curve = None
    if ctx.task.has_split("eval"):
        curve = pass_rate_curve(ctx, tokenizer)
        trainer.add_callback(curve)
    train_output = preemption.train(trainer, ctx)

    trainable, total = count_parameters(trainer.model)
    model = save_policy(trainer, tokenizer, ctx.stage_dir, ctx.save_dtype())
    accuracy = held_out_accuracy(model, tokenizer, ctx.task, EvalSettings.of_stage(cfg), ctx.seed, ctx.autocast(), ctx.name,
                                 ctx.stage_dir / EVAL_SAMPLES, tools=ToolSetup.of(cfg, "grpo"))

    metrics = {
        **accuracy,
        **training_metrics(trainer, ctx.stage_dir),
        "train_runtime_s": train_output.metrics.get("train_runtime", 0.0),
        "curve_eval_s": curve.seconds if curve else 0.0,
        "trainable_parameters": trainable,
        "total_parameters": total,
        **trainer_settings.reference_dtype(trainer),
        "weights_mb_at_load": weights_at_load / 2**20,
        **filter_metrics,
    }
    if curve:
        metrics.update(scaling_metrics(curve.points, float(cfg.scaling_warmup_fraction), ctx.stage_dir))
    return metrics
