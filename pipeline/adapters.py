"""PEFT adapters from the `peft` config group: LoRA, prefix tuning, prompt tuning (the `peft` library).

LoRA reaches three kinds of weights: attention projections and dense SwiGLU projections are
nn.Linear modules (`target_modules`), while transformers v5 MoE models store their experts as
fused 3D nn.Parameters (Qwen3-MoE: `mlp.experts.gate_up_proj` (E, 2I, H) and
`mlp.experts.down_proj` (E, H, I)), which no module name matches. peft reaches those through
`target_parameters`: its ParamWrapper adds a rank-r update per expert to the parameter itself.
The configured lists name both kinds; only the names present in the model are passed on, so one
default serves dense and MoE models alike.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftConfig, PrefixTuningConfig, PromptTuningConfig

from pipeline.errors import ConfigError

METHODS = ("none", "lora", "prefix", "prompt")
PROMPT_LEARNING = ("prefix", "prompt")  # virtual tokens: cannot be merged into the base weights


def check_peft_config(peft_cfg) -> None:
    """What can be wrong with the `peft` group before any model is loaded (the runner checks it
    for every stage whose USES lists peft); raises ConfigError."""
    if peft_cfg.method not in METHODS:
        raise ConfigError(f"peft.method={peft_cfg.method!r} is unknown; valid: {', '.join(METHODS)}")
    if peft_cfg.method == "lora" and peft_cfg.dropout and peft_cfg.target_parameters:
        raise ConfigError(
            f"peft.dropout={peft_cfg.dropout} cannot apply to peft.target_parameters (peft's ParamWrapper, which "
            "adapts the 3D MoE expert weights, has no dropout); set peft.dropout=0 or peft.target_parameters=[]"
        )


def build_peft_config(peft_cfg, model: torch.nn.Module, task_type: str = "CAUSAL_LM") -> PeftConfig | None:
    """The peft config for `model`, or None for full fine-tuning (peft=none). task_type SEQ_CLS
    (a reward model) also trains the new score head in full (peft's modules_to_save)."""
    check_peft_config(peft_cfg)
    if peft_cfg.method == "none":
        return None
    if peft_cfg.method == "prefix":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=int(peft_cfg.num_virtual_tokens))
    if peft_cfg.method == "prompt":
        return PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=int(peft_cfg.num_virtual_tokens),
            prompt_tuning_init=str(peft_cfg.init).upper(),
        )
    modules, parameters = lora_targets(model, list(peft_cfg.target_modules), list(peft_cfg.target_parameters))
    return LoraConfig(
        task_type=task_type,
        r=int(peft_cfg.rank),
        lora_alpha=float(peft_cfg.alpha),
        lora_dropout=float(peft_cfg.dropout),
        target_modules=modules,
        target_parameters=parameters or None,
    )


def lora_targets(model: torch.nn.Module, modules: list[str], parameters: list[str]) -> tuple[list[str], list[str]]:
    """The configured module and parameter names that occur in `model` (as a dotted suffix)."""
    module_names = [name for name, _ in model.named_modules()]
    parameter_names = [name for name, _ in model.named_parameters()]

    def present(wanted: list[str], names: list[str]) -> list[str]:
        return [w for w in wanted if any(n == w or n.endswith("." + w) for n in names)]

    found_modules, found_parameters = present(modules, module_names), present(parameters, parameter_names)
    if not found_modules and not found_parameters:
        raise ValueError(
            f"none of peft.target_modules={modules} or peft.target_parameters={parameters} occur in "
            f"{type(model).__name__}; list its linear layers (e.g. q_proj) or its expert parameters"
        )
    return found_modules, found_parameters
