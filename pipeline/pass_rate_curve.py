"""grpo's held-out pass-rate curve: the pass rate against compute, measured before the first
step and every few steps by a TrainerCallback, kept in a JSONL file so a resumed run keeps its
points, and fitted with the ScaleRL sigmoid (pipeline.scaling) when training ends."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainerCallback

from pipeline import artifacts, distributed
from pipeline.log import log
from pipeline.scaling import fit_scaling, plot_scaling

CURVE_FILE = "pass_rate_curve.jsonl"


class PassRateCurve(TrainerCallback):
    """Held-out pass rate against compute, before the first step and every `every` steps.

    compute = (1 + num_iterations) * tokens of every rollout so far (TRL's num_input_tokens_seen,
    prompt + completion): each rollout token is generated (or prefilled) once and trained on
    num_iterations times. Points are appended to a JSONL file so a resumed run keeps them.
    Every rank measures (sharded models need all ranks to generate); the main process writes.
    """

    def __init__(self, measure: Callable[[torch.nn.Module], float], every: int, num_iterations: int, path: Path, seed: int):
        self.measure, self.every, self.path, self.seed = measure, every, path, seed
        self.tokens_to_compute = 1 + num_iterations
        self.points: list[dict] = []
        self.seconds = 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # points of an earlier, interrupted attempt up to the checkpoint it resumes from
        self.points = [p for p in read_curve(self.path) if p["step"] <= state.global_step]
        if distributed.is_main_process():
            artifacts.write_text_atomic(self.path, "".join(json.dumps(p) + "\n" for p in self.points))
        if not self.points or self.points[-1]["step"] < state.global_step:
            self.record(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            self.record(state, model)

    def record(self, state, model) -> None:
        start = time.perf_counter()
        # own seed per point, and the training RNG streams left as they were
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            torch.manual_seed(self.seed + state.global_step)
            rate = self.measure(model)
        self.seconds += time.perf_counter() - start
        tokens = int(state.num_input_tokens_seen)
        point = {"step": state.global_step, "tokens": tokens, "compute": self.tokens_to_compute * tokens, "pass_rate": rate}
        self.points.append(point)
        if distributed.is_main_process():
            with self.path.open("a") as f:
                f.write(json.dumps(point) + "\n")
        log(f"grpo step {state.global_step}: held-out pass rate {rate:.3f} at compute {point['compute']:.3g} tokens")


def read_curve(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def scaling_metrics(points: list[dict], warmup_fraction: float, stage_dir: Path) -> dict[str, float]:
    """Fit the ScaleRL curve to the pass-rate points (R0 fixed to the step-0 point when there is
    one), plot it, and return the fit parameters; a fit that cannot be made is logged and
    reported as scaling_fit_ok=0."""
    compute = [p["compute"] for p in points]
    rates = [p["pass_rate"] for p in points]
    r0 = next((p["pass_rate"] for p in points if p["compute"] == 0), None)
    metrics = {"scaling_points": float(len(points))}
    try:
        fit = fit_scaling(compute, rates, r0=r0, warmup_fraction=warmup_fraction)
    except ValueError as err:
        log(f"grpo: scaling fit skipped: {err} (stages.grpo.eval_every sets how often the pass rate is measured)")
        fit = None
    if distributed.is_main_process() and points:
        plot_scaling(stage_dir / "scaling_fit.png", compute, rates, fit, xlabel="compute (rollout + trained tokens)")
    metrics["scaling_fit_ok"] = float(fit is not None)
    if fit is not None:
        metrics.update(fit.as_metrics("scaling"))
    return metrics
