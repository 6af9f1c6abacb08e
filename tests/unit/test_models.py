"""pipeline/models.py: building a model from the model group, and the bytes a stage holds for\nthe model it trains."""

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.adapters import build_peft_config
from pipeline.errors import ConfigError
from pipeline.models import build_model, load_model
from pipeline.tasks import build_task
from pipeline.tokenizer import save_tokenizer, train_tokenizer
from pipeline.trainer_settings import arguments, policy_dtype
from stages.sft import build_datasets, build_trainer, training_args
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["1 + 2 = 3", "4 - 1 = 3"] * 20, 280)


def test_vocab_size_pads_the_embedding_beyond_the_tokenizer(tokenizer):
    model_cfg = compose_config(["model=tiny_dense"]).model
    assert build_model(model_cfg, tokenizer).get_input_embeddings().weight.shape[0] == len(tokenizer)
    OmegaConf.update(model_cfg, "config.vocab_size", len(tokenizer) + 64, force_add=True)
    model = build_model(model_cfg, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) + 64
    assert model.config.pad_token_id == tokenizer.pad_token_id
    OmegaConf.update(model_cfg, "config.vocab_size", len(tokenizer) - 1)
    with pytest.raises(ConfigError, match="model.config.vocab_size"):
        build_model(model_cfg, tokenizer)


def held_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the modules' parameters."""
    storages = {}
    for module in modules:
        for tensor in module.parameters():
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    cfg = compose_config(["preset=smoke", "peft=lora", "trainer.precision=bf16", "stages.sft.max_steps=2"])
    task = build_task(cfg.task)
    tok = train_tokenizer(task.pretrain_texts(), int(cfg.stages.pretrain.tokenizer_vocab_size))
    model = build_model(cfg.model, tok)
    checkpoints = {}
    for dtype in (torch.float32, torch.bfloat16):
        path = tmp_path_factory.mktemp(str(dtype).removeprefix("torch."))
        model.to(dtype).save_pretrained(path)
        save_tokenizer(tok, path)
        checkpoints[dtype] = path
    return cfg, task, tok, checkpoints


def test_a_frozen_lora_base_is_held_in_the_forward_dtype(sft_setup, tmp_path):
    """sft with LoRA under bf16 on a bf16 checkpoint: the frozen base takes 2 bytes per
    parameter, the adapter 4 (fp32 master weights), and training moves the adapter alone."""
    cfg, task, tok, checkpoints = sft_setup
    assert policy_dtype(cfg, "sft", checkpoints[torch.bfloat16], "lora") == torch.bfloat16
    assert policy_dtype(cfg, "sft", checkpoints[torch.float32], "lora") == torch.float32  # merge rounds nothing
    assert policy_dtype(cfg, "sft", checkpoints[torch.bfloat16], "none") == torch.float32  # master weights
    fp32 = compose_config(["preset=smoke", "peft=lora", "trainer.precision=fp32"])
    assert policy_dtype(fp32, "sft", checkpoints[torch.bfloat16], "lora") == torch.float32

    model = load_model(str(checkpoints[torch.bfloat16]), dtype=torch.bfloat16)
    base_parameters = sum(p.numel() for p in model.parameters())
    train, evaluation = build_datasets(tok, task, cfg.stages.sft, seed=0)
    args = training_args(cfg.stages.sft, cfg.optim, cfg.peft, tmp_path, 0, arguments(cfg, "sft", tmp_path))
    trainer = build_trainer(model, tok, train, evaluation, args, build_peft_config(cfg.peft, model))
    adapter = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert adapter and all(p.dtype == torch.float32 for p in adapter.values())
    assert all(p.dtype == torch.bfloat16 for p in base.values())
    adapter_parameters = sum(p.numel() for p in adapter.values())
    assert held_bytes(trainer.model) == 2 * base_parameters + 4 * adapter_parameters

    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base.items())
    assert all(not torch.equal(after[n], p) for n, p in adapter.items() if ".lora_B." in n)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
