"""Every distributed concern in one place: rank, world size, main process, barriers.

Each rank runs the whole Hydra entry point; they read the run directory, decide the same
thing, and only the main process writes manifests, reports and final/.
"""

from __future__ import annotations

import os
from functools import cache

import torch


@cache
def state():
    """The accelerate PartialState, created once, before any Trainer builds an Accelerator.

    Without a GPU the process group must use gloo, and it must exist before DeepSpeed or
    accelerate look at it, or they believe there is a single process (DESIGN.md section 5).
    """
    from accelerate import PartialState

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        return PartialState(backend="gloo")
    return PartialState()


def is_main_process() -> bool:
    return state().is_main_process


def world_size() -> int:
    return state().num_processes


def barrier() -> None:
    # Not PartialState.wait_for_everyone(): on CPU launches (ACCELERATE_USE_CPU=1, gloo) the
    # state reports DistributedType.NO and its barrier is a no-op, though the group is up.
    if world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
