"""Bad values and bad files fail before any compute: exit code 2 and a message naming the key or
the file (issue 17). Each case drives the real entry point, `pipeline.__main__.main()`, in this
process with sys.argv set, with the runner's run_stage replaced by a tripwire: a case that gets
as far as running a stage has failed, whatever it would have done next. Two cases also run as a
real `python -m pipeline` subprocess for the exit code a shell sees.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline import distributed, runner
from pipeline.__main__ import main
from pipeline.errors import ConfigError
from tests.conftest import CONF, compose_config, run_cli

JSONL = ["task=jsonl", "run.stages=[pretrain]", "task.splits.eval={files}/good.jsonl"]
MUON_ZERO = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "none"}

# (case, overrides ({files}: the bad files' directory), environment, text the message must contain)
CASES = [
    # --- values: type and range of stage keys
    ("max_steps not an integer", ["stages.pretrain.max_steps=abc"], {}, "stages.pretrain.max_steps=abc"),
    ("max_steps 0", ["stages.pretrain.max_steps=0"], {}, "stages.pretrain.max_steps=0: must be an integer >= 1"),
    ("max_steps a float", ["stages.sft.max_steps=1.5"], {}, "stages.sft.max_steps=1.5"),
    ("batch_size 0", ["stages.pretrain.batch_size=0"], {}, "stages.pretrain.batch_size=0"),
    ("batch_size negative", ["stages.reward.batch_size=-4"], {}, "stages.reward.batch_size=-4"),
    ("lr negative", ["stages.pretrain.lr=-1"], {}, "stages.pretrain.lr=-1"),
    ("lr 0", ["stages.reward.lr=0"], {}, "stages.reward.lr=0"),
    ("lr a word", ["stages.dpo.lr=fast"], {}, "stages.dpo.lr=fast"),
    ("grad_accum 0", ["stages.pretrain.grad_accum=0"], {}, "stages.pretrain.grad_accum=0"),
    ("seq_len 0", ["stages.pretrain.seq_len=0"], {}, "stages.pretrain.seq_len=0"),
    ("save_steps 0", ["stages.sft.save_steps=0"], {}, "stages.sft.save_steps=0"),
    ("dpo beta a word", ["stages.dpo.beta=abc"], {}, "stages.dpo.beta=abc"),
    ("grpo num_generations a word", ["stages.grpo.num_generations=abc"], {}, "stages.grpo.num_generations=abc"),
    ("grpo temperature 0", ["stages.grpo.temperature=0"], {}, "stages.grpo.temperature=0"),
    ("test_time alpha a word", ["stages.test_time.alpha=abc"], {}, "stages.test_time.alpha=abc"),
    ("packing not a bool", ["stages.sft.packing=maybe"], {}, "stages.sft.packing=maybe"),
    # --- values: top level and groups
    ("seed not an integer", ["seed=abc"], {}, "seed=abc"),
    ("seed negative", ["seed=-1"], {}, "seed=-1"),
    ("run.force not a bool", ["run.force=maybe"], {}, "run.force=maybe"),
    ("optim lr 0", ["optim.lr=0"], {}, "optim.lr=0"),
    ("optim weight_decay negative", ["optim.weight_decay=-0.1"], {}, "optim.weight_decay=-0.1"),
    ("optim betas one value", ["optim.betas=[0.9]"], {}, "optim.betas=[0.9]"),
    ("optim warmup_ratio 1.5", ["optim.warmup_ratio=1.5"], {}, "optim.warmup_ratio=1.5"),
    ("optim scheduler unknown", ["optim.scheduler=nosuch"], {}, "optim.scheduler=nosuch"),
    ("muon momentum 1.5", ["optim=muon", "optim.momentum=1.5"], {}, "optim.momentum=1.5"),
    ("lora rank 0", ["peft=lora", "peft.rank=0"], {}, "peft.rank=0"),
    ("lora alpha 0", ["peft=lora", "peft.alpha=0"], {}, "peft.alpha=0"),
    ("prefix virtual tokens 0", ["peft=prefix", "peft.num_virtual_tokens=0"], {}, "peft.num_virtual_tokens=0"),
    ("task digits 0", ["task.digits=0"], {}, "task.digits=0"),
    ("task n_pretrain a word", ["task.n_pretrain=abc"], {}, "task.n_pretrain=abc"),
    ("jsonl max_chars 0", ["task=jsonl", "task.max_chars=0"], {}, "task.max_chars=0"),
    # --- Hydra's own errors
    ("unknown key", ["stages.sft.nosuchkey=1"], {}, "stages.sft.nosuchkey"),
    ("unknown group option", ["optim=nosuch"], {}, "optim/nosuch"),
    ("malformed override", ["stages.pretrain.max_steps=[1,"], {}, "stages.pretrain.max_steps=[1,"),
    # --- launch: optim=muon under DeepSpeed ZeRO
    ("muon under ZeRO-3 without reduce_scatter", ["optim=muon"], {**MUON_ZERO, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
     "reduce_scatter"),
    ("muon with clipping under ZeRO-2", ["optim=muon", "optim.max_grad_norm=1.0"],
     {**MUON_ZERO, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "optim.max_grad_norm=0"),
    # --- model files
    ("model.path without weights", ["model=hf", "model.path={files}/no_weights"], {}, "model.path={files}/no_weights"),
    ("model.path truncated safetensors", ["model=hf", "model.path={files}/truncated"], {}, "{files}/truncated/model.safetensors"),
    ("model.path safetensors header garbage", ["model=hf", "model.path={files}/garbage"], {}, "{files}/garbage/model.safetensors"),
    ("model.path shard missing", ["model=hf", "model.path={files}/missing_shard"], {}, "model-00002-of-00002.safetensors"),
    ("pretrain.init an adapter", ["stages.pretrain.init={files}/adapter"], {}, "stages.pretrain.init={files}/adapter"),
    ("sft.init truncated safetensors", ["run.stages=[sft]", "stages.sft.init={files}/truncated"], {},
     "{files}/truncated/model.safetensors"),
    # --- task=jsonl data files
    ("jsonl empty file", [*JSONL, "task.splits.pretrain={files}/empty.jsonl"], {}, "{files}/empty.jsonl"),
    ("jsonl only blank lines", [*JSONL, "task.splits.pretrain={files}/blank.jsonl"], {}, "{files}/blank.jsonl"),
    ("jsonl malformed line", [*JSONL, "task.splits.pretrain={files}/malformed.jsonl"], {}, "malformed.jsonl' line 3"),
    ("jsonl line not an object", [*JSONL, "task.splits.pretrain={files}/not_object.jsonl"], {}, "not_object.jsonl' line 2"),
    ("jsonl null value", [*JSONL, "task.splits.pretrain={files}/null.jsonl"], {}, "null.jsonl) row 2 (line 2), column 'text'"),
    ("jsonl list value", [*JSONL, "task.splits.pretrain={files}/list.jsonl"], {}, "list.jsonl' line 2, column 'text' is a list where line 1 has a string"),
    ("jsonl number as text", [*JSONL, "task.splits.pretrain={files}/number.jsonl"], {}, "number.jsonl) row 1"),
    ("jsonl row over max_chars", [*JSONL, "task.splits.pretrain={files}/long.jsonl", "task.max_chars=100"], {},
     "long.jsonl) row 2 (line 3), column 'text': 300 characters, more than task.max_chars=100"),
    ("jsonl file missing", [*JSONL, "task.splits.pretrain={files}/nowhere.jsonl"], {}, "{files}/nowhere.jsonl"),
]


def safetensors_file(path: Path) -> None:
    save_file({"weight": torch.zeros(64, 64), "bias": torch.zeros(64)}, str(path))


def make_bad_files(root: Path) -> Path:
    """The bad model directories and data files the cases point at ({files}), under root."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("no_weights", "truncated", "garbage", "missing_shard", "adapter"):
        (root / name).mkdir()
    for name in ("no_weights", "truncated", "garbage", "missing_shard"):
        (root / name / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    safetensors_file(root / "truncated" / "model.safetensors")
    data = (root / "truncated" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (root / "garbage" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(64))
    safetensors_file(root / "missing_shard" / "model-00001-of-00002.safetensors")
    weight_map = {"weight": "model-00001-of-00002.safetensors", "bias": "model-00002-of-00002.safetensors"}
    (root / "missing_shard" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    safetensors_file(root / "adapter" / "adapter_model.safetensors")

    rows = [json.dumps({"text": f"Q: {i}+1=?\nA: {i + 1}", "prompt": f"{i}+1", "answer": str(i + 1)}) for i in range(4)]
    (root / "good.jsonl").write_text("\n".join(rows) + "\n")
    (root / "empty.jsonl").write_text("")
    (root / "blank.jsonl").write_text("\n   \n")
    (root / "malformed.jsonl").write_text(rows[0] + "\n" + rows[1] + "\n" + '{"text": "cut off\n' + rows[2] + "\n")
    (root / "not_object.jsonl").write_text(rows[0] + "\n[1, 2]\n")
    (root / "null.jsonl").write_text(rows[0] + '\n{"text": null}\n')
    (root / "list.jsonl").write_text(rows[0] + '\n{"text": ["a", "b"]}\n')
    (root / "number.jsonl").write_text('{"text": 12}\n')
    (root / "long.jsonl").write_text(rows[0] + "\n\n" + json.dumps({"text": "x" * 300}) + "\n")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return make_bad_files(tmp_path_factory.mktemp("bad_inputs"))


@pytest.fixture
def entry_point(monkeypatch, capsys, tmp_path):
    """run(overrides, env) -> (exit code, everything printed): the real entry point in-process,
    failing the test if a stage was about to run."""
    distributed.state()  # created now, before a case's launcher variables, as a real launch creates it first
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}  # run_pipeline installs its own

    def tripwire(cfg, plan, *args, **kwargs):
        raise AssertionError(f"stage {plan.name} was about to run: the bad input was not caught before compute")

    monkeypatch.setattr(runner, "run_stage", tripwire)

    def run(overrides: list[str], env: dict[str, str]) -> tuple[int, str]:
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            patch.setattr(sys, "argv", ["pipeline", *overrides, f"run.dir={tmp_path / 'run'}"])
            with pytest.raises(SystemExit) as exit_:
                main()
        printed = capsys.readouterr()
        return exit_.value.code, printed.out + printed.err

    yield run
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("case, overrides, env, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_before_compute_naming_it(entry_point, files, tmp_path, case, overrides, env, expected):
    code, printed = entry_point([o.replace("{files}", str(files)) for o in overrides], env)
    assert code == 2, f"{case}: exit code {code}\n{printed[-3000:]}"
    assert expected.replace("{files}", str(files)) in printed, f"{case}: the message does not name it\n{printed[-3000:]}"
    assert not any((tmp_path / "run").glob("*/stage.json")), "a stage started"


def test_a_stage_failure_still_exits_1(entry_point):
    """Exit 2 is for what Hydra refuses before the run starts; a failure inside it stays 1."""
    code, printed = entry_point(["run.stages=[pretrain]", "preset=smoke"], {})
    assert code == 1 and "was about to run" in printed


def test_cli_exits_2_for_a_bad_value_and_for_hydras_errors(tmp_path):
    proc = run_cli("stages.pretrain.max_steps=0", f"run.dir={tmp_path}", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "stages.pretrain.max_steps=0: must be an integer >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("optim=nosuch", check=False, timeout=120)
    assert proc.returncode == 2 and "optim/nosuch" in proc.stderr, proc.stderr[-2000:]


def test_shipped_configs_pass(files):
    """No false alarms: every group option under both presets, and an intact model directory."""
    from pipeline.config_check import check_config, check_model_dir

    for group in ("model", "task", "optim", "peft"):
        for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
            for preset in ("demo", "smoke"):
                check_config(compose_config([f"{group}={option}", f"preset={preset}"]))
    intact = files / "intact"
    intact.mkdir(exist_ok=True)
    (intact / "config.json").write_text("{}")
    safetensors_file(intact / "model.safetensors")
    check_model_dir(intact, "model.path", "pretrain")
    cfg = compose_config(["model=hf", f"model.path={intact}", "stages.sft.init=" + str(intact)])
    check_config(cfg)
    with pytest.raises(ConfigError, match="stages.sft.init"):  # the same check reaches every stage's init
        check_model_dir(files / "truncated", "stages.sft.init", "sft")


def test_every_shipped_key_has_a_rule():
    """A key added to conf/ without a rule in pipeline/config_check.RULES would go unchecked."""
    from pipeline.config_check import rule_for

    missing = set()
    for overrides in ([], ["task=jsonl"], ["optim=muon"], ["peft=lora"], ["peft=prefix"], ["peft=prompt"]):
        cfg = compose_config(overrides)
        for group in ("model", "task", "optim", "peft", "run"):
            missing |= {f"{group}.{key}" for key in cfg[group] if rule_for(group, key) is None}
        for stage in cfg.stages:
            missing |= {f"stages.{stage}.{key}" for key in cfg.stages[stage] if rule_for(f"stages.{stage}", key) is None}
    assert rule_for("", "seed") is not None
    assert not missing, f"add a rule for these keys to pipeline/config_check.RULES: {sorted(missing)}"


def test_rules_read_like_the_fix():
    from pipeline.config_check import check_config

    cfg = compose_config(["stages.pretrain.lr=-1"])
    with pytest.raises(ConfigError, match=r"^stages.pretrain.lr=-1: must be a number > 0, or null \(falls back"):
        check_config(cfg)
    cfg = compose_config(["stages.dpo.max_steps=0", "run.stages=[pretrain]"])
    check_config(cfg)  # a stage the run leaves out is not checked
