"""Pairs from the policy's own samples (dpo's and reward's pairs=on_policy): verified-correct
answers over wrong ones of the same prompt, and a held-out split that keeps prompts whole."""

import pytest

from pipeline import policy_pairs
from pipeline.errors import ConfigError
from tests.conftest import compose_config


class FakeTask:
    def rl_prompts(self):
        return [{"prompt": "1+1", "answer": "2"}, {"prompt": "2+2", "answer": "4"}, {"prompt": "3+3", "answer": "6"}]

    def verify(self, completion, answer):
        return 1.0 if completion == f"A: {answer}" else 0.0

    def has_split(self, split):
        return False


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_on_policy_pairs_put_verified_answers_over_wrong_ones(monkeypatch, stage):
    samples = [
        ["A: 2", "A: 3", "A: 2", "oops"],  # two right, two wrong: two pairs
        ["A: 4", "A: 4", "A: 4", "A: 4"],  # all right: no pair
        ["A: 5", "A: 7", "A: 6", "A: 8"],  # one right: one pair
    ]
    seen = {}

    def fake_generate(model, tokenizer, prompts, *, temperature, num_samples, max_new_tokens, batch_size):
        seen.update(prompts=prompts, temperature=temperature, num_samples=num_samples)
        return samples, [[4] * 4] * 3

    monkeypatch.setattr(policy_pairs, "generate", fake_generate)
    monkeypatch.setattr(policy_pairs, "render_prompts", lambda tokenizer, task, prompts, fmt: [f"<{p}>" for p in prompts])
    cfg = compose_config(["preset=smoke", f"stages.{stage}.pair_prompts=3", f"stages.{stage}.samples_per_prompt=4"]).stages[stage]
    pairs, counts = policy_pairs.sample_pairs(None, None, FakeTask(), cfg, seed=0)
    assert seen == {"prompts": ["<1+1>", "<2+2>", "<3+3>"], "temperature": 1.0, "num_samples": 4}
    assert pairs == [
        {"prompt": "1+1", "chosen": "A: 2", "rejected": "A: 3", "group": 0},
        {"prompt": "1+1", "chosen": "A: 2", "rejected": "oops", "group": 0},
        {"prompt": "3+3", "chosen": "A: 6", "rejected": "A: 5", "group": 2},
    ]
    assert counts == {"prompts": 3, "samples": 12, "correct": 7, "prompts_with_pairs": 2}


def test_the_held_out_split_keeps_each_prompt_on_one_side():
    pairs = [{"group": g, "n": i} for i, g in enumerate([0, 0, 1, 2, 2, 2, 3])]
    train, held = policy_pairs.split_by_prompt(pairs, 3)
    assert {p["group"] for p in held} == {2, 3} and len(held) == 4  # whole prompts, at least 3 pairs
    assert {p["group"] for p in train} == {0, 1}
    assert policy_pairs.split_by_prompt(pairs, 0) == (pairs, [])


def test_on_policy_pairs_need_rl_prompts_with_answers():
    with pytest.raises(ConfigError, match="stages.reward.pairs=mix samples the policy"):
        policy_pairs.check_data("reward", "mix", FakeTask())
    policy_pairs.check_data("reward", "task", FakeTask())
