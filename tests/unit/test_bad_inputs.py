"""Bad values and bad files fail before any compute: exit code 2 and a message naming the key or
the file (issue 17). Each case drives the real entry point, `pipeline.__main__.main()`, in this
process with sys.argv set, with the runner's run_stage replaced by a tripwire: a case that gets
as far as running a stage has failed, whatever it would have done next. Two cases also run as a
real `python -m pipeline` subprocess for the exit code a shell sees.
"""

from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path

import pytest

from pipeline import distributed, runner
from pipeline.__main__ import main
from pipeline.errors import ConfigError
from tests.conftest import CONF, compose_config, run_cli

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "bad_inputs.py"


def load_cases():
    """The case table lives with the benchmark that prints it (benchmarks do not import tests)."""
    spec = importlib.util.spec_from_file_location("bad_inputs_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CASES = load_cases()
CASES, make_bad_files, safetensors_file = _CASES.CASES, _CASES.make_bad_files, _CASES.safetensors_file


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
