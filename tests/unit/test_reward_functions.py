"""User reward functions by import path: loading, the checks on what they return, and one
through a real grpo run whose logged rewards are what it returned."""

import json
import statistics

import pytest

from pipeline import rewards as reward_functions
from pipeline.errors import ConfigError
from tests.conftest import run_cli

MODULE = '''
import json, os

NOT_A_FUNCTION = 3


def brevity(prompts, completions, completion_ids, answer, **kwargs):
    """Shorter is better; every call's rewards go to $REWARD_LOG so the test can compare."""
    assert len(answer) == len(completions)  # the dataset's columns arrive as keyword arguments
    values = [-len(ids) / 100 for ids in completion_ids]
    with open(os.environ["REWARD_LOG"], "a") as f:
        f.write(json.dumps(values) + "\\n")
    return values


def too_few(prompts, completions, **kwargs):
    return [1.0]


def words(prompts, completions, **kwargs):
    return ["good"] * len(completions)
'''


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("REWARD_LOG", str(tmp_path / "rewards.jsonl"))
    return tmp_path


@pytest.mark.parametrize("path, message", [
    ("no_such_module:f", r"module 'no_such_module' does not import \(ModuleNotFoundError"),
    ("my_rewards:missing", r"module 'my_rewards' has no attribute 'missing'"),
    ("my_rewards:NOT_A_FUNCTION", r"'NOT_A_FUNCTION' is a int, not a function"),
    ("brevity", r"not an import path; write package.module:function"),
])
def test_a_bad_path_is_a_config_error_naming_it(user_module, path, message):
    with pytest.raises(ConfigError, match=rf"stages.grpo.reward_functions.x='{path}': " + message):
        reward_functions.load(path, "stages.grpo.reward_functions.x")


def test_both_path_spellings_load_the_function(user_module):
    assert reward_functions.load("my_rewards:brevity", "k").__name__ == "brevity"
    assert reward_functions.load("my_rewards.brevity", "k").__name__ == "brevity"


def test_what_a_function_returns_is_checked_with_its_name_in_the_message(user_module):
    too_few = reward_functions.checked("short", reward_functions.load("my_rewards:too_few", "k"))
    with pytest.raises(ValueError, match=r"reward function 'short' returned 1 values for 2 completions"):
        too_few(["p", "p"], ["a", "b"])
    words = reward_functions.checked("wordy", reward_functions.load("my_rewards:words", "k"))
    with pytest.raises(ValueError, match=r"reward function 'wordy' returned 'good'; each reward must be a number or None"):
        words(["p"], ["a"])
    fine = reward_functions.checked("fine", lambda prompts, completions, **kw: [1, None, 0.5])
    assert fine(["p"] * 3, ["a"] * 3) == [1.0, None, 0.5] and fine.__name__ == "fine"


def test_a_user_reward_trains_grpo_and_trl_logs_what_it_returned(user_module, smoke_chain_run, tmp_path):
    run_dir = tmp_path / "run"
    run_cli("preset=smoke", "run.stages=[grpo]", f"run.dir={run_dir}", f"stages.grpo.init={smoke_chain_run / 'sft' / 'final'}",
            "+stages.grpo.reward_functions.brevity=my_rewards:brevity", "+stages.grpo.reward_weights.brevity=0.5",
            "stages.grpo.max_steps=3", "stages.grpo.save_steps=3", "stages.grpo.eval_every=3", "trainer.report_to=none")
    calls = [json.loads(line) for line in (user_module / "rewards.jsonl").read_text().splitlines()]
    history = json.loads((run_dir / "grpo" / "log_history.json").read_text())
    logged = [e["rewards/brevity/mean"] for e in history if "rewards/brevity/mean" in e]
    assert len(calls) == 3 and len(logged) == 3
    assert logged == pytest.approx([statistics.mean(c) for c in calls], abs=1e-6)


def test_a_path_that_does_not_import_stops_the_run_before_compute(user_module, tmp_path):
    done = run_cli("preset=smoke", f"run.dir={tmp_path / 'run'}", "+stages.grpo.reward_functions.brevity=my_rewardz:brevity",
                   "+stages.grpo.reward_weights.brevity=1.0", check=False)
    assert done.returncode == 2
    assert "stages.grpo.reward_functions.brevity='my_rewardz:brevity': module 'my_rewardz' does not import" in done.stderr
    assert not (tmp_path / "run" / "pretrain").exists()
