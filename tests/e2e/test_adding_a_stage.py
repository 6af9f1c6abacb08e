"""A stage added from a package of one's own (README "Adding a stage"): one recipe file and one
config in a temp dir, named by run.stage_packages; it runs in a chain after sft, is skipped on
rerun and resumes after a kill to the same weights as an uninterrupted run."""

import json
import shutil
import textwrap

import pytest

from pipeline.errors import ConfigError
from pipeline.runner import plan_stages
from tests.conftest import compose_config, run_cli
from tests.stages.test_kill_resume import assert_same_weights, run_until_checkpoint

RECIPE = '''
"""Stage `polish`: more causal-LM training of the input on the task's sft completions."""

from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from pipeline import preemption, trainer_settings
from pipeline.errors import ConfigError
from pipeline.models import load_model, save_policy
from pipeline.optim import learning_rate, stage_optim, trainer_kwargs
from pipeline.resume import ExactResume
from pipeline.tokenizer import load_chat_tokenizer

SPLITS = ("sft",)
USES = ("task", "optim", "trainer")
TRAINS_INPUT = True


class PolishTrainer(ExactResume, Trainer):
    pass


def validate(cfg, input_path):
    if cfg.stages.polish.max_steps < 1:
        raise ConfigError("stages.polish.max_steps must be >= 1")


def run(ctx):
    cfg = ctx.stage_cfg
    tokenizer = load_chat_tokenizer(ctx.input_path)
    model = load_model(str(ctx.input_path))
    texts = [example["completion"] + tokenizer.eos_token for example in ctx.task.sft_examples()]
    data = Dataset.from_list([tokenizer(text) for text in texts])
    args = TrainingArguments(
        output_dir=str(ctx.stage_dir), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        save_strategy="steps", save_steps=cfg.save_steps, logging_steps=1, seed=ctx.cfg.seed,
        **trainer_settings.arguments(ctx.cfg, ctx.name, ctx.stage_dir),
        **trainer_kwargs(stage_optim(ctx.cfg, ctx.name), learning_rate(cfg)),
    )
    trainer = PolishTrainer(model=model, args=args, train_dataset=data,
                            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    output = preemption.train(trainer, ctx)
    save_policy(trainer, tokenizer, ctx.stage_dir)
    return {"train_loss": output.training_loss, "train_steps": trainer.state.global_step}
'''

CONFIG = '''
# stages.polish: more LM training on the sft completions
input_stage: sft
init: null
max_steps: 100
batch_size: 4
save_steps: 2
lr: 1.0e-3
'''


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("user-stages")
    folder = root / "mystages"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "polish.py").write_text(textwrap.dedent(RECIPE))
    (folder / "polish.yaml").write_text(textwrap.dedent(CONFIG))
    return root


def test_a_stage_from_a_package_runs_after_sft_skips_on_rerun_and_resumes_after_a_kill(
        package, smoke_chain_run, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(package))
    args = ["preset=smoke", "run.stage_packages=[mystages]", "run.stages=[sft,polish]",
            f"stages.sft.init={smoke_chain_run / 'pretrain' / 'final'}", "+stages.polish.max_steps=6",
            "trainer.report_to=none"]
    whole = tmp_path / "whole"
    run_cli(*args, f"run.dir={whole}")
    manifest = json.loads((whole / "polish" / "stage.json").read_text())
    assert manifest["status"] == "completed" and manifest["input"] == str(whole / "sft" / "final")
    metrics = json.loads((whole / "polish" / "metrics.json").read_text())
    assert metrics["train_steps"] == 6  # the command line's value over the package's config
    assert "| polish |" in (whole / "report.md").read_text()

    again = run_cli(*args, f"run.dir={whole}")
    assert "stage polish: already completed" in again.stdout

    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(whole / "sft", killed / "sft")  # completed: skipped, so the kill lands in polish
    run_until_checkpoint([*args, f"run.dir={killed}"], killed / "polish", 2, env={"PYTHONPATH": str(package)})
    run_cli(*args, f"run.dir={killed}")
    assert json.loads((killed / "polish" / "stage.json").read_text())["resumed_from"] == "checkpoint-2"
    assert_same_weights(killed / "polish" / "final", whole / "polish" / "final")


def test_an_unknown_stage_lists_the_stages_found(package, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(package))
    done = run_cli("preset=smoke", "run.stage_packages=[mystages]", "run.stages=[polsh]", f"run.dir={tmp_path}", check=False)
    assert done.returncode == 2
    listed = done.stderr.split("valid stages: ")[1].split(" (")[0].split(", ")
    assert "unknown stage 'polsh' in run.stages" in done.stderr
    assert sorted(listed) == ["dpo", "grpo", "polish", "pretrain", "reward", "sft", "test_time"]
    bad = run_cli("preset=smoke", "run.stage_packages=[mystages]", "run.stages=[polish]", "+stages.polish.max_steps=0",
                  f"run.dir={tmp_path / 'run'}", check=False)
    assert bad.returncode == 2 and "stages.polish.max_steps=0" in bad.stderr  # the config rules apply to it too


def test_a_training_stage_from_a_package_gets_the_checks_a_built_in_one_gets(package, tmp_path, monkeypatch):
    """Its contract (USES optim and trainer) makes it a training stage: what the machine cannot run
    is refused before compute with exit 2, as for sft, and nothing is written."""
    monkeypatch.setenv("PYTHONPATH", str(package))
    args = ["preset=smoke", "run.stage_packages=[mystages]", "run.stages=[polish]", f"run.dir={tmp_path / 'run'}",
            f"+stages.polish.init={tmp_path / 'nowhere'}"]
    done = run_cli(*args, "trainer.precision=fp16", check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "trainer.precision=fp16 needs a CUDA GPU" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()

    monkeypatch.syspath_prepend(str(package))  # the same checks in this process: planning alone
    with pytest.raises(ConfigError, match="trainer.report_to=mlflow needs the mlflow package"):
        plan_stages(compose_config([*args, "trainer.report_to=mlflow"]), tmp_path / "run")
    with pytest.raises(ConfigError, match="optim=muon cannot run under FSDP|stages.polish.init="):
        plan_stages(compose_config([*args, "optim=muon"]), tmp_path / "run")  # past the optimizer check: the input
