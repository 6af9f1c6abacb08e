"""Math answer checking (math-verify): equivalent forms, wrong answers, GSM8K references, the time
limit, and model text that is never run; the grpo `math` reward and task.verifier=math."""

import time

import pytest

from pipeline import math_answers
from pipeline.tasks.jsonl import JsonlTask
from pipeline import rewards
from tests.conftest import compose_config


@pytest.mark.parametrize("completion, answer", [
    ("so the answer is \\boxed{0.5}", "\\frac{1}{2}"),
    ("the share is 1/2", "0.5"),
    ("\\boxed{\\frac{1}{2}}", "1/2"),
    ("solving gives \\boxed{x=3}", "3"),
    ("48 + 24 = 72, so she sold 72 clips", "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72"),
    ("in all 1,234 apples", "#### 1,234"),
])
def test_equivalent_forms_are_right(completion, answer):
    assert math_answers.verify(completion, answer) == 1.0


@pytest.mark.parametrize("completion, answer", [
    ("\\boxed{41}", "42"),
    ("first 42, then 17 are left", "42"),  # the last number is the answer
    ("I do not know", "42"),
    ("\\boxed{x=4}", "3"),
    ("48 + 24 = 72", "#### 73"),
])
def test_wrong_answers_are_wrong(completion, answer):
    assert math_answers.verify(completion, answer) == 0.0


def test_a_pathological_answer_returns_within_the_time_limit():
    start = time.perf_counter()
    nested = "\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}"
    assert math_answers.verify(nested, "1", timeout_s=1) == 0.0
    assert math_answers.verify("9**9**9**9**9**9", "1", timeout_s=1) == 0.0
    assert time.perf_counter() - start < 6


def test_model_text_with_code_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    for text in (f"\\boxed{{__import__('os').system('touch {marker}')}}",
                 f"```python\nopen('{marker}', 'w')\n```\nso the answer is open('{marker}','w')",
                 f"$eval(\"open('{marker}','w')\")$"):
        assert math_answers.verify(text, "1") == 0.0
        math_answers.extract(text)
    assert not marker.exists()


def test_grpo_math_reward_scores_against_the_answer_column():
    cfg = compose_config(["stages.grpo.reward_weights={correct:0.0,format:0.0,reward_model:0.0,math:1.0}"])
    funcs, weights = rewards.build(cfg.stages.grpo, "grpo", None, None, False, 1)
    assert [f.__name__ for f in funcs] == ["math"] and weights == [1.0]
    completions = [[{"role": "assistant", "content": "\\boxed{\\frac{1}{2}}"}], [{"role": "assistant", "content": "0.25"}]]
    assert funcs[0](prompts=[None, None], completions=completions, answer=["0.5", "0.5"]) == [1.0, 0.0]


def test_task_verifier_math_checks_by_value_and_an_unknown_verifier_is_refused():
    cfg = compose_config(["task=jsonl", "task.verifier=math"])
    task = JsonlTask(cfg.task)
    assert task.verify("The total is \\boxed{3/4}", "0.75") == 1.0
    assert task.verify("A: 0.75", "3/4") == 1.0  # the last number, with no \boxed
    assert task.extract_answer("so \\boxed{\\frac{3}{4}}") == "\\frac{3}{4}"
    regex = JsonlTask(compose_config(["task=jsonl"]).task)
    assert regex.verify("A: 0.75", "3/4") == 0.0  # the default compares strings
    with pytest.raises(ValueError, match=r"task.verifier='sympy'; valid: regex, math"):
        JsonlTask(compose_config(["task=jsonl", "task.verifier=sympy"]).task)


def test_task_math_reads_math_schema_rows_and_checks_the_boxed_answer(tmp_path):
    import json

    from pipeline.tasks import build_task

    rows = [{"problem": "What is $1/2 + 1/4$?", "solution": "Add: $\\frac{1}{2}+\\frac{1}{4}=\\boxed{\\frac{3}{4}}$.",
             "answer": "\\frac{3}{4}", "level": "Level 1", "type": "Prealgebra"}]
    (tmp_path / "train.jsonl").write_text(json.dumps({k: rows[0][k] for k in ("problem", "solution")}))
    (tmp_path / "test.jsonl").write_text(json.dumps(rows[0]))
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"  # two datasets on the hub, two files here
    cfg = compose_config(["task=math", f"task.splits.sft={train}", f"task.splits.rl={train}", f"task.splits.eval={test}"])
    task = build_task(cfg.task)
    problem = task.eval_problems()[0]
    assert problem["prompt"] == rows[0]["problem"]
    assert task.verify("so the sum is 0.75", problem["answer"]) == 1.0
    assert task.verify("\\boxed{\\frac{3}{5}}", problem["answer"]) == 0.0
    assert task.sft_examples()[0]["completion"] == rows[0]["solution"]
