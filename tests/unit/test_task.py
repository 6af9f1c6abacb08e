import json
import re

import pytest
from omegaconf import OmegaConf

from pipeline.tasks import build_task
from pipeline.tasks.arithmetic import extract_answer
from tests.conftest import CONF


def arithmetic(**overrides):
    cfg = OmegaConf.load(CONF / "task" / "arithmetic.yaml")
    cfg.update({"n_pretrain": 3000, "n_sft": 500, "n_preference": 300, "n_rl": 200, "n_eval": 200, **overrides})
    return build_task(cfg)


def check_chain(question: str, solution: str) -> int:
    """Recompute every worked step with integer arithmetic; return the final value."""
    numbers = [int(x) for x in re.findall(r"\d+", question)]
    ops = re.findall(r"[+-]", question)
    lines = solution.split("\n")
    value = numbers[0]
    for op, x, line in zip(ops, numbers[1:], lines):
        new = value + x if op == "+" else value - x
        assert line == f"{value}{op}{x}={new}"
        value = new
    assert len(lines) == len(ops) + 1
    return value


def test_splits_are_disjoint_and_deterministic():
    task = arithmetic()
    splits = {s: {p.question for p in task.problems(s)} for s in ("pretrain", "sft", "preference", "rl", "eval")}
    assert {s: len(q) for s, q in splits.items()} == {"pretrain": 3000, "sft": 500, "preference": 300, "rl": 200, "eval": 200}
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not splits[a] & splits[b], f"{a} and {b} overlap"
    assert [p.question for p in arithmetic().problems("eval")] == [p.question for p in task.problems("eval")]
    # the held-out split does not move when a training split is resized
    assert [p.question for p in arithmetic(n_pretrain=100).problems("eval")] == [p.question for p in task.problems("eval")]


def test_worked_solutions_are_correct_and_within_difficulty():
    task = arithmetic(min_operands=2, max_operands=4, digits=2)
    counts = set()
    for row in task.sft_examples():
        value = check_chain(row["prompt"], row["completion"])
        assert row["completion"].endswith(f"A: {value}")
        operands = re.findall(r"\d+", row["prompt"])
        counts.add(len(operands))
        assert all(len(x) == 2 for x in operands)
    assert counts == {2, 3, 4}


def test_verifier_accepts_correct_and_rejects_wrong_or_malformed():
    task = arithmetic()
    assert task.verify("47+18=65\n65-9=56\nA: 56", "56") == 1.0
    assert task.verify("A: 56\ntrailing chatter", "56") == 1.0
    assert task.verify("A: -12", "-12") == 1.0
    for bad in ["A: 57", "A:56", "A: 56.0", "A: 5 6", "A: 50+6", "A: __import__('os')", "56", "", "A: ", "A: 55\nA: 56"]:
        assert task.verify(bad, "56") == 0.0, bad
    assert extract_answer("x\nA: 0012\n") == 12
    assert extract_answer("A: 1234567890123") is None  # absurdly long numbers are malformed


def test_preference_pairs_have_hard_negatives():
    task = arithmetic()
    pairs = task.preference_pairs()
    assert len(pairs) == 300
    assert [p["kind"] for p in pairs[:6]] == ["carried", "step", "digit"] * 2
    answers = {p.prompt: p.answer for p in task.problems("preference")}
    for pair in pairs:
        answer = int(answers[pair["prompt"]])
        assert task.verify(pair["chosen"], str(answer)) == 1.0
        check_chain(pair["prompt"].replace("=?", ""), pair["chosen"])
        good, bad = pair["chosen"].split("\n"), pair["rejected"].split("\n")
        assert len(good) == len(bad)
        wrong = extract_answer(pair["rejected"])
        differs = [i for i, (g, b) in enumerate(zip(good, bad)) if g != b]
        if pair["kind"] == "digit":  # the steps are right, one digit of the answer is not
            assert differs == [len(good) - 1]
            assert len(str(abs(wrong))) == len(str(abs(answer))) and (wrong < 0) == (answer < 0)
            assert sum(a != b for a, b in zip(str(abs(wrong)), str(abs(answer)))) == 1
        elif pair["kind"] == "carried":  # one slip of 1, 2 or 10, carried to the answer
            assert abs(wrong - answer) in (1, 2, 10)
            assert differs == list(range(differs[0], len(good)))
        else:  # "step": one step shows a wrong result and the chain goes on from the right one
            slipped = [i for i in differs if i < len(good) - 1]
            assert len(slipped) == 1
            assert differs in ([slipped[0]], [slipped[0], len(good) - 1])  # the answer is wrong only if the slip was last
            if differs == [slipped[0]]:  # a false equation in the work, yet the right final answer
                assert wrong == answer and task.verify(pair["rejected"], str(answer)) == 1.0
                continue
        assert task.verify(pair["rejected"], str(answer)) == 0.0


def test_jsonl_task_reads_columns_and_fails_clearly(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"q{i}", "response": f"r{i}\nA: {i}"}) for i in range(5)))
    cfg = OmegaConf.load(CONF / "task" / "jsonl.yaml")
    cfg.splits.sft = str(path)
    with pytest.raises(ValueError, match=r"no column 'prompt'.*\['question', 'response'\].*task.columns.prompt"):
        build_task(cfg).validate(["sft"])
    cfg.columns.prompt, cfg.columns.completion = "question", "response"
    task = build_task(cfg)
    task.validate(["sft"])
    assert task.sft_examples()[3] == {"prompt": "q3", "completion": "r3\nA: 3"}
    assert task.verify("work\nA: 3", "3") == 1.0 and task.verify("A: 4", "3") == 0.0
    with pytest.raises(ValueError, match="task.splits.eval"):
        task.validate(["eval"])


def test_fresh_eval_problems_are_new_and_leave_the_splits_alone():
    task = arithmetic()
    before = {s: list(task.problems(s)) for s in ("pretrain", "sft", "preference", "rl", "eval")}
    fresh = task.fresh_eval_problems(400)
    assert len({p["prompt"] for p in fresh}) == 400
    used = {p.prompt for split in before.values() for p in split}
    assert not used & {p["prompt"] for p in fresh}
    assert all(task.verify(f"A: {p['answer']}", p["answer"]) == 1.0 for p in fresh)
    assert task.fresh_eval_problems(400) == fresh and task.fresh_eval_problems(400, seed=1) != fresh
    assert {s: task.problems(s) for s in before} == before


def operand_count(question: str) -> int:
    return len(re.findall(r"[+-]", question.rstrip("=?"))) + 1


def test_pretrain_max_operands_narrows_the_pretraining_corpus_only():
    task = arithmetic(min_operands=2, max_operands=4, pretrain_max_operands=3)
    assert {operand_count(p.question) for p in task.problems("pretrain")} == {2, 3}
    for split in ("sft", "rl", "eval", "preference"):
        assert {operand_count(p.question) for p in task.problems(split)} == {2, 3, 4}, split
    assert all(operand_count(t.split("\n")[0][3:]) <= 3 for t in task.pretrain_texts())
    with pytest.raises(ValueError, match=r"task.pretrain_max_operands=5 must lie in \[min_operands, max_operands\]"):
        arithmetic(max_operands=4, pretrain_max_operands=5)


def test_sft_slip_rate_gives_that_share_of_wrong_but_consistent_solutions():
    clean = arithmetic(n_sft=2000).sft_examples()
    noisy_task = arithmetic(n_sft=2000, sft_slip_rate=0.25)
    noisy = noisy_task.sft_examples()
    assert [e["prompt"] for e in noisy] == [e["prompt"] for e in clean]
    slipped = [(c, n) for c, n in zip(clean, noisy) if c["completion"] != n["completion"]]
    assert 0.22 < len(slipped) / len(clean) < 0.28
    for c, n in slipped:
        # exactly one step's result is off, and the chain carries it: a wrong final answer
        assert noisy_task.verify(n["completion"], str(extract_answer(c["completion"]))) == 0.0
        wrong = [(a, b) for a, b in zip(c["completion"].split("\n"), n["completion"].split("\n")) if a != b]
        first = wrong[0]
        assert first[0].split("=")[0] == first[1].split("=")[0]  # the slipped step's operands are right
    assert noisy == noisy_task.sft_examples()  # the same slips every time (seeded)
    with pytest.raises(ValueError, match="sft_slip_rate"):
        arithmetic(sft_slip_rate=1.0)


@pytest.mark.parametrize("expression, value", [("47+18-9", "56"), ("12 - 80", "-68"), ("-5+3", "-2"), ("7", "7")])
def test_the_calculator_adds_and_subtracts(expression, value):
    from pipeline.tasks.arithmetic import calculator

    assert calculator(expression) == value


@pytest.mark.parametrize("expression", ["2*3", "__import__('os')", "1+", "", "1++2", "1.5+2", 12])
def test_the_calculator_refuses_anything_else_without_evaluating_it(expression):
    from pipeline.tasks.arithmetic import calculator

    with pytest.raises(ValueError, match="integers joined by"):
        calculator(expression)


def test_calculator_traces_call_the_tool_and_answer_with_its_result():
    from pipeline.tasks.arithmetic import calculator

    task = arithmetic(calculator=True, sft_slip_rate=0.25, n_sft=400)
    examples = task.sft_examples()
    slipped = 0
    for example, problem in zip(examples, task.problems("sft")):
        user, call, result, answer = example["messages"]
        assert user == {"role": "user", "content": problem.prompt}
        expression = call["tool_calls"][0]["function"]["arguments"]["expression"]
        assert result == {"role": "tool", "name": "calculator", "content": calculator(expression)}
        assert answer == {"role": "assistant", "content": f"A: {result['content']}"}
        assert [t["function"]["name"] for t in example["tools"]] == ["calculator"]
        if expression != problem.question:  # a slip: one operand off, the rest copied
            slipped += 1
            differ = [a != b for a, b in zip(re.findall(r"\d+", expression), re.findall(r"\d+", problem.question))]
            assert sum(differ) == 1 and re.findall(r"[+-]", expression) == re.findall(r"[+-]", problem.question)
    assert 0.18 < slipped / len(examples) < 0.32
    assert len(task.tool_call_texts()) == 400 and json.loads(task.tool_call_texts()[0])["name"] == "calculator"


def test_held_out_problems_can_be_longer_than_every_training_split():
    task = arithmetic(eval_min_operands=5, eval_max_operands=6)
    assert {operand_count(p.question) for p in task.problems("eval")} == {5, 6}
    assert {operand_count(p.question) for p in task.problems("rl")} == {2, 3, 4}
    assert {operand_count(p["prompt"]) for p in task.fresh_eval_problems(50)} == {5, 6}
    default = arithmetic()
    assert [p.question for p in default.problems("sft")] == [p.question for p in arithmetic(calculator=True).problems("sft")]
    with pytest.raises(ValueError, match="eval_min_operands"):
        arithmetic(eval_min_operands=5, eval_max_operands=4)
