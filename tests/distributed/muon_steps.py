"""A few Trainer steps on one fixed batch of 16 sequences with the pipeline's optim factory,
then final weights to <out_dir>. Same model init, data and settings on any launch:

    python -m tests.distributed.muon_steps <out_dir> <steps> [optim overrides...]
    accelerate launch --config_file conf/accelerate/zero2.yaml -m tests.distributed.muon_steps ...

Each step sees all 16 sequences (8 per rank on 2 ranks), so every launch computes the same
mean gradient and the final weights differ only by how the optimizer was run.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

from pipeline import distributed
from pipeline.optim import optimizer_cls_and_kwargs, trainer_kwargs

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_BATCH, SEQ_LEN, VOCAB = 16, 32, 64


def initial_model():
    """The tiny MoE of conf/model/tiny_moe.yaml, the same weights on every call."""
    model_cfg = OmegaConf.load(ROOT / "conf/model/tiny_moe.yaml")
    config = AutoConfig.for_model(model_cfg.arch, vocab_size=VOCAB, **OmegaConf.to_container(model_cfg.config))
    config.output_router_logits = False  # the aux loss of 8 sequences is not half that of 16
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def main(out_dir: str, steps: int, overrides: list[str]) -> None:
    distributed.state()  # gloo process group before anything builds an Accelerator
    optim_cfg = OmegaConf.merge(OmegaConf.load(ROOT / "conf/optim/muon.yaml"), OmegaConf.from_dotlist(overrides))
    model = initial_model()
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    data = Dataset.from_dict({"input_ids": tokens.tolist(), "labels": tokens.tolist()})
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=GLOBAL_BATCH // distributed.world_size(),
        save_strategy="no", report_to=[], logging_steps=1, seed=0, **trainer_kwargs(optim_cfg),
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(optim_cfg))
    trainer.train()
    trainer.save_model(out_dir)  # every rank: ZeRO-3 gathers the shards


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
