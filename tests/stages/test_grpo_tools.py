"""grpo with tools (TRL's multi-turn loop) on a tiny Qwen3 with its real chat template: which
tokens of a two-call rollout carry loss, the zero-variance row weights beside TRL's tool mask,
and a user's tool module trained through the real entry point."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from datasets import Dataset

from pipeline import rewards
from pipeline.grpo_trainer import ROW_WEIGHTS
from pipeline.models import load_model
from pipeline.tokenizer import load_chat_tokenizer
from pipeline.tasks import build_task
from stages.grpo import build_trainer, training_args
from tests.conftest import compose_config, run_cli
from tests.stages.test_model_families import FAMILY_RUN
from tests.tiny_models import save_tiny_family
from tests.unit.test_tools import TOOLS

TOOL = TOOLS  # add(a, b) among them
# what the scripted model writes in each round of every rollout: two calls, then the answer
ROUNDS = ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><|im_end|>',
          '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>',
          "A: 7<|im_end|>")


@pytest.fixture
def tool_module(tmp_path, monkeypatch):
    (tmp_path / "calc_tools.py").write_text(TOOL)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("calc_tools", None)


def scripted_trainer(tmp_path, zero_variance: str):
    model_dir = save_tiny_family("qwen3_tools", tmp_path / "qwen3")
    cfg = compose_config(["preset=smoke", "+stages.grpo.tools.add=calc_tools:add", "stages.grpo.num_generations=2",
                          "stages.grpo.batch_size=4", "stages.grpo.max_new_tokens=200", "stages.grpo.beta=0",
                          f"stages.grpo.zero_variance={zero_variance}", "stages.grpo.zero_variance_weight=0.25",
                          "trainer.report_to=none"])
    stage = cfg.stages.grpo
    tokenizer = load_chat_tokenizer(model_dir)
    tokenizer.padding_side = "left"
    task = build_task(cfg.task)
    funcs = rewards.build(stage, "grpo", task, tmp_path, False, 8)
    rows = [{"prompt": [{"role": "user", "content": "1+2+4=?"}], "answer": answer} for answer in ("7", "8")]
    args = training_args(stage, cfg.optim, cfg.peft, tmp_path / "out", 0, funcs[1])
    trainer = build_trainer(load_model(str(model_dir)), tokenizer, Dataset.from_list(rows), args, funcs, stage)
    calls = []

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        calls.append(len(prompt_ids))
        text = ROUNDS[len(calls) - 1]
        return [tokenizer(text, add_special_tokens=False)["input_ids"] for _ in prompt_ids], None

    trainer._generate_single_turn = generate
    trainer.model.train()
    inputs = [row for row in rows for _ in range(2)]  # each prompt's group of num_generations
    return trainer, tokenizer, trainer._generate_and_score_completions(inputs), calls


def test_a_two_call_rollout_puts_loss_on_the_models_tokens_only(tmp_path, tool_module):
    trainer, tokenizer, out, calls = scripted_trainer(tmp_path, "keep")
    assert calls == [4, 4, 4]  # every rollout: call, call, answer
    for row in range(4):
        ids = out["completion_ids"][row][out["completion_mask"][row].bool()]
        loss_mask = out["tool_mask"][row][out["completion_mask"][row].bool()]
        model_text = tokenizer.decode(ids[loss_mask.bool()])
        tool_text = tokenizer.decode(ids[~loss_mask.bool()])
        assert model_text == "".join(ROUNDS)  # the model's three turns, end-of-turn markers included, carry loss
        # the tool results as the chat template renders them carry none
        assert "<tool_response>\n3\n</tool_response>" in tool_text and "<tool_response>\n7\n</tool_response>" in tool_text
        assert "<tool_call>" not in tool_text and "A: 7" not in tool_text
        assert int(loss_mask.sum()) == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in ROUNDS)
    assert ROW_WEIGHTS not in out  # zero_variance=keep: no weights
    assert trainer._metrics["train"]["tools/call_frequency"] == [2.0]
    assert trainer._metrics["train"]["tools/failure_frequency"] == [0.0]


def test_row_weights_travel_apart_from_the_tool_mask_and_meet_it_in_the_loss(tmp_path, tool_module):
    trainer, tokenizer, out, _ = scripted_trainer(tmp_path, "downweight")
    # every completion answers 7: the group of "7" is all right, the group of "8" all wrong; both flat
    assert out[ROW_WEIGHTS].tolist() == [0.25, 0.25, 0.25, 0.25]
    assert set(out["tool_mask"].unique().tolist()) <= {0, 1}  # TRL's mask stays 0/1
    model_tokens = (out["completion_mask"] * out["tool_mask"]).sum()
    assert float(out["num_items_in_batch"]) == pytest.approx(0.25 * float(model_tokens))
    seen = {}

    def record(model, inputs):
        seen.update(inputs)
        return torch.zeros((), requires_grad=True)

    trainer._compute_loss = record
    trainer.compute_loss(trainer.model, out)
    assert ROW_WEIGHTS not in seen
    assert torch.equal(seen["tool_mask"], out["tool_mask"].float() * 0.25)  # tool results stay at 0


def test_a_users_tool_trains_through_grpo_and_reruns_when_edited(tmp_path, tool_module, monkeypatch):
    model_dir = save_tiny_family("qwen3_tools", tmp_path / "qwen3")
    monkeypatch.setenv("PYTHONPATH", str(tool_module))  # the user's module, as PYTHONPATH=. would
    args = ["model=qwen3", f"model.path={model_dir}", f"run.dir={tmp_path / 'run'}", *FAMILY_RUN,
            "run.stages=[grpo]", "+stages.grpo.tools.add=calc_tools:add", "stages.grpo.max_tool_calling_iterations=2"]
    done = run_cli(*args)
    assert "stage grpo: completed" in done.stdout
    metrics = json.loads((tmp_path / "run" / "grpo" / "metrics.json").read_text())
    assert metrics["tool_calls_per_completion"] >= 0 and 0 <= metrics["tool_failure_share"] <= 1
    (tool_module / "calc_tools.py").write_text(TOOL + "\n# edited\n")
    again = run_cli(*args, "run.dry_run=true")
    assert "grpo: would start" in again.stdout or "grpo: would replace" in again.stdout  # an edited tool reruns


@pytest.mark.parametrize("family, model", [("qwen3_tools", "qwen3"), ("llama3_tools", "llama3")])
def test_each_family_with_a_tool_template_runs_a_grpo_step_with_a_tool(tmp_path, tool_module, monkeypatch, family, model):
    model_dir = save_tiny_family(family, tmp_path / family)
    monkeypatch.setenv("PYTHONPATH", str(tool_module))
    run_cli(f"model={model}", f"model.path={model_dir}", f"run.dir={tmp_path / 'run'}", *FAMILY_RUN, "run.stages=[grpo]",
            "stages.grpo.max_steps=1", "stages.grpo.save_steps=1", "+stages.grpo.tools.add=calc_tools:add")
    metrics = json.loads((tmp_path / "run" / "grpo" / "metrics.json").read_text())
    assert metrics["train_steps"] == 1 and "tool_calls_per_completion" in metrics


def test_a_model_whose_template_cannot_show_tools_is_refused_before_compute(tmp_path, tool_module, monkeypatch):
    model_dir = save_tiny_family("smollm2", tmp_path / "smollm2")  # ChatML that renders message content only
    monkeypatch.setenv("PYTHONPATH", str(tool_module))
    refused = run_cli("model=smollm2", f"model.path={model_dir}", f"run.dir={tmp_path / 'run'}", *FAMILY_RUN,
                      "run.stages=[grpo]", "+stages.grpo.tools.add=calc_tools:add", check=False)
    assert refused.returncode == 2
    assert f"stages.grpo.tools: the chat template of {model_dir} does not render tool calls" in refused.stderr
    assert not (tmp_path / "run").exists()


ENVIRONMENT = '''

class Tally:
    """A running total the model adds to (TRL's environment protocol)."""

    def reset(self, **row):
        self.total = 0

    def add_to_total(self, x: int) -> int:
        """Add a number to the running total and return the total.

        Args:
            x: the number to add
        """
        self.total += x
        return self.total
'''


def test_a_users_tools_and_environment_train_through_sft_grpo_and_test_time(tmp_path, tool_module, monkeypatch):
    from tests.unit.test_sft_tools import row, write

    (tool_module / "calc_tools.py").write_text(TOOL + ENVIRONMENT)
    monkeypatch.setenv("PYTHONPATH", str(tool_module))
    model_dir = save_tiny_family("qwen3_tools", tmp_path / "qwen3")
    sft = write(tmp_path / "sft.jsonl", [row(a, b, c) for a in range(1, 9) for b in (2, 5) for c in (3, 4)])
    problems = [{"prompt": f"{a}+{b}+4=?", "answer": str(a + b + 4)} for a in range(1, 9) for b in (2, 5)]
    rl, held_out = write(tmp_path / "rl.jsonl", problems), write(tmp_path / "eval.jsonl", problems[:8])
    args = ["model=qwen3", f"model.path={model_dir}", f"run.dir={tmp_path / 'run'}", *FAMILY_RUN, "task=jsonl",
            f"task.splits.sft={sft}", f"task.splits.rl={rl}", f"task.splits.eval={held_out}",
            "run.stages=[sft,grpo,test_time]", "stages.sft.eval_examples=4", "stages.sft.max_length=1024",
            "+stages.grpo.tools.add=calc_tools:add", "stages.grpo.environment=calc_tools:Tally",
            "stages.grpo.max_tool_calling_iterations=2", "stages.test_time.methods=[greedy]"]
    done = run_cli(*args)
    run = tmp_path / "run"
    sft_metrics = json.loads((run / "sft" / "metrics.json").read_text())
    assert sft_metrics["train_loss"] < sft_metrics["train_loss_first"]  # it learns the tool-calling traces
    grpo_metrics = json.loads((run / "grpo" / "metrics.json").read_text())
    assert "tool_calls_per_completion" in grpo_metrics and "stage test_time: completed" in done.stdout
    assert "eval_tool_calls_per_problem" in grpo_metrics  # held-out answers with the tools it trained with
    test_time_metrics = json.loads((run / "test_time" / "metrics.json").read_text())
    assert "tool_calls_per_problem/greedy" in test_time_metrics  # test_time too (grpo's tools by default)
    (tool_module / "calc_tools.py").write_text(TOOL + ENVIRONMENT + "\n# the environment edited\n")
    again = run_cli(*args, "run.dry_run=true")
    assert "grpo: would replace" in again.stdout and "sft: would skip" in again.stdout


def test_the_embedded_model_trains_with_the_calculator_and_is_measured_with_it(tmp_path):
    """The tool-use demo's settings (conf/preset/demo_tools.yaml) at smoke size: the tokenizer
    pretrain trains renders tools, sft trains on the calculator traces and answers the held-out
    problems with the calculator, grpo trains with it, test_time counts its calls; and grpo with
    the tool, killed mid-stage and rerun, ends on the same weights. (Whether the model learns to
    call it is the demo's figure: benchmarks/tool_demo.py; the smoke model is too small.)"""
    run = tmp_path / "run"
    done = run_cli("preset=smoke", f"run.dir={run}", "run.stages=[pretrain,sft,grpo,test_time]", "trainer.report_to=none",
                   "task.calculator=true", "task.eval_min_operands=5", "task.eval_max_operands=6",
                   "stages.pretrain.tokenizer_tools=true", "stages.pretrain.max_steps=10", "stages.sft.tools_from=grpo",
                   "stages.grpo.max_new_tokens=48",
                   "+stages.grpo.tools.calculator=pipeline.tasks.arithmetic:calculator",
                   "stages.grpo.max_tool_calling_iterations=2", "stages.test_time.methods=[greedy,sample]")
    tokenizer = load_chat_tokenizer(run / "pretrain" / "final")
    assert tokenizer.response_template is not None and "<tool_call>" in tokenizer.get_vocab()
    sft = json.loads((run / "sft" / "metrics.json").read_text())
    assert sft["train_loss"] < 0.7 * sft["train_loss_first"]  # it learns the traces' tokens
    assert 0.0 <= sft["eval_tool_failure_share"] <= 1.0 and sft["eval_tool_calls_per_problem"] >= 0.0
    grpo = json.loads((run / "grpo" / "metrics.json").read_text())
    assert {"tool_calls_per_completion", "tool_failure_share", "eval_tool_calls_per_problem"} <= grpo.keys()
    test_time = json.loads((run / "test_time" / "metrics.json").read_text())
    assert "tool_calls_per_problem/greedy" in test_time and "stage test_time: completed" in done.stdout

    # grpo with the tool killed -9 after its second checkpoint and rerun equals the chain's grpo
    from tests.stages.test_kill_resume import assert_same_weights, kill_in_each_then_finish, killed_run_args

    grpo_only = ["preset=smoke", "run.stages=[grpo]", "trainer.report_to=none", "task.calculator=true",
                 "task.eval_min_operands=5", "task.eval_max_operands=6", "stages.grpo.max_new_tokens=48",
                 "+stages.grpo.tools.calculator=pipeline.tasks.arithmetic:calculator",
                 "stages.grpo.max_tool_calling_iterations=2", f"stages.grpo.init={run / 'sft' / 'final'}"]
    killed = tmp_path / "killed"
    resumed = kill_in_each_then_finish(killed_run_args(grpo_only, killed, [("grpo", 2, 2)]), killed, [("grpo", 2, 2)])
    assert resumed["grpo"] >= 2
    assert_same_weights(killed / "grpo" / "final", run / "grpo" / "final")
