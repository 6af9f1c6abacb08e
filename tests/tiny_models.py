"""Tiny randomly initialised checkpoints of the real model families (conf/model/<family>.yaml),
saved the way their hub repos are: config.json, safetensors weights, a fast tokenizer with the
family's special tokens and chat template. No download: the tokenizer is a small byte-level BPE
trained here, the weights are random."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from trl.chat_template_utils import llama3_2_chat_template, qwen3_chat_template

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LAYERS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=512)

# family -> (model_type, config kwargs, special tokens: eos, pad, bos, others, chat template)
FAMILIES = {
    "qwen3": ("qwen3", dict(LAYERS, tie_word_embeddings=True),
              dict(eos="<|im_end|>", pad="<|endoftext|>", bos=None, others=["<|im_start|>"], template=CHATML)),
    "qwen3_moe": ("qwen3_moe", dict(LAYERS, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                    norm_topk_prob=True, router_aux_loss_coef=0.001, output_router_logits=False,
                                    tie_word_embeddings=False),
                  dict(eos="<|im_end|>", pad="<|endoftext|>", bos=None, others=["<|im_start|>"], template=CHATML)),
    "llama3": ("llama", dict(LAYERS, tie_word_embeddings=False, rope_theta=500000.0),
               # Llama 3 has no pad token; the pipeline pads with eos
               dict(eos="<|eot_id|>", pad=None, bos="<|begin_of_text|>",
                    others=["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"], template=LLAMA3)),
    "smollm2": ("llama", dict(LAYERS, tie_word_embeddings=True),
                dict(eos="<|im_end|>", pad="<|im_end|>", bos=None, others=["<|im_start|>", "<|endoftext|>"], template=CHATML)),
}


# Qwen3 and Llama 3.2 with their real chat templates (as TRL ships them: they render tools, tool
# calls and tool results, and TRL knows how to parse their replies); the multi-turn tool tests use them
TOOL_FAMILIES = {
    "qwen3_tools": ("qwen3", dict(LAYERS, tie_word_embeddings=True, max_position_embeddings=4096),  # the tool schema is long
                    dict(eos="<|im_end|>", pad="<|endoftext|>", bos=None, template=qwen3_chat_template,
                         others=["<|im_start|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                                 "<think>", "</think>"])),
    # Llama 3.2's real template (tools as JSON in the user turn, calls as JSON replies)
    "llama3_tools": ("llama", dict(LAYERS, tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=4096),
                     dict(eos="<|eot_id|>", pad=None, bos="<|begin_of_text|>", template=llama3_2_chat_template,
                          others=["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>",
                                  "<|eom_id|>"])),
}


def corpus() -> list[str]:
    return [f"Q: {a} + {b} = ?\nA: {a + b}\nuser assistant system" for a in range(60) for b in range(0, 60, 7)]


def tokenizer_for(family: str) -> PreTrainedTokenizerFast:
    special = {**FAMILIES, **TOOL_FAMILIES}[family][2]
    names = [t for t in (special["eos"], special["pad"], special["bos"], *special["others"]) if t]
    specials = list(dict.fromkeys(names))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=special["eos"], pad_token=special["pad"],
                                        bos_token=special["bos"], additional_special_tokens=special["others"])
    tokenizer.chat_template = special["template"]
    return tokenizer


def save_tiny_family(family: str, directory: Path, seed: int = 0) -> Path:
    """A tiny random `family` checkpoint in `directory` (created), as its hub repo lays it out."""
    import torch

    model_type, kwargs, _ = {**FAMILIES, **TOOL_FAMILIES}[family]
    tokenizer = tokenizer_for(family)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                  bos_token_id=tokenizer.bos_token_id, pad_token_id=pad, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    assert json.loads((directory / "config.json").read_text())["model_type"] == model_type
    return directory
