"""Stage `pretrain`: causal LM with teacher forcing on packed sequences.

Documents (task texts + eos) are concatenated and cut into fixed-length blocks, so no token is
padding. MoE models train with the router load-balancing loss added; eval loss and perplexity
are the plain LM loss. Built on the transformers Trainer: checkpoints carry model, optimizer,
scheduler, RNG and data position, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import math
import time
from itertools import chain
from pathlib import Path

import torch
from datasets import Dataset
from omegaconf import OmegaConf
from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from pipeline import artifacts, distributed, preemption
from pipeline.errors import ConfigError
from pipeline.evaluate import evaluate
from pipeline.models import build_model, check_model_config, count_parameters, load_model, router_logits_off, set_router_aux_loss
from pipeline.optim import OptimizerStateSize, optimizer_cls_and_kwargs
from pipeline.report import first_and_last_loss, plot_loss
from pipeline.resume import ExactResume
from pipeline.tokenizer import stop_token_ids, train_tokenizer
from pipeline.training_args import build_training_args

SPLITS = ("pretrain", "eval")
USES = ("model", "task", "optim", "trainer", "generation")
NEEDS_INPUT = False  # no input: the model group builds one from config


def pack(tokenizer, texts: list[str], seq_len: int) -> Dataset:
    """Concatenate eos-terminated documents and cut them into seq_len blocks (remainder dropped)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    flat = list(chain.from_iterable(doc + [tokenizer.eos_token_id] for doc in ids))
    n_blocks = len(flat) // seq_len
    if n_blocks == 0:
        raise ValueError(f"{len(flat)} tokens do not fill one block of seq_len={seq_len}; add data or lower seq_len")
    return Dataset.from_dict({"input_ids": [flat[i * seq_len : (i + 1) * seq_len] for i in range(n_blocks)]})


class PackedBlocks:
    """Data collator for `pack`'s blocks, read from the dataset in torch format: the batch
    DataCollatorForLanguageModeling(mlm=False) builds (input_ids, an all-ones attention_mask,
    labels = input_ids with pad set to -100), the same int64 tensors, stacked directly instead
    of through tokenizer.pad over Python lists (about 1 ms of every step)."""

    def __init__(self, pad_token_id: int | None) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = torch.stack([row["input_ids"] for row in rows])
        labels = input_ids.clone()
        if self.pad_token_id is not None:
            labels[labels == self.pad_token_id] = -100
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


class LMTrainer(ExactResume, Trainer):
    def evaluate(self, *args, **kwargs):
        with router_logits_off(self.model):  # report the LM loss alone, not LM + aux
            return super().evaluate(*args, **kwargs)


class Throughput(TrainerCallback):
    """Training tokens per second over the steps this process ran: a resumed prefix is not
    counted, and the periodic evaluations are subtracted from the clock."""

    def __init__(self, tokens_per_step: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.tokens_per_second = 0.0
        self.eval_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_step = time.perf_counter(), state.global_step

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.eval_seconds += (metrics or {}).get("eval_runtime", 0.0)

    def on_train_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self.start - self.eval_seconds
        self.tokens_per_second = (state.global_step - self.start_step) * self.tokens_per_step / max(elapsed, 1e-9)


def validate(cfg, input_path: Path | None) -> None:
    """Config errors, raised as ConfigError before any compute."""
    if input_path is None:
        model_config = OmegaConf.to_container(cfg.model.config, resolve=True)
        check_model_config(model_config)
        vocab = model_config.get("vocab_size")
        if vocab is not None and int(vocab) < int(cfg.stages.pretrain.tokenizer_vocab_size):
            raise ConfigError(f"model.config.vocab_size={vocab} is below stages.pretrain.tokenizer_vocab_size="
                              f"{cfg.stages.pretrain.tokenizer_vocab_size}; raise it or drop the override")
    if input_path is None and cfg.task.get("calculator") and not cfg.stages.pretrain.get("tokenizer_tools"):
        raise ConfigError("task.calculator=true: sft trains on calculator calls, and the tokenizer pretrain trains "
                          "would render no tool calls; set stages.pretrain.tokenizer_tools=true (preset=demo_tools does)")


def setup_tokenizer(ctx):
    """The input checkpoint's tokenizer (stages.pretrain.init or model.path), or one trained on
    the task's texts for a model built from config."""
    source = ctx.input_path
    if source:
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=ctx.trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    tokenizer_dir = ctx.stage_dir / "tokenizer"
    need_tokenizer = not (tokenizer_dir / "tokenizer.json").exists()  # a resumed run reuses the first run's
    distributed.barrier()  # every rank has looked before the main process writes
    if need_tokenizer:
        if distributed.is_main_process():
            with_tools = bool(ctx.stage_cfg.get("tokenizer_tools", False))
            texts = ctx.task.pretrain_texts() + (ctx.task.tool_call_texts() if with_tools else [])
            tokenizer = train_tokenizer(texts, int(ctx.stage_cfg.tokenizer_vocab_size), tools=with_tools)
            tmp = ctx.stage_dir / ".tokenizer.tmp"
            tokenizer.save_pretrained(tmp)
            tmp.replace(tokenizer_dir)
        distributed.barrier()
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def setup_model(ctx, tokenizer):
    """The input checkpoint, or a model built from config sized to the tokenizer. Called after
    the TrainingArguments exist, so that under a ZeRO-3 launch transformers partitions it as it
    loads or builds it."""
    if ctx.input_path:
        return load_model(str(ctx.input_path), ctx.trust_remote_code, ctx.attn_implementation())
    return build_model(ctx.model, tokenizer, ctx.attn_implementation())


def run(ctx) -> dict[str, float]:
    cfg = ctx.stage_cfg
    tokenizer = setup_tokenizer(ctx)
    train_data = pack(tokenizer, ctx.task.pretrain_texts(), cfg.seq_len)
    eval_data = pack(tokenizer, ctx.task.eval_texts(), cfg.seq_len)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * distributed.world_size()
    throughput, optimizer_state = Throughput(tokens_per_step), OptimizerStateSize()
    args = build_training_args(TrainingArguments, cfg, ctx.optim, None, ctx.stage_dir, ctx.seed, ctx.shared_arguments())
    model = setup_model(ctx, tokenizer)
    weights_at_load = distributed.resident_parameter_bytes(model)
    set_router_aux_loss(model, True)
    trainer = LMTrainer(
        model=model,
        args=args,
        train_dataset=train_data.with_format("torch"),
        eval_dataset=eval_data.with_format("torch"),
        data_collator=PackedBlocks(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[throughput, optimizer_state],
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(ctx.optim, args.learning_rate),
    )
    train_output = preemption.train(trainer, ctx)
    eval_metrics = trainer.evaluate()

    set_router_aux_loss(model, False)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    artifacts.save_final(ctx.stage_dir, trainer.save_model, ctx.save_dtype())

    problems = ctx.task.eval_problems()[: cfg.eval_problems]
    with ctx.autocast():
        result = evaluate(
            model, tokenizer, ctx.task, problems, prompt_format="text",
            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
        )
    if distributed.is_main_process():
        plot_loss(trainer.state.log_history, ctx.stage_dir / "loss.png", "pretrain loss")
    trainable, total = count_parameters(model)
    first_loss, last_loss = first_and_last_loss(trainer.state.log_history)
    return {
        "eval_loss": eval_metrics["eval_loss"],
        "eval_perplexity": math.exp(eval_metrics["eval_loss"]),
        "eval_accuracy": result.accuracy,
        "eval_tokens_per_problem": result.tokens_per_problem,
        "eval_num_problems": result.num_problems,
        "train_loss": last_loss,
        "train_loss_first": first_loss,
        "train_steps": trainer.state.global_step,
        "train_epochs": trainer.state.epoch,
        "world_size": distributed.world_size(),
        "weights_mb_at_load": weights_at_load / 2**20,
        "resumed_at_step": throughput.start_step,
        "train_tokens": trainer.state.global_step * tokens_per_step,
        "tokens_per_second": throughput.tokens_per_second,
        "optimizer_state_mb": optimizer_state.megabytes,  # this rank's; a ZeRO shard
        "total_parameters": total,
        "trainable_parameters": trainable,
        "train_runtime_s": train_output.metrics.get("train_runtime", 0.0),
    }

