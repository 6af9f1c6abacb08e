"""Test-time compute: power sampling (Metropolis-Hastings from p^alpha), best-of-N, majority
vote, and plain / greedy / low-temperature sampling, all behind one interface that reports,
per method, accuracy and generated-token cost.

Power sampling (Karan & Du 2025, "Reasoning with Sampling") targets the sharpened distribution
over whole completions

    pi(x) ∝ p(x)^alpha,    x = (x_1 .. x_L),  L <= T = max_new_tokens,

where p(x) includes the stop token's probability when x ends with one (L <= T) and has no stop
term when x runs to the limit (L = T, truncated): both kinds of completion are scored the same
way in the current chain and in every proposal. The completion grows in blocks of B tokens;
after each block (limit K = kB) it runs N Metropolis-Hastings steps on pi_K (the same target
with limit K): pick a position i uniformly in the current completion (length L), resample
x'_{i:} from the proposal q = the model at temperature 1/alpha (until a stop token or K), and
accept with probability

    min(1, [p(x')^alpha q(x_{i:} | x_{<i}) L] / [p(x)^alpha q(x'_{i:} | x_{<i}) L'])

The shared prefix cancels, so only the suffixes' log p and log q enter. L / L' corrects for the
position being drawn from a range that depends on the state (1/L forward, 1/L' back); without
it the chain would favour short completions. As in the paper, a chain whose completion has
ended after a block's N steps is finished (the last block reaches T).

Two implementations of the same algorithm with the same random stream (ChainRandom: one
uniform stream per chain, consumed in the same order by both):

- `power_sample_reference`: one prompt at a time, every step re-encodes prompt + kept prefix
  from scratch and decodes the proposal with a fresh KV cache (what the paper's code does with
  one `generate` call per step). The clearly correct version: the test oracle and the baseline.
- `power_sample`: many prompts as one left-padded batch. The KV cache of prompt + current
  completion is kept across steps: a proposal masks out the cache slots at and after its
  resample position (per-row masks and explicit position ids, so every row resamples from its
  own position in one batched decode) and appends its tokens behind; accepted rows are then
  compacted back into place with one gather per layer. log p and log q of every token are
  taken from the logits of the decode step that sampled it and stored with the chain, so the
  acceptance ratio needs no extra forward pass. Finished chains leave the batch.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from pipeline.config import stage_defaults
from pipeline.evaluate import generate, render_prompts
from pipeline.models import router_logits_off
from pipeline.tokenizer import stop_token_ids

METHODS = ("greedy", "sample", "low_temperature", "power", "majority_vote", "best_of_n")


# --------------------------------------------------------------------------- random stream


class ChainRandom:
    """Independent uniform(0, 1) streams, one per chain id, each from its own seeded generator,
    so a chain draws the same numbers whether it runs alone or in a batch with others."""

    def __init__(self, seed: int, chain_ids: list[int], chunk: int = 512) -> None:
        self.generators = [np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, c]))) for c in chain_ids]
        self.chunk = chunk
        self.buffer = torch.empty(len(chain_ids), 0, dtype=torch.float64)
        self.position = torch.zeros(len(chain_ids), dtype=torch.long)

    def draw(self, rows: torch.Tensor) -> torch.Tensor:
        """The next uniform of each chain in `rows` (indices into chain_ids), float64 (len(rows),)."""
        if rows.numel() and int(self.position[rows].max()) >= self.buffer.shape[1]:
            more = np.stack([g.random(self.chunk) for g in self.generators])
            self.buffer = torch.cat([self.buffer, torch.from_numpy(more)], dim=1)
        values = self.buffer[rows, self.position[rows]]
        self.position[rows] += 1
        return values


def sample_from_uniform(log_probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: (R, V) log-probabilities and (R,) uniforms -> (R,) token ids."""
    cdf = log_probs.exp().cumsum(-1)
    targets = (uniforms * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, targets, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def token_log_probs(logits: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q) over the vocabulary from (R, V) logits: the model at temperature 1 and the
    proposal at temperature 1/alpha, in float64 (the acceptance ratio multiplies by alpha)."""
    logits = logits.double()
    return torch.log_softmax(logits, -1), torch.log_softmax(alpha * logits, -1)


def block_limits(max_new_tokens: int, block_size: int) -> list[int]:
    """The completion-length limit after each block: B, 2B, ..., T."""
    return list(range(block_size, max_new_tokens, block_size)) + [max_new_tokens]


def log_acceptance(alpha, prop_lp, prop_lq, cur_lp, cur_lq, cur_length, prop_length):
    """log of the MH ratio for suffix resampling (sums over the resampled suffixes)."""
    return (
        alpha * (prop_lp - cur_lp) + (cur_lq - prop_lq)
        + torch.log(torch.as_tensor(cur_length, dtype=torch.float64))
        - torch.log(torch.as_tensor(prop_length, dtype=torch.float64))
    )


@dataclass
class PowerSamples:
    """Per prompt: the final completion's token ids (stop token included if it ended), its log p
    under the model at temperature 1 (as the sampler scored it), the number of tokens generated
    for it in total (every proposal counted), and its trace: (resample position, proposal log p)
    of every MH step; plus the MH counts over all prompts."""

    token_ids: list[list[int]]
    log_p: list[float]
    generated_tokens: list[int]
    trace: list[list[tuple[int, float]]]
    proposals: int = 0
    accepted: int = 0

    @classmethod
    def empty(cls, n: int) -> PowerSamples:
        return cls([[] for _ in range(n)], [0.0] * n, [0] * n, [[] for _ in range(n)])

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposals if self.proposals else 0.0


# --------------------------------------------------------------------------- reference


VIRTUAL_TOKEN_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING")  # prompt-learning adapters power sampling supports


def _virtual_tokens(model) -> tuple[object, str | None, int]:
    """(the model that decodes, the prompt-learning type or None, its number of virtual tokens).

    A prefix/prompt-tuning PeftModel puts virtual tokens before the prompt: key/value vectors
    (prefix) or input embeddings (prompt). The samplers place them once, before the prompt,
    with positions 0..n-1 (prompt token k at n + k, as peft trains them), and decode with the
    base model after that."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not model.active_peft_config.is_prompt_learning:
        return model, None, 0
    config = model.active_peft_config
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if kind not in VIRTUAL_TOKEN_TYPES:
        raise ValueError(f"power sampling supports {', '.join(VIRTUAL_TOKEN_TYPES)} adapters, not {kind}")
    return model.get_base_model(), kind, int(config.num_virtual_tokens)


def _reference_generate(model, decoder, prefix: list[int], start: int, limit: int, alpha, stops, rng, row) -> tuple:
    """Sample completion tokens start..limit-1 after `prefix` (prompt + kept completion) from q,
    re-encoding the prefix from scratch with `model` (with its virtual tokens, if any) and
    decoding the rest with `decoder` on that cache. Returns (tokens, log p, log q) lists."""
    output = model(input_ids=torch.tensor([prefix]), use_cache=True)
    past = output.past_key_values
    tokens, lps, lqs = [], [], []
    for position in range(start, limit):
        logits = output.logits[:, -1]
        log_p, log_q = token_log_probs(logits, alpha)
        token = int(sample_from_uniform(log_q, rng.draw(row))[0])
        tokens.append(token)
        lps.append(float(log_p[0, token]))
        lqs.append(float(log_q[0, token]))
        if token in stops:
            break
        output = decoder(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
    return tokens, lps, lqs


@torch.inference_mode()
def power_sample_reference(
    model, prompt_ids: list[list[int]], *, alpha: float, mcmc_steps: int, block_size: int, max_new_tokens: int,
    stop_ids: list[int], seed: int = 0, chain_offset: int = 0,
) -> PowerSamples:
    """The same algorithm as power_sample, the simple way: one prompt at a time, every step
    re-encodes prompt + kept prefix. Chain c (= chain_offset + prompt index) draws from
    ChainRandom(seed, [c]), the stream power_sample gives it."""
    decoder, _, _ = _virtual_tokens(model)
    model.eval()
    stops = set(stop_ids)
    out = PowerSamples.empty(len(prompt_ids))
    one = torch.tensor([0])
    with router_logits_off(model):
        for index, prompt in enumerate(prompt_ids):
            rng = ChainRandom(seed, [chain_offset + index])
            x, lp, lq, count = [], [], [], 0
            for limit in block_limits(max_new_tokens, block_size):
                new, new_lp, new_lq = _reference_generate(model, decoder, prompt + x, len(x), limit, alpha, stops, rng, one)
                x, lp, lq, count = x + new, lp + new_lp, lq + new_lq, count + len(new)
                for _ in range(mcmc_steps):
                    i = min(int(float(rng.draw(one)[0]) * len(x)), len(x) - 1)
                    new, new_lp, new_lq = _reference_generate(model, decoder, prompt + x[:i], i, limit, alpha, stops, rng,
                                                              one)
                    count += len(new)
                    log_r = log_acceptance(alpha, sum(new_lp), sum(new_lq), sum(lp[i:]), sum(lq[i:]), len(x), i + len(new))
                    out.trace[index].append((i, sum(new_lp)))
                    out.proposals += 1
                    if math.log(float(rng.draw(one)[0])) < float(log_r):
                        out.accepted += 1
                        x, lp, lq = x[:i] + new, lp[:i] + new_lp, lq[:i] + new_lq
                if x[-1] in stops:
                    break
            out.token_ids[index], out.log_p[index], out.generated_tokens[index] = x, sum(lp), count
    return out


# --------------------------------------------------------------------------- fast, batched


@dataclass
class _Chains:
    """The batch of live chains. Cache layout, per row: slots [0, P) the left-padded prompt,
    slots P + j the completion token j for j < limit. Slots hold valid keys/values for the
    prompt and for completion tokens j < length - 1; the last token's KV is never needed
    (nothing is decoded after it without feeding it again)."""

    cache: DynamicCache
    prompt_ids: torch.Tensor  # (R, P) left-padded
    prompt_mask: torch.Tensor  # (R, P)
    prompt_length: torch.Tensor  # (R,)
    tokens: torch.Tensor  # (R, K) completion so far, pad beyond length
    lp: torch.Tensor  # (R, K) float64 log p of each token given its prefix, 0 beyond length
    lq: torch.Tensor  # (R, K) float64 log q likewise
    length: torch.Tensor  # (R,)
    rows: torch.Tensor  # (R,) chain index into the ChainRandom / the output lists

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        for name in ("prompt_ids", "prompt_mask", "prompt_length", "tokens", "lp", "lq", "length", "rows"):
            setattr(self, name, getattr(self, name)[keep])

    def widen(self, limit: int, pad_id: int) -> None:
        extra = limit - self.tokens.shape[1]
        if extra > 0:
            self.tokens = torch.nn.functional.pad(self.tokens, (0, extra), value=pad_id)
            self.lp = torch.nn.functional.pad(self.lp, (0, extra))
            self.lq = torch.nn.functional.pad(self.lq, (0, extra))


def _decode(model, chains: _Chains, start, active, limit, *, alpha, stops: torch.Tensor, pad_id, rng):
    """Sample completion tokens start..limit-1 from q for the `active` rows, all rows in one
    batched decode over the kept cache. Row r keeps prompt + tokens[:start_r] and re-feeds the
    token just before start_r (its cache slot is masked), so its first step yields the
    distribution at start_r. New keys/values are appended behind the current layout.

    Returns (tokens, lp, lq, count) of shape (R, S), (R, S), (R, S), (R,) and the number of
    decode steps run (= slots appended to the cache)."""
    rows, P = chains.rows.shape[0], chains.prompt_ids.shape[1]
    slots = torch.arange(P + chains.tokens.shape[1])
    anchor_slot = P + start - 1  # the re-fed token: last prompt token when start = 0
    sequence = torch.cat([chains.prompt_ids, chains.tokens], dim=1)
    token_in = sequence.gather(1, anchor_slot.unsqueeze(1)).squeeze(1)
    position = chains.prompt_length + start - 1
    base = torch.cat([chains.prompt_mask, torch.ones_like(chains.tokens)], dim=1)
    mask = base * (slots.unsqueeze(0) < anchor_slot.unsqueeze(1))
    steps = int((limit - start)[active].max()) if active.any() else 0
    new_tokens = torch.full((rows, max(steps, 1)), pad_id, dtype=torch.long)
    new_lp = torch.zeros(rows, max(steps, 1), dtype=torch.float64)
    new_lq = torch.zeros_like(new_lp)
    count = torch.zeros(rows, dtype=torch.long)
    running = active.clone()
    fed = 0
    device = model.device  # the bookkeeping stays on the CPU; the model and its (R, V) math on its device
    for step in range(steps):
        mask = torch.cat([mask, running.long().unsqueeze(1)], dim=1)
        logits = model(
            input_ids=token_in.unsqueeze(1).to(device), attention_mask=mask.to(device),
            position_ids=position.unsqueeze(1).to(device), past_key_values=chains.cache, use_cache=True,
        ).logits[:, -1]
        fed += 1
        log_p, log_q = token_log_probs(logits, alpha)
        uniforms = torch.full((rows,), 0.5, dtype=torch.float64)
        uniforms[running] = rng.draw(chains.rows[running])
        sampled_on_device = sample_from_uniform(log_q, uniforms.to(device)).unsqueeze(1)
        sampled = sampled_on_device.squeeze(1).cpu()
        new_tokens[running, step] = sampled[running]
        new_lp[running, step] = log_p.gather(1, sampled_on_device).squeeze(1).cpu()[running]
        new_lq[running, step] = log_q.gather(1, sampled_on_device).squeeze(1).cpu()[running]
        count += running.long()
        finished = torch.isin(sampled, stops) | (start + step + 1 >= limit)
        running = running & ~finished
        if not running.any():
            break
        token_in = torch.where(running, sampled, torch.full_like(sampled, pad_id))
        position = position + 1
    return new_tokens, new_lp, new_lq, count, fed


def _install(chains: _Chains, start, take, new_tokens, new_lp, new_lq, count, fed: int, limit: int, pad_id: int) -> None:
    """Make rows `take` hold tokens[:start] + new tokens, and compact the cache back to the
    layout of _Chains (width P + limit): their slot P + start - 1 + t gets the appended slot t
    (the decode step that fed that token: the re-fed one before start, then the new ones), which
    also makes the re-fed token's slot valid when it was the last one before an extension.
    Other rows and slots keep theirs."""
    rows, P, width = chains.rows.shape[0], chains.prompt_ids.shape[1], chains.tokens.shape[1]
    chains.widen(limit, pad_id)
    j = torch.arange(chains.tokens.shape[1]).unsqueeze(0)
    offset = (j - start.unsqueeze(1)).clamp(min=0, max=max(new_tokens.shape[1] - 1, 0))
    fresh = take.unsqueeze(1) & (j >= start.unsqueeze(1))
    within = j < (start + count).unsqueeze(1)
    chains.tokens = torch.where(fresh, torch.where(within, new_tokens.gather(1, offset), pad_id), chains.tokens)
    chains.lp = torch.where(fresh, torch.where(within, new_lp.gather(1, offset), 0.0), chains.lp)
    chains.lq = torch.where(fresh, torch.where(within, new_lq.gather(1, offset), 0.0), chains.lq)
    chains.length = torch.where(take, start + count, chains.length)

    slots = torch.arange(P + chains.tokens.shape[1]).unsqueeze(0).expand(rows, -1)
    appended = P + width + 1 + (slots - P - start.unsqueeze(1))
    source = torch.where(take.unsqueeze(1) & (slots >= P + start.unsqueeze(1) - 1), appended, slots)
    source = source.clamp(max=P + width + fed - 1)  # slots past the valid ones: anything, never attended
    for layer in chains.cache.layers:
        index = source[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]).to(layer.keys.device)
        layer.keys = layer.keys.gather(2, index)
        layer.values = layer.values.gather(2, index)


def _last_token(chains: _Chains) -> torch.Tensor:
    return chains.tokens.gather(1, (chains.length - 1).clamp(min=0).unsqueeze(1)).squeeze(1)


@torch.inference_mode()
def power_sample(
    model, prompt_ids: list[list[int]], *, alpha: float, mcmc_steps: int, block_size: int, max_new_tokens: int,
    stop_ids: list[int], pad_id: int, seed: int = 0, batch_size: int = 64, before_batch: Callable[[], None] | None = None,
) -> PowerSamples:
    """Power samples p^alpha for each prompt (token ids, no padding); see the module docstring.
    Chain c (the prompt's index) draws from ChainRandom(seed, [c]), as in power_sample_reference.
    `before_batch` is called before each batch of prompts and may raise to stop."""
    _virtual_tokens(model)  # an unsupported adapter fails here, before any compute
    model.eval()
    out = PowerSamples.empty(len(prompt_ids))
    params = _Params(alpha, mcmc_steps, block_size, max_new_tokens, torch.tensor(sorted(set(stop_ids))), pad_id)
    with router_logits_off(model):
        for first in range(0, len(prompt_ids), batch_size):
            if before_batch is not None:
                before_batch()
            chains = list(range(first, min(first + batch_size, len(prompt_ids))))
            _power_sample_batch(model, [prompt_ids[c] for c in chains], ChainRandom(seed, chains), params, out, first)
    return out


def _prefill(model, prompts: list[list[int]], pad_id: int) -> tuple[object, _Chains]:
    """(the decoding model, the chains with the cache of their prompts). Virtual tokens of a
    prefix/prompt-tuning adapter count as prompt slots before the left padding."""
    decoder, kind, n_virtual = _virtual_tokens(model)
    rows, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])
    device = decoder.device
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    position = n_virtual + (mask.cumsum(1) - 1).clamp(min=0)
    virtual_mask = torch.ones(rows, n_virtual, dtype=torch.long)
    inputs = dict(input_ids=ids.to(device))
    if kind == "PREFIX_TUNING":  # the adapter's key/value vectors fill the first cache slots
        cache = model.get_prompt(rows)
    else:
        cache = DynamicCache(config=decoder.config)
    if kind == "PROMPT_TUNING":  # the adapter's embeddings go in before the prompt's
        embeds = torch.cat([model.get_prompt(rows).to(decoder.dtype), decoder.get_input_embeddings()(ids.to(device))], dim=1)
        inputs = dict(inputs_embeds=embeds)
        position = torch.cat([torch.arange(n_virtual).expand(rows, -1), position], dim=1)
    full_mask = torch.cat([virtual_mask, mask], dim=1)
    decoder(**inputs, attention_mask=full_mask.to(device), position_ids=position.to(device), past_key_values=cache, use_cache=True)
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        raise ValueError("power_sample needs full-attention KV cache layers (no sliding window)")
    return decoder, _Chains(
        cache, torch.cat([torch.full((rows, n_virtual), pad_id), ids], dim=1), full_mask, n_virtual + mask.sum(1),
        torch.full((rows, 0), pad_id, dtype=torch.long), torch.zeros(rows, 0, dtype=torch.float64),
        torch.zeros(rows, 0, dtype=torch.float64), torch.zeros(rows, dtype=torch.long), torch.arange(rows),
    )


@dataclass(frozen=True)
class _Params:
    alpha: float
    mcmc_steps: int
    block_size: int
    max_new_tokens: int
    stops: torch.Tensor
    pad_id: int


def _power_sample_batch(model, prompts: list[list[int]], rng: ChainRandom, params: _Params, out: PowerSamples, first: int):
    """Run the chains of `prompts` (out's entries first, first + 1, ...) to the end, into `out`."""
    model, chains = _prefill(model, prompts, params.pad_id)
    sample = dict(alpha=params.alpha, stops=params.stops, pad_id=params.pad_id, rng=rng)
    for limit in block_limits(params.max_new_tokens, params.block_size):
        # extend every live chain (none has ended: ended chains left the batch) to the new limit
        start, every = chains.length.clone(), torch.ones_like(chains.length, dtype=torch.bool)
        new = _decode(model, chains, start, every, limit, **sample)
        _install(chains, start, every, *new, limit, params.pad_id)
        generated = new[3]
        for _ in range(params.mcmc_steps):
            start = (rng.draw(chains.rows) * chains.length).long().clamp(max=chains.length - 1)
            tokens, lp, lq, count, fed = _decode(model, chains, start, every, limit, **sample)
            suffix = torch.arange(chains.tokens.shape[1]).unsqueeze(0) >= start.unsqueeze(1)
            log_r = log_acceptance(
                params.alpha, lp.sum(1), lq.sum(1), (chains.lp * suffix).sum(1), (chains.lq * suffix).sum(1),
                chains.length, start + count,
            )
            take = torch.log(rng.draw(chains.rows)) < log_r
            _install(chains, start, take, tokens, lp, lq, count, fed, limit, params.pad_id)
            generated = generated + count
            for row, position, proposal_lp in zip(chains.rows.tolist(), start.tolist(), lp.sum(1).tolist()):
                out.trace[first + row].append((position, proposal_lp))
            out.proposals += int(take.numel())
            out.accepted += int(take.sum())
        for row, count in zip(chains.rows.tolist(), generated.tolist()):
            out.generated_tokens[first + row] += count
        ended = torch.isin(_last_token(chains), params.stops) | (limit >= params.max_new_tokens)
        for r in ended.nonzero().squeeze(1).tolist():
            chain = first + int(chains.rows[r])
            out.token_ids[chain] = chains.tokens[r, : chains.length[r]].tolist()
            out.log_p[chain] = float(chains.lp[r].sum())
        if ended.all():
            break
        chains.select((~ended).nonzero().squeeze(1))


# --------------------------------------------------------------------------- selection rules


def majority_vote(answers: list[str | None]) -> int:
    """Index of the first candidate stating the most frequent answer (None does not vote; ties
    go to the answer seen first; with no answer at all, candidate 0)."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0
    winner = votes.most_common(1)[0][0]
    return answers.index(winner)


def best_of_n(scores: list[float]) -> int:
    """Index of the highest-scoring candidate (the first one on ties)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


# --------------------------------------------------------------------------- one interface


DEFAULTS = stage_defaults("test_time")  # conf/stages/test_time.yaml: the defaults live there alone


@dataclass
class TestTimeSettings:
    alpha: float = float(DEFAULTS.alpha)  # power-sampling exponent; low_temperature samples at 1/alpha
    mcmc_steps: int = int(DEFAULTS.mcmc_steps)  # MH steps after each block
    block_size: int = int(DEFAULTS.block_size)  # tokens per block
    num_samples: int = int(DEFAULTS.num_samples)  # candidates per problem for majority_vote and best_of_n
    sample_temperature: float = float(DEFAULTS.sample_temperature)  # temperature of those candidates (and of `sample`)
    max_new_tokens: int = int(DEFAULTS.max_new_tokens)
    batch_size: int = int(DEFAULTS.batch_size)
    seed: int = 0

    @classmethod
    def of(cls, stage_cfg, seed: int) -> TestTimeSettings:
        """From stages.test_time (the composed config)."""
        return cls(
            alpha=float(stage_cfg.alpha), mcmc_steps=int(stage_cfg.mcmc_steps), block_size=int(stage_cfg.block_size),
            num_samples=int(stage_cfg.num_samples), sample_temperature=float(stage_cfg.sample_temperature),
            max_new_tokens=int(stage_cfg.max_new_tokens), batch_size=int(stage_cfg.batch_size), seed=int(seed),
        )


@dataclass
class MethodResult:
    method: str
    accuracy: float
    tokens_per_problem: float  # every generated token counted (all candidates, all proposals)
    wall_time_s: float
    num_problems: int
    completions: list[str] = field(repr=False)  # the answer kept for each problem
    extras: dict[str, float] = field(default_factory=dict)
    # majority_vote and best_of_n: each problem's candidates, the index kept, and (best_of_n) their scores
    candidates: list[list[str]] | None = field(default=None, repr=False)
    picks: list[int] | None = field(default=None, repr=False)
    scores: list[list[float]] | None = field(default=None, repr=False)


def _samples(model, tokenizer, prompts, settings: TestTimeSettings, temperature: float, n: int, cache: dict | None,
             before_batch: Callable[[], None] | None = None, tools=None, problems: list[dict] | None = None):
    """(texts, counts, seconds, tool calls and failures or None) of n samples per prompt; from
    `cache` if these were drawn before (the cache keeps (texts, counts, seconds) under the
    samples' key and the tool counts under ("tools", key)). With `tools` (a
    pipeline.tool_loop.ToolSetup) each sample is a tool-using conversation on its problem."""
    key = (tuple(prompts), temperature, n)
    if cache is not None and key in cache:
        return (*cache[key], cache.get(("tools", key)))
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    options = dict(temperature=temperature, num_samples=n, max_new_tokens=settings.max_new_tokens,
                   batch_size=max(1, settings.batch_size // n))
    if tools is None:
        texts, counts = generate(model, tokenizer, prompts, before_batch=before_batch, **options)
        calls = None
    else:
        before = (tools.stats.calls, tools.stats.failures)
        texts, counts = tools.generate(model, tokenizer, [p["prompt"] for p in problems], problems, **options)
        calls = (tools.stats.calls - before[0], tools.stats.failures - before[1])
    result = (texts, counts, time.perf_counter() - start)
    if cache is not None:
        cache[key] = result
        if calls is not None:
            cache[("tools", key)] = calls
    return (*result, calls)


def run_method(method: str, model, tokenizer, task, problems: list[dict], settings: TestTimeSettings,
               score: Callable[[list[dict], list[str]], list[float]] | None = None, cache: dict | None = None,
               before_batch: Callable[[], None] | None = None, tools=None) -> MethodResult:
    """Answer every problem with `method` (one of METHODS), chat format; accuracy by the task's
    verifier, cost in generated tokens. Pass one `cache` dict to several calls and majority_vote
    and best_of_n choose among the same candidates, drawn once; each still reports their full
    cost (tokens and the time it took to draw them). `before_batch` is called before each
    generation batch and may raise to stop (test_time's preemption check). best_of_n keeps
    the candidate with the highest `score(problems, texts)` (the problem of each text). With
    `tools` (a pipeline.tool_loop.ToolSetup) the sampling methods answer with the tool loop and
    report tool calls per problem and the failed share; power sampling has none (refused)."""
    if method == "power" and tools is not None:
        raise ValueError("power sampling has no tool loop; it would measure the model without its tools")
    if method not in METHODS:
        raise ValueError(f"unknown test-time method {method!r}; valid: {', '.join(METHODS)}")
    if method == "best_of_n" and score is None:
        raise ValueError("best_of_n needs a score (rewards.weighted_sum)")
    start, drawing = time.perf_counter(), 0.0
    prompts = render_prompts(tokenizer, task, [p["prompt"] for p in problems], "chat")
    extras: dict[str, float] = {}
    if method in ("greedy", "sample", "low_temperature"):
        temperature = {"greedy": 0.0, "sample": settings.sample_temperature, "low_temperature": 1.0 / settings.alpha}[method]
        texts, counts, _, calls = _samples(model, tokenizer, prompts, settings, temperature, 1, None, before_batch,
                                           tools, problems)
        chosen, cost = [t[0] for t in texts], [c[0] for c in counts]
    elif method == "power":
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        result = power_sample(
            model, ids, alpha=settings.alpha, mcmc_steps=settings.mcmc_steps, block_size=settings.block_size,
            max_new_tokens=settings.max_new_tokens, stop_ids=stop_token_ids(tokenizer), pad_id=tokenizer.pad_token_id,
            seed=settings.seed, batch_size=settings.batch_size, before_batch=before_batch,
        )
        chosen = [tokenizer.decode(t, skip_special_tokens=True) for t in result.token_ids]
        cost = result.generated_tokens
        extras["acceptance_rate"] = result.acceptance_rate
        calls = None
    else:
        before = time.perf_counter()
        texts, counts, drawing, calls = _samples(model, tokenizer, prompts, settings, settings.sample_temperature,
                                                 settings.num_samples, cache, before_batch, tools, problems)
        drawing -= time.perf_counter() - before  # the part of the drawing time not spent in this call
        scores = None
        if method == "majority_vote":
            picks = [majority_vote([task.extract_answer(t) for t in candidates]) for candidates in texts]
        else:
            flat = score([p for p in problems for _ in range(settings.num_samples)],
                         [t for candidates in texts for t in candidates])
            n = settings.num_samples
            scores = [[float(x) for x in flat[i * n : (i + 1) * n]] for i in range(len(problems))]
            picks = [best_of_n(row) for row in scores]
        chosen, cost = [c[k] for c, k in zip(texts, picks)], [sum(c) for c in counts]
    rewards = [task.verify(text, p["answer"]) for text, p in zip(chosen, problems)]
    n = max(len(problems), 1)
    if calls is not None:
        extras["tool_calls_per_problem"] = calls[0] / n
        extras["tool_failure_share"] = calls[1] / calls[0] if calls[0] else 0.0
    wall = time.perf_counter() - start + drawing
    result = MethodResult(method, sum(rewards) / n, sum(cost) / n, wall, len(problems), chosen, extras)
    if method in ("majority_vote", "best_of_n"):
        result.candidates, result.picks, result.scores = texts, picks, scores
    return result
