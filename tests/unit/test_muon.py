"""The Muon hybrid's own parts (grouping, batched Newton-Schulz, ExpertMuon, the shared-state
optimizer, DeepSpeed group lrs), each checked against torch.optim.Muon where both apply."""

import copy
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf
from torch.optim._muon import _zeropower_via_newtonschulz as torch_newton_schulz

from pipeline import muon
from pipeline.models import build_model
from pipeline.tokenizer import train_tokenizer
from tests.conftest import CONF

SETTINGS = muon.MuonSettings(lr=3e-3, muon_lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                             momentum=0.95, adjust_lr=muon.MATCH_RMS)
LAYERS, EXPERTS = 4, 8


@pytest.fixture(scope="module")
def tiny_moe():
    """The pipeline's tiny MoE (conf/model/tiny_moe.yaml), built as the pretrain stage builds it."""
    tokenizer = train_tokenizer(["Q: 47+18-9=?\n47+18=65\n65-9=56\nA: 56\n"] * 20, 300)
    torch.manual_seed(0)
    return build_model(OmegaConf.load(CONF / "model" / "tiny_moe.yaml"), tokenizer)


def lm_loss(model, seed: int) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(seed))
    return model(input_ids=ids, labels=ids).loss


def singular_values(matrices: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrices.double())


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (128, 128), (8, 256, 128), (8, 128, 128)])
def test_newton_schulz_is_near_orthogonal(shape):
    torch.manual_seed(0)
    # ill-conditioned input: singular values spread over two decades
    u, _, vh = torch.linalg.svd(torch.randn(shape), full_matrices=False)
    spread = torch.logspace(0, -2, u.shape[-1])
    matrices = u @ torch.diag_embed(spread.expand(*shape[:-2], -1)) @ vh
    out = muon.newton_schulz(matrices)
    assert out.shape == matrices.shape and out.dtype == matrices.dtype
    sv = singular_values(out)
    # Muon's quintic does not converge to 1: after 5 steps it leaves them in about [0.68, 1.2]
    assert sv.min() > 0.65 and sv.max() < 1.25, sv
    # and it keeps the singular vectors: out ~ U V^T
    assert (out - u @ vh).norm() / (u @ vh).norm() < 0.25


def test_newton_schulz_orthogonalises_each_expert_on_its_own():
    torch.manual_seed(0)
    stack = torch.randn(EXPERTS, 256, 128) * torch.logspace(0, 2, EXPERTS).view(-1, 1, 1)  # scales differ
    batched = muon.newton_schulz(stack)
    one_by_one = torch.stack([muon.newton_schulz(matrix) for matrix in stack])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=1e-5)
    flattened = muon.newton_schulz(stack.reshape(-1, 128)).reshape(stack.shape)  # the wrong way
    assert (flattened - batched).norm() / batched.norm() > 0.5


@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_newton_schulz_matches_torch_on_2d(shape):
    torch.manual_seed(0)
    matrix = torch.randn(shape)
    ours = muon.newton_schulz(matrix)
    reference = torch_newton_schulz(matrix, muon.NS_COEFFICIENTS, muon.NS_STEPS, 1e-7).float()
    assert (ours - reference).norm() / reference.norm() < 0.03  # torch iterates in bfloat16, we in float32


def test_every_parameter_has_exactly_one_role(tiny_moe):
    roles = muon.parameter_roles(tiny_moe)
    params = dict(tiny_moe.named_parameters())  # tied lm_head/embedding listed once
    assert roles.keys() == params.keys()
    assert all(roles[name][1] is params[name] for name in params)
    by_role = {role: sorted(n for n, (r, _) in roles.items() if r == role) for role in muon.ROLES}
    per_layer = lambda suffixes: sorted(f"model.layers.{i}.{s}" for i in range(LAYERS) for s in suffixes)  # noqa: E731
    assert by_role[muon.MUON] == per_layer([f"self_attn.{p}_proj.weight" for p in "qkvo"])
    assert by_role[muon.EXPERT_MUON] == per_layer(["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    assert by_role[muon.ADAMW] == sorted(["model.embed_tokens.weight", *per_layer(["mlp.gate.weight"])])
    assert by_role[muon.ADAMW_NO_DECAY] == sorted(
        ["model.norm.weight", *per_layer(["input_layernorm.weight", "post_attention_layernorm.weight",
                                          "self_attn.q_norm.weight", "self_attn.k_norm.weight"])])
    assert tiny_moe.get_output_embeddings().weight is params["model.embed_tokens.weight"]  # the head: tied


def test_hybrid_groups_cover_every_parameter_once(tiny_moe):
    optimizer = muon.hybrid_optimizer(tiny_moe, SETTINGS)
    grouped = Counter(id(p) for group in optimizer.param_groups for p in group["params"])
    assert set(grouped) == {id(p) for p in tiny_moe.parameters()} and set(grouped.values()) == {1}
    rules = [(g["rule"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups]
    assert rules == [("adamw", 0.1, 1 + LAYERS), ("adamw", 0.0, 1 + 4 * LAYERS),
                     ("muon", 0.1, 4 * LAYERS), ("expert_muon", 0.1, 2 * LAYERS)]
    assert isinstance(optimizer.rules["muon"], torch.optim.Muon)
    assert isinstance(optimizer.rules["adamw"], torch.optim.AdamW)


def test_hybrid_matches_torch_muon_and_adamw(tiny_moe):
    """The hybrid moves 2D matrices as torch.optim.Muon, expert stacks as ExpertMuon and the
    rest as torch.optim.AdamW, each given the same settings on its own, over steps that
    exercise momentum, weight decay and the shared state."""
    model = copy.deepcopy(tiny_moe)
    reference = copy.deepcopy(tiny_moe)
    hybrid = muon.hybrid_optimizer(model, SETTINGS)
    roles = muon.parameter_roles(reference)
    pick = lambda *wanted: [p for r, p in roles.values() if r in wanted]  # noqa: E731
    torch_muon = torch.optim.Muon(pick(muon.MUON), lr=3e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                                  adjust_lr_fn="match_rms_adamw")
    torch_adamw = torch.optim.AdamW([{"params": pick(muon.ADAMW), "weight_decay": 0.1},
                                     {"params": pick(muon.ADAMW_NO_DECAY), "weight_decay": 0.0}],
                                    lr=3e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
    expert_muon = muon.ExpertMuon(pick(muon.EXPERT_MUON), lr=3e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                                  adjust_lr_fn="match_rms_adamw")
    for step in range(3):
        for net, optimizers in ((model, [hybrid]), (reference, [torch_muon, expert_muon, torch_adamw])):
            lm_loss(net, step).backward()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
    for (name, param), (_, expected) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(param, expected, rtol=0, atol=1e-7, msg=name)
    assert (model.model.layers[0].self_attn.q_proj.weight - tiny_moe.model.layers[0].self_attn.q_proj.weight).abs().max() > 1e-3


@pytest.mark.parametrize("adjust_lr", muon.ADJUST_LR)
def test_expert_muon_is_torch_muon_per_expert(adjust_lr):
    """A 3D expert stack under ExpertMuon moves as E separate 2D matrices under torch.optim.Muon."""
    torch.manual_seed(0)
    origin = torch.randn(EXPERTS, 96, 32) * 0.02
    stack = torch.nn.Parameter(origin.clone())
    experts = [torch.nn.Parameter(matrix.clone()) for matrix in origin]
    settings = dict(lr=0.01, weight_decay=0.1, momentum=0.9, nesterov=True, adjust_lr_fn=adjust_lr)
    ours, theirs = muon.ExpertMuon([stack], **settings), torch.optim.Muon(experts, **settings)
    for _ in range(3):
        grad = torch.randn(stack.shape) * torch.logspace(-2, 1, EXPERTS).view(-1, 1, 1)  # experts differ in scale
        stack.grad = grad.clone()
        for expert, expert_grad in zip(experts, grad):
            expert.grad = expert_grad.clone()
        ours.step()
        theirs.step()
    theirs_moved = torch.stack([expert.detach() for expert in experts])
    travel = (theirs_moved - origin).norm()
    assert travel > 0.05
    # torch iterates in bfloat16, ExpertMuon (on CPU) in float32
    assert (stack.detach() - theirs_moved).norm() / travel < 0.03


def test_state_dict_round_trip_continues_identically(tiny_moe):
    model = copy.deepcopy(tiny_moe)
    optimizer = muon.hybrid_optimizer(model, SETTINGS)
    for step in range(2):
        lm_loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    saved_model, saved_state = copy.deepcopy(model), copy.deepcopy(optimizer.state_dict())
    resumed = muon.hybrid_optimizer(saved_model, SETTINGS)
    resumed.load_state_dict(saved_state)
    assert all(rule.state is resumed.state for rule in resumed.rules.values())
    for net, opt in ((model, optimizer), (saved_model, resumed)):
        lm_loss(net, 2).backward()
        opt.step()
    for (name, a), (_, b) in zip(model.named_parameters(), saved_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_scheduler_reaches_every_rule(tiny_moe):
    optimizer = muon.hybrid_optimizer(copy.deepcopy(tiny_moe), SETTINGS)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)  # sets lr = 0.5 * initial lr
    for rule in optimizer.rules.values():
        assert {g["lr"] for g in rule.param_groups} == {1.5e-3}


@pytest.mark.parametrize("adjust_lr", muon.ADJUST_LR)
def test_deepspeed_groups_give_the_same_step_size_and_decay(tiny_moe, adjust_lr):
    """DeepSpeed's Muon scales by sqrt(max(1, rows/cols)) and decays by lr * weight_decay; the
    per-shape groups turn that into the hybrid's scale and decay."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.muon.original_muon import _aspect_ratio_scale

    settings = muon.MuonSettings(**{**SETTINGS.__dict__, "adjust_lr": adjust_lr, "muon_lr": 0.02})
    model = copy.deepcopy(tiny_moe)
    optimizer = muon.deepspeed_optimizer(model, settings)
    roles = muon.parameter_roles(model)
    grouped = Counter(id(p) for group in optimizer.param_groups for p in group["params"])
    assert set(grouped) == {id(p) for p in model.parameters()} and set(grouped.values()) == {1}
    for group in optimizer.param_groups:
        for param in group["params"]:
            assert param.use_muon == group["use_muon"]
        if not group["use_muon"]:
            assert group["lr"] == settings.lr
            continue
        shape = param.shape
        assert group["lr"] * _aspect_ratio_scale(*shape[-2:]) == pytest.approx(0.02 * muon.update_scale(shape, adjust_lr))
        assert group["lr"] * group["weight_decay"] == pytest.approx(0.02 * 0.1)
    muon_params = {id(p) for g in optimizer.param_groups if g["use_muon"] for p in g["params"]}
    assert muon_params == {id(p) for r, p in roles.values() if r in (muon.MUON, muon.EXPERT_MUON)}


def test_unknown_adjust_lr_is_refused():
    with pytest.raises(ValueError, match=r"optim.adjust_lr='rms'; valid: match_rms_adamw, original"):
        muon.MuonSettings(**{**SETTINGS.__dict__, "adjust_lr": "rms"})
