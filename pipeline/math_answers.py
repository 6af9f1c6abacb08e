"""Math answer checking with math-verify: the model's answer is the last `\\boxed{...}` in its
text, or the last number or arithmetic expression where there is none; it is right when it is
mathematically equal to the reference (`\\frac{1}{2}`, `0.5` and `1/2` agree; `x=3` and `3` do).
A GSM8K reference solution counts by its final `#### 42` line, a MATH one by its last `\\boxed{}`.

Model text is never executed: math-verify reads LaTeX with its own ANTLR grammar, and the only
strings that reach sympy's expression parser are matched by a regex of digits, dots, spaces and
arithmetic operators. Parsing and comparing each stop after `timeout_s` seconds (math-verify's
alarm-based limit, on the main thread), counting as wrong.
"""

from __future__ import annotations

import logging
import re

GSM8K_FINAL = re.compile(r"####\s*(?P<answer>[^\n]+?)\s*$")
TIMEOUT_S = 2

logging.getLogger("math_verify").setLevel(logging.ERROR)  # it logs every timeout with the whole input


def reference(answer: str) -> str:
    """The reference as math-verify should read it: a GSM8K solution's `#### 42` (thousands
    commas dropped) boxed; a worked solution with a `\\boxed{}` (MATH) as it is; a bare answer
    (`\\frac{1}{2}`, `42`) boxed."""
    final = GSM8K_FINAL.search(answer.strip())
    if final:
        return f"\\boxed{{{final.group('answer').replace(',', '')}}}"
    return answer if "\\boxed" in answer else f"\\boxed{{{answer.strip()}}}"


def extract(completion: str, timeout_s: int = TIMEOUT_S) -> str | None:
    """The answer math-verify reads in `completion` (its text form), or None."""
    from math_verify import parse

    parsed = parse(completion, parsing_timeout=timeout_s)
    return str(parsed[-1]) if parsed else None


def verify(completion: str, answer: str, timeout_s: int = TIMEOUT_S) -> float:
    """1.0 when the completion's answer equals the reference, else 0.0."""
    from math_verify import parse
    from math_verify import verify as equal

    gold = parse(reference(answer), parsing_timeout=timeout_s)
    predicted = parse(completion, parsing_timeout=timeout_s)
    if not gold or not predicted:
        return 0.0
    return 1.0 if equal(gold, predicted, timeout_seconds=timeout_s) else 0.0
