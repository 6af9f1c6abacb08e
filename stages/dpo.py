"""Stage `dpo`: Direct Preference Optimization on the task's preference pairs (TRL's DPOTrainer).

Training pairs (`pairs`): `on_policy` (default) samples `samples_per_prompt` completions per RL
prompt from the starting policy and pairs a verified-correct one (chosen) with an incorrect one
(rejected), so DPO pushes down the mistakes this policy actually makes; `task` uses the task's
fixed preference pairs. Held-out pairs for the implicit-reward accuracy are always the task's.

The policy starts from the SFT checkpoint and the reference is that same checkpoint, frozen:
with full fine-tuning TRL loads a second copy; with an adapter (peft=lora|prefix|prompt) the
reference is the policy with its adapter disabled, so no second copy is held. `beta` and
`loss_type` (sigmoid = DPO, ipo, hinge, ... whatever the installed trl offers) come from the
config. Pairs are conversations in the input's chat template, as in the reward stage; the
loss covers the assistant's tokens only. final/ is handed off like sft's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from datasets import Dataset, load_from_disk
from transformers import set_seed
from trl import DPOConfig, DPOTrainer
from trl.data_utils import is_conversational

from pipeline import distributed, policy_pairs, preemption, trainer_settings
from pipeline.training_args import build_training_args
from pipeline.adapters import build_peft_config
from pipeline.evaluate import EVAL_SAMPLES, EvalSettings, held_out_accuracy
from pipeline.models import (
    check_trainable_scope, count_parameters, load_model, restrict_trainable, save_policy,
    set_router_aux_loss,
)
from pipeline.optim import optimizer_cls_and_kwargs
from pipeline.report import first_and_last_loss, plot_loss
from pipeline.resume import ExactResume
from pipeline.tokenizer import load_chat_tokenizer
from pipeline.errors import ConfigError
from pipeline.log import log
from pipeline.tasks import conversational_pairs

SPLITS = ("preference",)
# rl: the prompts of on-policy pairs (pairs=on_policy needs it); eval: held-out accuracy when the
# task has problems with answers
OPTIONAL_SPLITS = ("rl", "eval")
PAIR_SOURCES = ("on_policy", "task")
USES = ("task", "optim", "peft", "trainer", "model", "generation")  # model: train_only/freeze checked against its parameters
TRAINS_INPUT = True  # the runner checks the input: a model, not a saved adapter, with a chat template
# the pairwise losses of trl 1.16's DPOTrainer (DPOConfig.loss_type); tests check them against it
LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)


def validate(cfg, input_path: Path | None) -> None:
    stage = cfg.stages.dpo
    losses = list(stage.loss_type) if not isinstance(stage.loss_type, str) else [stage.loss_type]
    unknown = [loss for loss in losses if loss not in LOSS_TYPES]
    if unknown:
        raise ConfigError(f"stages.dpo.loss_type={unknown} is unknown; valid: {', '.join(LOSS_TYPES)}")
    if stage.loss_weights is not None and len(stage.loss_weights) != len(losses):
        raise ConfigError(f"stages.dpo.loss_weights={list(stage.loss_weights)} needs one weight per loss_type {losses}")
    if stage.beta <= 0:
        raise ConfigError(f"stages.dpo.beta={stage.beta} must be > 0 (it scales the implicit reward)")
    if "exo_pair" in losses and stage.label_smoothing == 0:
        raise ConfigError("stages.dpo.loss_type=exo_pair needs stages.dpo.label_smoothing > 0 (the paper uses 1e-3)")
    if stage.pairs not in PAIR_SOURCES:
        raise ConfigError(f"stages.dpo.pairs={stage.pairs!r} is unknown; valid: {', '.join(PAIR_SOURCES)}")
    if stage.pairs == "on_policy" and stage.samples_per_prompt < 2:
        raise ConfigError(f"stages.dpo.samples_per_prompt={stage.samples_per_prompt}: on-policy pairs need at least 2 samples per prompt")
    if stage.eval_pairs < 1:
        raise ConfigError(f"stages.dpo.eval_pairs={stage.eval_pairs}: hold out at least 1 pair for the reward accuracy")
    check_trainable_scope(stage, "dpo", cfg.peft.method, cfg.model, input_path)



def training_args(stage_cfg, optim_cfg, peft_cfg, output_dir: Path, seed: int, shared: dict | None = None) -> DPOConfig:
    """DPOConfig: the shared fields (pipeline/training_args.py) and DPO's own."""
    return build_training_args(
        DPOConfig, stage_cfg, optim_cfg, peft_cfg, output_dir, seed, shared,
        max_length=stage_cfg.max_length,
        beta=float(stage_cfg.beta),
        loss_type=list(stage_cfg.loss_type) if not isinstance(stage_cfg.loss_type, str) else [stage_cfg.loss_type],
        loss_weights=list(stage_cfg.loss_weights) if stage_cfg.loss_weights is not None else None,
        label_smoothing=float(stage_cfg.label_smoothing),
        precompute_ref_log_probs=precomputes_reference(stage_cfg),
        # prefix tuning: no router aux loss (TRL hands the prefix-lengthened mask to the MoE aux loss, see sft)
        router_aux_loss_coef=0.0 if peft_cfg.method == "prefix" else None,
    )


def precomputes_reference(stage_cfg) -> bool:
    """Whether TRL computes the reference log-probs of every pair once, with the starting policy,
    before training, and keeps no reference model (full fine-tuning: 2-4 bytes per parameter
    less). Step-level rows are changed after TRL tokenizes them (drop_appended_eos), so they keep
    the reference model and score it per step."""
    return bool(stage_cfg.precompute_ref_log_probs) and not bool(stage_cfg.step_level)


def reference_kind(trainer, args: DPOConfig) -> str:
    """How the stage scored the reference: precomputed, a frozen model, or the policy with its adapter disabled."""
    if args.precompute_ref_log_probs:
        return "precomputed"
    return "model" if trainer.ref_model is not None else "adapter_disabled"


PAIRS_DIR = "pairs"  # the stage's training and evaluation pairs, as datasets on disk


def on_disk(datasets: dict[str, Dataset], directory: Path) -> dict[str, Dataset]:
    """The datasets saved under `directory` by the main process and loaded back by every rank.
    TRL writes the precomputed reference log-probs to a cache file beside a dataset's own files
    and every rank reads rank 0's; an in-memory dataset's cache goes to a temporary directory of
    each process, where the other ranks cannot find it."""
    if distributed.is_main_process():
        shutil.rmtree(directory, ignore_errors=True)
        for name, dataset in datasets.items():
            dataset.save_to_disk(str(directory / name))
    distributed.barrier()
    return {name: load_from_disk(str(directory / name)) for name in datasets}


def check_data(cfg, task) -> None:
    """On-policy pairs judge the policy's samples of the rl prompts against their answers."""
    policy_pairs.check_data("dpo", str(cfg.stages.dpo.pairs), task)


def end_of_turn(tokenizer) -> str:
    """What the chat template writes after an assistant message (e.g. "<|im_end|>\n")."""
    marker = "\x00END\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    return text[text.rindex(marker) + len(marker):]


def first_step_pairs(pairs: list[dict], tokenizer) -> list[dict]:
    """Step-level pairs (as in Step-DPO): the shared opening lines of chosen and rejected move
    into the prompt, and the two completions are the first line where they part. Everything
    after the slip is left out: in the rejected answer it is mostly sound work on a wrong number,
    which full-answer DPO would push down as well. Plain-text rows: the prompt is the chat
    rendering plus the shared lines; a completion that ends the answer ends with the template's
    end of turn, one cut after a line does not (see drop_appended_eos)."""
    rows, end = [], end_of_turn(tokenizer)
    for pair in pairs:
        good, bad = pair["chosen"].split("\n"), pair["rejected"].split("\n")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": pair["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        k = next((i for i, (g, b) in enumerate(zip(good, bad)) if g != b), None)
        if k is None:  # one answer is the other cut short: no single line parts them, keep both whole
            rows.append({"prompt": prompt, "chosen": pair["chosen"] + end, "rejected": pair["rejected"] + end})
            continue

        def step(lines: list[str]) -> str:
            return lines[k] + "\n" if k < len(lines) - 1 else lines[k] + end

        rows.append({"prompt": prompt + "".join(line + "\n" for line in good[:k]), "chosen": step(good), "rejected": step(bad)})
    return rows


def drop_appended_eos(dataset: Dataset, eos_token_id: int) -> Dataset:
    """TRL appends the EOS token to every plain-text completion. A step-level completion is the
    middle of an answer, so that token would teach the policy to stop after the line it
    prefers (with an NLL term on chosen, the demo policy learnt to answer one line and stop);
    remove it from the tokenized rows. Completions that end the answer keep their end of turn."""
    def strip(row: dict) -> dict:
        return {key: row[key][:-1] if row[key] and row[key][-1] == eos_token_id else row[key] for key in ("chosen_ids", "rejected_ids")}

    return dataset.map(strip)


class StageDPOTrainer(ExactResume, DPOTrainer):
    pass


def build_trainer(model, tokenizer, train_data, eval_data, args: DPOConfig, peft_config, optim_cfg,
                  train_probe=None) -> DPOTrainer:
    """TRL's DPOTrainer with the reference left to TRL (log-probs precomputed, a frozen copy, or
    the adapter disabled). `train_probe` (training pairs the stage evaluates before and after)
    joins the evaluation sets as "train_probe", beside "eval": TRL precomputes the reference for
    evaluation sets given at construction only. Plain-text training rows lose the EOS token TRL
    appends to them (drop_appended_eos)."""
    evaluation = eval_data if train_probe is None else {"eval": eval_data, "train_probe": train_probe}
    trainer = StageDPOTrainer(
        model=model, ref_model=None, args=args, train_dataset=train_data, eval_dataset=evaluation,
        processing_class=tokenizer, peft_config=peft_config,
    )
    # trl 1.16's DPOTrainer has no constructor argument for it; the Trainer reads the attribute
    trainer.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(optim_cfg, args.learning_rate)
    if not is_conversational(train_data[0]):  # step-level rows, see first_step_pairs
        trainer.train_dataset = drop_appended_eos(trainer.train_dataset, tokenizer.eos_token_id)
    return trainer


def implicit_rewards(trainer: DPOTrainer, pairs: str, prefix: str) -> dict[str, float]:
    """TRL's implicit-reward accuracy and margin (beta * log-ratio to the reference, chosen minus
    rejected) on the evaluation set named `pairs` (build_trainer), from one evaluation pass."""
    metrics = trainer.evaluate(eval_dataset=pairs)  # trl logs these as eval_rewards/* whatever the prefix
    return {
        f"{prefix}_reward_accuracy": metrics["eval_rewards/accuracies"],
        f"{prefix}_reward_margin": metrics["eval_rewards/margins"],
        f"{prefix}_loss": metrics["eval_loss"],
    }


def run(ctx) -> dict[str, float]:
    cfg = ctx.stage_cfg
    tokenizer = load_chat_tokenizer(ctx.input_path, ctx.trust_remote_code)
    # the arguments before the model: under a ZeRO-3 launch from_pretrained then loads it partitioned
    args = training_args(cfg, ctx.optim, ctx.peft, ctx.stage_dir, ctx.seed, ctx.shared_arguments(reference=True))
    model = load_model(str(ctx.input_path.resolve()), ctx.trust_remote_code, ctx.attn_implementation(), ctx.policy_dtype())
    weights_at_load = distributed.resident_parameter_bytes(model)
    restrict_trainable(model, ctx.stage_cfg, "dpo")
    peft_config = build_peft_config(ctx.peft, model)
    set_router_aux_loss(model, ctx.peft.method != "prefix")  # see router_aux_loss_coef below
    train_data, eval_data = conversational_pairs(ctx.task.preference_pairs(), int(cfg.eval_pairs))
    if cfg.pairs == "on_policy":
        model = distributed.to_device_unless_sharded(model)
        with ctx.autocast(), distributed.gathered(model):
            pairs, _ = policy_pairs.sample_pairs(model, tokenizer, ctx.task, cfg, ctx.seed)
        pairs = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]
        log(f"stage dpo: {len(pairs)} on-policy pairs from {cfg.pair_prompts} prompts x {cfg.samples_per_prompt} samples")
        if not pairs:
            raise RuntimeError("the policy's samples gave no (correct, incorrect) pair; raise stages.dpo.pair_prompts, "
                               "samples_per_prompt or sample_temperature, or use stages.dpo.pairs=task")
        train_data = Dataset.from_list(first_step_pairs(pairs, tokenizer)) if cfg.step_level else conversational_pairs(pairs, 0)[0]
    train_probe = train_data.select(range(min(len(train_data), int(cfg.eval_pairs))))
    if args.precompute_ref_log_probs:
        saved = on_disk({"train": train_data, "eval": eval_data, "train_probe": train_probe}, ctx.stage_dir / PAIRS_DIR)
        train_data, eval_data, train_probe = saved["train"], saved["eval"], saved["train_probe"]
    trainer = build_trainer(model, tokenizer, train_data, eval_data, args, peft_config, ctx.optim, train_probe)
    # An evaluation before training leaves transformers' Trainer with an inference engine under
    # DeepSpeed, and its train() then fails (found with 2-process ZeRO-3 on this machine): the
    # probe's starting values are not measured there.
    unmeasured = dict.fromkeys(("train_probe_before_reward_margin", "train_probe_before_loss"), float("nan"))
    before = unmeasured if distributed.deepspeed_config() else implicit_rewards(trainer, "train_probe", "train_probe_before")
    train_output = preemption.train(trainer, ctx)
    after = {**implicit_rewards(trainer, "train_probe", "train_probe"), **implicit_rewards(trainer, "eval", "eval")}

    trainable, total = count_parameters(trainer.model)
    model = save_policy(trainer, tokenizer, ctx.stage_dir, ctx.save_dtype())
    accuracy = held_out_accuracy(model, tokenizer, ctx.task, EvalSettings.of_stage(cfg), ctx.seed, ctx.autocast(), ctx.name,
                                 ctx.stage_dir / EVAL_SAMPLES)
    log_history = trainer.state.log_history
    if distributed.is_main_process():
        plot_loss(log_history, ctx.stage_dir / "loss.png", f"dpo loss ({', '.join(args.loss_type)}, beta={args.beta})",
                  eval_key="eval_eval_loss")
    first_loss, last_loss = first_and_last_loss(log_history)
    last_train = next((e for e in reversed(log_history) if "rewards/margins" in e), {})
    return {
        **accuracy,
        **after,
        "train_probe_reward_margin_before": before["train_probe_before_reward_margin"],
        "train_probe_loss_before": before["train_probe_before_loss"],
        "train_reward_accuracy": last_train.get("rewards/accuracies", float("nan")),
        "train_reward_margin": last_train.get("rewards/margins", float("nan")),
        "train_loss": last_loss,
        "train_loss_first": first_loss,
        "train_steps": trainer.state.global_step,
        "train_pairs": len(train_data),
        "train_runtime_s": train_output.metrics.get("train_runtime", 0.0),
        "trainable_parameters": trainable,
        **trainer_settings.reference_dtype(trainer),
        "reference": reference_kind(trainer, args),
        "weights_mb_at_load": weights_at_load / 2**20,
        "total_parameters": total,
    }
