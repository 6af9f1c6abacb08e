"""Optimizer + schedule factory: turns the `optim` config group into trainer arguments.

Every training stage (Trainer or TRL) builds its trainer with

    TrainingArguments(..., **trainer_kwargs(cfg.optim, lr))
    Trainer(..., optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(cfg.optim, lr))

so one optim group serves them all; a stage may override the learning rate with its own `lr`.
optim=adamw is the Trainer's own AdamW. optim=muon is the Muon/AdamW hybrid of
pipeline/muon.py, which the Trainer builds through its optimizer-factory hook when training
starts (under DeepSpeed inside deepspeed.initialize), and schedules, clips and checkpoints
like any optimizer. TRL trainers whose constructor lacks the argument (trl 1.16: DPO, GRPO)
take it as `trainer.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(...)` before train().
"""

from __future__ import annotations

import os

from transformers import TrainerCallback

from pipeline import distributed
from pipeline.config import group_defaults
from pipeline.muon import MuonSettings, build_optimizer
from pipeline.trainer_settings import stage_group

VALID = ("adamw", "muon")
MUON_DEFAULTS = group_defaults("optim", "muon")
DEEPSPEED_MUON_STAGES = (1, 2, 3)


def stage_optim(cfg, stage: str):
    """The optim group as one stage sees it: `stages.<stage>.optim` (a mapping, e.g.
    {name: muon, max_grad_norm: 0}) merged over the `optim` group; null leaves the group as is."""
    return stage_group(cfg, "optim", stage)


def learning_rate(stage_cfg, peft_cfg=None) -> float | None:
    """A stage's learning rate: its own `lr`, else the peft group's (for a stage that trains
    through it: the rate that suits full fine-tuning or the adapter), else None: the optim
    group's `lr` (trainer_kwargs)."""
    if stage_cfg.get("lr") is not None:
        return float(stage_cfg.lr)
    if peft_cfg is not None and peft_cfg.get("lr") is not None:
        return float(peft_cfg.lr)
    return None


def trainer_kwargs(optim_cfg, lr: float | None = None) -> dict:
    """TrainingArguments fields for the configured optimizer and schedule."""
    check_supported(optim_cfg)
    beta1, beta2 = optim_cfg.betas
    return dict(
        # torch's fused AdamW (CPU and CUDA): one kernel per tensor and no temporaries; the
        # single-tensor one (torch's CPU default) holds twice the largest parameter during the
        # step, the foreach one (CUDA default) 4 bytes per trained parameter (docs/memory.md).
        # optim=muon: replaced by optimizer_cls_and_kwargs
        optim="adamw_torch_fused",
        learning_rate=float(lr if lr is not None else optim_cfg.lr),
        weight_decay=float(optim_cfg.weight_decay),
        adam_beta1=float(beta1),
        adam_beta2=float(beta2),
        adam_epsilon=float(optim_cfg.eps),
        lr_scheduler_type=str(optim_cfg.scheduler),
        # transformers 5 has no warmup_ratio: warmup_steps below 1 is the fraction of the total steps
        warmup_steps=float(optim_cfg.warmup_ratio),
        max_grad_norm=float(optim_cfg.max_grad_norm),
        ddp_backend=distributed.backend(),
    )


def optimizer_cls_and_kwargs(optim_cfg, lr: float | None = None) -> tuple | None:
    """The Trainer's `optimizer_cls_and_kwargs`: None (the Trainer's AdamW) or the Muon hybrid."""
    check_supported(optim_cfg)
    if optim_cfg.name != "muon":
        return None
    return muon_factory, {"settings": muon_settings(optim_cfg, lr), "deepspeed": distributed.deepspeed_config() is not None}


def muon_factory():
    """transformers calls `factory()(model, **kwargs)` for an optimizer that needs the model."""
    return build_optimizer


def muon_settings(optim_cfg, lr: float | None = None) -> MuonSettings:
    lr = float(lr if lr is not None else optim_cfg.lr)
    return MuonSettings(
        lr=lr,
        muon_lr=float(optim_cfg.muon_lr) if optim_cfg.get("muon_lr") is not None else lr,
        weight_decay=float(optim_cfg.weight_decay),
        betas=tuple(float(b) for b in optim_cfg.betas),
        eps=float(optim_cfg.eps),
        # a stage that switches to muon over an adamw group (stages.<stage>.optim) gets muon.yaml's defaults
        momentum=float(optim_cfg.get("momentum", MUON_DEFAULTS.momentum)),
        adjust_lr=str(optim_cfg.get("adjust_lr", MUON_DEFAULTS.adjust_lr)),
    )


def check_supported(optim_cfg) -> None:
    """Refuse, before training starts, an optimizer the launch cannot run, saying what to change."""
    if optim_cfg.name not in VALID:
        raise ValueError(f"optim={optim_cfg.name!r} is not available; valid: {', '.join(VALID)}")
    if optim_cfg.name != "muon":
        return
    muon_settings(optim_cfg)  # checks adjust_lr
    if distributed.launcher_sharding() == "fsdp":
        raise ValueError("optim=muon does not run under FSDP: Muon orthogonalises whole matrices and FSDP shards "
                         "them. Launch with DeepSpeed ZeRO instead (conf/accelerate/zero{1,2,3}.yaml).")
    ds_config = distributed.deepspeed_config()
    if ds_config is None:
        return
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage not in DEEPSPEED_MUON_STAGES:
        raise ValueError(f"optim=muon under DeepSpeed needs ZeRO stage 1, 2 or 3 (DeepSpeed runs Muon in its ZeRO "
                         f"code), the config has stage {stage}; launch with conf/accelerate/zero{{1,2,3}}.yaml")
    if stage == 3 and zero.get("reduce_scatter", True) is not False:
        # Refused rather than patched: the setting lives in the launch's DeepSpeed config, which
        # accelerate hands to every rank before this code runs.
        raise ValueError(f"optim=muon under ZeRO-3 needs \"reduce_scatter\": false in zero_optimization (DeepSpeed "
                         f"gathers whole matrices for Muon); the launch's DeepSpeed config ({deepspeed_source()}) "
                         "does not set it. Launch with conf/accelerate/zero3.yaml (its conf/deepspeed/zero3.json sets "
                         "it) or add it to your DeepSpeed json")
    if "optimizer" in ds_config:
        raise ValueError("the DeepSpeed config has an \"optimizer\" section, which would replace optim=muon; "
                         "remove it (conf/deepspeed/*.json leave the optimizer to the optim group)")
    if float(optim_cfg.max_grad_norm) > 0:
        raise ValueError(f"optim=muon under DeepSpeed ZeRO needs optim.max_grad_norm=0: DeepSpeed would clip the "
                         f"orthogonalised Muon update together with the gradients, not the gradients "
                         f"(got {optim_cfg.max_grad_norm})")


def deepspeed_source() -> str:
    """Where the launch's DeepSpeed config comes from, for messages."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    return path if path != "none" else "zero_stage set inline in the accelerate config"


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state (moments, momentum buffers) this process holds; under ZeRO, its
    shard. Unwraps accelerate's and DeepSpeed's wrappers down to the torch optimizer."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    tensors = {}
    for per_param in optimizer.state.values():
        for value in per_param.values():
            if hasattr(value, "untyped_storage"):
                tensors[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(tensors.values())


class OptimizerStateSize(TrainerCallback):
    """Records optimizer_state_bytes at the end of training (the state exists after a step)."""

    def __init__(self) -> None:
        self.megabytes = 0.0

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            self.megabytes = optimizer_state_bytes(optimizer) / 2**20
