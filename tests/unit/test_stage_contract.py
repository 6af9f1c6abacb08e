"""The recipe contract the runner relies on: every recipe found has a config and every stage
config a recipe; a recipe's config hash covers every config group it reads (USES), so changing
one reruns the stage instead of skipping it as completed."""

import re
from pathlib import Path

import pytest

from pipeline.runner import available_stages, load_stage, load_stage_module, stage_hash
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[2]
GROUPS = ("model", "task", "optim", "peft", "trainer")
# reads of a group that cannot change what a stage computes
HARMLESS = {("model", "trust_remote_code")}
READS = {  # a call that reads a group for the recipe
    r"\btrainer_settings\.": "trainer",
    r"\bstage_optim\(": "optim",
    r"\bctx\.task\b": "task",
    # the stage's view of its settings (pipeline/stage.py StageContext, which also refuses at
    # run time a group USES lacks)
    r"\bctx\.(trainer|attn_implementation|forward_dtype|autocast|save_dtype|shared_arguments)\b": "trainer",
    r"\bctx\.optim\b": "optim",
    r"\bctx\.peft\b": "peft",
    r"\bctx\.model\b": "model",
}


def groups_read(source: str) -> set[str]:
    found = {group for group, key in re.findall(rf"\bcfg\.({'|'.join(GROUPS)})\b(?:\.(\w+))?", source)
             if (group, key) not in HARMLESS}
    return found | {group for pattern, group in READS.items() if re.search(pattern, source)}


def test_every_recipe_has_a_config_and_every_config_a_recipe():
    cfg = compose_config()
    recipes = {p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__"}
    assert recipes == set(cfg.stages) == set(available_stages(cfg))


@pytest.mark.parametrize("stage", sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__"))
def test_uses_lists_every_group_the_recipe_reads(stage):
    module = load_stage_module(stage, compose_config())
    missing = groups_read(Path(module.__file__).read_text()) - set(module.USES)
    assert not missing, f"stages/{stage}.py reads {sorted(missing)}, which its USES {module.USES} lacks"


def test_a_trainer_setting_reruns_a_stage_and_tracking_does_not():
    def sft_hash(*overrides):
        cfg = compose_config(list(overrides))
        return stage_hash(cfg, load_stage("sft", cfg), "input")

    assert sft_hash("trainer.precision=bf16") != sft_hash("trainer.precision=fp32")
    assert sft_hash("trainer.report_to=none") == sft_hash("trainer.report_to=tensorboard")


def test_benchmarks_do_not_import_the_tests():
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        assert not re.search(r"(?m)^\s*(from|import) tests\b", script.read_text()), script.name


def test_the_context_is_the_stages_view_and_refuses_a_group_its_uses_lacks(tmp_path):
    from pipeline.stage import StageContext

    cfg = compose_config(["stages.sft.optim={lr:0.5}", "stages.sft.trainer={precision:fp32}", "trainer.precision=bf16"])
    ctx = StageContext("sft", cfg, cfg.stages.sft, tmp_path, tmp_path / "sft", None, None, None,
                       uses=("task", "optim", "trainer"))
    assert ctx.optim.lr == 0.5 and cfg.optim.lr != 0.5  # the stage's override merged over the group
    assert ctx.trainer.precision == "fp32" and ctx.shared_arguments()["bf16"] is False
    with pytest.raises(RuntimeError, match=r"stage 'sft' reads the peft group, which its USES \['task', 'optim', "
                                           r"'trainer'\] lacks: add 'peft' to USES"):
        ctx.peft
    unchecked = StageContext("sft", cfg, cfg.stages.sft, tmp_path, tmp_path / "sft", None, None, None)
    assert unchecked.peft.method == cfg.peft.method
