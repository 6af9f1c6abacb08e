"""SFT data path: the batches TRL's trainer collates carry loss on response tokens only."""

from collections import Counter

import pytest
import torch

from pipeline.models import build_model
from pipeline.tasks import build_task
from pipeline.tokenizer import IM_END, train_tokenizer
from stages.sft import build_datasets, build_trainer, training_args
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def setup():
    cfg = compose_config(["preset=smoke", "stages.sft.pretrain_mix=0.2"])
    task = build_task(cfg.task)
    tokenizer = train_tokenizer(task.pretrain_texts(), int(cfg.stages.pretrain.tokenizer_vocab_size))
    return cfg, task, tokenizer


def expected_rows(tokenizer, task, n_eval: int) -> dict[tuple[int, ...], tuple[int, str]]:
    """Every training row, computed independently: ids -> (number of prompt tokens, response text)."""
    rows = {}
    for example in task.sft_examples()[:-n_eval]:
        user = [{"role": "user", "content": example["prompt"]}]
        conversation = user + [{"role": "assistant", "content": example["completion"]}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        assert text.startswith(prompt)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows[tuple(ids)] = (len(tokenizer(prompt, add_special_tokens=False)["input_ids"]), text[len(prompt):])
    for text in task.pretrain_texts():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows[tuple(ids)] = (0, text + tokenizer.eos_token)
    return rows


def segments(batch: dict[str, torch.Tensor]):
    """(input_ids, labels) of every example in a collated batch: padded rows, or packed rows
    split where position_ids restart."""
    for row in range(batch["input_ids"].shape[0]):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        if "attention_mask" in batch:
            keep = batch["attention_mask"][row].bool()
            assert (labels[~keep] == -100).all(), "padding carries loss"
            yield ids[keep].tolist(), labels[keep].tolist()
            continue
        starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [len(ids)]
        for start, end in zip(starts, starts[1:]):
            if end > start:
                yield ids[start:end].tolist(), labels[start:end].tolist()


@pytest.mark.parametrize("packing", [False, True])
def test_collated_labels_cover_the_response_only(setup, tmp_path, packing):
    cfg, task, tokenizer = setup
    stage = cfg.stages.sft.copy()
    stage.packing = packing
    stage.max_length = 512  # no truncation: every row is checked whole
    train, evaluation = build_datasets(tokenizer, task, stage, seed=0)
    model = build_model(cfg.model, tokenizer)
    args = training_args(stage, cfg.optim, cfg.peft, tmp_path, seed=0)
    trainer = build_trainer(model, tokenizer, train, evaluation, args, peft_config=None)

    expected = expected_rows(tokenizer, task, int(stage.eval_examples))
    kinds = Counter()
    for batch in trainer.get_train_dataloader():
        for ids, labels in segments(batch):
            assert tuple(ids) in expected, "a training row is not one of the examples"
            n_prompt, response = expected[tuple(ids)]
            assert labels[:n_prompt] == [-100] * n_prompt  # the prompt, chat markup included
            # the response carries its own ids (a packed row's first label is -100: nothing predicts it)
            assert labels[max(n_prompt, 1):] == ids[max(n_prompt, 1):]
            assert tokenizer.decode(ids[n_prompt:]) == response
            kinds["chat" if n_prompt else "text"] += 1
    n_chat = len(task.sft_examples()) - int(stage.eval_examples)
    assert kinds == {"chat": n_chat, "text": round(n_chat * 0.2 / 0.8)}  # pretrain_mix=0.2 of the rows


def test_chat_response_is_the_completion_and_its_end_of_turn(setup):
    cfg, task, tokenizer = setup
    train, _ = build_datasets(tokenizer, task, cfg.stages.sft, seed=0)
    mask = train[0]["completion_mask"]
    n_prompt = mask.index(1)
    assert mask == [0] * n_prompt + [1] * (len(mask) - n_prompt)
    response = tokenizer.decode(train[0]["input_ids"][n_prompt:])
    assert response == task.sft_examples()[0]["completion"] + IM_END + "\n"  # the model learns to end its turn
