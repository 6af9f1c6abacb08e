"""Preemption: stop at a step boundary, save a checkpoint, exit with the requeue code.

Two ways to ask: a signal (SIGUSR1 or SIGTERM, e.g. SLURM's warning before the time limit
or a plain `kill`) or a flag file `<run.dir>/.preempt` (what the sbatch scripts touch, since
the signal reaches the batch shell, not every rank on every node). Ranks agree on the step to
stop at with an all-reduce, so no rank leaves a collective the others are still in.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import TrainOutput

from pipeline import artifacts, distributed
from pipeline.resume import ExactResume, StopAtMaxSteps, TrainingAlreadyComplete

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; the sbatch scripts requeue on it
FLAG_FILE = ".preempt"
_requested = False


class Preempted(Exception):
    """Raised by a stage after its checkpoint is on disk; the runner exits with REQUEUE_EXIT_CODE."""


def _handle(signum, frame) -> None:
    global _requested
    if _requested:  # a second signal: stop now, the checkpoint of the first may never come
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
    _requested = True
    print(f"[pipeline] received {signal.Signals(signum).name}: saving a checkpoint at the next step", flush=True)


def install_handlers() -> None:
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, _handle)


def requested(run_dir: Path) -> bool:
    """True on every rank if any rank was asked to stop."""
    local = _requested or (run_dir / FLAG_FILE).exists()
    if distributed.world_size() == 1:
        return local
    flag = torch.tensor([int(local)], device=distributed.state().device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


class PreemptionCallback(TrainerCallback):
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.triggered = False

    def on_step_end(self, args, state, control, **kwargs):
        if requested(self.run_dir):
            self.triggered = True
            control.should_save = True
            control.should_training_stop = True


class CheckpointPermissions(TrainerCallback):
    """A saved checkpoint's files get the umask's permissions (safetensors writes 0600)."""

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            artifacts.apply_umask(checkpoint)


class ProgressLine(TrainerCallback):
    """One plain log line per tenth of the stage's steps, with its ETA, for logs where the
    progress bar is unreadable (SLURM output files, `tee`)."""

    def __init__(self, stage: str, every_fraction: float = 0.1) -> None:
        self.stage, self.every_fraction = stage, every_fraction

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.first_step = time.perf_counter(), state.global_step
        self.every = max(1, round(state.max_steps * self.every_fraction))

    def on_step_end(self, args, state, control, **kwargs):
        done = state.global_step - self.first_step
        if not distributed.is_main_process() or done <= 0 or (state.global_step % self.every and state.global_step != state.max_steps):
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (state.max_steps - state.global_step)
        print(f"[pipeline] {self.stage}: step {state.global_step}/{state.max_steps}, {elapsed:.0f}s elapsed, "
              f"ETA {eta:.0f}s (training steps only)", flush=True)


def train(trainer, ctx):
    """`trainer.train()` that resumes from the stage's checkpoint and raises Preempted when
    it stopped early on request (its checkpoint is saved by then). A resume from the checkpoint
    saved at max_steps trains no further step and returns the checkpoint's state."""
    if ctx.resume_checkpoint is not None and not isinstance(trainer, ExactResume):
        raise TypeError(f"{type(trainer).__name__} must list pipeline.resume.ExactResume first to resume exactly")
    # what the trainer really runs (accelerate's setting), whatever the config asked for
    ctx.shared_metrics["mixed_precision"] = str(trainer.accelerator.mixed_precision)
    callback = PreemptionCallback(ctx.run_dir)
    trainer.add_callback(callback)
    trainer.add_callback(StopAtMaxSteps())
    trainer.add_callback(ProgressLine(ctx.name))
    trainer.add_callback(CheckpointPermissions())
    try:
        output = trainer.train(resume_from_checkpoint=str(ctx.resume_checkpoint) if ctx.resume_checkpoint else None)
    except TrainingAlreadyComplete:
        trainer.control = trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
        return TrainOutput(trainer.state.global_step, 0.0, {"train_runtime": 0.0})
    if callback.triggered:
        raise Preempted(f"stopped at step {trainer.state.global_step}; checkpoint-{trainer.state.global_step} saved")
    return output
