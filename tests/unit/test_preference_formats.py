"""Preference data in TRL's forms: strings, explicit conversations, and the implicit-prompt form
(whole conversations sharing the prompt turns, as trl-lib/ultrafeedback_binarized has them),
checked before compute; and task=preference through reward and dpo on a local copy."""

import json

import pytest

from pipeline.tasks import build_task, conversational_pairs
from tests.conftest import compose_config, run_cli
from tests.stages.test_model_families import FAMILY_RUN
from tests.tiny_models import save_tiny_family

USER = {"role": "user", "content": "What is 2+3?"}
GOOD = {"role": "assistant", "content": "5"}
BAD = {"role": "assistant", "content": "6"}


def task_for(tmp_path, rows):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return build_task(compose_config(["task=jsonl", f"task.splits.preference={data}"]).task), data


def ultrafeedback_row(a: int) -> dict:
    prompt = {"role": "user", "content": f"What is {a}+1?"}
    return {"prompt": None, "chosen": [prompt, {"role": "assistant", "content": str(a + 1)}],
            "rejected": [prompt, {"role": "assistant", "content": str(a + 2)}], "score_chosen": 8.0, "score_rejected": 3.0}


def test_the_implicit_prompt_form_splits_into_prompt_and_answers(tmp_path):
    multi = [USER, GOOD, {"role": "user", "content": "Double it."}]
    rows = [{"chosen": [USER, GOOD], "rejected": [USER, BAD]},
            {"chosen": [*multi, {"role": "assistant", "content": "10"}], "rejected": [*multi, {"role": "assistant", "content": "12"}]}]
    task, _ = task_for(tmp_path, rows)
    pairs = task.preference_pairs()
    assert pairs[0] == {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}
    assert pairs[1]["prompt"] == multi and pairs[1]["chosen"][0]["content"] == "10"
    train, _ = conversational_pairs(pairs, 0)
    assert train[1]["prompt"] == multi and train[0]["rejected"] == [BAD]


def test_explicit_conversations_and_strings_stay_as_they_are(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    task, _ = task_for(tmp_path, [{"prompt": [system, USER], "chosen": [GOOD], "rejected": [BAD]}])
    train, _ = conversational_pairs(task.preference_pairs(), 0)
    assert train[0]["prompt"] == [system, USER] and train[0]["chosen"] == [GOOD]
    strings, _ = task_for(tmp_path, [{"prompt": "What is 2+3?", "chosen": "5", "rejected": "6"}])
    train, _ = conversational_pairs(strings.preference_pairs(), 0)
    assert train[0] == {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}


@pytest.mark.parametrize("row, message", [
    ({"chosen": [{"role": "user", "content": "a"}, GOOD], "rejected": [{"role": "user", "content": "b"}, BAD]},
     "chosen and rejected do not share prompt turns ending with a user turn"),
    ({"chosen": [USER, GOOD], "rejected": [USER]}, "column 'rejected': the conversation does not end with the assistant's answer"),
    ({"prompt": [USER, GOOD], "chosen": [GOOD], "rejected": [BAD]}, "column 'prompt': the prompt conversation does not end with a user turn"),
    ({"prompt": [USER], "chosen": [USER, GOOD], "rejected": [BAD]}, "column 'chosen': an answer holds assistant turns only"),
])
def test_a_bad_pair_fails_before_compute_naming_the_row(tmp_path, row, message):
    task, data = task_for(tmp_path, [{"chosen": [USER, GOOD], "rejected": [USER, BAD]} if "prompt" not in row else
                                     {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}, row])
    with pytest.raises(ValueError, match=rf"split 'preference' \({data}\) row 2 \(line 2\).*{message}"):
        task.validate(["preference"])


def test_task_preference_runs_reward_and_dpo_on_a_local_copy_of_its_schema(tmp_path):
    data = tmp_path / "ultrafeedback.jsonl"
    data.write_text("\n".join(json.dumps({k: v for k, v in ultrafeedback_row(a).items() if k != "prompt"}) for a in range(60)))
    model = save_tiny_family("qwen3", tmp_path / "qwen3")
    run_dir = tmp_path / "run"
    dpo = [o for o in FAMILY_RUN if o.startswith(("preset", "trainer", "stages.dpo"))]
    proc = run_cli("model=qwen3", f"model.path={model}", "task=preference", f"task.splits.preference={data}",
                   f"run.dir={run_dir}", *dpo, "run.stages=[reward,dpo]", "stages.dpo.pairs=task",
                   "stages.reward.max_steps=4", "stages.reward.save_steps=4", "stages.reward.eval_steps=4",
                   "stages.reward.eval_pairs=8")
    assert "stage dpo: the task has no eval split (problems with answers): no answer accuracy" in proc.stdout
    reward = json.loads((run_dir / "reward" / "metrics.json").read_text())
    dpo_metrics = json.loads((run_dir / "dpo" / "metrics.json").read_text())
    assert 0.0 <= reward["eval_pairwise_accuracy"] <= 1.0
    assert dpo_metrics["train_probe_loss"] < dpo_metrics["train_probe_loss_before"]
    assert "eval_accuracy" not in dpo_metrics
    refused = run_cli("model=qwen3", f"model.path={model}", "task=preference", f"task.splits.preference={data}",
                      f"run.dir={tmp_path / 'r2'}", "run.stages=[dpo]", check=False)
    assert refused.returncode == 2 and "stages.dpo.pairs=on_policy samples the policy on the task's rl prompts" in refused.stderr
