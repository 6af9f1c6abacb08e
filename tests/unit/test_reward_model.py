"""The reward model's scoring path: one scalar per conversation, read at its last real token
whatever the padding side, and tokenized exactly as TRL's RewardTrainer tokenized it."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from pipeline.reward_model import load_reward_model, render_conversation, score
from pipeline.tokenizer import train_tokenizer

TEXTS = ["Q: 47+18-9=?\n47+18=65\n65-9=56\nA: 56\n", "Q: 12-80=?\n12-80=-68\nA: -68\n"] * 50
PROMPTS = ["47+18-9", "12-80", "3+4"]
COMPLETIONS = ["47+18=65\n65-9=56\nA: 56", "12-80=-68\nA: -68", "3+4=7\n" * 6 + "A: 7"]  # lengths differ


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    tokenizer = train_tokenizer(TEXTS, 300)
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
        num_experts_per_tok=2, num_labels=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    path = tmp_path_factory.mktemp("rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def unpadded_scores(model, tokenizer) -> torch.Tensor:
    return torch.cat([score(model, tokenizer, [p], [c]) for p, c in zip(PROMPTS, COMPLETIONS)])


@pytest.mark.parametrize("side", ["right", "left"])
def test_score_is_read_at_the_last_real_token(reward_model, side):
    model, tokenizer = load_reward_model(reward_model)
    alone = unpadded_scores(model, tokenizer)
    tokenizer.padding_side = side
    batched = score(model, tokenizer, PROMPTS, COMPLETIONS)
    assert batched.shape == (3,)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)
    # the shorter rows really were padded, and reading the last position would have been wrong
    texts = [render_conversation(tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (batch["attention_mask"] == 0).any(dim=1).tolist() == [True, True, False]
    with torch.no_grad():
        logits = model.model(**batch).last_hidden_state @ model.score.weight.T
    naive = logits[:, -1, 0] if side == "right" else logits[:, 0, 0]
    assert not torch.allclose(naive[:2], alone[:2], atol=1e-3)


def test_scoring_tokenizes_like_trl(reward_model):
    """The reward stage trains on TRL's tokenization (apply_chat_template, tokenize=True); scoring
    must feed the same ids."""
    _, tokenizer = load_reward_model(reward_model)
    messages = [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": COMPLETIONS[0]}]
    trl_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    ours = tokenizer(render_conversation(tokenizer, PROMPTS[0], COMPLETIONS[0]), add_special_tokens=False)["input_ids"]
    assert ours == trl_ids


def test_bad_reward_model_inputs(reward_model, tmp_path):
    model, tokenizer = load_reward_model(reward_model)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        score(model, tokenizer, PROMPTS[:2], COMPLETIONS[:1])
    with pytest.raises(FileNotFoundError, match="not a reward model directory"):
        load_reward_model(tmp_path)
