"""What the pipeline needs from TRL and transformers beyond their public API, in one place.

Each entry names the private method or field, the code that relies on it, the version it was
written against, and the public hook that would replace it. `problems()` compares the installed
libraries with the entries (a method gone or its parameters changed); the classes that override
them call `require` when they are built, so a library upgrade that breaks an override stops the
stage with the entry's text rather than training wrongly. tests/unit/test_compat.py runs it on
the pinned versions and holds pyproject's lower bounds of these libraries to the versions written
against.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from importlib import metadata


@dataclass(frozen=True)
class PrivateHook:
    owner: str  # "module:Class"
    name: str  # the private method (or a field of what it returns)
    parameters: tuple[str, ...]  # its parameters after self, as written against
    used_by: str
    written_against: str  # "package version"
    public_replacement: str

    @property
    def package(self) -> str:
        return self.written_against.split()[0]

    def problem(self) -> str | None:
        """Why the installed library no longer fits this override, or None."""
        module, cls = self.owner.split(":")
        method = getattr(getattr(importlib.import_module(module), cls), self.name, None)
        if method is None:
            return f"{cls}.{self.name} is gone"
        found = tuple(p for p in inspect.signature(method).parameters if p != "self")
        if found != self.parameters:
            return f"{cls}.{self.name} now takes {found}, not {self.parameters}"
        return None


HOOKS = (
    PrivateHook(
        "trl:GRPOTrainer", "_generate", ("prompts",),
        used_by="pipeline/grpo_trainer.py: router logits off while generating (MoE), the rollout timer",
        written_against="trl 1.16.0",
        public_replacement="a generation-context argument or callback around GRPOTrainer's rollouts",
    ),
    PrivateHook(
        "trl:GRPOTrainer", "_calculate_rewards", ("inputs", "prompts", "completions", "completion_ids_list"),
        used_by="pipeline/grpo_trainer.py: keeps each batch's per-function rewards for zero-variance weighting",
        written_against="trl 1.16.0",
        public_replacement="a callback that sees each batch's rewards",
    ),
    PrivateHook(
        "trl:GRPOTrainer", "_generate_and_score_completions", ("inputs",),
        used_by="pipeline/grpo_trainer.py: per-row loss weights of zero-variance groups, added to the returned "
                "batch as `row_weights` with a weighted `num_items_in_batch` (compute_loss applies them where TRL "
                "applies its `tool_mask`: the loss, its normaliser, the KL and the entropy); writes the trainer's "
                "private `_metrics`",
        written_against="trl 1.16.0",
        public_replacement="per-completion loss weights returned by a reward hook, and a public metrics logger",
    ),
    PrivateHook(
        "transformers:Trainer", "_load_from_checkpoint", ("resume_from_checkpoint", "model"),
        used_by="pipeline/resume.py: a plain model's checkpoint weights loaded through from_pretrained's key "
                "conversion (MoE experts) and refused when a tensor does not match",
        written_against="transformers 5.24.0",
        public_replacement="a strict load with from_pretrained's key conversion in the Trainer's own resume",
    ),
)


def problems(hooks: tuple[PrivateHook, ...] = HOOKS) -> list[str]:
    """One line per override the installed libraries no longer fit."""
    lines = []
    for hook in hooks:
        problem = hook.problem()
        if problem:
            installed = metadata.version(hook.package)
            lines.append(f"{problem} ({hook.package} {installed} installed; {hook.used_by} was written against "
                         f"{hook.written_against}; the public hook that would replace it: {hook.public_replacement})")
    return lines


def require(owner: str) -> None:
    """RuntimeError naming every override of `owner` ("module:Class") the installed library breaks."""
    found = problems(tuple(h for h in HOOKS if h.owner == owner))
    if found:
        raise RuntimeError("the installed library does not fit this pipeline's overrides (pipeline/compat.py): "
                           + "; ".join(found) + ". Install the versions of constraints.txt")
