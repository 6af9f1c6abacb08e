"""Stage `reward`: a Bradley-Terry reward model on the task's preference pairs.

The SFT checkpoint's backbone gets a one-output sequence-classification head (transformers'
AutoModelForSequenceClassification: the score is read at the last non-padding token) and is
trained by TRL's RewardTrainer with the pairwise loss -log sigmoid(r(chosen) - r(rejected)).
Pairs are conversations, [user: prompt, assistant: chosen|rejected], in the input's chat
template; for the default task the rejected answer is a hard negative (one step off by 1, 2
or 10, carried through the later steps). Full fine-tuning or peft=lora (the head trains in
full); final/ is a plain checkpoint that AutoModelForSequenceClassification loads, scored with
pipeline.reward_model by grpo and test_time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer

from pipeline import distributed, preemption, trainer_settings
from pipeline.adapters import build_peft_config
from pipeline.models import count_parameters, save_policy, set_router_aux_loss
from pipeline.optim import learning_rate, optimizer_cls_and_kwargs, stage_optim, trainer_kwargs
from pipeline.report import first_and_last_loss, plot_loss
from pipeline.resume import ExactResume
from pipeline.reward_model import score
from pipeline.tokenizer import load_chat_tokenizer
from pipeline.errors import ConfigError
from pipeline.tasks import conversational_pairs

SPLITS = ("preference",)
USES = ("task", "optim", "peft", "trainer")
TRAINS_INPUT = True  # the runner checks the input: a model, not a saved adapter, with a chat template
PEFT_METHODS = ("none", "lora")


def validate(cfg, input_path: Path | None) -> None:
    stage, peft_cfg = cfg.stages.reward, cfg.peft
    if peft_cfg.method not in PEFT_METHODS:
        raise ConfigError(
            f"peft={peft_cfg.method} with stage reward: a reward model reads its score off the last token's hidden "
            f"state, which prefix/prompt virtual tokens do not train a head for; use peft=none or peft=lora "
            f"(e.g. run reward separately: run.stages=[reward] peft=lora)"
        )
    if stage.eval_pairs < 1:
        raise ConfigError(f"stages.reward.eval_pairs={stage.eval_pairs}: hold out at least 1 pair for the pairwise accuracy")



class StageRewardTrainer(ExactResume, RewardTrainer):
    pass


def pairwise_scores(model, tokenizer, pairs: Dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of (chosen, rejected) for each pair through the scoring path later stages use."""
    prompts = [row["prompt"] for row in pairs]  # conversations: a system turn or earlier turns included
    chosen = score(model, tokenizer, prompts, [row["chosen"] for row in pairs], batch_size)
    rejected = score(model, tokenizer, prompts, [row["rejected"] for row in pairs], batch_size)
    return chosen, rejected


def run(ctx) -> dict[str, float]:
    cfg = ctx.stage_cfg
    trust = bool(ctx.cfg.model.trust_remote_code)
    tokenizer = load_chat_tokenizer(ctx.input_path, trust)
    # the score head is new: seeded by RewardTrainer (set_seed(args.seed)) only for string models
    torch.manual_seed(ctx.cfg.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        ctx.input_path, num_labels=1, trust_remote_code=trust, dtype=torch.float32,
        attn_implementation=trainer_settings.attn_implementation(ctx.cfg, ctx.name),
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    set_router_aux_loss(model, False)  # the sequence-classification head adds no aux loss
    train_data, eval_data = conversational_pairs(ctx.task.preference_pairs(), int(cfg.eval_pairs))
    lr = learning_rate(cfg, ctx.cfg.peft)
    args = RewardConfig(
        output_dir=str(ctx.stage_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length,
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        seed=ctx.cfg.seed,
        **trainer_settings.arguments(ctx.cfg, ctx.name, ctx.stage_dir),  # TRL's own defaults: bf16, checkpointing
        **trainer_kwargs(stage_optim(ctx.cfg, ctx.name), lr),
    )
    trainer = StageRewardTrainer(
        model=model, args=args, train_dataset=train_data, eval_dataset=eval_data, processing_class=tokenizer,
        peft_config=build_peft_config(ctx.cfg.peft, model, task_type="SEQ_CLS"),
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(stage_optim(ctx.cfg, ctx.name), args.learning_rate),
    )
    train_output = preemption.train(trainer, ctx)
    eval_metrics = trainer.evaluate()
    trainable, total = count_parameters(trainer.model)
    model = save_policy(trainer, tokenizer, ctx.stage_dir, trainer_settings.save_dtype(ctx.cfg, ctx.name, ctx.input_path))

    with trainer_settings.autocast(ctx.cfg, ctx.name):
        chosen, rejected = pairwise_scores(model.eval(), tokenizer, eval_data, cfg.batch_size)
    margin = chosen - rejected
    # per kind of rejected answer, where the task labels them (arithmetic: carried, step, digit)
    kinds = [p.get("kind") for p in ctx.task.preference_pairs()[-len(eval_data) :]]
    by_kind = {
        f"eval_pairwise_accuracy/{kind}": (margin[[k == kind for k in kinds]] > 0).float().mean().item()
        for kind in sorted({k for k in kinds if k})
    }
    log_history = trainer.state.log_history
    if distributed.is_main_process():
        plot_loss(log_history, ctx.stage_dir / "loss.png", "reward model loss (Bradley-Terry)")
    first_loss, last_loss = first_and_last_loss(log_history)
    train_accuracy = next((e["accuracy"] for e in reversed(log_history) if "accuracy" in e), float("nan"))
    return {
        "eval_pairwise_accuracy": (margin > 0).float().mean().item(),
        "eval_loss": eval_metrics["eval_loss"],
        **by_kind,
        "eval_reward_margin": margin.mean().item(),
        "eval_reward_chosen": chosen.mean().item(),
        "eval_reward_rejected": rejected.mean().item(),
        "eval_num_pairs": len(eval_data),
        "train_loss": last_loss,
        "train_loss_first": first_loss,
        "train_pairwise_accuracy": train_accuracy,
        "train_steps": trainer.state.global_step,
        "train_pairs": len(train_data),
        "train_runtime_s": train_output.metrics.get("train_runtime", 0.0),
        "trainable_parameters": trainable,
        "total_parameters": total,
    }
