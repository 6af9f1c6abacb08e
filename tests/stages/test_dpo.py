"""The dpo stage: the implicit reward margin grows on training pairs (from the one-command smoke
chain), the policy trains while its reference stays put (in process, per PEFT method), and bad
configs stop before compute."""

import inspect
import json
import re

import pytest
import torch
from datasets import Dataset
from trl import DPOTrainer

from pipeline.adapters import build_peft_config
from pipeline.models import load_model
from pipeline.runner import ConfigError
from pipeline.tasks import build_task, conversational_pairs
from pipeline.tokenizer import load_chat_tokenizer, train_tokenizer
from stages import dpo
from tests.conftest import compose_config

EXPECTED_METRICS = {
    "eval_accuracy", "eval_accuracy_sampled", "eval_reward_accuracy", "eval_reward_margin",
    "train_reward_accuracy", "train_reward_margin", "train_probe_reward_margin", "train_probe_reward_margin_before",
    "train_probe_loss", "train_probe_loss_before",
}


def test_implicit_reward_margin_on_training_pairs_increases(smoke_chain_run):
    result = json.loads((smoke_chain_run / "dpo" / "metrics.json").read_text())
    assert EXPECTED_METRICS <= result.keys()
    # before training the policy is its reference: every implicit reward is zero
    assert abs(result["train_probe_reward_margin_before"]) < 1e-4, result
    # one evaluation pass over the same fixed training pairs before and after, not the logged
    # batch losses (8 pairs each, too noisy to compare)
    assert result["train_probe_reward_margin"] > 0.1, result
    assert result["train_probe_loss"] < result["train_probe_loss_before"] - 0.01, result


def trainable_split(model) -> tuple[dict, dict]:
    """(frozen, trainable) parameter copies by name."""
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return frozen, trained


def completion_log_prob(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    return log_probs[torch.arange(len(targets)), targets][len(prompt_ids) - 1:].sum().item()


def test_precomputed_reference_is_the_starting_policy_and_no_second_model(smoke_chain_run, tmp_path):
    """Full fine-tuning with precompute_ref_log_probs (the default): TRL scores every training
    and evaluation pair once with the starting policy and holds one model, not two."""
    sft_final = smoke_chain_run / "sft" / "final"
    cfg = compose_config(["preset=smoke", "stages.dpo.max_steps=3", "stages.dpo.lr=1e-2"])
    tokenizer = load_chat_tokenizer(sft_final)
    model = load_model(str(sft_final))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    train, held_out = conversational_pairs(build_task(cfg.task).preference_pairs(), 16)
    args = dpo.training_args(cfg.stages.dpo, cfg.optim, cfg.peft, tmp_path, seed=0)
    assert args.precompute_ref_log_probs
    trainer = dpo.build_trainer(model, tokenizer, train, held_out, args, None, cfg.optim, train.select(range(4)))
    assert trainer.ref_model is None and dpo.reference_kind(trainer, args) == "precomputed"
    held = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in trainer.model.parameters()}
    assert sum(held.values()) == weights
    sft = load_model(str(sft_final))
    for dataset in (trainer.train_dataset, trainer.eval_dataset["eval"], trainer.eval_dataset["train_probe"]):
        row = dataset[0]
        for side in ("chosen", "rejected"):
            expected = completion_log_prob(sft, row["prompt_ids"], row[f"{side}_ids"])
            assert abs(row[f"ref_{side}_logps"] - expected) < 1e-3 * max(1.0, abs(expected)), side
    trainer.train()  # and the implicit rewards after training still read the starting policy's
    assert dpo.implicit_rewards(trainer, "train_probe", "probe")["probe_reward_margin"] != 0


@pytest.mark.parametrize("method", ["none", "lora", "prefix"])
def test_policy_trains_and_reference_stays(smoke_chain_run, tmp_path, method):
    sft_final = smoke_chain_run / "sft" / "final"
    cfg = compose_config(["preset=smoke", f"peft={method}", "stages.dpo.max_steps=3", "stages.dpo.lr=1e-2",
                          "stages.dpo.precompute_ref_log_probs=false"])
    tokenizer = load_chat_tokenizer(sft_final)
    model = load_model(str(sft_final))
    train, held_out = conversational_pairs(build_task(cfg.task).preference_pairs(), 16)
    args = dpo.training_args(cfg.stages.dpo, cfg.optim, cfg.peft, tmp_path, seed=0)
    trainer = dpo.build_trainer(model, tokenizer, train, held_out, args, build_peft_config(cfg.peft, model), cfg.optim)
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "12+34"}], return_tensors="pt", return_dict=True)
    with torch.no_grad():
        sft_logits = load_model(str(sft_final))(**probe).logits

    if method == "none":  # precompute_ref_log_probs=false: a frozen copy of the SFT model
        reference = trainer.ref_model
        assert reference is not None and reference is not trainer.model
        assert dpo.reference_kind(trainer, args) == "model"
        ref_before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    else:  # no second copy: the reference is the policy with its adapter disabled
        assert trainer.ref_model is None and dpo.reference_kind(trainer, args) == "adapter_disabled"
    frozen_before, trained_before = trainable_split(trainer.model)
    trainer.train()
    frozen_after, trained_after = trainable_split(trainer.model)

    assert any(not torch.equal(trained_after[n], trained_before[n]) for n in trained_before), "policy did not change"
    assert all(torch.equal(frozen_after[n], frozen_before[n]) for n in frozen_before)
    if method == "none":
        assert all(torch.equal(p, ref_before[n]) for n, p in trainer.ref_model.named_parameters())
        reference_model = trainer.ref_model
    else:
        size = lambda params: sum(t.numel() for t in params.values())  # noqa: E731
        assert 0 < size(trained_before) < 0.5 * size(frozen_before)
        reference_model = trainer.model
    with torch.no_grad(), (trainer.model.disable_adapter() if method != "none" else torch.no_grad()):
        ref_logits = reference_model(**probe).logits
    torch.testing.assert_close(ref_logits[..., -sft_logits.shape[1] :, :], sft_logits, atol=1e-5, rtol=1e-5)


def test_loss_types_match_the_installed_trl():
    source = inspect.getsource(DPOTrainer._compute_loss)
    assert set(re.findall(r'loss_type == "(\w+)"', source)) == set(dpo.LOSS_TYPES)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stages.dpo.loss_type=kto"], "stages.dpo.loss_type=['kto'] is unknown"),
        (["stages.dpo.beta=0"], "stages.dpo.beta=0"),
        (["stages.dpo.loss_type=exo_pair"], "needs stages.dpo.label_smoothing > 0"),
        (["stages.dpo.eval_pairs=0"], "hold out at least 1 pair"),
        (["stages.dpo.pairs=mine"], "stages.dpo.pairs='mine' is unknown"),
        (["stages.dpo.pairs=on_policy", "stages.dpo.samples_per_prompt=1"], "at least 2 samples per prompt"),
        (["peft=lora", "stages.dpo.train_only=[experts]"], "stages.dpo.train_only applies to full fine-tuning"),
        (["stages.dpo.freeze=['(attn']"], "stages.dpo.freeze: '(attn' is not a regular expression"),
    ],
)
def test_bad_dpo_config_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        dpo.validate(compose_config(["preset=smoke", *overrides]), None)


def test_step_level_pairs_stop_at_the_first_line_that_parts_them():
    tokenizer = train_tokenizer(["Q: 12+34-5=?\n12+34=46\n46-5=41\nA: 41\n"] * 20, 300)
    head = tokenizer.apply_chat_template([{"role": "user", "content": "12+34-5=?"}], tokenize=False, add_generation_prompt=True)
    END = dpo.end_of_turn(tokenizer)
    assert END == "<|im_end|>\n"
    pairs = [
        {"prompt": "12+34-5=?", "chosen": "12+34=46\n46-5=41\nA: 41", "rejected": "12+34=46\n46-5=40\nA: 40"},
        {"prompt": "12+34-5=?", "chosen": "12+34=46\n46-5=41\nA: 41", "rejected": "12+34=47\n47-5=42\nA: 42"},
        {"prompt": "12+34-5=?", "chosen": "12+34=46\n46-5=41\nA: 41", "rejected": "12+34=46\n46-5=41\nA: 4"},
        {"prompt": "12+34-5=?", "chosen": "12+34=46\n46-5=41\nA: 41", "rejected": "12+34=46\n46-5=41"},
    ]
    assert dpo.first_step_pairs(pairs, tokenizer) == [
        {"prompt": head + "12+34=46\n", "chosen": "46-5=41\n", "rejected": "46-5=40\n"},
        {"prompt": head, "chosen": "12+34=46\n", "rejected": "12+34=47\n"},
        # the last line ends the answer: the template's end of turn follows it
        {"prompt": head + "12+34=46\n46-5=41\n", "chosen": "A: 41" + END, "rejected": "A: 4" + END},
        # cut short (no line parts them): both whole
        {"prompt": head, "chosen": "12+34=46\n46-5=41\nA: 41" + END, "rejected": "12+34=46\n46-5=41" + END},
    ]


def test_step_level_rows_reach_the_trainer_without_a_stop_token_after_the_line(smoke_chain_run, tmp_path):
    """TRL appends EOS to plain-text completions; after a middle line it would teach the policy
    to stop there, so the stage removes it (and only it) from the tokenized rows."""
    sft_final = smoke_chain_run / "sft" / "final"
    cfg = compose_config(["preset=smoke", "stages.dpo.max_steps=1"])
    tokenizer = load_chat_tokenizer(sft_final)
    pairs = [
        {"prompt": "12+34-5=?", "chosen": "12+34=46\n46-5=41\nA: 41", "rejected": "12+34=47\n47-5=42\nA: 42"},
        {"prompt": "12+34-5=?", "chosen": "12+34=46\n46-5=41\nA: 41", "rejected": "12+34=46\n46-5=41\nA: 4"},
    ]
    rows = Dataset.from_list(dpo.first_step_pairs(pairs, tokenizer))
    args = dpo.training_args(cfg.stages.dpo, cfg.optim, cfg.peft, tmp_path, seed=0)
    trainer = dpo.build_trainer(load_model(str(sft_final)), tokenizer, rows, rows, args, None, cfg.optim)
    chosen = [tokenizer.decode(row["chosen_ids"]) for row in trainer.train_dataset]
    rejected = [tokenizer.decode(row["rejected_ids"]) for row in trainer.train_dataset]
    # no "<|endoftext|>" after the cut line; the last line keeps the template's end of turn
    assert chosen == ["12+34=46\n", "A: 41<|im_end|>\n"] and rejected == ["12+34=47\n", "A: 4<|im_end|>\n"]
    # conversational rows are left as TRL made them
    conversational, _ = conversational_pairs(pairs, 0)
    whole = dpo.build_trainer(load_model(str(sft_final)), tokenizer, conversational, rows, args, None, cfg.optim)
    assert tokenizer.decode(whole.train_dataset[0]["chosen_ids"]) == "12+34=46\n46-5=41\nA: 41<|im_end|>\n"
