"""The `trainer` group: how every training stage runs (mixed precision, attention kernel,
activation memory, experiment tracking), read through this one helper so the stages agree.

    TrainingArguments(..., **trainer_settings.arguments(cfg, "sft", stage_dir))
    load_model(path, attn_implementation=trainer_settings.attn_implementation(cfg, "sft"))

A stage overrides any key under `stages.<stage>.trainer` (e.g. stages.grpo.trainer.precision=fp32).
`check(cfg, stages)` refuses, before any compute, a setting this machine cannot run.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import contextlib
import dataclasses
import json

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import TrainingArguments

from pipeline.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
# attention kernels that need a package and a CUDA GPU: (import name, pip name)
ATTENTION_PACKAGES = {"flash_attention_2": ("flash_attn", "flash-attn"), "flash_attention_3": ("flash_attn_interface", "flash-attn-3")}
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
# transformers 5.24 renamed gradient_checkpointing (now a deprecated alias); older 5.x has only the old name
CHECKPOINTING = next(name for name in ("activation_checkpointing", "gradient_checkpointing")
                     if name in {f.name for f in dataclasses.fields(TrainingArguments)})


def stage_group(cfg, group: str, stage: str) -> DictConfig:
    """A config group as one stage sees it: the mapping under stages.<stage>.<group> merged over
    cfg.<group> (null: the group as it is). Serves `trainer` and `optim`."""
    override = cfg.stages[stage].get(group) if stage in cfg.stages else None
    if not override:
        return cfg[group]
    merged = OmegaConf.merge(OmegaConf.to_container(cfg[group], resolve=True), OmegaConf.to_container(override, resolve=True))
    OmegaConf.set_readonly(merged, True)
    return merged


def settings(cfg, stage: str) -> DictConfig:
    """The trainer group as `stage` sees it: stages.<stage>.trainer merged over cfg.trainer."""
    return stage_group(cfg, "trainer", stage)


def precision(cfg, stage: str) -> str:
    """bf16, fp16 or fp32; `auto` is bf16 on a CUDA device that supports it, else fp32."""
    chosen = str(settings(cfg, stage).precision)
    if chosen == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return chosen


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def forward_dtype(cfg, stage: str) -> torch.dtype:
    """The dtype in which `stage` loads the models it only runs forward: DPO's and GRPO's
    reference, the reward model that scores, test_time's policy."""
    return DTYPES[precision(cfg, stage)]


def policy_dtype(cfg, stage: str, input_path: Path | None, peft_method: str) -> torch.dtype:
    """The dtype in which `stage` loads the model it trains. Full fine-tuning: fp32, the master
    weights the optimizer updates (trainer.precision is the autocast). With an adapter (peft) the
    base stays frozen and only runs forward, so it is loaded in the forward dtype when the
    checkpoint is stored in that dtype: a bf16 checkpoint under bf16 takes half the bytes and
    nothing is rounded. A wider checkpoint (fp32) stays fp32, so that LoRA's merge into it at
    hand-off rounds nothing either. The adapter's own weights are fp32 (PEFT upcasts them)."""
    forward = forward_dtype(cfg, stage)
    if peft_method == "none" or forward == torch.float32 or checkpoint_dtype(input_path) != forward:
        return torch.float32
    return forward


def reference(cfg, stage: str) -> dict:
    """DPOConfig/GRPOConfig fields that load the frozen reference in the stage's forward dtype.
    (TRL builds it from the policy's path with args.model_init_kwargs; its warning that the
    kwargs are ignored for an instantiated policy is about the policy, not the reference.)"""
    dtype = forward_dtype(cfg, stage)
    return {} if dtype == torch.float32 else {"model_init_kwargs": {"dtype": dtype}}


def reference_dtype(trainer) -> dict[str, str]:
    """{"reference_dtype": ...} for metrics.json when the trainer holds a separate reference model."""
    ref = getattr(trainer, "ref_model", None)
    if ref is None:
        return {}
    ref = getattr(ref, "module", ref)  # a DeepSpeed engine wraps it
    return {"reference_dtype": str(next(ref.parameters()).dtype).removeprefix("torch.")}


def autocast(cfg, stage: str):
    """A context in which the model a stage trained (fp32 master weights) is evaluated at the
    stage's precision, as the trainer ran its forward passes."""
    chosen = precision(cfg, stage)
    if chosen == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=DTYPES[chosen])


def checkpoint_dtype(path: Path | None) -> torch.dtype:
    """The dtype a Hugging Face checkpoint's config.json records (fp32 when it records none, or
    for None: a model built from config)."""
    config = Path(path) / "config.json" if path is not None else None
    if config is None or not config.is_file():
        return torch.float32
    recorded = json.loads(config.read_text())
    name = recorded.get("dtype") or recorded.get("torch_dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


def save_dtype(cfg, stage: str, input_path: Path | None) -> torch.dtype:
    """The dtype of the stage's final/ weights: save_dtype auto = the input checkpoint's (a bf16
    model stays bf16; a model built from config saves in fp32)."""
    chosen = str(settings(cfg, stage).save_dtype)
    return checkpoint_dtype(input_path) if chosen == "auto" else DTYPES[chosen]


def attn_implementation(cfg, stage: str) -> str | None:
    """What to pass as `attn_implementation` to from_pretrained/from_config (None: transformers' choice)."""
    chosen = str(settings(cfg, stage).attn_implementation)
    return None if chosen == "auto" else chosen


def report_to(cfg, stage: str) -> list[str]:
    value = settings(cfg, stage).report_to
    names = [str(value)] if isinstance(value, str) else [str(v) for v in value]
    return [n for n in names if n != "none"]


# what a stage's training_args() uses when no settings are passed (tests building arguments alone)
PLAIN = {"bf16": False, "fp16": False, CHECKPOINTING: False, "report_to": [], "dataloader_pin_memory": False}


def arguments(cfg, stage: str, stage_dir: Path) -> dict:
    """TrainingArguments fields every training stage shares (TRL's configs inherit them)."""
    s = settings(cfg, stage)
    chosen = precision(cfg, stage)
    trackers = report_to(cfg, stage)
    if "tensorboard" in trackers:
        # transformers' TensorBoardCallback takes its directory from this variable when the
        # trainer is built: the event files land in the stage dir, so `tensorboard --logdir
        # outputs` shows one run per stage named <run.name>/<stage>, and a replaced stage's
        # curves move to superseded/ with it
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(stage_dir)
    cpu_bf16 = chosen == "bf16" and not torch.cuda.is_available()
    return dict(
        bf16=chosen == "bf16",  # mixed precision: master weights and optimizer state stay fp32
        **({"use_cpu": True} if cpu_bf16 else {}),  # transformers allows bf16 without a GPU only so (CPU autocast)
        fp16=chosen == "fp16",
        **{CHECKPOINTING: bool(s.gradient_checkpointing),
           f"{CHECKPOINTING}_kwargs": {"use_reentrant": False} if s.gradient_checkpointing else None},
        report_to=trackers,
        run_name=f"{cfg.run.name}/{stage}",
        use_liger_kernel=bool(s.use_liger_kernel),
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def check(cfg, stages: list[str], trains: list[str] | None = None) -> None:
    """ConfigError, naming the key and the fix, for a setting that cannot run here: for every
    stage that runs models under the trainer group, and the trackers of those that train
    (`trains`; all of `stages` when None)."""
    trains = stages if trains is None else trains
    for stage in stages:
        s = settings(cfg, stage)
        key = f"stages.{stage}.trainer" if cfg.stages[stage].get("trainer") else "trainer"
        if s.precision not in PRECISIONS:
            raise ConfigError(f"{key}.precision={s.precision}: must be one of {', '.join(PRECISIONS)}")
        if s.precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError(f"{key}.precision=fp16 needs a CUDA GPU (none here); use bf16 (CPU autocast) or fp32")
        if s.precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"{key}.precision=bf16: this GPU does not support bf16; use fp16 or fp32 (or auto)")
        attention = str(s.attn_implementation)
        if attention not in ATTENTION:
            raise ConfigError(f"{key}.attn_implementation={attention}: must be one of {', '.join(ATTENTION)}")
        if attention in ATTENTION_PACKAGES:
            module, package = ATTENTION_PACKAGES[attention]
            if not torch.cuda.is_available():
                raise ConfigError(f"{key}.attn_implementation={attention} needs a CUDA GPU (none here); use sdpa or eager")
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"{key}.attn_implementation={attention} needs the {package} package "
                                  f"(pip install {package}); or use sdpa")
        for name in report_to(cfg, stage) if stage in trains else ():
            if name not in TRACKERS:
                raise ConfigError(f"{key}.report_to={name}: must be none or any of {', '.join(TRACKERS)}")
            if importlib.util.find_spec(name) is None:
                raise ConfigError(f"{key}.report_to={name} needs the {name} package (pip install {name}); "
                                  "or set trainer.report_to=none")
        if s.use_liger_kernel:
            if not torch.cuda.is_available():
                raise ConfigError(f"{key}.use_liger_kernel=true needs a CUDA GPU (none here); set it to false")
            if importlib.util.find_spec("liger_kernel") is None:
                raise ConfigError(f"{key}.use_liger_kernel=true needs the liger-kernel package (pip install liger-kernel)")
