"""Stage `reward`: a Bradley-Terry reward model on preference pairs.

The SFT checkpoint's backbone gets a one-output sequence-classification head (transformers'
AutoModelForSequenceClassification: the score is read at the last non-padding token) and is
trained by TRL's RewardTrainer with the pairwise loss -log sigmoid(r(chosen) - r(rejected)).
Pairs are conversations, [user: prompt, assistant: chosen|rejected], in the input's chat
template. `pairs` says where they come from: `task`, the task's preference split (for the
default task the rejected answer is a hard negative: one step off by 1, 2 or 10, carried
through the later steps); `on_policy`, the input policy's own samples of the rl prompts, a
verified-correct one over a wrong one of the same prompt (pipeline/policy_pairs.py: a verifier
trained on the mistakes this policy makes, which is what best-of-N over its samples needs);
`mix`, both. Held out: the task's last eval_pairs pairs, and with on-policy pairs whole prompts'
pairs (at least eval_pairs); each set's pairwise accuracy is reported. Full fine-tuning or
peft=lora (the head trains in full); final/ is a plain checkpoint that
AutoModelForSequenceClassification loads, scored with pipeline.reward_model by grpo and test_time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer

from pipeline import distributed, policy_pairs, preemption
from pipeline.adapters import build_peft_config
from pipeline.log import log
from pipeline.models import count_parameters, load_model, save_policy, set_router_aux_loss
from pipeline.optim import optimizer_cls_and_kwargs
from pipeline.report import first_and_last_loss, plot_loss
from pipeline.resume import ExactResume
from pipeline.reward_model import score
from pipeline.tokenizer import load_chat_tokenizer
from pipeline.training_args import build_training_args
from pipeline.errors import ConfigError
from pipeline.tasks import conversational_pairs

SPLITS = ("preference",)
OPTIONAL_SPLITS = ("rl",)  # the prompts of on-policy pairs (pairs=on_policy|mix needs it)
USES = ("task", "optim", "peft", "trainer", "generation")
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
    if stage.pairs not in policy_pairs.SOURCES:
        raise ConfigError(f"stages.reward.pairs={stage.pairs!r} is unknown; valid: {', '.join(policy_pairs.SOURCES)}")


def check_data(cfg, task) -> None:
    """On-policy pairs judge the policy's samples of the rl prompts against their answers."""
    policy_pairs.check_data("reward", str(cfg.stages.reward.pairs), task)


def training_pairs(ctx, tokenizer) -> tuple[Dataset, dict[str, Dataset], dict[str, float]]:
    """(train, held-out sets by name, counts): the task's pairs (`task`: the last eval_pairs held
    out) and, for pairs=on_policy|mix, pairs from the input policy's samples (`on_policy`: whole
    prompts held out). The policy is loaded for the sampling only."""
    cfg = ctx.stage_cfg
    task_train, task_eval = conversational_pairs(ctx.task.preference_pairs(), int(cfg.eval_pairs))
    if cfg.pairs == "task":
        return task_train, {"task": task_eval}, {}
    policy = load_model(str(ctx.input_path.resolve()), ctx.trust_remote_code,
                        dtype=ctx.forward_dtype())  # forward only
    policy = distributed.to_device_unless_sharded(policy)
    with ctx.autocast():
        pairs, counts = policy_pairs.sample_pairs(policy, tokenizer, ctx.task, cfg, ctx.seed)
    del policy
    train, held = policy_pairs.split_by_prompt(pairs, int(cfg.eval_pairs))
    log(f"stage reward: {len(pairs)} on-policy pairs ({counts['correct']} of {counts['samples']} samples correct; "
        f"{counts['prompts_with_pairs']} of {counts['prompts']} prompts gave a pair): {len(train)} to train on, "
        f"{len(held)} held out")
    if not train or not held:
        raise RuntimeError(f"the policy's samples gave {len(pairs)} (correct, wrong) pairs, too few to train on and hold "
                           "out; raise stages.reward.pair_prompts, samples_per_prompt or sample_temperature, or use "
                           "stages.reward.pairs=task")
    strip = lambda rows: [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]  # noqa: E731
    on_train, on_eval = conversational_pairs(strip(train), 0)[0], conversational_pairs(strip(held), 0)[0]
    if cfg.pairs == "mix":
        on_train = concatenate_datasets([task_train, on_train]).shuffle(seed=ctx.seed)
    numbers = {"pairs_on_policy": len(pairs), "pair_samples_correct": counts["correct"] / max(counts["samples"], 1)}
    return on_train, {"on_policy": on_eval, "task": task_eval}, numbers



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
    trust = ctx.trust_remote_code
    tokenizer = load_chat_tokenizer(ctx.input_path, trust)
    train_data, evals, pair_counts = training_pairs(ctx, tokenizer)  # before the model: one model in memory at a time
    eval_data = evals.get("on_policy", evals["task"])  # the trainer's eval_loss: the kind it trains on
    # the arguments before the model: under a ZeRO-3 launch from_pretrained then loads it partitioned
    args = build_training_args(RewardConfig, cfg, ctx.optim, ctx.peft, ctx.stage_dir, ctx.seed, ctx.shared_arguments(),
                               max_length=cfg.max_length, center_rewards_coefficient=cfg.center_rewards_coefficient)
    # the score head is new: seeded by RewardTrainer (set_seed(args.seed)) only for string models
    torch.manual_seed(ctx.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        ctx.input_path, num_labels=1, trust_remote_code=trust, dtype=torch.float32,
        attn_implementation=ctx.attn_implementation(),
    )
    weights_at_load = distributed.resident_parameter_bytes(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    set_router_aux_loss(model, False)  # the sequence-classification head adds no aux loss
    trainer = StageRewardTrainer(
        model=model, args=args, train_dataset=train_data, eval_dataset=eval_data, processing_class=tokenizer,
        peft_config=build_peft_config(ctx.peft, model, task_type="SEQ_CLS"),
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(ctx.optim, args.learning_rate),
    )
    train_output = preemption.train(trainer, ctx)
    eval_metrics = trainer.evaluate()
    trainable, total = count_parameters(trainer.model)
    model = save_policy(trainer, tokenizer, ctx.stage_dir, ctx.save_dtype())

    with ctx.autocast():
        scores = {name: pairwise_scores(model.eval(), tokenizer, data, cfg.batch_size) for name, data in evals.items()}
    accuracy = {f"eval_pairwise_accuracy_{name}": (c - r > 0).float().mean().item() for name, (c, r) in scores.items()}
    chosen, rejected = scores["on_policy" if "on_policy" in scores else "task"]
    margin = chosen - rejected
    # per kind of rejected answer in the task's pairs, where the task labels them (arithmetic: carried, step, digit)
    task_margin = scores["task"][0] - scores["task"][1]
    kinds = [p.get("kind") for p in ctx.task.preference_pairs()[-len(evals["task"]) :]]
    by_kind = {
        f"eval_pairwise_accuracy/{kind}": (task_margin[[k == kind for k in kinds]] > 0).float().mean().item()
        for kind in sorted({k for k in kinds if k})
    }
    log_history = trainer.state.log_history
    if distributed.is_main_process():
        plot_loss(log_history, ctx.stage_dir / "loss.png", "reward model loss (Bradley-Terry)")
    first_loss, last_loss = first_and_last_loss(log_history)
    train_accuracy = next((e["accuracy"] for e in reversed(log_history) if "accuracy" in e), float("nan"))
    return {
        # the held-out pairs of the kind it trains on: on-policy ones when it samples them
        "eval_pairwise_accuracy": (margin > 0).float().mean().item(),
        **accuracy,
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
        **pair_counts,
        "train_runtime_s": train_output.metrics.get("train_runtime", 0.0),
        "trainable_parameters": trainable,
        "weights_mb_at_load": weights_at_load / 2**20,
        "total_parameters": total,
    }
