"""pipeline/tool_loop.py: evaluation runs the tool loop a policy trained with (parse the calls,
call, append the results, generate again), counts calls and failures, and honours the limit."""

from __future__ import annotations

import pytest

from pipeline.tokenizer import load_chat_tokenizer
from pipeline.tool_loop import ToolSetup, generate_with_tools
from tests.tiny_models import save_tiny_family


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def broken(a: int) -> int:
    """Always fails.

    Args:
        a: anything
    """
    raise RuntimeError("out of order")


class Tally:
    def reset(self, **row):
        self.total, self.answer = 0, row["answer"]

    def add_to_total(self, x: int) -> int:
        """Add to the running total.

        Args:
            x: the number to add
        """
        self.total += x
        return self.total


def call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call><|im_end|>'


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_chat_tokenizer(save_tiny_family("qwen3_tools", tmp_path_factory.mktemp("qwen3")))


def scripted(replies: list[str], seen: list):
    """A stand-in for evaluate.generate: the k-th round's reply for every conversation."""

    def generate(model, tokenizer, prompts, **options):
        seen.append(prompts)
        reply = replies[len(seen) - 1]
        return [[reply] for _ in prompts], [[7] for _ in prompts]

    return generate


def test_two_calls_then_the_answer(tokenizer):
    seen = []
    replies = [call("add", '{"a": 1, "b": 2}'), call("add", '{"a": 3, "b": 4}'), "A: 7<|im_end|>"]
    answers, tokens, stats = generate_with_tools(None, tokenizer, ["1+2+4=?"], [{"answer": "7"}], ToolSetup((add,)),
                                                 generate_fn=scripted(replies, seen))
    assert answers == [["A: 7"]] and tokens == [[21]]
    assert (stats.calls, stats.failures, stats.conversations) == (2, 0, 1)
    assert "<tool_response>\n3\n</tool_response>" in seen[1][0] and "<tool_response>\n7\n</tool_response>" in seen[2][0]
    assert '"name": "add"' in seen[0][0]  # the tool's schema is in the prompt


def test_a_failing_or_unknown_call_is_an_error_the_model_reads(tokenizer):
    seen = []
    replies = [call("broken", '{"a": 1}'), call("nope", '{"a": 1}'), "A: 0<|im_end|>"]
    answers, _, stats = generate_with_tools(None, tokenizer, ["?"], [{}], ToolSetup((broken,)),
                                            generate_fn=scripted(replies, seen))
    assert answers == [["A: 0"]] and (stats.calls, stats.failures) == (2, 2)
    assert "RuntimeError: out of order" in seen[1][0] and "KeyError" in seen[2][0]
    assert stats.as_metrics("eval") == {"eval_tool_calls_per_problem": 2.0, "eval_tool_failure_share": 1.0}


def test_the_round_limit_ends_the_loop(tokenizer):
    seen = []
    replies = [call("add", '{"a": 1, "b": 2}'), call("add", '{"a": 3, "b": 4}')]
    answers, _, stats = generate_with_tools(None, tokenizer, ["?"], [{}], ToolSetup((add,), max_iterations=1),
                                            generate_fn=scripted(replies, seen))
    assert len(seen) == 2 and stats.calls == 1 and answers == [[""]]  # the second reply's call is not run


def test_each_sample_gets_a_fresh_environment_reset_with_its_row(tokenizer):
    seen = []
    replies = [call("add_to_total", '{"x": 5}'), call("add_to_total", '{"x": 2}'), "A: 7<|im_end|>"]
    _, _, stats = generate_with_tools(None, tokenizer, ["a", "b"], [{"answer": "7"}, {"answer": "8"}],
                                      ToolSetup(environment=Tally), num_samples=2, generate_fn=scripted(replies, seen))
    assert stats.conversations == 4 and stats.calls == 8
    assert all("<tool_response>\n7\n</tool_response>" in prompt for prompt in seen[2])  # 5 + 2 in each, not shared


class Scripted(ToolSetup):
    """Every sample answers "A: 7" after two tool calls (no model)."""

    def generate(self, model, tokenizer, prompts, rows, **options):
        n = options["num_samples"]
        self.stats.calls += 2 * len(prompts) * n
        self.stats.conversations += len(prompts) * n
        return [["A: 7"] * n for _ in prompts], [[5] * n for _ in prompts]


def test_test_time_methods_answer_with_tools_and_count_their_calls(tokenizer):
    from pipeline.sampling import TestTimeSettings, run_method
    from pipeline.tasks import build_task
    from tests.conftest import compose_config

    task = build_task(compose_config(["preset=smoke"]).task)
    problems = [{"prompt": "1+2+4=?", "answer": "7"}, {"prompt": "1+1=?", "answer": "2"}]
    settings, setup, cache = TestTimeSettings(num_samples=4), Scripted((add,)), {}
    greedy = run_method("greedy", None, tokenizer, task, problems, settings, tools=setup)
    assert greedy.accuracy == 0.5 and greedy.extras == {"tool_calls_per_problem": 2.0, "tool_failure_share": 0.0}
    vote = run_method("majority_vote", None, tokenizer, task, problems, settings, cache=cache, tools=setup)
    best = run_method("best_of_n", None, tokenizer, task, problems, settings, score=lambda p, t: [1.0] * len(t),
                      cache=cache, tools=setup)
    assert vote.extras["tool_calls_per_problem"] == best.extras["tool_calls_per_problem"] == 8.0  # the same candidates
    assert setup.stats.calls == 2 * 2 + 2 * 2 * 4  # best_of_n drew nothing new
    with pytest.raises(ValueError, match="power sampling has no tool loop"):
        run_method("power", None, tokenizer, task, problems, settings, tools=setup)


def test_test_time_takes_grpos_tools_leaves_power_out_of_auto_and_refuses_it_listed(tmp_path, monkeypatch):
    import sys

    from pipeline.errors import ConfigError
    from stages import test_time
    from tests.conftest import compose_config

    (tmp_path / "calc_tools.py").write_text("from tests.unit.test_tool_loop import add\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        cfg = compose_config(["+stages.grpo.tools.add=calc_tools:add", "stages.test_time.reward_weights={}",
                              "+stages.test_time.reward_functions.one=tests.unit.test_tool_loop:add",
                              f"run.dir={tmp_path / 'run'}"])
        methods, _ = test_time.chosen_methods(cfg, tmp_path / "run")
        assert "power" not in methods and "greedy" in methods
        listed = compose_config(["+stages.grpo.tools.add=calc_tools:add", "stages.test_time.methods=[greedy,power]",
                                 f"run.dir={tmp_path / 'run'}"])
        with pytest.raises(ConfigError, match=r"stages.test_time.methods lists power, and the policy answers with grpo's "
                                              r"tools \(stages.test_time.tools_from=grpo\)"):
            test_time.validate(listed, None)
        bare = compose_config(["+stages.grpo.tools.add=calc_tools:add", "stages.test_time.methods=[greedy,power]",
                               "stages.test_time.tools_from=null", f"run.dir={tmp_path / 'run'}"])
        test_time.validate(bare, None)  # the bare model: power runs
    finally:
        sys.modules.pop("calc_tools", None)
