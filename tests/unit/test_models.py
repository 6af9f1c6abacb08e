"""pipeline/models.py: building a model from the model group."""

import pytest
from omegaconf import OmegaConf

from pipeline.errors import ConfigError
from pipeline.models import build_model
from pipeline.tokenizer import train_tokenizer
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
