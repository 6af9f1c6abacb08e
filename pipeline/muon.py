"""The Muon/AdamW hybrid: Muon for the hidden weight matrices, AdamW for everything else.

Muon (momentum, Nesterov, Newton-Schulz orthogonalisation of the update) is defined for the
matrices inside the repeated transformer blocks. Embeddings, the LM head, norms, biases and
the MoE router train with AdamW: the router is a small classifier head over experts, where
equalising the singular values of its update would push rarely-chosen experts' logits as
hard as the busy ones'.

Library pieces do the updates: torch.optim.Muon for 2D matrices, torch.optim.AdamW for the
rest and, under DeepSpeed ZeRO, DeepSpeed's MuonWithAuxAdam (its ZeRO code gathers each
matrix before orthogonalising it). Written here, because none of them has it:
  - the grouping of a Hugging Face model's parameters (`parameter_roles`);
  - `ExpertMuon`: torch.optim.Muon's update for the 3D expert stacks of transformers v5 MoE
    models ((E, 2I, H) gate_up_proj, (E, H, I) down_proj), each expert orthogonalised on its
    own in one batched Newton-Schulz (torch.optim.Muon accepts 2D parameters only);
  - `MuonHybrid`: the library optimizers over shared parameter groups, as the one optimizer
    the Trainer drives, checkpoints and schedules;
  - per-group learning rates that give DeepSpeed's Muon the AdamW-matched update size.

LR matching (adjust_lr="match_rms_adamw", Moonlight, arXiv:2502.16982): each orthogonalised
update is scaled by 0.2 * sqrt(max(rows, cols)), the RMS of a typical AdamW update, so one
learning rate and one decoupled weight decay serve both groups.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

MATCH_RMS = "match_rms_adamw"  # Moonlight: update RMS of AdamW, one lr for both groups
ORIGINAL = "original"  # Keller Jordan: sqrt(max(1, rows/cols)), needs a Muon-specific lr
ADJUST_LR = (MATCH_RMS, ORIGINAL)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of Keller Jordan's Muon (also torch's)
NS_STEPS = 5  # DeepSpeed's Muon fixes 5; the single-process path uses the same

MUON, EXPERT_MUON, ADAMW, ADAMW_NO_DECAY = "muon", "expert_muon", "adamw", "adamw_no_decay"
ROLES = (MUON, EXPERT_MUON, ADAMW, ADAMW_NO_DECAY)


@dataclass(frozen=True)
class MuonSettings:
    lr: float  # AdamW group
    muon_lr: float  # Muon groups; equal to lr when adjust_lr is match_rms_adamw
    weight_decay: float  # decoupled, both groups (not on norms and biases)
    betas: tuple[float, float]
    eps: float
    momentum: float
    adjust_lr: str

    def __post_init__(self) -> None:
        if self.adjust_lr not in ADJUST_LR:
            raise ValueError(f"optim.adjust_lr={self.adjust_lr!r}; valid: {', '.join(ADJUST_LR)}")


def logical_shape(param: Tensor) -> tuple[int, ...]:
    """The parameter's shape, also when ZeRO-3 has partitioned it into a flat shard."""
    return tuple(getattr(param, "ds_shape", param.shape))


def parameter_roles(model: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """name -> (role, parameter) for every trainable parameter (tied weights once).

    muon          2D matrices inside the repeated blocks (attention, dense MLP)
    expert_muon   3D MoE expert stacks inside the blocks, one matrix per expert
    adamw         other matrices: embeddings, LM/score heads, MoE routers, PEFT adapters
    adamw_no_decay  vectors: norms and biases
    """
    roles: dict[str, tuple[str, nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        is_router = "router" in type(module).__name__.lower()
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            ndim = len(logical_shape(param))
            in_block = re.search(r"(^|\.)\d+\.", name) is not None  # e.g. model.layers.3.mlp...
            hidden = in_block and not is_router and "lora_" not in name
            if ndim < 2:
                role = ADAMW_NO_DECAY
            elif hidden and ndim == 2:
                role = MUON
            elif hidden and ndim == 3:
                role = EXPERT_MUON
            else:
                role = ADAMW
            roles[name] = (role, param)
    return roles


def update_scale(shape: tuple[int, ...], adjust_lr: str) -> float:
    """Multiplier of the lr for one orthogonalised (rows, cols) update (the last two dims)."""
    rows, cols = shape[-2:]
    if adjust_lr == MATCH_RMS:
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


def newton_schulz(matrices: Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise each matrix of a batch: (..., rows, cols) -> same shape.

    The quintic iteration of Muon (the coefficients torch.optim.Muon uses): it maps G = U S V^T
    to about U S' V^T with S' within roughly [0.7, 1.2], not exactly 1, which training does
    not mind. Runs in bfloat16 on GPUs, as torch.optim.Muon does, and in float32 elsewhere,
    where bfloat16 matmuls are emulated and about ten times slower.
    """
    a, b, c = NS_COEFFICIENTS
    x = matrices.to(torch.bfloat16 if matrices.is_cuda else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(matrices.dtype)


class ExpertMuon(Optimizer):
    """torch.optim.Muon's update for stacks of matrices (E, rows, cols), e.g. MoE experts: each
    matrix has its own orthogonalisation and its own update scale; the momentum buffer and
    the decoupled weight decay are those of torch.optim.Muon, with the same hyperparameters."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, eps: float = 1e-7, ns_steps: int = NS_STEPS,
                 adjust_lr_fn: str | None = None) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for param in group["params"]:
                if param.ndim != 3:
                    raise ValueError(f"ExpertMuon takes (experts, rows, cols) parameters, got {tuple(param.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                update = param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = newton_schulz(update, group["ns_steps"], group["eps"])
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-lr * update_scale(param.shape, group["adjust_lr_fn"] or ORIGINAL))
        return loss


class MuonHybrid(Optimizer):
    """One optimizer over parameter groups that each name their update rule (group["rule"]):
    torch.optim.Muon, ExpertMuon or torch.optim.AdamW. The rule optimizers share this
    optimizer's group dicts and state, so the Trainer's scheduler, gradient clipping and
    checkpoints see a single ordinary optimizer."""

    RULES: dict[str, type[Optimizer]] = {MUON: torch.optim.Muon, EXPERT_MUON: ExpertMuon, ADAMW: torch.optim.AdamW}

    def __init__(self, param_groups: list[dict]) -> None:
        self.rules: dict[str, Optimizer] = {}
        for rule, optimizer_cls in self.RULES.items():
            groups = [group for group in param_groups if group["rule"] == rule]
            if groups:  # fills in each group's defaults, in place
                self.rules[rule] = optimizer_cls(groups)
        super().__init__(param_groups, defaults={})
        self._share_groups_and_state()

    def _share_groups_and_state(self) -> None:
        for rule, optimizer in self.rules.items():
            optimizer.param_groups = [group for group in self.param_groups if group["rule"] == rule]
            optimizer.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # makes new group dicts and a new state
        self._share_groups_and_state()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.rules.values():
            optimizer.step()
        return loss


def split(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """role -> parameters (see parameter_roles)."""
    by_role: dict[str, list[nn.Parameter]] = {role: [] for role in ROLES}
    for role, param in parameter_roles(model).values():
        by_role[role].append(param)
    return by_role


def adamw_groups(by_role: dict[str, list[nn.Parameter]], settings: MuonSettings) -> list[dict]:
    adamw = dict(lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps)
    return [
        {"params": params, "weight_decay": decay, **adamw}
        for params, decay in ((by_role[ADAMW], settings.weight_decay), (by_role[ADAMW_NO_DECAY], 0.0))
        if params
    ]


def hybrid_optimizer(model: nn.Module, settings: MuonSettings) -> MuonHybrid:
    """Single process or DDP (every rank holds whole matrices). AdamW groups come first, so
    the Trainer logs the AdamW learning rate."""
    by_role = split(model)
    muon = dict(lr=settings.muon_lr, weight_decay=settings.weight_decay, momentum=settings.momentum,
                nesterov=True, ns_steps=NS_STEPS, adjust_lr_fn=settings.adjust_lr)
    # fused AdamW, as optim=adamw (pipeline/optim.py): no temporaries the size of the embedding
    groups = [{"rule": ADAMW, "fused": True, **group} for group in adamw_groups(by_role, settings)]
    groups += [{"rule": rule, "params": by_role[rule], **muon} for rule in (MUON, EXPERT_MUON) if by_role[rule]]
    return MuonHybrid(groups)


def deepspeed_optimizer(model: nn.Module, settings: MuonSettings) -> Optimizer:
    """DeepSpeed's MuonWithAuxAdam, for ZeRO-1/2/3: its ZeRO code runs Muon on whole (gathered)
    matrices, 3D expert stacks batched per expert, and AdamW on the flat shards of the rest.

    DeepSpeed scales each update by sqrt(max(1, rows/cols)) and applies weight decay as
    lr * weight_decay. One Muon group per matrix shape, with lr and weight decay rescaled,
    gives the update and decay the single-process hybrid gives (adjust_lr included).
    """
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    by_role = split(model)
    groups = [{"use_muon": False, **group} for group in adamw_groups(by_role, settings)]
    by_shape: dict[tuple[int, int], list[nn.Parameter]] = defaultdict(list)
    for param in by_role[MUON] + by_role[EXPERT_MUON]:
        by_shape[logical_shape(param)[-2:]].append(param)
    for shape, params in by_shape.items():
        ratio = update_scale(shape, settings.adjust_lr) / update_scale(shape, ORIGINAL)
        groups.append({"params": params, "use_muon": True, "lr": settings.muon_lr * ratio,
                       "weight_decay": settings.weight_decay / ratio, "momentum": settings.momentum})
    for role, params in by_role.items():
        for param in params:
            param.use_muon = role in (MUON, EXPERT_MUON)  # DeepSpeed's ZeRO code reads this tag
    return MuonWithAuxAdam(groups, adam_optimizer=torch.optim.AdamW)


def build_optimizer(model: nn.Module, settings: MuonSettings, deepspeed: bool = False) -> Optimizer:
    return deepspeed_optimizer(model, settings) if deepspeed else hybrid_optimizer(model, settings)
