"""pipeline/sampling.py: power sampling against the exact p^alpha of an enumerable toy, the fast
sampler against the reference with the same random stream, and the selection rules."""

import itertools
import math
from collections import Counter

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import (
    AutoModelForSequenceClassification, PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM,
)

from pipeline.reward_model import RewardScorer
from pipeline.sampling import (
    ChainRandom, best_of_n, block_limits, majority_vote, power_sample, power_sample_reference,
    sample_from_uniform, token_log_probs,
)
from pipeline.tokenizer import CHAT_TEMPLATE, train_tokenizer


def tiny_moe(vocab: int, eos: int, pad: int, seed: int, sharpen: float = 1.0, stop_bias: dict | None = None):
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=2, num_experts_per_tok=1,
        pad_token_id=pad, eos_token_id=eos, tie_word_embeddings=False, output_router_logits=True,
    )
    model = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)  # peakier next-token distributions: p^alpha and q differ more
        if stop_bias:  # a logit bias, to make stop tokens rarer and completions longer
            head = torch.nn.Linear(config.hidden_size, vocab, bias=True)
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            for token, bias in stop_bias.items():
                head.bias[token] = bias
            model.lm_head = head
    return model


def total_variation(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(x, 0.0) - b.get(x, 0.0)) for x in set(a) | set(b))


def exact_distributions(model, prompt, alpha, max_new_tokens, eos, vocab):
    """Over every complete sequence (ends with eos within the limit, or runs to the limit without
    it): the power target p^alpha / Z and token-level low-temperature sampling (q = T 1/alpha)."""
    body = [t for t in range(vocab) if t != eos]
    sequences = [(*b, eos) for n in range(max_new_tokens) for b in itertools.product(body, repeat=n)]
    sequences += list(itertools.product(body, repeat=max_new_tokens))
    log_p, log_q = {}, {}
    with torch.no_grad():
        for x in sequences:
            logits = model(input_ids=torch.tensor([prompt + list(x)])).logits[0, len(prompt) - 1 : -1]
            lp, lq = token_log_probs(logits, alpha)
            index = torch.tensor(x).unsqueeze(1)
            log_p[x], log_q[x] = float(lp.gather(1, index).sum()), float(lq.gather(1, index).sum())
    assert math.isclose(sum(math.exp(v) for v in log_p.values()), 1.0, abs_tol=1e-5)  # the set is complete
    weights = {x: math.exp(alpha * v) for x, v in log_p.items()}
    z = sum(weights.values())
    return {x: w / z for x, w in weights.items()}, {x: math.exp(v) for x, v in log_q.items()}


def test_power_sampler_matches_the_exact_target_on_an_enumerable_toy():
    vocab, eos, pad, limit, alpha, chains = 4, 2, 3, 4, 2.0, 4000
    model = tiny_moe(vocab, eos, pad, seed=0, sharpen=3.0)
    prompt = [0, 1]
    target, low_temperature = exact_distributions(model, prompt, alpha, limit, eos, vocab)
    gap = total_variation(target, low_temperature)
    assert gap > 0.3  # the toy separates p^alpha from low-temperature sampling
    # one block: the whole completion is drawn from q, then 50 MH steps on p^alpha (mixed by about 40)
    result = power_sample(model, [prompt] * chains, alpha=alpha, mcmc_steps=50, block_size=limit, max_new_tokens=limit,
                          stop_ids=[eos], pad_id=pad, seed=1, batch_size=chains)
    empirical = {x: c / chains for x, c in Counter(tuple(t) for t in result.token_ids).items()}
    assert set(empirical) <= set(target)
    assert any(len(x) == limit and x[-1] != eos for x in empirical)  # truncated completions occur, scored too
    assert total_variation(empirical, target) < 0.045  # 4000 exact draws: 0.022 on average, 0.031 at most in 50 tries
    assert total_variation(empirical, low_temperature) > gap - 0.05
    assert 0.2 < result.acceptance_rate < 0.9


def sequence_log_p(model, prompt: list[int], completion: list[int]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
    return float(torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(completion).unsqueeze(1)).sum())


def test_fast_sampler_reproduces_the_reference_chains():
    vocab, eos, pad = 10, 8, 9
    model = tiny_moe(vocab, eos, pad, seed=1, sharpen=2.0, stop_bias={eos: -1.0, 7: -1.0})
    # prompts of different lengths: the batch is left-padded, the reference sees each alone
    prompts = [[1, 2, 3], [4], [5, 6, 7, 1, 2, 3, 4], [0, 0], [7, 3, 1], [2, 2, 2, 2], [6], [3, 5]]
    options = dict(alpha=2.0, mcmc_steps=3, block_size=4, max_new_tokens=14, stop_ids=[eos, 7], seed=5)
    fast = power_sample(model, prompts, pad_id=pad, batch_size=5, **options)  # two batches: 5 + 3 chains
    reference = power_sample_reference(model, prompts, **options)
    assert fast.token_ids == reference.token_ids
    # every proposal's position and log p, step by step: a stale cache entry in the fast sampler
    # changes a proposal's log p even when the chains happen to end up the same
    for fast_trace, reference_trace in zip(fast.trace, reference.trace):
        assert [p for p, _ in fast_trace] == [p for p, _ in reference_trace]
        assert [lp for _, lp in fast_trace] == pytest.approx([lp for _, lp in reference_trace], abs=1e-4)
    # the log p each sampler scored its chain with, and the same from one plain forward pass:
    # a stale or misplaced cache entry in the fast sampler shows here first
    rescored = [sequence_log_p(model, prompt, x) for prompt, x in zip(prompts, fast.token_ids)]
    assert fast.log_p == pytest.approx(rescored, abs=1e-4)
    assert reference.log_p == pytest.approx(rescored, abs=1e-4)
    assert fast.generated_tokens == reference.generated_tokens
    assert (fast.proposals, fast.accepted) == (reference.proposals, reference.accepted)
    assert 0 < fast.accepted < fast.proposals  # both accepting and rejecting steps happened
    lengths = [len(t) for t in fast.token_ids]
    assert max(lengths) == 14 and min(lengths) < 4  # ended within the first block, and ran to the limit
    assert {t[-1] for t in fast.token_ids if len(t) < 14} == {eos, 7}  # both stop tokens end chains
    assert model.config.output_router_logits  # switched off for sampling only, then restored


@pytest.mark.parametrize("adapter", ["prefix", "prompt"])
def test_fast_sampler_reproduces_the_reference_with_virtual_tokens(adapter):
    """Prefix/prompt tuning: the fast sampler places the virtual tokens itself; the reference
    re-encodes through peft's own forward."""
    vocab, eos, pad = 10, 8, 9
    base = tiny_moe(vocab, eos, pad, seed=1, sharpen=2.0, stop_bias={eos: -1.0})
    config = (PrefixTuningConfig if adapter == "prefix" else PromptTuningConfig)(task_type="CAUSAL_LM", num_virtual_tokens=3)
    torch.manual_seed(4)
    model = get_peft_model(base, config)
    with torch.no_grad():  # virtual tokens that matter: prefix key/values start at zero otherwise
        for parameter in model.prompt_encoder.parameters():
            parameter.normal_(0.0, 1.0)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 1, 2], [0, 0]]
    options = dict(alpha=2.0, mcmc_steps=2, block_size=5, max_new_tokens=10, stop_ids=[eos], seed=2)
    fast = power_sample(model, prompts, pad_id=pad, batch_size=4, **options)
    reference = power_sample_reference(model, prompts, **options)
    assert fast.token_ids == reference.token_ids
    for fast_trace, reference_trace in zip(fast.trace, reference.trace):
        assert [p for p, _ in fast_trace] == [p for p, _ in reference_trace]
        assert [lp for _, lp in fast_trace] == pytest.approx([lp for _, lp in reference_trace], abs=1e-4)
    plain = power_sample(base, prompts, pad_id=pad, batch_size=4, **options)
    assert plain.log_p != pytest.approx(fast.log_p, abs=1e-3)  # the virtual tokens did change the model


def test_chain_random_gives_a_chain_the_same_stream_alone_or_in_a_batch():
    batch = ChainRandom(seed=3, chain_ids=[10, 11, 12], chunk=4)
    alone = ChainRandom(seed=3, chain_ids=[11], chunk=4)
    drawn = [float(batch.draw(torch.tensor([0, 1, 2]))[1]) for _ in range(6)]
    drawn += [float(batch.draw(torch.tensor([1]))[0]) for _ in range(3)]
    assert drawn == [float(alone.draw(torch.tensor([0]))[0]) for _ in range(9)]


def test_inverse_cdf_sampling_and_block_limits():
    log_probs = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.2, 0.5, 0.3]], dtype=torch.float64))
    assert sample_from_uniform(log_probs, torch.tensor([0.1, 0.69], dtype=torch.float64)).tolist() == [0, 1]
    assert sample_from_uniform(log_probs, torch.tensor([0.71, 0.999999], dtype=torch.float64)).tolist() == [2, 2]
    assert block_limits(10, 4) == [4, 8, 10] and block_limits(8, 4) == [4, 8] and block_limits(3, 8) == [3]


def test_majority_vote_and_best_of_n_pick_the_expected_candidates():
    assert majority_vote(["12", None, "7", "7", "12", "7"]) == 2
    assert majority_vote(["3", "5", "5", "3"]) == 0  # a tie goes to the answer seen first
    assert majority_vote([None, None]) == 0
    assert majority_vote([None, "4"]) == 1
    assert best_of_n([0.1, 2.5, -1.0, 2.5]) == 1
    assert best_of_n([-3.0]) == 0


@pytest.fixture(scope="module")
def chat_tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(["Q: 12+34=?\n12+34=46\nA: 46", "hello world"] * 20, vocab_size=300)


def test_reward_scorer_reads_the_last_token_of_each_chat_rendering(chat_tokenizer):
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=len(chat_tokenizer), hidden_size=16, intermediate_size=32, moe_intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=2,
        num_experts_per_tok=1, num_labels=1, pad_token_id=chat_tokenizer.pad_token_id,
    )
    model = AutoModelForSequenceClassification.from_config(config).eval()
    scorer = RewardScorer(model, chat_tokenizer, batch_size=3)
    prompts = ["12+34=?"] * 4
    completions = ["12+34=46\nA: 46", "A: 1", "12+34=47\nA: 47 and some more text", "x"]
    scores = scorer.score(prompts, completions)
    for prompt, completion, score in zip(prompts, completions, scores):  # one at a time, no padding at all
        text = chat_tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False)
        assert text.endswith("<|im_end|>\n") and CHAT_TEMPLATE == chat_tokenizer.chat_template
        ids = chat_tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            assert math.isclose(float(model(**ids).logits[0, 0]), score, abs_tol=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 4
    assert completions[best_of_n(scores)] == completions[max(range(4), key=scores.__getitem__)]


def test_evaluate_policy_averages_eval_samples_per_problem(monkeypatch):
    """eval_accuracy_sampled is the mean over eval_samples samples per problem: with a verifier
    that accepts every other sample it is 0.5 whatever the problems, and the key is reported."""
    from types import SimpleNamespace

    from pipeline import evaluate as ev

    calls = []

    def fake_evaluate(model, tokenizer, task, problems, *, temperature=0.0, num_samples=1, **options):
        calls.append((temperature, num_samples))
        rewards = [[float(i % 2) for i in range(num_samples)] for _ in problems]
        return ev.EvalResult(sum(map(sum, rewards)) / (len(problems) * num_samples), {}, 10.0, len(problems), [])

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    task = SimpleNamespace(eval_problems=lambda: [{"prompt": "1+1=?", "answer": "2"}] * 10)
    metrics = ev.evaluate_policy(None, None, task, ev.EvalSettings(problems=10, samples=4, max_new_tokens=8, batch_size=5),
                                 seed=0)
    assert calls == [(0.0, 1), (1.0, 4)]
    assert metrics["eval_samples"] == 4 and metrics["eval_accuracy_sampled"] == 0.5
