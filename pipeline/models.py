"""Build a Hugging Face causal LM from a config, or load one from a local path."""

from __future__ import annotations

import contextlib
import os

import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel


def build_model(model_cfg, tokenizer) -> PreTrainedModel:
    """A freshly initialised model of `model_cfg.arch` (a transformers model_type) sized to the tokenizer."""
    kwargs = OmegaConf.to_container(model_cfg.config, resolve=True)
    config = AutoConfig.for_model(
        model_cfg.arch,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **kwargs,
    )
    return AutoModelForCausalLM.from_config(config)


def load_model(path: str, trust_remote_code: bool = False) -> PreTrainedModel:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=torch.float32)


def set_router_aux_loss(model: torch.nn.Module, enabled: bool) -> None:
    """MoE models: train with the load-balancing aux loss, save final/ with it off so plain
    `generate` works for anyone who loads the checkpoint."""
    config = getattr(model, "config", None)
    if hasattr(config, "router_aux_loss_coef"):
        config.output_router_logits = enabled


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


@contextlib.contextmanager
def router_logits_off(model: torch.nn.Module):
    """Turn MoE router-logit outputs off for generation and honest eval loss.

    The aux loss belongs in the training loss only; with it on, Qwen3-MoE `generate` with an
    attention mask crashes inside load_balancing_loss_func (transformers 5.23, DESIGN.md s.5).
    """
    config = getattr(model, "config", None)
    had = getattr(config, "output_router_logits", None)
    if had:
        config.output_router_logits = False
    try:
        yield model
    finally:
        if had:
            config.output_router_logits = had
