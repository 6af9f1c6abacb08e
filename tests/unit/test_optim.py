"""The optim factory: what each launch gets, and the launches it refuses before training."""

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from pipeline import muon
from pipeline.optim import check_supported, optimizer_cls_and_kwargs, optimizer_state_bytes, trainer_kwargs
from tests.conftest import CONF, ROOT, compose_config


def optim(name: str, *overrides: str):
    return compose_config([f"optim={name}", *overrides]).optim


def launch_with_deepspeed(monkeypatch, tmp_path, config: dict | str) -> None:
    """The environment `accelerate launch --config_file conf/accelerate/zero*.yaml` sets."""
    path = CONF / "deepspeed" / config if isinstance(config, str) else tmp_path / "ds.json"
    if isinstance(config, dict):
        path.write_text(json.dumps(config))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))


def test_adamw_is_the_trainers_own():
    kwargs = trainer_kwargs(optim("adamw"), lr=1e-3)
    assert kwargs["optim"] == "adamw_torch_fused" and kwargs["learning_rate"] == 1e-3 and kwargs["ddp_backend"] is None
    assert optimizer_cls_and_kwargs(optim("adamw")) is None


ADAMW_STEP = """
import sys, torch
from pathlib import Path
from transformers import Trainer, TrainingArguments
from pipeline.optim import trainer_kwargs
from tests.conftest import compose_config

def status(key):  # kB
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
    return int(line.split()[1])

args = TrainingArguments(output_dir=sys.argv[1], report_to=[], **trainer_kwargs(compose_config([]).optim))
cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
weight = torch.nn.Parameter(torch.randn(32 * 2**20))  # 128 MiB, like one embedding matrix
weight.grad = torch.randn_like(weight)
optimizer = cls([weight], **kwargs)
Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark (VmHWM) to the current RSS
before = status("VmRSS:")
optimizer.step()
print((status("VmHWM:") - before) / 1024)
"""


def test_the_adamw_step_holds_its_state_and_no_copy_of_the_weights(tmp_path):
    """Peak resident growth over the first step: the two moments (256 MiB) and nothing else. The
    single-tensor AdamW (torch's CPU default) measured 516 MiB: two temporaries of the parameter."""
    proc = subprocess.run([sys.executable, "-c", ADAMW_STEP, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    growth_mib = float(proc.stdout.split()[-1])
    assert 250 <= growth_mib <= 256 + 32, growth_mib


def test_muon_is_built_by_the_trainers_factory_hook():
    factory, kwargs = optimizer_cls_and_kwargs(optim("muon"), lr=2e-3)
    assert kwargs["settings"] == muon.MuonSettings(lr=2e-3, muon_lr=2e-3, weight_decay=0.1, betas=(0.9, 0.95),
                                                   eps=1e-8, momentum=0.95, adjust_lr="match_rms_adamw")
    assert kwargs["deepspeed"] is False
    layer = torch.nn.ModuleList([torch.nn.Linear(8, 8)])  # named "0.weight": a matrix inside a block
    optimizer = factory()(layer, **kwargs)  # how transformers' Trainer.create_optimizer calls it
    assert isinstance(optimizer, muon.MuonHybrid)
    assert [g["rule"] for g in optimizer.param_groups] == ["adamw", "muon"]
    _, kwargs = optimizer_cls_and_kwargs(optim("muon", "optim.adjust_lr=original", "optim.muon_lr=0.02"))
    assert kwargs["settings"].muon_lr == 0.02 and kwargs["settings"].lr == 3e-3


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_shipped_zero_configs_run_both_optimizers(monkeypatch, tmp_path, stage):
    launch_with_deepspeed(monkeypatch, tmp_path, f"zero{stage}.json")
    check_supported(optim("adamw"))
    check_supported(optim("muon"))
    assert optimizer_cls_and_kwargs(optim("muon"))[1]["deepspeed"] is True
    config = json.loads((CONF / "deepspeed" / f"zero{stage}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage and "optimizer" not in config
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["gradient_clipping"] == "auto"
    accelerate = OmegaConf.load(CONF / "accelerate" / f"zero{stage}.yaml")
    assert accelerate.distributed_type == "DEEPSPEED" and accelerate.num_processes == 2
    assert accelerate.deepspeed_config.deepspeed_config_file == f"conf/deepspeed/zero{stage}.json"


@pytest.mark.parametrize(
    "config, overrides, message",
    [
        ({"zero_optimization": {"stage": 0}}, [], r"needs ZeRO stage 1, 2 or 3.*stage 0"),
        ({"zero_optimization": {"stage": 3}}, [], r"ZeRO-3 needs \"reduce_scatter\": false"),
        ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, [], r"\"optimizer\" section"),
        ({"zero_optimization": {"stage": 2}}, ["optim.max_grad_norm=1.0"], r"needs optim.max_grad_norm=0"),
    ],
)
def test_impossible_deepspeed_combinations_are_refused(monkeypatch, tmp_path, config, overrides, message):
    launch_with_deepspeed(monkeypatch, tmp_path, config)
    with pytest.raises(ValueError, match=message):
        trainer_kwargs(optim("muon", *overrides))
    check_supported(optim("adamw"))  # AdamW runs there


def test_muon_under_fsdp_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="does not run under FSDP"):
        check_supported(optim("muon"))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"optim.adjust_lr='bogus'; valid: match_rms_adamw, original"):
        trainer_kwargs(optim("muon", "optim.adjust_lr=bogus"))
    bad = OmegaConf.merge(optim("adamw"), {"name": "sgd"})
    with pytest.raises(ValueError, match=r"optim='sgd' is not available; valid: adamw, muon"):
        trainer_kwargs(bad)


def test_optimizer_state_bytes_counts_moments_through_wrappers():
    layer = torch.nn.Linear(100, 10, bias=False)
    adamw = torch.optim.AdamW(layer.parameters())
    assert optimizer_state_bytes(adamw) == 0  # no state before the first step
    layer(torch.randn(3, 100)).sum().backward()
    adamw.step()

    class Wrapper:  # accelerate's AcceleratedOptimizer, DeepSpeed's ZeRO optimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    step_counter = 4  # AdamW keeps a float32 step tensor per parameter
    assert optimizer_state_bytes(Wrapper(Wrapper(adamw))) == 2 * 1000 * 4 + step_counter


def test_stage_optim_merges_a_stage_override_over_the_group():
    from pipeline.optim import stage_optim
    from tests.conftest import compose_config

    cfg = compose_config(["stages.sft.optim={name:muon,lr:0.01}"])
    assert stage_optim(cfg, "dpo") is cfg.optim  # no override: the group itself
    merged = stage_optim(cfg, "sft")
    assert (merged.name, merged.lr, merged.weight_decay) == ("muon", 0.01, cfg.optim.weight_decay)
    assert cfg.optim.name == "adamw"  # the group is untouched


def test_a_stage_optim_override_is_checked_before_compute():
    import pytest

    from pipeline.config_check import check_config
    from pipeline.errors import ConfigError
    from tests.conftest import compose_config

    with pytest.raises(ConfigError, match=r"stages.sft.optim.nope: not a key of the optim group"):
        check_config(compose_config(["run.stages=[sft]", "stages.sft.optim={nope:1}"]))
    with pytest.raises(ConfigError, match=r"optim.lr=-1"):
        check_config(compose_config(["run.stages=[sft]", "stages.sft.optim={lr:-1}"]))
    check_config(compose_config(["run.stages=[sft]", "stages.sft.optim={name:muon,max_grad_norm:0}"]))
