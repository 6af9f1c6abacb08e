"""Generation with tools outside training: the loop TRL's GRPOTrainer runs in its rollouts
(generate; parse the reply's tool calls with the tokenizer's response template; call the tools;
append the assistant turn and the results; generate again, up to `max_iterations` rounds), so that
a policy trained with tools is evaluated with them. A call that raises or times out gives the
model an error as its result, as in training; the answer is the last assistant turn's text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers.utils import get_json_schema
from trl.chat_template_utils import parse_response

from pipeline import tools as tool_config
from pipeline.evaluate import generate
from pipeline.tasks.base import as_turns


@dataclass
class ToolStats:
    calls: int = 0
    failures: int = 0
    conversations: int = 0

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_tool_calls_per_problem": self.calls / max(self.conversations, 1),
                f"{prefix}_tool_failure_share": self.failures / self.calls if self.calls else 0.0}


@dataclass(frozen=True)
class ToolSetup:
    """What a stage offers the model: tool functions, an environment class (a fresh instance per
    conversation, reset with the problem's row), and the round limit (None: until it stops).
    `stats` adds up the calls of every generate() (evaluate.evaluate calls it with tools)."""

    tools: tuple[Callable, ...] = ()
    environment: Callable | None = None
    max_iterations: int | None = None
    stats: ToolStats = field(default_factory=ToolStats, compare=False)

    def generate(self, model, tokenizer, prompts: list, rows: list[dict], **options) -> tuple[list[list[str]], list[list[int]]]:
        texts, tokens, stats = generate_with_tools(model, tokenizer, prompts, rows, self, **options)
        self.stats.calls += stats.calls
        self.stats.failures += stats.failures
        self.stats.conversations += stats.conversations
        return texts, tokens

    @classmethod
    def of(cls, stage_cfg, stage: str) -> ToolSetup | None:
        """From stages.<stage>.tools / environment / max_tool_calling_iterations; None without tools."""
        if not tool_config.uses_tools(stage_cfg):
            return None
        limit = stage_cfg.get("max_tool_calling_iterations")
        return cls(tuple(tool_config.load_tools(stage_cfg, stage)), tool_config.load_environment(stage_cfg, stage),
                   None if limit is None else int(limit))


@dataclass
class Conversation:
    messages: list[dict]
    functions: dict[str, Callable]
    schemas: list[dict]
    tokens: int = 0
    done: bool = False
    rounds: int = 0
    answer: str = ""


def start(prompt, row: dict, setup: ToolSetup) -> Conversation:
    functions = {f.__name__: f for f in setup.tools}
    if setup.environment is not None:
        env = setup.environment()
        env.reset(**row)
        functions.update({name: getattr(env, name) for name in tool_config.environment_tools(type(env))})
    return Conversation(as_turns(prompt, "user"), functions, [get_json_schema(f) for f in functions.values()])


def call(conversation: Conversation, tool_call: dict, stats: ToolStats) -> dict:
    """The tool turn answering `tool_call` (an error message if the call fails)."""
    stats.calls += 1
    function = tool_call.get("function", {})
    name = function.get("name", "?")
    try:
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        result = conversation.functions[name](**arguments)
    except Exception as err:  # an unknown tool, bad arguments, the tool raising or timing out
        stats.failures += 1
        result = {"error": f"{type(err).__name__}: {err}"}
    return {"role": "tool", "name": name, "content": result if isinstance(result, str) else json.dumps(result)}


def generate_with_tools(model, tokenizer, prompts: list, rows: list[dict], setup: ToolSetup, *, temperature: float = 0.0,
                        num_samples: int = 1, max_new_tokens: int = 64, batch_size: int = 64,
                        generate_fn: Callable = generate) -> tuple[list[list[str]], list[list[int]], ToolStats]:
    """(answers, generated tokens, tool stats) per prompt, `num_samples` each, as evaluate.generate
    returns them; each sample is its own conversation with its own environment."""
    parser = tool_config.response_parser(tokenizer)
    conversations = [start(p, r, setup) for p, r in zip(prompts, rows) for _ in range(num_samples)]
    stats = ToolStats(conversations=len(conversations))
    while active := [c for c in conversations if not c.done]:
        texts = [tokenizer.apply_chat_template(c.messages, tools=c.schemas or None, add_generation_prompt=True, tokenize=False)
                 for c in active]
        replies, counts = generate_fn(model, tokenizer, texts, temperature=temperature, num_samples=1,
                                      max_new_tokens=max_new_tokens, batch_size=batch_size, skip_special_tokens=False)
        for conversation, text, (reply,), (count,) in zip(active, texts, replies, counts):
            conversation.tokens += count
            # TRL's parser, as in training: a malformed call (bad JSON, no name or arguments) is a plain answer
            parsed = parse_response(parser, tokenizer(reply, add_special_tokens=False)["input_ids"],
                                    prefix=tokenizer(text, add_special_tokens=False)["input_ids"], tools=conversation.schemas)
            calls = parsed.get("tool_calls") or []
            limit_reached = setup.max_iterations is not None and conversation.rounds >= setup.max_iterations
            if not calls or limit_reached:
                conversation.done, conversation.answer = True, parsed.get("content") or ""
                continue
            conversation.rounds += 1
            conversation.messages.append({"role": "assistant", "content": parsed.get("content") or "", "tool_calls": calls})
            conversation.messages.extend(call(conversation, c, stats) for c in calls)
    answers = [[c.answer for c in conversations[i : i + num_samples]] for i in range(0, len(conversations), num_samples)]
    tokens = [[c.tokens for c in conversations[i : i + num_samples]] for i in range(0, len(conversations), num_samples)]
    return answers, tokens, stats
