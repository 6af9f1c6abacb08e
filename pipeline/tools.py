"""Tools and environments for multi-turn rollouts, by import path like reward functions.

    stages.grpo.tools.<name>=package.module:function     TRL's tool: typed arguments and a
                                                         docstring the chat template renders
    stages.grpo.environment=package.module:Factory       TRL's environment: `reset(**row)` and
                                                         public methods used as tools

TRL's GRPOTrainer runs the loop (generate, parse the tool calls with the tokenizer's response
template, call, append the results, generate again, up to `max_tool_calling_iterations`) and
masks the results out of the loss. This module loads and checks what the user configured, before
any compute: that every path imports to a callable whose schema transformers can build (else the
chat template cannot show it to the model), and that the input model's chat template renders
tool calls and results and its replies can be parsed. A tool (function or environment
method) that raises, or runs longer than `tool_timeout_s`, gives the model an error as its result (TRL counts it in
`tools/failure_frequency`); it never stops the run.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import inspect
from collections.abc import Callable

from transformers.utils import get_json_schema

from pipeline.errors import ConfigError
from pipeline.rewards import load, source_fingerprint

# tool calls run in these threads so that a slow one can be abandoned after tool_timeout_s
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="tool")


def tool_paths(stage_cfg) -> dict[str, str]:
    return {str(name): str(path) for name, path in (stage_cfg.get("tools") or {}).items()}


def uses_tools(stage_cfg) -> bool:
    return bool(tool_paths(stage_cfg)) or stage_cfg.get("environment") is not None


def schema(function: Callable, key: str) -> dict:
    """The JSON schema the chat template renders; ConfigError naming `key` and the fix."""
    try:
        return get_json_schema(function)
    except Exception as err:  # transformers' TypeError / DocstringParsingException
        raise ConfigError(f"{key}: {getattr(function, '__name__', function)!r} cannot be shown to the model as a tool "
                          f"({err}); give every argument a type annotation and the function a docstring with an "
                          "Args: section describing each argument") from err


def call_with_timeout(function: Callable, name: str, seconds: float, *args, **kwargs):
    """function(*args, **kwargs), or TimeoutError after `seconds` (the call is abandoned in its thread)."""
    future = _POOL.submit(function, *args, **kwargs)
    try:
        return future.result(timeout=seconds)
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"tool {name} took longer than {seconds:g} s") from None


def with_timeout(function: Callable, seconds: float) -> Callable:
    """`function` (same name, signature and docstring, so its schema is unchanged) that raises
    TimeoutError after `seconds`."""

    @functools.wraps(function)
    def call(*args, **kwargs):
        return call_with_timeout(function, function.__name__, seconds, *args, **kwargs)

    return call


def environment_with_timeout(cls: type, seconds: float) -> type:
    """A subclass of the environment `cls` whose tool methods (same names, signatures and
    docstrings) raise TimeoutError after `seconds`, as tool functions do."""

    def timed(method: Callable) -> Callable:
        @functools.wraps(method)
        def call(self, *args, **kwargs):
            return call_with_timeout(method, method.__name__, seconds, self, *args, **kwargs)

        return call

    methods = {name: timed(getattr(cls, name)) for name in environment_tools(cls)}
    return type(cls.__name__, (cls,), {**methods, "__module__": cls.__module__, "__doc__": cls.__doc__})


def load_tools(stage_cfg, stage: str) -> list[Callable]:
    """The configured tool functions, checked and wrapped with the stage's timeout."""
    tools = []
    for name, path in tool_paths(stage_cfg).items():
        key = f"stages.{stage}.tools.{name}"
        function = load(path, key)
        if inspect.isclass(function):
            raise ConfigError(f"{key}={path!r} is a class; a tool is a function (an object with reset and tool methods "
                              f"goes to stages.{stage}.environment)")
        if function.__name__ != name:
            raise ConfigError(f"{key}={path!r}: the model calls a tool by its function's name, {function.__name__!r}; "
                              f"name the key after it: stages.{stage}.tools.{function.__name__}")
        schema(function, key)
        tools.append(with_timeout(function, float(stage_cfg.tool_timeout_s)))
    return tools


def load_environment(stage_cfg, stage: str) -> Callable | None:
    """The environment factory, or None; ConfigError unless its instances have `reset` and every
    public method is a tool the chat template can show."""
    if stage_cfg.get("environment") is None:
        return None
    key, path = f"stages.{stage}.environment", str(stage_cfg.environment)
    factory = load(path, key)
    cls = factory if inspect.isclass(factory) else None
    if cls is None:
        raise ConfigError(f"{key}={path!r} is a {type(factory).__name__}; name a class whose instances have reset(**row) "
                          "and tool methods (TRL's environment_factory)")
    if not inspect.isfunction(getattr(cls, "reset", None)):
        raise ConfigError(f"{key}={path!r}: {cls.__name__} has no reset method; TRL calls reset(**row) before each rollout")
    names = environment_tools(cls)
    if not names:
        raise ConfigError(f"{key}={path!r}: {cls.__name__} has no public method to offer as a tool")
    for name in names:
        schema(getattr(cls, name), f"{key} ({cls.__name__}.{name})")
    return environment_with_timeout(cls, float(stage_cfg.tool_timeout_s))


def environment_tools(cls) -> list[str]:
    """The methods of an environment class offered as tools (TRL's rule: public functions on the
    class but reset and get_reward)."""
    return [name for name, _ in inspect.getmembers(cls, predicate=inspect.isfunction)
            if not name.startswith("_") and name not in ("reset", "get_reward")]


def check(stage_cfg, stage: str) -> None:
    """Everything about the tools that can be checked without the model."""
    if not uses_tools(stage_cfg):
        return
    if stage_cfg.get("max_tool_calling_iterations") is not None and int(stage_cfg.max_tool_calling_iterations) < 1:
        raise ConfigError(f"stages.{stage}.max_tool_calling_iterations={stage_cfg.max_tool_calling_iterations}: "
                          "must be >= 1 (null: no limit)")
    if float(stage_cfg.tool_timeout_s) <= 0:
        raise ConfigError(f"stages.{stage}.tool_timeout_s={stage_cfg.tool_timeout_s}: must be > 0")
    load_tools(stage_cfg, stage)
    load_environment(stage_cfg, stage)


def check_tokenizer(tokenizer, stage: str, where: str) -> None:
    """ConfigError unless the chat template of the model at `where` renders tool calls and tool
    results and TRL can parse the model's replies into tool calls."""
    from trl.chat_template_utils import supports_tool_calling

    fix = (f"use a model whose chat template supports tools (Qwen3, Qwen2.5, Llama 3.1/3.2, ...), or leave "
           f"stages.{stage}.tools and stages.{stage}.environment unset")
    if not supports_tool_calling(tokenizer):
        raise ConfigError(f"stages.{stage}.tools: the chat template of {where} does not render tool calls and tool "
                          f"results; {fix}")
    try:
        response_parser(tokenizer)
    except ValueError as err:
        raise ConfigError(f"stages.{stage}.tools: TRL cannot parse tool calls out of the replies of {where} "
                          f"(no response template for its chat template); {fix}") from err


def response_parser(tokenizer):
    """`tokenizer`, or a copy with TRL's response template for its chat template, whose
    parse_response reads tool calls out of a reply; ValueError for a template TRL does not know."""
    if getattr(tokenizer, "response_template", None) is not None or getattr(tokenizer, "response_schema", None) is not None:
        return tokenizer
    from trl.chat_template_utils import add_response_schema

    return add_response_schema(copy.copy(tokenizer))


def tools_from(cfg, stage: str):
    """(the stage config holding the tools `stage` evaluates the policy with, its name), or
    (None, None): stages.<stage>.tools_from names it (grpo by default, the stage that trains with
    them); a run without that stage, or whose stage offers no tools, evaluates without."""
    source = cfg.stages[stage].get("tools_from")
    if source is None or source not in cfg.stages:
        return None, None
    return (cfg.stages[source], str(source)) if uses_tools(cfg.stages[source]) else (None, None)


def fingerprint(stage_cfg) -> str | None:
    """The import paths and source files of the tools and the environment, and the loop's limits
    (an edited tool reruns the stage; so does another tool, for a stage whose own config does not
    name it: sft's and test_time's evaluation)."""
    paths = sorted(tool_paths(stage_cfg).items())
    if stage_cfg.get("environment") is not None:
        paths.append(("environment", str(stage_cfg.environment)))
    if not paths:
        return None
    limits = f"rounds={stage_cfg.get('max_tool_calling_iterations')},timeout={stage_cfg.get('tool_timeout_s')}"
    return "|".join([*(f"{name}={path}:{source_fingerprint(path)}" for name, path in paths), limits])
