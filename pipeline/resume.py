"""Exact resume: a stage killed at any step and rerun ends with the weights an uninterrupted run
would have.

The Trainer resumes a plain model by reading checkpoint-N/model.safetensors into it with a
non-strict `load_state_dict`. transformers v5 saves fused MoE expert tensors one tensor per
expert (its save-time conversion), so those keys match nothing, the trained experts are
silently left at their initial values, and the run goes on. `ExactResume`
loads the weights through `from_pretrained` instead, which applies the same key conversion as
any other load, and refuses to continue if a tensor is missing, unexpected or of another shape.

Every stage's trainer class lists `ExactResume` first; `pipeline.preemption.train` checks it.
"""

from __future__ import annotations

import os

import torch
from transformers import PreTrainedModel, TrainerCallback
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from pipeline import compat


class ResumeError(RuntimeError):
    """A checkpoint that cannot restore the model exactly."""


def load_checkpoint_weights(model: PreTrainedModel, checkpoint: str) -> None:
    """Load checkpoint's weights into `model` in place, with from_pretrained's key conversion;
    ResumeError if any tensor is missing, unexpected or mismatched. Costs one extra CPU copy of
    the weights while it runs."""
    dtype = next(model.parameters()).dtype
    saved, info = type(model).from_pretrained(
        checkpoint, config=model.config, dtype=dtype, output_loading_info=True
    )
    problems = {kind: info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(kind)}
    if problems:
        detail = "; ".join(f"{kind}: {sorted(map(str, keys))[:6]}" for kind, keys in problems.items())
        raise ResumeError(
            f"{checkpoint} does not hold this model's weights ({detail}); resuming would train from partly "
            "initial weights. Move the stage directory aside (or run.force=true) to start the stage again"
        )
    result = model.load_state_dict(saved.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:  # names that from_pretrained tied or renamed
        raise ResumeError(f"{checkpoint}: after loading, missing {result.missing_keys[:6]}, "
                          f"unexpected {result.unexpected_keys[:6]}")


class ExactResume:
    """Trainer mixin: resume a plain (non-PEFT, non-FSDP) model's weights exactly. PEFT adapters,
    FSDP and DeepSpeed checkpoints keep the Trainer's own loading, which stores and restores
    them in the model's own layout."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # a private Trainer method (pipeline/compat.py)
        compat.require("transformers:Trainer")
        model = self.model if model is None else model
        plain = isinstance(model, PreTrainedModel) and not getattr(self, "is_fsdp_enabled", False)
        has_weights = any(
            os.path.isfile(os.path.join(resume_from_checkpoint, name)) for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
        )
        if not (plain and has_weights):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        with torch.no_grad():
            load_checkpoint_weights(model, resume_from_checkpoint)


class TrainingAlreadyComplete(Exception):
    """Raised before a step that would go past max_steps (see StopAtMaxSteps)."""


class StopAtMaxSteps(TrainerCallback):
    """The Trainer checks max_steps after a step, so resuming from the checkpoint saved at
    max_steps would train one step more. This stops it before that step: by then the Trainer has
    loaded the checkpoint's weights, optimizer and state, so the model is the finished one."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise TrainingAlreadyComplete()
