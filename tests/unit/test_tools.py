"""pipeline/tools.py: tools and environments by import path, checked before any compute (exit 2
naming the key and the fix), with a timeout that turns a slow call into an error the model reads."""

from __future__ import annotations

import sys
import textwrap
import time

import pytest
from omegaconf import OmegaConf
from transformers.utils import get_json_schema

from pipeline import tools
from pipeline.errors import ConfigError
from tests.conftest import compose_config
from tests.tiny_models import tokenizer_for

TOOLS = '''
import time


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def nap(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "awake"


def untyped(a, b):
    return a + b


class Calculator:
    def reset(self, **row):
        self.calls = 0

    def multiply(self, a: int, b: int) -> int:
        """Multiply two integers.

        Args:
            a: the first number
            b: the second number
        """
        self.calls += 1
        return a * b

    def wait(self, seconds: float) -> str:
        """Sleep.

        Args:
            seconds: how long
        """
        time.sleep(seconds)
        return "awake"


class NoReset:
    def multiply(self, a: int, b: int) -> int:
        """Multiply.

        Args:
            a: a
            b: b
        """
        return a * b
'''


@pytest.fixture
def user_tools(tmp_path, monkeypatch):
    (tmp_path / "my_tools.py").write_text(TOOLS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "my_tools.py"
    sys.modules.pop("my_tools", None)


def grpo(**keys):
    stage = OmegaConf.create(OmegaConf.to_container(compose_config().stages.grpo))  # not struct: new tool names
    return OmegaConf.merge(stage, OmegaConf.create(keys))


def test_a_users_tools_and_environment_load_with_their_schemas(user_tools):
    stage = grpo(tools={"add": "my_tools:add"}, environment="my_tools:Calculator")
    tools.check(stage, "grpo")
    (add,) = tools.load_tools(stage, "grpo")
    assert add(2, 3) == 5 and add.__name__ == "add"
    assert get_json_schema(add)["function"]["parameters"]["properties"]["a"] == {"type": "integer", "description": "the first number"}
    assert tools.load_environment(stage, "grpo").__name__ == "Calculator"
    assert tools.uses_tools(stage) and not tools.uses_tools(grpo())


@pytest.mark.parametrize("keys, message", [
    ({"tools": {"add": "no_such_module:add"}}, r"stages.grpo.tools.add='no_such_module:add': module 'no_such_module' does not import"),
    ({"tools": {"untyped": "my_tools:untyped"}}, r"stages.grpo.tools.untyped: 'untyped' cannot be shown to the model as a tool .* type annotation"),
    ({"tools": {"plus": "my_tools:add"}}, r"the model calls a tool by its function's name, 'add'; name the key after it: stages.grpo.tools.add"),
    ({"tools": {"Calculator": "my_tools:Calculator"}}, r"is a class; a tool is a function .* stages.grpo.environment"),
    ({"environment": "my_tools:NoReset"}, r"stages.grpo.environment='my_tools:NoReset': NoReset has no reset method"),
    ({"environment": "my_tools:add"}, r"stages.grpo.environment='my_tools:add' is a function; name a class"),
    ({"tools": {"add": "my_tools:add"}, "tool_timeout_s": 0}, r"stages.grpo.tool_timeout_s=0: must be > 0"),
])
def test_bad_tool_configs_name_the_key_and_the_fix(user_tools, keys, message):
    with pytest.raises(ConfigError, match=message):
        tools.check(grpo(**keys), "grpo")


def test_a_slow_tool_becomes_an_error_and_keeps_its_schema(user_tools):
    (nap,) = tools.load_tools(grpo(tools={"nap": "my_tools:nap"}, tool_timeout_s=0.2), "grpo")
    assert nap(0.01) == "awake"
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"tool nap took longer than 0.2 s"):
        nap(5)
    assert time.perf_counter() - start < 2
    assert get_json_schema(nap)["function"]["name"] == "nap"


def test_a_slow_environment_method_becomes_an_error_too(user_tools):
    from transformers.utils import get_json_schema as schema_of

    environment = tools.load_environment(grpo(environment="my_tools:Calculator", tool_timeout_s=0.2), "grpo")()
    environment.reset()
    assert environment.multiply(3, 4) == 12 and environment.calls == 1  # the instance's state, as without the timeout
    with pytest.raises(TimeoutError, match=r"tool wait took longer than 0.2 s"):
        environment.wait(5)
    assert schema_of(environment.multiply)["function"]["parameters"]["required"] == ["a", "b"]
    assert tools.environment_tools(type(environment)) == ["multiply", "wait"]


def test_the_tools_source_is_part_of_the_hash(user_tools):
    stage = grpo(tools={"add": "my_tools:add"})
    before = tools.fingerprint(stage)
    user_tools.write_text(TOOLS + "\n# edited\n")
    assert tools.fingerprint(stage) != before and tools.fingerprint(grpo()) is None


def test_a_chat_template_without_tool_support_is_refused_naming_the_model():
    plain = tokenizer_for("qwen3")  # ChatML that renders content only: tool calls would vanish
    with pytest.raises(ConfigError, match=r"stages.grpo.tools: the chat template of /some/model does not render tool "
                                          r"calls and tool results; use a model whose chat template supports tools"):
        tools.check_tokenizer(plain, "grpo", "/some/model")
    tools.check_tokenizer(tokenizer_for("qwen3_tools"), "grpo", "/tiny/qwen3")  # Qwen3's real template
