"""The test_time stage through the real entry point on preset=smoke, and its checks before compute."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.runner import ConfigError, plan_stages
from tests.conftest import compose_config, run_cli

METHODS_WITHOUT_REWARD = ["greedy", "sample", "low_temperature", "power", "majority_vote"]


def metrics(stage: Path) -> dict:
    return json.loads((stage / "metrics.json").read_text())


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory) -> tuple[Path, str]:
    """pretrain -> sft -> test_time in one command; (run dir, its stdout)."""
    run_dir = tmp_path_factory.mktemp("test-time") / "run"
    proc = run_cli("preset=smoke", f"run.dir={run_dir}", "run.stages=[pretrain,sft,test_time]",
                   f"stages.test_time.methods=[{','.join(METHODS_WITHOUT_REWARD)}]")
    return run_dir, proc.stdout


def test_chain_evaluates_the_newest_policy_with_every_method_and_writes_the_table(chain_run):
    run_dir, stdout = chain_run
    stage = run_dir / "test_time"
    manifest = json.loads((stage / "stage.json").read_text())
    assert manifest["status"] == "completed" and manifest["input"] == str(run_dir / "sft" / "final")
    result = metrics(stage)
    assert result["eval_num_problems"] == 6  # preset=smoke
    for method in METHODS_WITHOUT_REWARD:
        assert 0.0 <= result[f"accuracy/{method}"] <= 1.0
        assert result[f"wall_time_s/{method}"] > 0
    # token cost: one completion for the single-sample methods, num_samples (3) for the vote,
    # and at least one full completion plus the proposals for power sampling
    single = result["tokens_per_problem/greedy"]
    assert 0 < single <= 32
    assert result["tokens_per_problem/majority_vote"] > result["tokens_per_problem/sample"]
    assert result["tokens_per_problem/power"] > result["tokens_per_problem/low_temperature"]
    assert 0.0 < result["acceptance_rate/power"] <= 1.0
    assert "accuracy/best_of_n" not in result
    report = (run_dir / "report.md").read_text()
    assert "## test_time: methods side by side" in report
    table = report.split("## test_time: methods side by side")[1]
    for method in METHODS_WITHOUT_REWARD:
        assert f"| {method} | {result[f'accuracy/{method}']:.3f} |" in table
    assert (stage / "methods.png").stat().st_size > 0 and "test_time/methods.png" in report
    assert not (stage / "final").exists()


def test_rerun_skips_the_completed_stage(chain_run):
    run_dir, _ = chain_run
    before = (run_dir / "test_time" / "metrics.json").read_text()
    proc = run_cli("preset=smoke", f"run.dir={run_dir}", "run.stages=[pretrain,sft,test_time]",
                   f"stages.test_time.methods=[{','.join(METHODS_WITHOUT_REWARD)}]")
    assert "stage test_time: already completed" in proc.stdout
    assert (run_dir / "test_time" / "metrics.json").read_text() == before


def tiny_reward_model(sft_final: Path, out: Path) -> Path:
    """A sequence-classification model (num_labels=1) with the sft tokenizer, saved like the
    reward stage's final/."""
    tokenizer = AutoTokenizer.from_pretrained(sft_final)
    model = AutoModelForSequenceClassification.from_pretrained(sft_final, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_best_of_n_with_a_reward_model(chain_run, tmp_path):
    run_dir, _ = chain_run
    sft_final = run_dir / "sft" / "final"
    reward = tiny_reward_model(sft_final, tmp_path / "reward")
    out_dir = tmp_path / "run"
    run_cli("preset=smoke", f"run.dir={out_dir}", "run.stages=[test_time]", f"stages.test_time.init={sft_final}",
            f"stages.test_time.reward_model={reward}", "stages.test_time.methods=[best_of_n,majority_vote]")
    result = metrics(out_dir / "test_time")
    assert 0.0 <= result["accuracy/best_of_n"] <= 1.0
    # both choose among the same num_samples candidates per problem, at the same cost
    assert result["tokens_per_problem/best_of_n"] == result["tokens_per_problem/majority_vote"] > 0
    assert "accuracy/greedy" not in result
    report = (out_dir / "report.md").read_text()
    assert "| best_of_n |" in report and "| stage |  |" not in report  # no empty headline table


def plan_test_time(tmp_path: Path, *overrides: str, stages: str = "[test_time]"):
    return plan_stages(compose_config([f"run.stages={stages}", *overrides]), tmp_path / "run")


def test_bad_methods_and_reward_model_fail_before_compute(tmp_path):
    chain = "[pretrain,sft,test_time]"  # the input is still to be written: the config is checked alone
    with pytest.raises(ConfigError, match=r"stages.test_time.methods=\['greedy', 'beam'\].*from greedy, sample"):
        plan_test_time(tmp_path, "stages.test_time.methods=[greedy,beam]", stages=chain)
    with pytest.raises(ConfigError, match=r"reward_model=.*nowhere is not a model directory"):
        plan_test_time(tmp_path, f"stages.test_time.reward_model={tmp_path / 'nowhere'}", stages=chain)
    with pytest.raises(ConfigError, match=r"stages.test_time.alpha=0.5 is out of range"):
        plan_test_time(tmp_path, "stages.test_time.alpha=0.5", stages=chain)
    plan_test_time(tmp_path, "stages.test_time.methods=[greedy]", stages=chain)  # fine
    # best_of_n listed scores with this run's reward model (auto): no reward stage is an error, as in grpo
    with pytest.raises(ConfigError, match=r"stages.test_time scores with the reward model and "
                                          r"stages.test_time.reward_model=auto reads .*reward/final, which does not exist"):
        plan_test_time(tmp_path, "stages.test_time.methods=[greedy,best_of_n]", stages=chain)
    plan_test_time(tmp_path, stages=chain)  # methods=auto (the default): best_of_n is left out
    plan_test_time(tmp_path, stages="[pretrain,sft,reward,test_time]")  # fine
    with pytest.raises(ConfigError, match=r"unknown rewards \['correct'\]; valid: reward_model .*best-of-N by it is pass@N"):
        plan_test_time(tmp_path, "+stages.test_time.reward_weights.correct=1", stages=chain)
    with pytest.raises(ConfigError, match=r"first of grpo, dpo, sft, pretrain that runs before it"):
        plan_test_time(tmp_path, "stages.test_time.input_stage=[grpo,dpo,sft,pretrain]")  # preset=demo: sft alone


def test_power_sampling_refuses_a_p_tuning_adapter(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "P_TUNING"}))
    with pytest.raises(ConfigError, match=r"P_TUNING adapter.*PREFIX_TUNING and PROMPT_TUNING adapters only.*Drop power"):
        plan_test_time(tmp_path, f"stages.test_time.init={adapter}", "stages.test_time.methods=[greedy,power]")


def test_prompt_tuning_final_through_every_method(chain_run, tmp_path):
    """sft with peft=prompt hands off adapter + base/; test_time loads it with load_policy and
    power-samples with the virtual tokens in place."""
    run_dir, _ = chain_run
    out_dir = tmp_path / "run"
    run_cli("preset=smoke", f"run.dir={out_dir}", "run.stages=[sft,test_time]", "peft=prompt",
            f"stages.sft.init={run_dir / 'pretrain' / 'final'}", "stages.test_time.methods=[greedy,power,majority_vote]")
    manifest = json.loads((out_dir / "test_time" / "stage.json").read_text())
    assert manifest["input"] == str(out_dir / "sft" / "final")
    assert (out_dir / "sft" / "final" / "adapter_config.json").is_file()
    result = metrics(out_dir / "test_time")
    assert result["tokens_per_problem/power"] > result["tokens_per_problem/greedy"] > 0
    assert 0.0 < result["acceptance_rate/power"] <= 1.0


def test_auto_methods_leave_best_of_n_out_without_a_reward_and_samples_show_each_pick(chain_run, tmp_path):
    """methods=auto on a run with no reward: every other method, one line saying why; the
    samples file has each problem's candidates with verdicts and what each method kept."""
    run_dir, _ = chain_run
    done = run_cli("preset=smoke", f"run.dir={tmp_path / 'run'}", "run.stages=[test_time]",
                   f"stages.test_time.init={run_dir / 'sft' / 'final'}", "stages.test_time.eval_problems=3")
    assert "best_of_n left out of methods=auto: no reward to rank candidates by" in done.stdout
    assert "add reward to run.stages" in done.stdout
    result = metrics(tmp_path / "run" / "test_time")
    assert {k.split("/")[1] for k in result if k.startswith("accuracy/")} == set(METHODS_WITHOUT_REWARD)
    records = [json.loads(line) for line in (tmp_path / "run" / "test_time" / "samples.jsonl").read_text().splitlines()]
    assert [r["problem"] for r in records] == [0, 1, 2]
    for record in records:
        assert set(record["methods"]) == set(METHODS_WITHOUT_REWARD)
        assert len(record["candidates"]) == 3  # preset=smoke: num_samples
        assert record["methods"]["majority_vote"]["text"] == record["candidates"][record["methods"]["majority_vote"]["pick"]]["text"]
        assert all(set(c) == {"text", "answer", "correct"} for c in record["candidates"])
    accuracy = sum(r["methods"]["greedy"]["correct"] for r in records) / 3
    assert accuracy == result["accuracy/greedy"]
    assert "test_time/samples.jsonl" in (tmp_path / "run" / "report.md").read_text()


def test_best_of_n_keeps_the_candidate_with_the_highest_reward_in_the_samples_file(smoke_chain_run):
    records = [json.loads(line) for line in (smoke_chain_run / "test_time" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == metrics(smoke_chain_run / "test_time")["eval_num_problems"]
    for record in records:
        rewards = [c["reward"] for c in record["candidates"]]
        pick = record["methods"]["best_of_n"]["pick"]
        assert rewards[pick] == max(rewards) and rewards.index(max(rewards)) == pick
    sft = [json.loads(line) for line in (smoke_chain_run / "sft" / "eval_samples.jsonl").read_text().splitlines()]
    assert len(sft) == metrics(smoke_chain_run / "sft")["eval_num_problems"]
    assert sum(r["greedy"]["correct"] for r in sft) / len(sft) == metrics(smoke_chain_run / "sft")["eval_accuracy"]
