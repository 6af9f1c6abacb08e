"""The one builder of a training stage's arguments: `TrainingArguments` or the TRL config that
inherits it. It fills what every training stage shares, from the stage's config (steps, batch,
accumulation, eval/save/log cadence), its optimizer group (pipeline/optim.py) and the trainer
group (pipeline/trainer_settings.py); a recipe passes only the fields its method adds.

    args = build_training_args(SFTConfig, stage_cfg, optim_cfg, peft_cfg, stage_dir, seed, shared,
                               max_length=stage_cfg.max_length, packing=...)
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from transformers import TrainingArguments

from pipeline.optim import learning_rate, trainer_kwargs
from pipeline.trainer_settings import PLAIN

Args = TypeVar("Args", bound=TrainingArguments)


def build_training_args(config_cls: type[Args], stage_cfg, optim_cfg, peft_cfg, output_dir: Path, seed: int, shared: dict | None = None,
          *, evaluate: bool = True, **method) -> Args:
    """`config_cls` filled from the stage config and the optim group; `peft_cfg` None for a stage
    that trains no adapter (its lr is its own or the optim group's); `shared` is
    trainer_settings.arguments() (precision, checkpointing, tracking), None: PLAIN (tests building
    arguments alone); `evaluate` False for a stage whose trainer runs no eval loop (grpo measures
    its own); `method` the fields the stage's method adds, which win over the shared ones."""
    fields = dict(
        output_dir=str(output_dir),
        max_steps=stage_cfg.max_steps,
        per_device_train_batch_size=stage_cfg.batch_size,
        gradient_accumulation_steps=stage_cfg.grad_accum,
        save_strategy="steps",
        save_steps=stage_cfg.save_steps,
        save_total_limit=stage_cfg.save_total_limit,
        logging_steps=stage_cfg.logging_steps,
        seed=int(seed),
        **(shared if shared is not None else PLAIN),
        **trainer_kwargs(optim_cfg, learning_rate(stage_cfg, peft_cfg)),
    )
    if evaluate:
        fields.update(per_device_eval_batch_size=stage_cfg.batch_size, eval_strategy="steps", eval_steps=stage_cfg.eval_steps)
    return config_cls(**{**fields, **method})
