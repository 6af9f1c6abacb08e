"""The sft stage rejects bad input and config before any stage of the run computes."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from peft import PromptTuningConfig

from pipeline.runner import ConfigError, plan_stages
from pipeline.tokenizer import train_tokenizer
from tests.conftest import compose_config, run_cli

TEXTS = ["Q: 47+18-9=?\n47+18=65\n65-9=56\nA: 56\n"] * 20


def checkpoint(tmp_path: Path, tokenizer: bool = True, chat_template: bool = True) -> Path:
    """A checkpoint directory as far as validation reads it: config.json and the tokenizer."""
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "qwen3"}')
    save_file({"stand_in": torch.zeros(1)}, str(path / "model.safetensors"))  # weights are checked: an intact file
    if tokenizer:
        tok = train_tokenizer(TEXTS, 300)
        if not chat_template:
            tok.chat_template = None
        tok.save_pretrained(path)
    return path


def plan_sft(tmp_path: Path, init: Path, *overrides: str):
    cfg = compose_config(["run.stages=[sft]", f"stages.sft.init={init}", *overrides])
    return plan_stages(cfg, tmp_path / "run")


def test_input_without_tokenizer_fails_naming_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"has no tokenizer.*tokenizer.save_pretrained"):
        plan_sft(tmp_path, checkpoint(tmp_path, tokenizer=False))


def test_input_without_chat_template_fails_naming_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"has no chat template.*tokenizer.chat_template = "):
        plan_sft(tmp_path, checkpoint(tmp_path, chat_template=False))


def test_input_with_chat_template_passes(tmp_path):
    (plan,) = plan_sft(tmp_path, checkpoint(tmp_path))
    assert plan.name == "sft" and plan.input_path.name == "model"


def test_cli_reports_the_missing_chat_template_and_exits_2(tmp_path):
    init = checkpoint(tmp_path, chat_template=False)
    proc = run_cli("run.stages=[sft]", f"stages.sft.init={init}", f"run.dir={tmp_path / 'run'}", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "has no chat template" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing ran, and no run dir was made


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["peft=prompt", "stages.sft.packing=true"], r"packing=true with peft=prompt"),
        (["peft=lora", "peft.dropout=0.1"], r"peft.dropout=0.1 cannot apply to peft.target_parameters"),
        (["stages.sft.pretrain_mix=1.0"], r"pretrain_mix=1.0 must be in \[0, 1\)"),
        (["stages.sft.eval_examples=0"], r"eval_examples=0"),
    ],
)
def test_bad_config_fails_before_compute(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_sft(tmp_path, checkpoint(tmp_path), *overrides)


def test_adapter_input_fails_naming_its_base(tmp_path):
    init = checkpoint(tmp_path)
    PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4).save_pretrained(init)
    with pytest.raises(ConfigError, match=r"is a PEFT adapter.*stages.sft.init=.*model/base"):
        plan_sft(tmp_path, init, "peft=prompt")
