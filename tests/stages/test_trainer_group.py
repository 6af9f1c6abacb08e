"""The trainer group through real smoke runs: bf16 autocast in every training stage, TensorBoard
event files per stage, gradient checkpointing and the attention kernel leaving the loss alone."""

import json
from pathlib import Path

import pytest

from pipeline import artifacts
from tests.conftest import SMOKE_CHAIN, run_cli

TRAINING = ("pretrain", "sft", "reward", "dpo", "grpo")


def metrics(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "metrics.json").read_text())


def first_logged_loss(run_dir: Path, stage: str) -> float:
    """The first training loss the stage logged, from its newest checkpoint's trainer state."""
    newest = max((run_dir / stage).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((newest / "trainer_state.json").read_text())["log_history"]
    return next(entry["loss"] for entry in history if "loss" in entry)


def event_files(stage_dir: Path) -> list[Path]:
    return sorted(stage_dir.glob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def bf16_chain(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("bf16") / "run"
    run_cli("preset=smoke", f"run.dir={run_dir}", SMOKE_CHAIN, "trainer.precision=bf16")
    return run_dir


@pytest.fixture(scope="module")
def checkpointed_chain(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("gc") / "run"
    run_cli("preset=smoke", f"run.dir={run_dir}", SMOKE_CHAIN, "trainer.gradient_checkpointing=true", "trainer.report_to=none")
    return run_dir


def test_bf16_trains_under_bf16_autocast_in_every_training_stage(bf16_chain, smoke_chain_run):
    for stage in TRAINING:
        assert metrics(bf16_chain, stage)["mixed_precision"] == "bf16", stage
        assert metrics(smoke_chain_run, stage)["mixed_precision"] == "no", stage  # auto on CPU: fp32
    for stage in ("pretrain", "sft", "reward"):
        m = metrics(bf16_chain, stage)
        assert m["train_loss"] < m["train_loss_first"], stage
        assert first_logged_loss(bf16_chain, stage) != first_logged_loss(smoke_chain_run, stage)  # not fp32 under another name
    # final/ of a bf16 run loads and answers (test_time read the grpo final of this chain), its
    # policy loaded in bf16 as a forward-only model; the fp32 run's in fp32
    assert metrics(bf16_chain, "test_time")["eval_num_problems"] > 0
    assert metrics(bf16_chain, "test_time")["model_dtype"] == "bfloat16"
    assert metrics(smoke_chain_run, "test_time")["model_dtype"] == "float32"
    # grpo's frozen reference: forward-only, loaded in bf16; dpo precomputes its reference log-probs
    assert metrics(bf16_chain, "grpo")["reference_dtype"] == "bfloat16"
    assert metrics(smoke_chain_run, "grpo")["reference_dtype"] == "float32"
    for run in (bf16_chain, smoke_chain_run):
        assert metrics(run, "dpo")["reference"] == "precomputed" and "reference_dtype" not in metrics(run, "dpo")
    # the model was built from config: every final/ stays fp32 (save_dtype auto follows the input)
    for stage in TRAINING:
        assert safetensors_dtypes(bf16_chain / stage / "final") == {"F32"}, stage


def safetensors_dtypes(directory: Path) -> set[str]:
    """The dtypes of the floating-point tensors in a checkpoint's safetensors files, as stored."""
    return set().union(*(artifacts.safetensors_header(file)[1] for file in directory.glob("*.safetensors")))


@pytest.fixture(scope="module")
def bf16_checkpoint(smoke_pretrain_run, tmp_path_factory) -> Path:
    """The smoke pretrain's final/ re-saved in bf16, as a user's bf16 hub checkpoint comes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("bf16_input") / "model"
    source = smoke_pretrain_run / "pretrain" / "final"
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    return out


@pytest.mark.parametrize("save_dtype, stored, recorded", [("auto", "BF16", "bfloat16"), ("fp32", "F32", "float32")])
def test_a_bf16_input_comes_out_of_sft_in_bf16_unless_save_dtype_says(bf16_checkpoint, tmp_path, save_dtype, stored, recorded):
    run_dir = tmp_path / "run"
    run_cli("preset=smoke", "run.stages=[sft]", f"run.dir={run_dir}", f"stages.sft.init={bf16_checkpoint}",
            f"trainer.save_dtype={save_dtype}", "stages.sft.max_steps=4", "stages.sft.save_steps=4",
            "stages.sft.eval_steps=4", "stages.sft.logging_steps=2", "trainer.report_to=none")
    final = run_dir / "sft" / "final"
    assert safetensors_dtypes(final) == {stored}
    assert json.loads((final / "config.json").read_text())["dtype"] == recorded
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(final, dtype="auto")
    assert str(loaded.dtype) == f"torch.{recorded}"


def test_tensorboard_event_files_hold_each_stages_training_loss(smoke_chain_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for stage in TRAINING:
        files = event_files(smoke_chain_run / stage)
        assert files, f"no event file in {stage}/"
        events = EventAccumulator(str(smoke_chain_run / stage)).Reload()
        assert "train/loss" in events.Tags()["scalars"], (stage, events.Tags()["scalars"])
        assert len(events.Scalars("train/loss")) >= 1
    assert not event_files(smoke_chain_run / "test_time")  # trains nothing


def test_report_to_none_writes_no_event_file(checkpointed_chain):
    for stage in TRAINING:
        assert not event_files(checkpointed_chain / stage), stage


def test_gradient_checkpointing_leaves_the_first_loss_alone_in_every_training_stage(checkpointed_chain, smoke_chain_run):
    for stage in TRAINING:
        on, off = first_logged_loss(checkpointed_chain, stage), first_logged_loss(smoke_chain_run, stage)
        assert on == pytest.approx(off, rel=1e-4, abs=1e-5), stage


def test_sdpa_and_eager_give_the_same_first_loss(tmp_path):
    losses = {}
    for kernel in ("sdpa", "eager"):
        run_dir = tmp_path / kernel
        run_cli("preset=smoke", "run.stages=[pretrain]", f"run.dir={run_dir}", f"trainer.attn_implementation={kernel}",
                "stages.pretrain.max_steps=2", "stages.pretrain.logging_steps=1", "stages.pretrain.save_steps=2")
        losses[kernel] = first_logged_loss(run_dir, "pretrain")
        config = json.loads((run_dir / "pretrain" / "final" / "config.json").read_text())
        assert config.get("_attn_implementation", kernel) in (kernel, None)
    assert losses["sdpa"] == pytest.approx(losses["eager"], rel=1e-5)


def test_flash_attention_fails_before_compute_with_exit_2(tmp_path):
    done = run_cli("preset=smoke", "run.stages=[pretrain]", f"run.dir={tmp_path / 'run'}",
                   "trainer.attn_implementation=flash_attention_2", check=False)
    assert done.returncode == 2
    assert "trainer.attn_implementation=flash_attention_2 needs a CUDA GPU" in done.stdout + done.stderr
    assert not (tmp_path / "run" / "pretrain").exists()
