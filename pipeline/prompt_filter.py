"""grpo's offline prompt filter (difficulty filtering): the input policy samples each RL prompt a
few times before training, and the prompts it always solves are dropped: a group of equal
rewards has no learning signal, only cost. The pass rates are saved, so a resumed run trains on
the same rows."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import set_seed

from pipeline import artifacts, distributed
from pipeline.errors import ConfigError
from pipeline.evaluate import evaluate
from pipeline.log import log

FILTER_FILE = "prompt_pass_rates.json"


def prompt_pass_rates(model, tokenizer, task, rows: list[dict], *, samples: int, temperature: float, max_new_tokens: int,
                      batch_size: int, seed: int) -> list[float]:
    """Each row's pass rate (the task's verifier against its answer) over `samples` completions
    of `model`. The ranks split the prompts and gather the rates, so all keep the same rows."""
    rank, world = distributed.state().process_index, distributed.world_size()
    mine = rows[rank::world]
    set_seed(seed + rank)
    result = evaluate(model, tokenizer, task, mine, temperature=temperature, num_samples=samples,
                      max_new_tokens=max_new_tokens, batch_size=batch_size)
    rates = [sum(task.verify(t, r["answer"]) >= 1.0 for t in texts) / samples for texts, r in zip(result.completions, mine)]
    if world == 1:
        return rates
    shards: list = [None] * world
    torch.distributed.all_gather_object(shards, rates)
    return [shards[i % world][i // world] for i in range(len(rows))]


def filter_prompts(rows: list[dict], rates: list[float], max_pass_rate: float, per_step: int) -> list[dict]:
    """The rows whose pass rate is at most max_pass_rate; ConfigError when fewer than one step's."""
    kept = [row for row, rate in zip(rows, rates) if rate <= max_pass_rate]
    if len(kept) < per_step:
        raise ConfigError(
            f"the prompt filter kept {len(kept)} of {len(rows)} RL prompts (pass rate <= {max_pass_rate}), fewer than the "
            f"{per_step} one step takes: raise stages.grpo.filter_max_pass_rate or task.n_rl, or set stages.grpo.filter_samples=0"
        )
    return kept


def selected_prompts(data: Dataset, rates_of, path: Path, max_pass_rate: float, per_step: int) -> tuple[Dataset, dict[str, float]]:
    """The rows of `data` that pass the filter, and the filter's metrics. `rates_of(rows)` measures
    the pass rates unless `path` holds them from an earlier, interrupted attempt."""
    rows = data.to_list()
    start = time.perf_counter()
    if path.exists():
        rates = json.loads(path.read_text())
    else:
        rates = rates_of(rows)
        if distributed.is_main_process():
            artifacts.write_json_atomic(path, rates)
    kept = filter_prompts(rows, rates, max_pass_rate, per_step)
    log(f"stage grpo: prompt filter kept {len(kept)} of {len(rows)} RL prompts (input policy's mean pass rate "
        f"{sum(rates) / len(rates):.3f})")
    return Dataset.from_list(kept), {
        "filter_kept_prompts": len(kept),
        "filter_prompts": len(rows),
        "filter_pass_rate_mean": sum(rates) / len(rates),
        "filter_seconds": time.perf_counter() - start,
    }
