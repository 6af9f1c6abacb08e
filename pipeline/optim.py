"""Optimizer + schedule factory: turns the `optim` config group into trainer arguments.

Every training stage (Trainer or TRL) takes these keyword arguments, so one optim group
serves them all; a stage may override the learning rate with its own `lr`.
"""

from __future__ import annotations

from pipeline import distributed

VALID = ("adamw",)


def trainer_kwargs(optim_cfg, lr: float | None = None) -> dict:
    """TrainingArguments fields for the configured optimizer and schedule."""
    if optim_cfg.name not in VALID:
        raise ValueError(f"optim={optim_cfg.name!r} is not available; valid: {', '.join(VALID)}")
    beta1, beta2 = optim_cfg.betas
    return dict(
        optim="adamw_torch",
        learning_rate=float(lr if lr is not None else optim_cfg.lr),
        weight_decay=float(optim_cfg.weight_decay),
        adam_beta1=float(beta1),
        adam_beta2=float(beta2),
        adam_epsilon=float(optim_cfg.eps),
        lr_scheduler_type=str(optim_cfg.scheduler),
        warmup_steps=float(optim_cfg.warmup_ratio),  # a float in [0, 1) is a ratio of total steps
        max_grad_norm=float(optim_cfg.max_grad_norm),
        ddp_backend=distributed.backend(),
    )
