"""Stage `sft`: supervised fine-tuning on chat conversations, loss on the response only, either
full fine-tuning or through a PEFT adapter (peft=lora|prefix|prompt).

Each task example is a conversation: a `messages` row, or a prompt and a completion (strings
become a user and an assistant turn, conversations stay as they are), rendered with the input
checkpoint's chat template. Rows are tokenized here into TRL's pre-tokenized format
(input_ids + completion_mask): one dataset has to hold both these conversations and the plain
pretraining texts of the forgetting guard (`pretrain_mix`, full loss), which TRL's raw formats
cannot mix. TRL's SFTTrainer then builds the labels (completion_only_loss: prompt and padding get
-100), truncates, packs if asked, collates, adds the MoE router aux loss and trains; checkpoints
resume like pretrain's.

Hand-off (pipeline.models.save_policy / load_policy): full fine-tuning and LoRA (merged)
leave a plain checkpoint in final/; prefix and prompt tuning leave the adapter in final/ and the
frozen base in final/base/.
"""

from __future__ import annotations

import random
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from trl.data_utils import common_prefix_length

from pipeline import distributed, preemption, tools
from pipeline.adapters import PROMPT_LEARNING, build_peft_config
from pipeline.evaluate import EVAL_SAMPLES, EvalSettings, held_out_accuracy
from pipeline.models import (
    count_parameters, load_model, router_logits_off, save_policy, set_router_aux_loss,
)
from pipeline.optim import optimizer_cls_and_kwargs
from pipeline.report import first_and_last_loss, plot_loss
from pipeline.resume import ExactResume
from pipeline.tasks.base import as_turns
from pipeline.tokenizer import load_chat_tokenizer
from pipeline.tool_loop import ToolSetup
from pipeline.training_args import build_training_args
from pipeline.errors import ConfigError
from pipeline.log import log

SPLITS = ("sft",)
OPTIONAL_SPLITS = ("eval",)  # held-out accuracy when the task has problems with answers; else eval_loss only
USES = ("task", "optim", "peft", "trainer", "generation")
TRAINS_INPUT = True  # the runner checks the input: a model, not a saved adapter, with a chat template


def validate(cfg, input_path: Path | None) -> None:
    """Config and input errors, raised as ConfigError before any compute."""
    stage, peft_cfg = cfg.stages.sft, cfg.peft
    if not 0.0 <= stage.pretrain_mix < 1.0:
        raise ConfigError(f"stages.sft.pretrain_mix={stage.pretrain_mix} must be in [0, 1)")
    if stage.eval_examples < 1:
        raise ConfigError(f"stages.sft.eval_examples={stage.eval_examples}: hold out at least 1 example for eval_loss")
    if stage.packing and peft_cfg.method in PROMPT_LEARNING:
        raise ConfigError(
            f"stages.sft.packing=true with peft={peft_cfg.method}: virtual tokens break the per-example attention "
            "of packed rows; set stages.sft.packing=false"
        )
    tool_cfg, tool_stage = tools.tools_from(cfg, "sft")
    if tool_cfg is not None:
        tools.check(tool_cfg, tool_stage)
        if input_path is not None:
            tools.check_tokenizer(load_chat_tokenizer(input_path, bool(cfg.model.trust_remote_code)), tool_stage,
                                  str(input_path))


def extra_inputs(cfg, run_dir: Path, planned: dict[str, str]) -> str | None:
    """Part of the config hash: the tools the held-out accuracy answers with (stages.sft.tools_from)."""
    tool_cfg, _ = tools.tools_from(cfg, "sft")
    return tools.fingerprint(tool_cfg) if tool_cfg is not None else None


def check_data(cfg, task, input_path: Path | None) -> None:
    """Rows are left to train on, before any compute: the last eval_examples rows are held out,
    and (with the input's tokenizer, once it exists) TRL drops a row whose prompt fills
    max_length, since no response token is left in it (stops at the first row that survives);
    rows with tool calls need a chat template that renders them."""
    stage = cfg.stages.sft
    examples = task.sft_examples()
    n_eval = int(stage.eval_examples)
    source = f"the sft split ({cfg.task.splits.sft})" if cfg.task.get("splits") and cfg.task.splits.get("sft") else "the sft split"
    if len(examples) <= n_eval:
        raise ConfigError(f"{source} has {len(examples)} rows and stages.sft.eval_examples={n_eval} of them are held out "
                          f"for eval_loss, which leaves none to train on; lower stages.sft.eval_examples "
                          f"(e.g. {max(1, len(examples) // 10)}) or add rows")
    if input_path is None:
        return
    tokenizer = load_chat_tokenizer(input_path, bool(cfg.model.trust_remote_code))
    calls = next((i for i, e in enumerate(examples) if any(t.get("tool_calls") for t in e.get("messages", ()))), None)
    if calls is not None:
        from trl.chat_template_utils import supports_tool_calling

        if not supports_tool_calling(tokenizer):
            raise ConfigError(f"{source}: row {calls + 1} calls tools, and the chat template of {input_path} does not "
                              "render tool calls and results; start from a model whose template does (Qwen3, Llama "
                              "3.1/3.2, the embedded model with stages.pretrain.tokenizer_tools=true)")
    if stage.packing:  # packing chunks rows to max_length instead of dropping them
        return
    prompt_lengths = []
    for example in examples[:-n_eval]:
        mask = tokenize_example(tokenizer, example)["completion_mask"]
        if any(mask[: stage.max_length]):
            return
        prompt_lengths.append(mask.index(1) if 1 in mask else len(mask))
    raise ConfigError(
        f"{source} has {len(examples)} rows: {n_eval} held out for eval_loss (stages.sft.eval_examples), and in all "
        f"{len(prompt_lengths)} others the prompt fills stages.sft.max_length={stage.max_length} tokens (prompts take "
        f"{min(prompt_lengths)}-{max(prompt_lengths)}), so TRL would drop every one; raise stages.sft.max_length above "
        f"{max(prompt_lengths)} or shorten the prompts"
    )


def tokenize_chat(tokenizer, prompt: str | list[dict], completion: str | list[dict]) -> dict[str, list[int]]:
    """The conversation prompt + completion through the chat template (a string prompt is one
    user turn, a string completion one assistant turn), with completion_mask 1 on the
    completion's tokens (from where it departs from the prompt alone rendered with the
    generation prompt, as TRL does for conversational data)."""
    user, assistant = as_turns(prompt, "user"), as_turns(completion, "assistant")
    prompt_ids = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    input_ids = tokenizer.apply_chat_template(user + assistant, tokenize=True, return_dict=True)["input_ids"]
    n_prompt = common_prefix_length(prompt_ids, input_ids)
    return {"input_ids": input_ids, "completion_mask": [0] * n_prompt + [1] * (len(input_ids) - n_prompt)}


def tokenize_messages(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> dict[str, list[int]]:
    """A whole conversation through the chat template (with the row's `tools` schemas, which the
    template shows the model), with completion_mask 1 on every assistant turn, tool calls
    included (from where it departs from the conversation before it rendered with the generation
    prompt, to the end of the turn) and 0 on system, user and tool-result turns."""

    template = training_template(tokenizer) if any(t["role"] == "tool" or t.get("tool_calls") for t in messages) else None

    def ids(turns, generation_prompt=False) -> list[int]:
        return tokenizer.apply_chat_template(turns, tools=tools or None, add_generation_prompt=generation_prompt,
                                             chat_template=template, tokenize=True, return_dict=True)["input_ids"]

    input_ids = ids(messages)
    mask = [0] * len(input_ids)
    for k, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start = common_prefix_length(ids(messages[:k], generation_prompt=True) if k else [], input_ids)
        through = ids(messages[: k + 1])
        if input_ids[: len(through)] != through:
            raise ValueError("the chat template renders a conversation differently from its first turns (it is not "
                             "prefix-consistent), so the assistant turns cannot be located; use prompt/completion rows")
        mask[start : len(through)] = [1] * (len(through) - start)
    return {"input_ids": input_ids, "completion_mask": mask}


def training_template(tokenizer) -> str | None:
    """None when the tokenizer's chat template renders a tool-calling conversation as a prefix of
    its continuations; else TRL's prefix-preserving training version of it (what TRL's GRPO
    trains multi-turn rollouts with: e.g. Qwen3's template drops earlier turns' reasoning)."""
    from trl.chat_template_utils import get_training_chat_template, is_chat_template_prefix_preserving

    if not hasattr(tokenizer, "_pipeline_training_template"):
        preserving = is_chat_template_prefix_preserving(tokenizer)
        tokenizer._pipeline_training_template = None if preserving else get_training_chat_template(tokenizer)
    return tokenizer._pipeline_training_template


def tokenize_text(tokenizer, text: str) -> dict[str, list[int]]:
    """A pretraining document as in pretrain (text + eos), every token in the loss."""
    input_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": input_ids, "completion_mask": [1] * len(input_ids)}


def tokenize_example(tokenizer, example: dict) -> dict[str, list[int]]:
    """An sft example: a conversation (`messages`) or a prompt/completion pair."""
    if "messages" in example:
        return tokenize_messages(tokenizer, example["messages"], example.get("tools"))
    return tokenize_chat(tokenizer, example["prompt"], example["completion"])


def build_datasets(tokenizer, task, stage_cfg, seed: int) -> tuple[Dataset, Dataset]:
    """(train, eval): the last eval_examples sft examples are held out for eval_loss; the
    training rows get pretraining texts added so that they make up pretrain_mix of them."""
    examples = task.sft_examples()
    n_eval = int(stage_cfg.eval_examples)
    if len(examples) <= n_eval:
        raise ValueError(f"{len(examples)} sft examples leave none for training after stages.sft.eval_examples={n_eval}")
    rows = [tokenize_example(tokenizer, e) for e in examples[:-n_eval]]
    n_mix = round(len(rows) * stage_cfg.pretrain_mix / (1.0 - stage_cfg.pretrain_mix))
    if n_mix:
        texts = task.pretrain_texts()
        rows += [tokenize_text(tokenizer, t) for t in random.Random(seed).sample(texts, min(n_mix, len(texts)))]
    eval_rows = [tokenize_example(tokenizer, e) for e in examples[-n_eval:]]
    return Dataset.from_list(rows), Dataset.from_list(eval_rows)


def log_truncation(train_data: Dataset, stage_cfg, stage: str) -> None:
    """Say how many training rows TRL will drop because max_length cuts off every response token."""
    if stage_cfg.packing:
        return
    dropped = sum(not any(mask[: stage_cfg.max_length]) for mask in train_data["completion_mask"])
    if dropped:
        log(f"stage {stage}: {dropped} of {len(train_data)} training rows have no response token within "
            f"stages.{stage}.max_length={stage_cfg.max_length}; TRL drops them (raise max_length to keep them)")


def training_args(stage_cfg, optim_cfg, peft_cfg, output_dir: Path, seed: int, shared: dict | None = None) -> SFTConfig:
    """SFTConfig: the shared fields (pipeline/training_args.py) and SFT's own."""
    return build_training_args(
        SFTConfig, stage_cfg, optim_cfg, peft_cfg, output_dir, seed, shared,
        max_length=stage_cfg.max_length,
        packing=bool(stage_cfg.packing),
        completion_only_loss=True,  # pre-tokenized rows: labels from completion_mask
        # Prefix tuning trains without the MoE router aux loss: TRL hands the prefix-lengthened
        # attention mask to load_balancing_loss_func, which fails on the size mismatch (trl 1.16,
        # transformers 5.23). None: the model config's coefficient.
        router_aux_loss_coef=0.0 if peft_cfg.method == "prefix" else None,
    )


class StageSFTTrainer(ExactResume, SFTTrainer):
    def evaluate(self, *args, **kwargs):
        """Report the LM loss alone, not LM + router aux loss (as pretrain does)."""
        aux_loss_enabled, self.aux_loss_enabled = self.aux_loss_enabled, False
        try:
            with router_logits_off(self.model):
                return super().evaluate(*args, **kwargs)
        finally:
            self.aux_loss_enabled = aux_loss_enabled


def build_trainer(
    model, tokenizer, train_data: Dataset, eval_data: Dataset, args: SFTConfig, peft_config, optim_cfg=None
) -> StageSFTTrainer:
    """TRL's trainer; it wraps `model` with `peft_config` (None: train `model` as it is).
    `optim_cfg` with name muon hands the Trainer the Muon/AdamW hybrid at the stage's lr."""
    return StageSFTTrainer(
        model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
        processing_class=tokenizer, peft_config=peft_config,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(optim_cfg, args.learning_rate) if optim_cfg else None,
    )


def run(ctx) -> dict[str, float]:
    cfg = ctx.stage_cfg
    tokenizer = load_chat_tokenizer(ctx.input_path, ctx.trust_remote_code)
    train_data, eval_data = build_datasets(tokenizer, ctx.task, cfg, ctx.seed)
    log_truncation(train_data, cfg, ctx.name)
    # the arguments before the model: under a ZeRO-3 launch from_pretrained then loads it partitioned
    args = training_args(cfg, ctx.optim, ctx.peft, ctx.stage_dir, ctx.seed, ctx.shared_arguments())
    model = load_model(str(ctx.input_path.resolve()), ctx.trust_remote_code, ctx.attn_implementation(), ctx.policy_dtype())
    # (resolved: the adapter records its base)
    weights_at_load = distributed.resident_parameter_bytes(model)
    peft_config = build_peft_config(ctx.peft, model)
    set_router_aux_loss(model, True)
    trainer = build_trainer(model, tokenizer, train_data, eval_data, args, peft_config, ctx.optim)
    train_output = preemption.train(trainer, ctx)
    eval_metrics = trainer.evaluate()

    trainable, total = count_parameters(trainer.model)
    model = save_policy(trainer, tokenizer, ctx.stage_dir, ctx.save_dtype())
    tool_cfg, tool_stage = tools.tools_from(ctx.cfg, ctx.name)  # evaluated with the tools the chain trains with
    accuracy = held_out_accuracy(model, tokenizer, ctx.task, EvalSettings.of_stage(cfg), ctx.seed, ctx.autocast(), ctx.name,
                                 ctx.stage_dir / EVAL_SAMPLES,
                                 tools=ToolSetup.of(tool_cfg, tool_stage) if tool_cfg is not None else None)
    log_history = trainer.state.log_history
    if distributed.is_main_process():
        plot_loss(log_history, ctx.stage_dir / "loss.png", "sft loss (response tokens)")
    first_loss, last_loss = first_and_last_loss(log_history)
    runtime = train_output.metrics.get("train_runtime", 0.0)
    tokens = next((e["num_tokens"] for e in reversed(log_history) if "num_tokens" in e), 0)
    return {
        "eval_loss": eval_metrics["eval_loss"],
        **accuracy,
        "train_loss": last_loss,
        "train_loss_first": first_loss,
        "train_steps": trainer.state.global_step,
        "train_examples": len(trainer.train_dataset),  # after TRL's truncation drops
        "train_tokens": tokens,
        "tokens_per_second": tokens / runtime if runtime else 0.0,
        "weights_mb_at_load": weights_at_load / 2**20,
        "train_runtime_s": runtime,
        "trainable_parameters": trainable,
        "total_parameters": total,
    }
