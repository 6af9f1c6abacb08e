"""sft on tool-calling conversations in TRL's format (`messages` with assistant `tool_calls` and
`tool` turns, a `tools` column of JSON schemas): the loss covers the assistant turns, calls
included, and no tool result; bad rows stop the run before compute, naming the row."""

from __future__ import annotations

import itertools
import json

import pytest

from pipeline.tasks import build_task
from pipeline.tokenizer import load_chat_tokenizer
from stages.sft import tokenize_example
from tests.conftest import compose_config
from tests.tiny_models import save_tiny_family

ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                        "parameters": {"type": "object", "required": ["a", "b"],
                                                       "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
NEG = {"type": "function", "function": {"name": "negate", "description": "Negate an integer.",
                                        "parameters": {"type": "object", "required": ["x"],
                                                       "properties": {"x": {"type": "integer"}}}}}


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def row(a: int, b: int, c: int) -> dict:
    return {"tools": [ADD, NEG], "messages": [
        {"role": "user", "content": f"{a}+{b}+{c}=?"},
        {"role": "assistant", "content": "", "tool_calls": [call("add", a=a, b=b)]},
        {"role": "tool", "name": "add", "content": str(a + b)},
        {"role": "assistant", "content": "", "tool_calls": [call("add", a=a + b, b=c)]},
        {"role": "tool", "name": "add", "content": str(a + b + c)},
        {"role": "assistant", "content": f"A: {a + b + c}"}]}


def write(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def sft_task(path: str):
    return build_task(compose_config(["task=jsonl", f"task.splits.sft={path}"]).task)


def test_tool_conversations_read_without_the_nulls_arrow_adds(tmp_path):
    rows = [row(1, 2, 4), {"tools": [NEG], "messages": [
        {"role": "user", "content": "-5?"}, {"role": "assistant", "content": "", "tool_calls": [call("negate", x=5)]},
        {"role": "tool", "name": "negate", "content": "-5"}, {"role": "assistant", "content": "A: -5"}]}]
    examples = sft_task(write(tmp_path / "sft.jsonl", rows)).sft_examples()
    assert examples[0]["messages"] == row(1, 2, 4)["messages"]  # no "x": null in add's arguments
    assert examples[1]["messages"][1]["tool_calls"] == [call("negate", x=5)]
    assert examples[0]["tools"] == [ADD, NEG] and examples[1]["tools"] == [NEG]


@pytest.mark.parametrize("messages, tools, problem", [
    ([{"role": "user", "content": "hi"}, {"role": "tool", "name": "add", "content": "3"},
      {"role": "assistant", "content": "A: 3"}], [ADD], "turn 2 is a tool result with no tool call before it to answer"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call("mul", a=1, b=2)]},
      {"role": "tool", "name": "mul", "content": "2"}, {"role": "assistant", "content": "A: 2"}], [ADD],
     "turn 2 calls 'mul', which is not among the row's tools \\(add\\)"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call("add", a=1, b=2)]},
      {"role": "tool", "name": "add", "content": "3"}, {"role": "assistant", "content": "A: 3"}], None,
     "turn 2 calls tools, and the row has no tools column"),
])
def test_a_bad_tool_row_is_named_before_compute(tmp_path, messages, tools, problem):
    rows = [row(1, 2, 3), {"messages": messages, **({"tools": tools} if tools else {})}]
    if tools is None:
        rows = [{"messages": messages}]
    path = write(tmp_path / "sft.jsonl", rows)
    line = 1 if tools is None else 2
    with pytest.raises(ValueError, match=rf"split 'sft' \({path}\) row {line} \(line {line}\), column 'messages': {problem}"):
        sft_task(path).sft_examples()


def test_the_loss_covers_the_assistant_turns_and_calls_and_no_tool_result(tmp_path):
    tokenizer = load_chat_tokenizer(save_tiny_family("qwen3_tools", tmp_path / "qwen3"))
    example = sft_task(write(tmp_path / "sft.jsonl", [row(1, 2, 4)])).sft_examples()[0]
    out = tokenize_example(tokenizer, example)
    spans = [(bool(k), tokenizer.decode([out["input_ids"][i] for i in group]))
             for k, group in itertools.groupby(range(len(out["input_ids"])), key=lambda i: out["completion_mask"][i])]
    trained = [text for k, text in spans if k]
    assert len(trained) == 3 and [k for k, _ in spans] == [False, True, False, True, False, True]
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><|im_end|>' in trained[0]
    assert '{"a": 3, "b": 4}' in trained[1] and trained[2].endswith("A: 7<|im_end|>\n")
    untrained = "".join(text for k, text in spans if not k)
    assert "<tool_response>\n3\n</tool_response>" in untrained and "<tool_response>\n7\n</tool_response>" in untrained
    assert '"name": "negate"' in untrained  # the schemas are rendered (for the model to read), not trained on
