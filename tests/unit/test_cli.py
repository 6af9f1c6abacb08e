"""The command line as a user meets it: --help lists the config groups there are, a launch config
named as a group is explained, a refusal before compute leaves no run dir behind, and the jsonl
task's default answer line reads files written on Windows."""

import re

import pytest

from pipeline.errors import ConfigError
from pipeline.runner import plan_stages
from tests.conftest import ROOT, compose_config, run_cli


def test_help_lists_the_config_groups_and_names_the_launch_configs_apart():
    done = run_cli("--help")
    groups = done.stdout.split("== Configuration groups ==")[1].split("Launch configs")[0]
    listed = {line.split(":")[0] for line in groups.splitlines() if re.match(r"^\w+: ", line)}
    assert listed == {"model", "optim", "peft", "preset", "stages", "task", "trainer", "generation"}
    assert "accelerate launch --config_file conf/accelerate/<name>.yaml" in done.stdout
    assert "ddp, fsdp2, multinode, single_gpu, zero1, zero2, zero3" in done.stdout


def test_a_launch_config_named_as_a_group_is_explained(tmp_path):
    done = run_cli("accelerate=ddp", "preset=smoke", "run.stages=[pretrain]", f"run.dir={tmp_path / 'run'}", check=False)
    assert done.returncode == 2
    assert "conf/accelerate/ holds launch configs, not a config group" in done.stderr
    assert "accelerate launch --config_file conf/accelerate/<name>.yaml -m pipeline" in done.stderr
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"\+accelerate=\.\.\.: conf/accelerate/ holds launch configs"):
        plan_stages(compose_config(["+accelerate=ddp", "run.stages=[pretrain]"]), tmp_path / "run")  # merged in: refused


def test_an_uncached_hub_name_offline_leaves_no_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = f"hub-refusal-{tmp_path.name}"
    done = run_cli("model=qwen3", "preset=smoke", "run.stages=[sft]", f"run.name={name}", check=False)
    assert done.returncode == 2 and "hf download Qwen/Qwen3-0.6B" in done.stderr
    assert not (ROOT / "outputs" / name).exists()  # run.dir's default, outputs/<run.name>


def test_the_jsonl_answer_pattern_reads_a_line_ending_in_a_carriage_return():
    pattern = re.compile(compose_config(["task=jsonl"]).task.answer_pattern)
    for text, answer in [("work\r\nA: 42\r\n", "42"), ("A: 42", "42"), ("A: 42  \nnext", "42"), ("A: 4 2", None)]:
        found = pattern.search(text)
        assert (found.group("answer") if found else None) == answer, text
