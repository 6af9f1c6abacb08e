"""The reward model the `reward` stage writes, for everyone who scores with it (GRPO's reward,
best-of-N): an AutoModelForSequenceClassification with one output, whose score of a
conversation is read at its last non-padding token (transformers' sequence-classification
pooling finds it through `config.pad_token_id`, on either padding side)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from pipeline import distributed
from pipeline.models import router_logits_off, set_router_aux_loss
from pipeline.tasks.base import as_turns
from pipeline.tokenizer import load_chat_tokenizer


def load_reward_model(path: str | Path, trust_remote_code: bool = False,
                      dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) of a reward/final/ directory, in eval mode, weights in `dtype`, on this
    process's device (its GPU under a launcher)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a reward model directory (no config.json); point at a reward stage's final/")
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype)
    if model.config.num_labels != 1:
        raise ValueError(f"{path}: num_labels={model.config.num_labels}, a reward model has exactly one output")
    set_router_aux_loss(model, False)
    return model.eval().to(distributed.state().device), load_chat_tokenizer(path, trust_remote_code)


def render_conversation(tokenizer, prompt: str | list[dict], completion: str | list[dict]) -> str:
    """What the reward model reads: the prompt turns and the answer turns in the chat template
    (a string prompt is one user turn, a string completion one assistant turn), the same
    rendering the reward stage trained on."""
    return tokenizer.apply_chat_template(as_turns(prompt, "user") + as_turns(completion, "assistant"), tokenize=False)


@torch.inference_mode()
def score(model, tokenizer, prompts: list, completions: list, batch_size: int = 64) -> torch.Tensor:
    """Reward of each (prompt, completion) pair, shape (len(prompts),)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if model.config.pad_token_id is None:
        raise ValueError("the reward model's config has no pad_token_id; it cannot find the last token of padded rows")
    texts = [render_conversation(tokenizer, p, c) for p, c in zip(prompts, completions)]
    scores = []
    with router_logits_off(model):
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            scores.append(model(**batch.to(model.device)).logits[:, 0].float().cpu())
    return torch.cat(scores) if scores else torch.empty(0)


class RewardScorer:
    """A loaded reward model and its tokenizer, scoring (prompt, completion) lists: best-of-N
    in test_time, the reward-model reward in grpo."""

    def __init__(self, model, tokenizer, batch_size: int = 64) -> None:
        if not tokenizer.chat_template:
            raise ValueError("the reward model's tokenizer has no chat template; it scores chat renderings")
        if model.config.pad_token_id is None:
            raise ValueError("the reward model's config has no pad_token_id; it cannot find the last token of a batch row")
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size

    @classmethod
    def load(cls, path: str | Path, trust_remote_code: bool = False, batch_size: int = 64,
             dtype: torch.dtype = torch.float32) -> "RewardScorer":
        model, tokenizer = load_reward_model(path, trust_remote_code, dtype)
        return cls(model, tokenizer, batch_size)

    def score(self, prompts: list, completions: list) -> list[float]:
        """prompts and completions: strings or conversations (render_conversation)."""
        return score(self.model, self.tokenizer, prompts, completions, self.batch_size).tolist()
