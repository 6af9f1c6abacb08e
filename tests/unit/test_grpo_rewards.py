"""grpo's rewards on hand-written completions, and the group-relative advantages and
zero-variance weighting of a real (tiny) GRPOTrainer on hand-made reward groups."""

from pathlib import Path

import pytest
import torch

from omegaconf import OmegaConf

from pipeline.models import build_model, restrict_trainable
from pipeline.tasks import build_task
from pipeline.tokenizer import train_tokenizer
from pipeline.runner import ConfigError
from pipeline.grpo_trainer import ROW_WEIGHTS, StageGRPOTrainer, zero_variance_weights
from stages.grpo import build_dataset, training_args
from pipeline.rewards import format_reward, verifier_reward
from tests.conftest import compose_config

FORMAT = compose_config().stages.grpo.format_pattern


@pytest.fixture(scope="module")
def task():
    return build_task(compose_config(["preset=smoke"]).task)


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# hand-written completions for "47+18-9=?" (answer 56): (completion, correct, well-formed)
COMPLETIONS = [
    ("47+18=65\n65-9=56\nA: 56", 1.0, 1.0),  # correct, worked steps
    ("A: 56", 1.0, 1.0),  # correct, no steps
    ("47+18=65\n65-9=57\nA: 57", 0.0, 1.0),  # wrong answer
    ("A: 56.0", 0.0, 0.0),  # malformed: not an integer
    ("A:56", 0.0, 0.0),  # malformed: no space
    ("A: 5 6", 0.0, 0.0),  # malformed: split digits
    ("A: 50+6", 0.0, 0.0),  # an expression is not an answer (and is never evaluated)
    ("A: __import__('os').system('touch PWNED')", 0.0, 0.0),
    ("", 0.0, 0.0),  # empty
    ("47+18=65\n" * 5000 + "A: 56", 1.0, 1.0),  # very long, correct at the end
    ("x" * 100_000, 0.0, 0.0),  # very long, no answer line
    ("A: 57\nA: 56", 0.0, 1.0),  # the first answer line counts
    ("A: " + "9" * 40, 0.0, 0.0),  # absurdly long number: malformed
]


def test_verifier_reward_on_hand_written_completions(task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    correct = verifier_reward(task)
    completions = [chat(text) for text, _, _ in COMPLETIONS]
    rewards = correct(prompts=[None] * len(completions), completions=completions, answer=["56"] * len(completions))
    assert rewards == [expected for _, expected, _ in COMPLETIONS]
    assert correct.__name__ == "correct"  # TRL logs rewards/correct/mean
    # plain-text completions (non-conversational datasets) score the same
    assert correct(prompts=[None], completions=["A: 56"], answer=["56"]) == [1.0]
    assert not (tmp_path / "PWNED").exists()


def test_format_reward_on_hand_written_completions():
    reward = format_reward(FORMAT)
    completions = [chat(text) for text, _, _ in COMPLETIONS]
    assert reward(prompts=None, completions=completions) == [expected for _, _, expected in COMPLETIONS]


def test_zero_variance_weights_mark_flat_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert zero_variance_weights(rewards, 3, 0.0).tolist() == [0.0] * 6 + [1.0] * 3 + [0.0] * 3
    weights = zero_variance_weights(rewards, 3, 0.25)
    # groups: [1,1,1] flat, [0,0,0] flat, [1,0,0] informative, [0,0,0] flat
    assert weights.tolist() == [0.25] * 3 + [0.25] * 3 + [1.0] * 3 + [0.25] * 3
    nan_group = torch.tensor([float("nan"), 1.0, 1.0, float("nan"), 0.0, 1.0])
    assert zero_variance_weights(nan_group, 3, 0.0).tolist() == [0.0] * 3 + [1.0] * 3
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        zero_variance_weights(rewards[:10], 4, 0.0)


# --- advantages through TRL's own scoring path, with the rewards fixed by hand

GROUPS = [  # four prompts, four completions each
    [1.0, 0.0, 0.0, 1.0],
    [1.0, 1.0, 1.0, 1.0],  # all right: zero variance
    [0.0, 0.0, 0.0, 0.0],  # all wrong: zero variance
    [0.0, 0.0, 0.0, 1.0],
]
G = 4


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    cfg = compose_config(["preset=smoke"])
    task = build_task(cfg.task)
    tokenizer = train_tokenizer(task.pretrain_texts()[:200], 300)
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer)
    model.config.output_router_logits = False
    return cfg, task, tokenizer, model


def scored_batch(tiny_policy, tmp_path: Path, zero_variance: str, scale_rewards: str = "group", weight: float = 0.1):
    cfg, task, tokenizer, model = tiny_policy
    fixed = [r for group in GROUPS for r in group]

    def hand_made(prompts, completions, **kwargs):
        return fixed[: len(completions)]

    stage = cfg.stages.grpo.copy()
    stage.update(num_generations=G, batch_size=len(fixed), max_new_tokens=6, beta=0.0, scale_rewards=scale_rewards,
                 loss_type="cispo")
    args = training_args(stage, cfg.optim, cfg.peft, tmp_path, 0, [1.0])
    data = build_dataset(task).select(range(len(GROUPS)))
    trainer = StageGRPOTrainer(model=model, reward_funcs=[hand_made], args=args, train_dataset=data,
                               processing_class=tokenizer, zero_variance=zero_variance, zero_variance_weight=weight)
    trainer.model.train()
    inputs = [row for row in data for _ in range(G)]  # TRL's sampler repeats each prompt G times in a row
    return trainer._generate_and_score_completions(inputs)


def group_formula(scale_rewards: str) -> torch.Tensor:
    r = torch.tensor(GROUPS)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        return (centred / (r.std(dim=1, keepdim=True) + 1e-4)).flatten()
    return (centred / (r.flatten().std() + 1e-4)).flatten()  # batch


@pytest.mark.parametrize("scale_rewards", ["group", "batch"])
def test_advantages_are_group_normalised_rewards(tiny_policy, tmp_path, scale_rewards):
    out = scored_batch(tiny_policy, tmp_path, "keep", scale_rewards)
    torch.testing.assert_close(out["advantages"], group_formula(scale_rewards), rtol=0, atol=1e-5)
    # group 0: rewards [1,0,0,1], mean 0.5, unbiased std 0.5774 -> +-0.866
    if scale_rewards == "group":
        assert out["advantages"][:4].tolist() == pytest.approx([0.866, -0.866, -0.866, 0.866], abs=1e-3)
    assert "tool_mask" not in out  # keep: TRL's batch untouched
    assert out["num_items_in_batch"] == out["completion_mask"].sum()


@pytest.mark.parametrize("zero_variance, weight", [("filter", 0.0), ("downweight", 0.1)])
def test_zero_variance_groups_are_filtered_or_downweighted(tiny_policy, tmp_path, zero_variance, weight):
    out = scored_batch(tiny_policy, tmp_path, zero_variance, weight=0.1)
    # the flat groups have no signal either way
    assert out["advantages"][4:12].abs().max() == 0
    expected = torch.tensor([1.0] * 4 + [weight] * 8 + [1.0] * 4)
    # TRL's loss mask is completion_mask * tool_mask; compute_loss multiplies the row weights into it
    loss_weight = out.get("tool_mask", torch.ones_like(out["completion_mask"])) * out[ROW_WEIGHTS].unsqueeze(1)
    assert loss_weight.shape == out["completion_mask"].shape
    rows = (loss_weight * out["completion_mask"]).amax(dim=1)
    torch.testing.assert_close(rows, expected * (out["completion_mask"].sum(dim=1) > 0))
    lengths = out["completion_mask"].sum(dim=1).float()
    assert out["num_items_in_batch"].item() == pytest.approx((lengths * expected).sum().item())


def test_freeze_and_train_only_select_the_trained_parameters(tiny_policy):
    _, _, tokenizer, model = tiny_policy

    def scoped(model_name: str = "tiny_moe", **fields):
        fresh = build_model(compose_config(["preset=smoke", f"model={model_name}"]).model, tokenizer)
        return fresh, restrict_trainable(fresh, OmegaConf.create({"freeze": [], "train_only": [], **fields}), "grpo")

    fresh, frozen = scoped()
    assert frozen == 0 and all(p.requires_grad for p in fresh.parameters())
    fresh, frozen = scoped(freeze=[r"self_attn\.(q|k|v|o)_proj"])
    assert frozen == 4 * 4  # 4 layers x q, k, v, o
    for name, param in fresh.named_parameters():
        assert param.requires_grad == ("self_attn" not in name or "norm" in name), name
    # {last} is the last decoder layer: only its experts and the final norm train
    demo_scope = [r"layers\.{last}\.mlp\.experts\.", r"^model\.norm\."]
    fresh, frozen = scoped(train_only=demo_scope)
    trained = sorted(n for n, p in fresh.named_parameters() if p.requires_grad)
    assert trained == ["model.layers.3.mlp.experts.down_proj", "model.layers.3.mlp.experts.gate_up_proj", "model.norm.weight"]
    assert frozen == len(list(fresh.parameters())) - 3
    with pytest.raises(ConfigError, match=r"freeze: 'nothing_like_this' matches no parameter"):
        scoped(freeze=["nothing_like_this"])
    # every pattern must match: on a dense model the demo scope is an error, not "train the norm only"
    with pytest.raises(ConfigError, match=r"train_only: .*experts.* matches no parameter of Qwen3ForCausalLM.*train_only=\[\]"):
        scoped("tiny_dense", train_only=demo_scope)


@pytest.mark.parametrize("gather", [True, False])
def test_ds3_gather_for_generation_reaches_trl(tmp_path, gather):
    cfg = compose_config(["preset=smoke", f"stages.grpo.ds3_gather_for_generation={str(gather).lower()}"])
    assert training_args(cfg.stages.grpo, cfg.optim, cfg.peft, tmp_path, 0, [1.0]).ds3_gather_for_generation is gather
