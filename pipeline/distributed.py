"""Every distributed concern in one place: rank, world size, main process, barriers.

Each rank runs the whole Hydra entry point; they read the run directory, decide the same
thing, and only the main process writes manifests, reports and final/.
"""

from __future__ import annotations

import contextlib
import json
import os
from functools import cache
from pathlib import Path

import torch


@cache
def state():
    """The accelerate PartialState, created once, before any Trainer builds an Accelerator.

    Without a GPU the process group must use gloo, and it must exist before DeepSpeed or
    accelerate look at it, or they believe there is a single process.
    """
    from accelerate import PartialState

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        return PartialState(backend="gloo")
    return PartialState()


def is_main_process() -> bool:
    return state().is_main_process


def world_size() -> int:
    return state().num_processes


def backend() -> str | None:
    """The process-group backend (gloo on CPU), or None for a single process. TrainingArguments
    must be told it: it rebuilds the accelerate state and, without it, counts one process on a
    CPU DeepSpeed run, so DeepSpeed rejects the batch size."""
    return state().backend if world_size() > 1 else None


def barrier() -> None:
    # Not PartialState.wait_for_everyone(): on CPU launches (ACCELERATE_USE_CPU=1, gloo) the
    # state reports DistributedType.NO and its barrier is a no-op, though the group is up.
    if world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def launcher_sharding() -> str | None:
    """"deepspeed" or "fsdp" when `accelerate launch` was given such a config, else None."""
    for name in ("deepspeed", "fsdp"):
        if os.environ.get(f"ACCELERATE_USE_{name.upper()}", "false").lower() == "true":
            return name
    return None


def deepspeed_config() -> dict | None:
    """The DeepSpeed config of an `accelerate launch --config_file conf/accelerate/zero*.yaml`
    run (its json, or the stage set inline in the accelerate yaml), else None."""
    if launcher_sharding() != "deepspeed":
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path != "none":
        return json.loads(Path(path).read_text())
    return {"zero_optimization": {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))}}


def to_device_unless_sharded(model):
    """Put a model a stage samples from before its Trainer exists (dpo's on-policy pairs, grpo's
    prompt filter) on this process's device, as the Trainer would; under ZeRO/FSDP it stays where
    it is, for the launcher to partition (sampling then runs on the CPU)."""
    return model if launcher_sharding() else model.to(state().device)


def is_partitioned(model) -> bool:
    """Whether ZeRO-3 partitioned the model's parameters when it was loaded (from_pretrained does
    once the stage's TrainingArguments exist under a ZeRO-3 launch)."""
    parameters = getattr(model, "parameters", None)
    return parameters is not None and any(hasattr(p, "ds_tensor") for p in parameters())


def gathered(model):
    """A context in which a ZeRO-3-partitioned model is whole on every rank (deepspeed's
    GatheredParameters), for the sampling a stage does before its Trainer exists; a no-op for a
    model that is not partitioned."""
    if not is_partitioned(model):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def resident_parameter_bytes(model) -> int:
    """The bytes of the model's parameters this process holds: its ZeRO-3 shard when partitioned."""
    return sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in model.parameters())
