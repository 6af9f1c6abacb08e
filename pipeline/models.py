"""Build a Hugging Face causal LM from a config, or load one from a local path; save and load
a stage's policy in either hand-off layout (plain checkpoint, or adapter + base)."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch
from omegaconf import OmegaConf
from peft import PeftConfig, PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from pipeline import artifacts, distributed
from pipeline.errors import ConfigError
from pipeline.tokenizer import load_chat_tokenizer, save_tokenizer, stop_token_ids

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_DIR = "adapter"  # every PEFT final/ keeps its adapter here
BASE_DIR = "base"  # a prefix/prompt-tuning final/ keeps its frozen base model here


def build_model(model_cfg, tokenizer, attn_implementation: str | None = None) -> PreTrainedModel:
    """A freshly initialised model of `model_cfg.arch` (a transformers model_type) sized to the
    tokenizer, or to `model.config.vocab_size` when that is set (at least the tokenizer's size: a
    padded embedding, as Qwen3's 151,936 rows for 151,669 tokens); `attn_implementation` None:
    transformers' default."""
    kwargs = OmegaConf.to_container(model_cfg.config, resolve=True)
    check_model_config(kwargs)
    vocab_size = int(kwargs.pop("vocab_size", None) or len(tokenizer))
    if vocab_size < len(tokenizer):
        raise ConfigError(f"model.config.vocab_size={vocab_size} is below the tokenizer's {len(tokenizer)} tokens; "
                          "raise it or drop the override (the model is then sized to the tokenizer)")
    config = AutoConfig.for_model(
        model_cfg.arch,
        vocab_size=vocab_size,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **kwargs,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


TOKENIZER_IDS = ("pad_token_id", "eos_token_id", "bos_token_id")  # build_model takes them from the tokenizer


def check_model_config(config: dict) -> None:
    """ConfigError for a model.config key that build_model sets from the tokenizer."""
    for key in TOKENIZER_IDS:
        if key in config:
            raise ConfigError(f"model.config.{key} is set from the tokenizer when the model is built; drop the override")


def load_model(path: str, trust_remote_code: bool = False, attn_implementation: str | None = None,
               dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A model to train in fp32 (master weights; trainer.precision sets the autocast), or one that
    only runs forward in `dtype` (trainer_settings.forward_dtype)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    return AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=trust_remote_code, dtype=dtype, attn_implementation=attn_implementation
    )


def is_adapter_checkpoint(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def check_trainable_input(path: Path, stage: str, trust_remote_code: bool = False) -> None:
    """ConfigError naming the fix if the checkpoint a stage is about to train (a recipe with
    TRAINS_INPUT: sft, reward, dpo, grpo) is an adapter (peft cannot train a saved prefix/prompt
    adapter further) or has no chat-template tokenizer."""
    if is_adapter_checkpoint(path):
        raise ConfigError(
            f"the {stage} input {path} is a PEFT adapter, not a model; {stage} trains a plain checkpoint (peft "
            "loads saved prefix/prompt adapters for inference only). Start from the base inside a prefix/prompt "
            f"final/ (stages.{stage}.init={path / BASE_DIR}) or from a LoRA run's merged final/"
        )
    try:
        load_chat_tokenizer(path, trust_remote_code)
    except ValueError as err:
        raise ConfigError(f"{stage} input: {err}") from err


def load_policy(path: str | Path, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> PreTrainedModel | PeftModel:
    """The model a stage handed off in `path` (its final/), in either layout a stage writes:

    - a plain checkpoint (full fine-tuning, or LoRA merged into its base): a transformers model;
    - an adapter that cannot be merged (prefix or prompt tuning): adapter_config.json and the
      adapter weights at the top, the frozen base model in base/: a PeftModel over that base.
      An adapter directory without base/ (e.g. final/adapter/) uses the base it records.

    The adapter loads for inference: peft does not train a saved prefix/prompt adapter further.
    """
    path = Path(path)
    if not is_adapter_checkpoint(path):
        return load_model(str(path), trust_remote_code, dtype=dtype)
    base = path / BASE_DIR
    if not (base / "config.json").is_file():
        base = Path(PeftConfig.from_pretrained(str(path)).base_model_name_or_path)
    model = load_model(str(base), trust_remote_code, dtype=dtype)
    return PeftModel.from_pretrained(model, str(path))


def save_peft_policy(model: PeftModel, tokenizer, out_dir: Path, final_dir: Path) -> PreTrainedModel | PeftModel:
    """Write a PEFT model and its tokenizer to out_dir (renamed to final_dir afterwards) in the
    layout load_policy reads; return the model as handed off. (A plain model is saved with the
    trainer's save_model, which also gathers sharded weights.)

    LoRA is merged into its base (out_dir is a plain checkpoint) and the adapter kept under
    adapter/. Prefix/prompt tuning cannot be merged: the adapter goes to the top and to adapter/,
    the base to base/, and adapter_config.json names final_dir/base so that
    `AutoPeftModelForCausalLM.from_pretrained(final_dir)` works while the run directory stays
    where it is (load_policy works wherever it is moved).

    Called on every rank like artifacts.save_final: every rank merges, the main process writes.
    """

    def save(obj, directory: Path) -> None:
        if distributed.is_main_process():
            # adapters here never train embeddings; "auto" would probe the base path (on the Hub, too)
            options = {"save_embedding_layers": False} if isinstance(obj, PeftModel) else {}
            obj.save_pretrained(directory, **options)
            save_tokenizer(tokenizer, directory)

    adapter = model.peft_config[model.active_adapter]
    if adapter.is_prompt_learning:
        adapter.base_model_name_or_path = str(final_dir / BASE_DIR)
        save(model.get_base_model(), out_dir / BASE_DIR)
        save(model, out_dir)
        save(model, out_dir / ADAPTER_DIR)
        return model
    save(model, out_dir / ADAPTER_DIR)
    merged = model.merge_and_unload()
    save(merged, out_dir)
    return merged


def save_policy(trainer, tokenizer, stage_dir: Path, dtype: torch.dtype | None = None) -> PreTrainedModel | PeftModel:
    """Write a policy-training stage's final/ (atomically, every rank calls it) and return the
    model as handed off: a plain checkpoint for full fine-tuning, save_peft_policy's layout for an
    adapter. Router aux loss off and the tokenizer's stop tokens in generation_config, so plain
    `generate` on the checkpoint stops where the pipeline's evaluation does. `dtype`: the weights'
    dtype on disk (trainer_settings.save_dtype); the returned model stays as it trained."""
    model = trainer.model  # wrapped by TRL when an adapter was asked for
    set_router_aux_loss(model, False)
    if getattr(model, "generation_config", None) is not None:  # a reward model has none
        model.generation_config.eos_token_id = stop_token_ids(tokenizer)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if not isinstance(model, PeftModel):
        artifacts.save_final(stage_dir, trainer.save_model, dtype)
        return model
    handed_off = []
    final = stage_dir / artifacts.FINAL
    artifacts.save_final(stage_dir, lambda tmp: handed_off.append(save_peft_policy(model, tokenizer, tmp, final)), dtype)
    return handed_off[0]


def set_router_aux_loss(model: torch.nn.Module, enabled: bool) -> None:
    """MoE models: train with the load-balancing aux loss, save final/ with it off so plain
    `generate` works for anyone who loads the checkpoint."""
    config = getattr(model, "config", None)
    if hasattr(config, "router_aux_loss_coef"):
        config.output_router_logits = enabled


LAST_LAYER = "{last}"  # in a train_only pattern: the index of the model's last decoder layer
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def check_trainable_scope(stage_cfg, stage: str, peft_method: str, model_cfg, input_path: Path | None) -> None:
    """Config errors of a stage's `freeze` / `train_only` regexes (stage_cfg, named
    stages.<stage> in messages), before any compute: bad regexes, peft combinations, and
    patterns the input model's parameter names (read from its config on the meta device, no
    weights; model_cfg when there is no input yet) cannot match."""
    fields = [f for f in ("freeze", "train_only") if stage_cfg.get(f)]
    for field in fields:
        if peft_method != "none":
            raise ConfigError(f"stages.{stage}.{field} applies to full fine-tuning; with peft={peft_method} choose "
                              "peft.target_modules / peft.target_parameters instead")
        for pattern in stage_cfg[field]:
            try:
                re.compile(str(pattern).replace(LAST_LAYER, "0"))
            except re.error as err:
                raise ConfigError(f"stages.{stage}.{field}: {pattern!r} is not a regular expression: {err}") from err
    skeleton = model_skeleton(model_cfg, input_path) if fields else None
    if skeleton is not None:
        restrict_trainable(skeleton, stage_cfg, stage)


def model_skeleton(model_cfg, input_path: Path | None) -> PreTrainedModel | None:
    """The input model's architecture on the meta device (parameter names, no memory): from the
    input checkpoint's config, else from the model group; None when neither says."""
    trust = bool(model_cfg.get("trust_remote_code", False))
    if input_path is not None and (Path(input_path) / "config.json").is_file():
        config = AutoConfig.from_pretrained(str(input_path), trust_remote_code=trust)
    elif model_cfg.get("path"):
        config = AutoConfig.from_pretrained(str(model_cfg.path), trust_remote_code=trust)
    elif model_cfg.get("arch"):
        config = AutoConfig.for_model(model_cfg.arch, **OmegaConf.to_container(model_cfg.config, resolve=True))
    else:
        return None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust)


def restrict_trainable(model: torch.nn.Module, stage_cfg, stage: str) -> int:
    """Full fine-tuning of a subset: with `train_only` only the parameters whose names match one
    of its regexes train ("{last}" stands for the last decoder layer's index); parameters matching
    a `freeze` regex stay frozen. Returns how many parameter tensors were frozen; a pattern that
    matches no parameter is a ConfigError (on a dense model an experts pattern would otherwise
    leave only the rest of the list training)."""
    names = [name for name, _ in model.named_parameters()]
    layers = [int(m.group(1)) for m in map(_LAYER_INDEX.search, names) if m]
    last = str(max(layers)) if layers else None

    def matching(field: str) -> set[str]:
        """The parameter names one of the field's patterns matches; each pattern must match one."""
        selected: set[str] = set()
        for pattern in (str(p) for p in stage_cfg.get(field) or []):
            if LAST_LAYER in pattern and last is None:
                raise ConfigError(f"stages.{stage}.{field}: {pattern!r} uses {LAST_LAYER}, but {type(model).__name__} "
                                  "has no '.layers.<i>.' parameters")
            regex = re.compile(pattern.replace(LAST_LAYER, last or ""))
            hits = {n for n in names if regex.search(n)}
            if not hits:
                raise ConfigError(f"stages.{stage}.{field}: {pattern!r} matches no parameter of {type(model).__name__}; "
                                  f"fix it or set stages.{stage}.{field}=[]")
            selected |= hits
        return selected

    keep = matching("train_only")
    frozen = (set(names) - keep if keep else set()) | matching("freeze")
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return len(frozen)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (a ZeRO-3-partitioned parameter counts whole)."""
    counts = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trains in counts if trains), sum(n for n, _ in counts)


@contextlib.contextmanager
def router_logits_off(model: torch.nn.Module):
    """Turn MoE router-logit outputs off for generation and honest eval loss.

    The aux loss belongs in the training loss only; with it on, Qwen3-MoE `generate` with an
    attention mask crashes inside load_balancing_loss_func (transformers 5.23).
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
