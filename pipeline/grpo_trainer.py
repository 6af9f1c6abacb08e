"""TRL's GRPOTrainer as grpo trains with it: zero-variance groups (every completion right, or
every one wrong: no learning signal) filtered out of, or down-weighted in, the loss normaliser
and the KL (`zero_variance`), router logits off while generating, and timers for the generation
share of each step."""

from __future__ import annotations

import time

import torch
from accelerate.utils import gather
from trl import GRPOTrainer

from pipeline import artifacts, compat, distributed
from pipeline.models import router_logits_off
from pipeline.report import plot_curves
from pipeline.resume import ExactResume

LOG_FILE = "log_history.json"
ROW_WEIGHTS = "row_weights"  # the batch field with each completion's loss weight (zero-variance groups)


def zero_variance_weights(rewards: torch.Tensor, num_generations: int, weight: float) -> torch.Tensor:
    """Per-completion loss weights: `weight` for completions of a group whose rewards are all
    equal (no learning signal: their advantage is 0), 1.0 for the others.

    rewards: (N,) total reward per completion, groups of num_generations consecutive rows
    (TRL's layout). Returns (N,) float. NaN rewards (unscorable) are ignored within a group.
    """
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    grouped = rewards.view(-1, num_generations)
    lo = torch.where(grouped.isnan(), torch.inf, grouped).amin(dim=1)
    hi = torch.where(grouped.isnan(), -torch.inf, grouped).amax(dim=1)
    flat = ~(hi - lo > 1e-6)  # also true for an all-NaN group
    per_group = torch.where(flat, torch.as_tensor(weight, dtype=torch.float32), torch.tensor(1.0))
    return per_group.to(rewards.device).repeat_interleave(num_generations)


class StageGRPOTrainer(ExactResume, GRPOTrainer):
    """TRL's GRPOTrainer plus: zero-variance group weighting, router logits off while
    generating, and timers for the generation share of each step."""

    def __init__(self, *args, zero_variance: str = "keep", zero_variance_weight: float = 0.0, **kwargs):
        self.zero_variance = zero_variance
        self.zero_variance_weight = 0.0 if zero_variance == "filter" else float(zero_variance_weight)
        self.generation_seconds = 0.0  # rollouts of training steps (not the held-out curve)
        self.train_step_seconds = 0.0
        self._group_rewards: torch.Tensor | None = None
        compat.require("trl:GRPOTrainer")
        super().__init__(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch):
        start = time.perf_counter()
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self.train_step_seconds += time.perf_counter() - start

    # The three overrides below are of private GRPOTrainer methods, for want of public hooks;
    # pipeline/compat.py lists them with the version they were written against and the public
    # hook that would replace each (TRL's own zero-variance handling is filtering by std in the
    # advantages only).
    def _generate(self, prompts):
        start = time.perf_counter()
        # MoE: router logits belong to the loss only; generate() with them on crashes
        with router_logits_off(self.accelerator.unwrap_model(self.model)):
            out = super()._generate(prompts)
        if self.model.training:
            self.generation_seconds += time.perf_counter() - start
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._group_rewards = rewards_per_func  # gathered over processes, groups of num_generations rows
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.zero_variance == "keep" or not self.model.training:
            return output
        total = (self._group_rewards * self.reward_weights.to(self._group_rewards.device)).nansum(dim=1)
        total[self._group_rewards.isnan().all(dim=1)] = torch.nan
        weights = zero_variance_weights(total, self.num_generations, self.zero_variance_weight)
        n_local = output["completion_ids"].size(0)
        start = self.accelerator.process_index * n_local
        local = weights[start : start + n_local].to(output["completion_mask"].device)
        # The weights travel in their own field (TRL splits and shuffles every per-row tensor of the
        # batch alike) and meet the loss in compute_loss; TRL's `tool_mask` keeps marking the tool
        # results (0) apart from the model's tokens (1). The dapo/cispo normaliser counts weighted
        # model tokens.
        output[ROW_WEIGHTS] = local
        model_tokens = output["completion_mask"] * output.get("tool_mask", 1)
        output["num_items_in_batch"] = gather((model_tokens * local.unsqueeze(1)).sum()).sum()
        self._metrics["train"]["zero_variance_weighted_frac"].append(float((weights < 1.0).float().mean()))
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The loss with the per-row weights applied where TRL applies its tool mask: TRL multiplies
        completion_mask by `tool_mask` for the loss, its normaliser, the KL and the entropy, and
        nothing else, so weighting that product weights exactly these rows' tokens."""
        weights = inputs.get(ROW_WEIGHTS)
        if weights is not None:
            tool_mask = inputs.get("tool_mask", torch.ones_like(inputs["completion_mask"]))
            inputs = {k: v for k, v in inputs.items() if k != ROW_WEIGHTS}
            inputs["tool_mask"] = tool_mask.float() * weights.unsqueeze(1)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def logged(log_history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in log_history if e.get(key) is not None]


def training_metrics(trainer: StageGRPOTrainer, stage_dir) -> dict[str, float]:
    """The figures of the trainer's log: training reward (first and last logged mean), the last
    KL (none when beta = 0), the mean share of zero-variance groups, step time and its
    generation share, rollout tokens. Writes log_history.json and reward.png (main process)."""
    history = trainer.state.log_history
    reward_curve, kl_curve = logged(history, "reward"), logged(history, "kl")
    if distributed.is_main_process():
        artifacts.write_json_atomic(stage_dir / LOG_FILE, history)  # the reward/KL curves, for benchmarks
        if reward_curve:
            curves = {"reward (mean)": tuple(map(list, zip(*reward_curve)))}
            plot_curves(stage_dir / "reward.png", curves, "step", "reward", "grpo training reward")
    steps, step_seconds = trainer.state.global_step, trainer.train_step_seconds
    metrics = {
        "reward_mean": reward_curve[-1][1] if reward_curve else float("nan"),
        "reward_mean_first": reward_curve[0][1] if reward_curve else float("nan"),
        "train_steps": steps,
        "step_time_s": step_seconds / steps if steps else 0.0,
        "generation_share": trainer.generation_seconds / step_seconds if step_seconds else 0.0,
        "rollout_tokens": float(trainer.state.num_input_tokens_seen),
    }
    if kl_curve:
        metrics["kl"] = kl_curve[-1][1]
    calls, failures = logged(history, "tools/call_frequency"), logged(history, "tools/failure_frequency")
    if calls:  # TRL's: tool calls per completion, failed share of the calls (each logging window)
        metrics["tool_calls_per_completion"] = sum(v for _, v in calls) / len(calls)
        metrics["tool_failure_share"] = sum(v for _, v in failures) / len(failures) if failures else 0.0
    zero_std = [v for _, v in logged(history, "frac_reward_zero_std")]
    if zero_std:
        metrics["frac_reward_zero_std"] = sum(zero_std) / len(zero_std)
    return metrics
