"""Held-out evaluation shared by every stage: batched generation with the KV cache, then the
task's verifier. Greedy accuracy, sampled pass@1 and pass@k, and generated-token cost."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GenerationConfig, set_seed

from pipeline import artifacts, distributed
from pipeline.generation import Engine
from pipeline.generation import current as current_engine
from pipeline.log import log
from pipeline.models import router_logits_off
from pipeline.tasks.base import as_turns
from pipeline.tokenizer import stop_token_ids


@dataclass
class EvalResult:
    accuracy: float  # mean verifier reward over every sample (pass@1)
    pass_at_k: dict[int, float]
    tokens_per_problem: float  # generated tokens per problem, all samples counted
    num_problems: int
    completions: list[list[str]] = field(repr=False)

    def as_metrics(self, prefix: str = "eval") -> dict[str, float]:
        metrics = {f"{prefix}_accuracy": self.accuracy, f"{prefix}_tokens_per_problem": self.tokens_per_problem}
        metrics.update({f"{prefix}_pass@{k}": v for k, v in self.pass_at_k.items() if k > 1})
        return metrics


def render_prompts(tokenizer, task, prompts: list, prompt_format: str) -> list[str]:
    """`text`: the pretraining format ("Q: ...\\n"); `chat`: the tokenizer's chat template. A
    prompt is a string (one user turn) or a conversation ending with a user turn."""
    if prompt_format == "text":
        return [task.text_prompt(p) for p in prompts]
    if prompt_format == "chat":
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template; chat-format evaluation needs one")
        return [
            tokenizer.apply_chat_template(as_turns(p, "user"), tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    raise ValueError(f"prompt_format={prompt_format!r}; valid: text, chat")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    temperature: float = 0.0,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    before_batch: Callable[[], None] | None = None,
    skip_special_tokens: bool = True,
    engine: Engine | None = None,
) -> tuple[list[list[str]], list[list[int]]]:
    """Completions (and their generated-token counts) for each prompt, `num_samples` each.

    temperature 0 means greedy. Sampling is pure ancestral sampling (no top-k/top-p), so
    "temperature 1" is the model's own distribution. `before_batch` is called before each
    batch and may raise to stop (test_time's preemption check). `skip_special_tokens` False keeps
    the markers a response template parses (tool calls). `engine`: padded `model.generate` or
    continuous batching (`model.generate_batch`); None: the running stage's
    (pipeline/generation.py).
    """
    engine = engine or current_engine()
    continuous = engine.sampler == "continuous_batching"
    stops = stop_token_ids(tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,  # explicit: continuous batching decodes greedily unless told to sample
        temperature=temperature if temperature > 0 else None,
        top_k=0 if temperature > 0 else None,
        top_p=1.0 if temperature > 0 else None,
        num_return_sequences=1 if continuous else num_samples,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    texts: list[list[str]] = []
    counts: list[list[int]] = []
    try:
        with router_logits_off(model):
            for start in range(0, len(prompts), batch_size):
                if before_batch is not None:
                    before_batch()
                chunk = prompts[start : start + batch_size]
                if continuous:
                    rows = generate_continuous(model, tokenizer, chunk, config, engine, num_samples)
                else:
                    batch = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
                    out = model.generate(**batch, generation_config=config)
                    rows = list(out[:, batch["input_ids"].shape[1] :])
                for i in range(0, len(rows), num_samples):
                    group = rows[i : i + num_samples]
                    lengths = [generated_length(row, stops) for row in group]
                    texts.append([tokenizer.decode(row[:n], skip_special_tokens=skip_special_tokens) for row, n in zip(group, lengths)])
                    counts.append(lengths)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return texts, counts


def generate_continuous(model, tokenizer, prompts: list[str], config: GenerationConfig, engine: Engine,
                        num_samples: int) -> list[torch.Tensor]:
    """Each prompt's `num_samples` generations (one request each), in order, by transformers'
    continuous batching; RuntimeError if a request failed or went missing."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts for _ in range(num_samples)]
    outputs = list(model.generate_batch(ids, generation_config=config, progress_bar=False,
                                        continuous_batching_config=engine.continuous_batching_config()).values())
    failed = [o for o in outputs if getattr(o, "error", None)]
    if len(outputs) != len(ids) or failed:
        raise RuntimeError(f"continuous batching returned {len(outputs)} of {len(ids)} generations"
                           + (f"; {failed[0].request_id}: {failed[0].error}" if failed else ""))
    return [torch.tensor(o.generated_tokens, dtype=torch.long) for o in outputs]


def generated_length(row: torch.Tensor, stops: list[int]) -> int:
    """Tokens generated up to and including the first stop token (the rest is padding)."""
    hits = torch.isin(row, torch.tensor(stops, device=row.device)).nonzero()
    return int(hits[0, 0]) + 1 if len(hits) else int(row.numel())


def evaluate(
    model,
    tokenizer,
    task,
    problems: list[dict],
    *,
    prompt_format: str = "chat",
    temperature: float = 0.0,
    num_samples: int = 1,
    ks: tuple[int, ...] = (1,),
    max_new_tokens: int = 64,
    batch_size: int = 64,
    tools=None,
) -> EvalResult:
    """`tools`: a pipeline.tool_loop.ToolSetup; the model then answers in the chat format with the
    tool loop it was trained with (each round up to max_new_tokens)."""
    options = dict(temperature=temperature, num_samples=num_samples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if tools is not None and prompt_format == "chat":
        texts, counts = tools.generate(model, tokenizer, [p["prompt"] for p in problems], problems, **options)
    else:
        prompts = render_prompts(tokenizer, task, [p["prompt"] for p in problems], prompt_format)
        texts, counts = generate(model, tokenizer, prompts, **options)
    rewards = [[task.verify(t, p["answer"]) for t in samples] for samples, p in zip(texts, problems)]
    n = len(problems)
    correct = [sum(r >= 1.0 for r in row) for row in rewards]
    return EvalResult(
        accuracy=sum(map(sum, rewards)) / (n * num_samples),
        pass_at_k={k: sum(pass_at_k(num_samples, c, k) for c in correct) / n for k in ks if k <= num_samples},
        tokens_per_problem=sum(map(sum, counts)) / n,
        num_problems=n,
        completions=texts,
    )


@dataclass(frozen=True)
class EvalSettings:
    """A policy stage's held-out evaluation (its eval_problems, eval_samples, max_new_tokens and
    eval_batch_size keys)."""

    problems: int  # the first `problems` eval problems: the same for every stage, so stages compare
    samples: int  # samples per problem for the sampled accuracy
    max_new_tokens: int
    batch_size: int

    @classmethod
    def of_stage(cls, stage_cfg) -> "EvalSettings":
        """From a stage config's eval_problems, eval_samples, max_new_tokens, eval_batch_size."""
        return cls(int(stage_cfg.eval_problems), int(stage_cfg.eval_samples), int(stage_cfg.max_new_tokens),
                   int(stage_cfg.eval_batch_size))


def evaluate_policy(model, tokenizer, task, settings: EvalSettings, seed: int,
                    samples_path: Path | None = None, tools=None) -> dict[str, float]:
    """A policy stage's held-out numbers in the chat format: greedy accuracy and sampled
    (temperature 1) accuracy. The sampled figure is the mean over `settings.samples` samples per
    problem (pass@1), which narrows its sampling noise. With samples_path, every problem's greedy
    answer and samples with their verdicts go there as JSON lines (main process)."""
    problems = task.eval_problems()[: settings.problems]
    options = dict(prompt_format="chat", max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                   tools=tools)
    greedy = evaluate(model, tokenizer, task, problems, **options)
    set_seed(seed)
    samples = int(settings.samples)
    sampled = evaluate(model, tokenizer, task, problems, temperature=1.0, num_samples=samples, **options)
    if samples_path is not None and distributed.is_main_process():
        records = [{"problem": i, "prompt": p["prompt"], "answer": p.get("answer"),
                    "greedy": {"text": g[0], "correct": task.verify(g[0], p["answer"]) >= 1.0},
                    "samples": [{"text": t, "correct": task.verify(t, p["answer"]) >= 1.0} for t in row]}
                   for i, (p, g, row) in enumerate(zip(problems, greedy.completions, sampled.completions))]
        artifacts.write_text_atomic(samples_path, "".join(json.dumps(r) + "\n" for r in records))
    return {
        "eval_accuracy": greedy.accuracy,
        "eval_accuracy_sampled": sampled.accuracy,
        "eval_samples": samples,
        "eval_tokens_per_problem": greedy.tokens_per_problem,
        "eval_num_problems": greedy.num_problems,
        **(tools.stats.as_metrics("eval") if tools is not None else {}),
    }


EVAL_SAMPLES = "eval_samples.jsonl"  # in a policy stage's dir: its held-out answers, one problem a line


def held_out_accuracy(model, tokenizer, task, settings: EvalSettings, seed: int, autocast, stage: str,
                      samples_path: Path | None = None, tools=None) -> dict[str, float]:
    """evaluate_policy under `autocast` (the stage's precision) when the task has eval problems
    with answers; else {} and a line saying so (a chat or preference set has none)."""
    if not task.has_split("eval"):
        log(f"stage {stage}: the task has no eval split (problems with answers): no answer accuracy")
        return {}
    with autocast:
        return evaluate_policy(model, tokenizer, task, settings, seed, samples_path, tools)
