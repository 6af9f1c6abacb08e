"""Synthetic verifiable arithmetic: multi-step integer +/- with worked steps.

A problem "47+18-9" is written as

    Q: 47+18-9=?
    47+18=65
    65-9=56
    A: 56

Every split is drawn from one seeded stream of distinct questions, so the held-out split is
disjoint from every training split by construction.

With `task.calculator=true` the sft solutions call the `calculator` tool instead of working the
steps (TRL's tool-calling conversations: the call, its result as a tool turn, then "A: <n>"), for
a grpo that offers the same tool (stages.grpo.tools.calculator=pipeline.tasks.arithmetic:calculator).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from transformers.utils import get_json_schema

from pipeline.tasks.base import Task

ANSWER_LINE = re.compile(r"^A: (-?\d{1,12})$")
EXPRESSION = re.compile(r"\s*-?\d{1,12}(\s*[+-]\s*\d{1,12}){0,31}\s*")
CALCULATOR_PATH = "pipeline.tasks.arithmetic:calculator"


def calculator(expression: str) -> str:
    """Add and subtract integers, left to right.

    Args:
        expression: integers joined by + and -, e.g. 47+18-9
    """
    if not isinstance(expression, str) or not EXPRESSION.fullmatch(expression):
        raise ValueError("expression must be integers joined by + and -, e.g. 47+18-9")
    text = expression.replace(" ", "")
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    signs = re.findall(r"(?<=\d)[+-]", text)
    value = -numbers[0] if text.startswith("-") else numbers[0]
    for sign, number in zip(signs, numbers[1:]):
        value = value + number if sign == "+" else value - number
    return str(value)


def calculator_call(expression: str) -> dict:
    """An assistant turn calling the calculator, in TRL's format."""
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}]}


@dataclass(frozen=True)
class Problem:
    question: str  # "47+18-9"
    steps: tuple[str, ...]  # ("47+18=65", "65-9=56")
    answer: int

    @property
    def prompt(self) -> str:
        return f"{self.question}=?"

    def solution(self, steps: tuple[str, ...] | None = None, answer: int | None = None) -> str:
        steps = self.steps if steps is None else steps
        answer = self.answer if answer is None else answer
        return "".join(s + "\n" for s in steps) + f"A: {answer}"


def extract_answer(completion: str) -> int | None:
    """The integer on the first line starting with "A:", or None if that line is malformed.

    Strict on purpose: "A: 56" parses; "A: 56.0", "A:56", "A: 5 6" or "A: 2+3" do not.
    """
    for line in completion.split("\n"):
        if line.startswith("A:"):
            match = ANSWER_LINE.match(line.rstrip("\r"))
            return int(match.group(1)) if match else None
    return None


def make_problem(rng: random.Random, min_operands: int, max_operands: int, digits: int, ops: str) -> Problem:
    n = rng.randint(min_operands, max_operands)
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    operands = [rng.randint(lo, hi) for _ in range(n)]
    operators = [rng.choice(ops) for _ in range(n - 1)]
    value, steps = operands[0], []
    for op, x in zip(operators, operands[1:]):
        new = value + x if op == "+" else value - x
        steps.append(f"{value}{op}{x}={new}")
        value = new
    question = str(operands[0]) + "".join(op + str(x) for op, x in zip(operators, operands[1:]))
    return Problem(question, tuple(steps), value)


def slip_expression(problem: Problem, rng: random.Random) -> str:
    """The question with one operand off by 1, 2 or 10: the calculator's input copied with a slip."""
    numbers = [int(t) for t in re.findall(r"\d+", problem.question)]
    operators = re.findall(r"[+-]", problem.question)
    i = rng.randrange(len(numbers))
    numbers[i] = max(numbers[i] + rng.choice([-10, -2, -1, 1, 2, 10]), 0)
    return str(numbers[0]) + "".join(op + str(x) for op, x in zip(operators, numbers[1:]))


# the kinds of rejected answer in the preference pairs, in rotation; each is one small slip
NEGATIVE_KINDS = ("carried", "step", "digit")


def corrupt(problem: Problem, rng: random.Random, kind: str = "carried") -> str:
    """A plausible wrong worked solution with one slip:

    carried  one step's result is off by 1, 2 or 10 and the error is carried through the later
             steps, so the chain is self-consistent and only redoing the arithmetic exposes it;
    step     the same slip, but the next step goes on from the correct value (so unless the slip
             is in the last step the final answer is right: only the work is wrong);
    digit    every step is right and one digit of the final answer is wrong.
    """
    numbers = [int(t) for t in re.findall(r"\d+", problem.question)]
    operators = re.findall(r"[+-]", problem.question)
    if kind == "digit":
        text = str(abs(problem.answer))
        i = rng.randrange(len(text))
        digit = rng.choice([d for d in "0123456789" if d != text[i] and (i > 0 or d != "0" or len(text) == 1)])
        wrong = int(text[:i] + digit + text[i + 1 :]) * (-1 if problem.answer < 0 else 1)
        return problem.solution(answer=wrong)
    if kind not in ("carried", "step"):
        raise ValueError(f"unknown negative kind {kind!r}; valid: {', '.join(NEGATIVE_KINDS)}")
    bad_step = rng.randrange(len(operators))
    delta = rng.choice([-10, -2, -1, 1, 2, 10])
    value, steps = numbers[0], []
    for i, (op, x) in enumerate(zip(operators, numbers[1:])):
        new = value + x if op == "+" else value - x
        shown = new + delta if i == bad_step else new
        steps.append(f"{value}{op}{x}={shown}")
        value = shown if kind == "carried" else new
    return problem.solution(tuple(steps), value)


class ArithmeticTask(Task):
    name = "arithmetic"

    def __init__(self, cfg) -> None:
        if cfg.min_operands < 2 or cfg.max_operands < cfg.min_operands:
            raise ValueError(
                f"task.min_operands={cfg.min_operands}, task.max_operands={cfg.max_operands}: "
                "need 2 <= min_operands <= max_operands"
            )
        if not 1 <= cfg.digits <= 6 or not cfg.ops or set(cfg.ops) - set("+-"):
            raise ValueError(f"task.digits must be 1..6 and task.ops a non-empty subset of '+-', got {cfg.digits}, {cfg.ops!r}")
        self.cfg = cfg
        sizes = {s: int(cfg[f"n_{s}"]) for s in ("eval", "pretrain", "sft", "preference", "rl")}
        self._shape = (int(cfg.min_operands), int(cfg.max_operands), int(cfg.digits), str(cfg.ops))
        # the pretraining corpus may cover fewer operands than the other splits (null: the same)
        pretrain_max = cfg.get("pretrain_max_operands")
        pretrain_max = int(cfg.max_operands) if pretrain_max is None else int(pretrain_max)
        if not int(cfg.min_operands) <= pretrain_max <= int(cfg.max_operands):
            raise ValueError(f"task.pretrain_max_operands={pretrain_max} must lie in "
                             f"[min_operands, max_operands] = [{cfg.min_operands}, {cfg.max_operands}]")
        self.slip_rate = float(cfg.get("sft_slip_rate") or 0.0)
        if not 0.0 <= self.slip_rate < 1.0:
            raise ValueError(f"task.sft_slip_rate={self.slip_rate} must lie in [0, 1)")
        shapes = {"pretrain": (self._shape[0], pretrain_max, *self._shape[2:])}
        # the held-out problems may be longer (or shorter) than every training split's
        eval_min, eval_max = cfg.get("eval_min_operands"), cfg.get("eval_max_operands")
        eval_min = int(cfg.min_operands) if eval_min is None else int(eval_min)
        eval_max = int(cfg.max_operands) if eval_max is None else int(eval_max)
        if not 2 <= eval_min <= eval_max:
            raise ValueError(f"task.eval_min_operands={eval_min}, task.eval_max_operands={eval_max}: "
                             "need 2 <= eval_min_operands <= eval_max_operands (null: min/max_operands)")
        shapes["eval"] = (eval_min, eval_max, *self._shape[2:])
        self._eval_shape = shapes["eval"]
        self.calculator = bool(cfg.get("calculator", False))
        rng = random.Random(cfg.seed)
        self._seen: set[str] = set()
        # eval first, so changing a training size never changes the held-out problems
        self._splits = {split: self._draw(rng, size, split, shapes.get(split)) for split, size in sizes.items()}

    def _draw(self, rng: random.Random, size: int, split: str, shape: tuple | None = None) -> list[Problem]:
        """size problems none of the splits drawn so far has."""
        problems: list[Problem] = []
        attempts = 0
        while len(problems) < size:
            attempts += 1
            if attempts > 20 * size + 1000:
                raise ValueError(f"task: cannot draw {size} distinct '{split}' problems; raise digits or max_operands")
            p = make_problem(rng, *(shape or self._shape))
            if p.question not in self._seen:
                self._seen.add(p.question)
                problems.append(p)
        return problems

    def fresh_eval_problems(self, n: int, seed: int = 0) -> list[dict]:
        """n more held-out problems, disjoint from every split, for a tighter held-out measurement
        than n_eval gives without changing any split (benchmarks/heldout_eval.py)."""
        rng = random.Random(f"{self.cfg.seed}/fresh/{seed}")
        fresh = self._draw(rng, n, "fresh eval", self._eval_shape)
        self._seen.difference_update(p.question for p in fresh)  # a later call may draw them again
        return [{"prompt": p.prompt, "answer": str(p.answer)} for p in fresh]

    def problems(self, split: str) -> list[Problem]:
        return self._splits[split]

    def text_prompt(self, prompt: str) -> str:
        return f"Q: {prompt}\n"

    def pretrain_texts(self) -> list[str]:
        return [self.text_prompt(p.prompt) + p.solution() + "\n" for p in self._splits["pretrain"]]

    def eval_texts(self) -> list[str]:
        return [self.text_prompt(p.prompt) + p.solution() + "\n" for p in self._splits["eval"]]

    def sft_examples(self) -> list[dict]:
        """The worked solutions of an imperfect teacher: a `sft_slip_rate` share of them (chosen by
        task.seed) carry one slip, off by 1, 2 or 10, carried through to the answer ("carried" in
        `corrupt`), as distilled data does. The slipped step varies, so the correct token stays
        the most likely one everywhere: greedy decoding learns the right answer, sampling at
        temperature 1 reproduces the slips, and a verifier reward (grpo) can remove them."""
        rng = random.Random(f"{self.cfg.seed}/slips")
        examples = []
        for p in self._splits["sft"]:
            slipped = self.slip_rate > 0 and rng.random() < self.slip_rate
            if self.calculator:
                examples.append(self.calculator_conversation(p, slip_expression(p, rng) if slipped else p.question))
            else:
                examples.append({"prompt": p.prompt, "completion": corrupt(p, rng, "carried") if slipped else p.solution()})
        return examples

    def calculator_conversation(self, problem: Problem, expression: str) -> dict:
        """The question, a call of the calculator on `expression` (the question itself, or one
        with a slip), its result, and the answer the result gives."""
        result = calculator(expression)
        messages = [{"role": "user", "content": problem.prompt}, calculator_call(expression),
                    {"role": "tool", "name": "calculator", "content": result},
                    {"role": "assistant", "content": f"A: {result}"}]
        return {"messages": messages, "tools": [get_json_schema(calculator)]}

    def tool_call_texts(self) -> list[str]:
        """The text of the sft split's calculator calls, for a tokenizer trained with tool markers."""
        return [json.dumps({"name": "calculator", "arguments": {"expression": p.question}}) for p in self._splits["sft"]]

    def preference_pairs(self) -> list[dict]:
        rng = random.Random(self.cfg.seed + 2)
        pairs = []
        for i, p in enumerate(self._splits["preference"]):
            kind = NEGATIVE_KINDS[i % len(NEGATIVE_KINDS)]
            pairs.append({"prompt": p.prompt, "chosen": p.solution(), "rejected": corrupt(p, rng, kind), "kind": kind})
        return pairs

    def rl_prompts(self) -> list[dict]:
        return [{"prompt": p.prompt, "answer": str(p.answer)} for p in self._splits["rl"]]

    def eval_problems(self) -> list[dict]:
        return [{"prompt": p.prompt, "answer": str(p.answer)} for p in self._splits["eval"]]

    def extract_answer(self, completion: str) -> str | None:
        got = extract_answer(completion)
        return None if got is None else str(got)

    def verify(self, completion: str, answer: str) -> float:
        got = extract_answer(completion)
        return 1.0 if got is not None and got == int(answer) else 0.0
