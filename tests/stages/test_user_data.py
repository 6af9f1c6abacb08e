"""User data in TRL's conversational forms beyond `messages`: SFT prompt/completion as
conversations, RL prompts as conversations with extra columns that reach the reward functions
as keyword arguments (grpo and test_time's best-of-N), grpo without answers or an eval split."""

import json

import pytest

from pipeline.tasks import build_task
from pipeline.tokenizer import train_tokenizer
from stages.sft import tokenize_chat
from tests.conftest import compose_config, run_cli

SYSTEM = {"role": "system", "content": "Answer with a line A: <number>."}

MODULE = '''
import json, os, re

PATTERN = re.compile(r"(?m)^A: *(?P<answer>\\S+) *$")


def _log(record):
    with open(os.environ["REWARD_LOG"], "a") as f:
        f.write(json.dumps(record) + "\\n")


def short(prompts, completions, completion_ids, difficulty, **kwargs):
    """grpo: log what TRL passed; shorter completions score higher."""
    _log({"prompts": prompts, "difficulty": difficulty, "ids": [len(i) for i in completion_ids],
          "kwargs": sorted(kwargs)})
    return [-len(i) / 100 for i in completion_ids]


def oracle(prompts, completions, completion_ids, answer, tag, **kwargs):
    """test_time: 1 when the completion's A: line is the answer (the task's own verifier)."""
    values = []
    for c, a in zip(completions, answer):
        match = PATTERN.search(c[-1]["content"])
        values.append(1.0 if match and match.group("answer") == a else 0.0)
    _log({"prompts": prompts, "answer": answer, "tag": tag, "values": values})
    return values
'''


def write_rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_user_rewards.py").write_text(MODULE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("REWARD_LOG", str(tmp_path / "calls.jsonl"))
    return tmp_path


def calls(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "calls.jsonl").read_text().splitlines()]


def arithmetic_problems(split_reader: str, n: int) -> list[dict]:
    task = build_task(compose_config(["preset=smoke"]).task)
    return getattr(task, split_reader)()[:n]


def test_sft_prompt_and_completion_as_conversations_mask_only_the_completion():
    tokenizer = train_tokenizer(["Answer with a line A: <number>. What is 2+3? A: 5"] * 20, 320)
    prompt = [SYSTEM, {"role": "user", "content": "What is 2+3?"}]
    row = tokenize_chat(tokenizer, prompt, [{"role": "assistant", "content": "A: 5"}])
    ids, mask = row["input_ids"], row["completion_mask"]
    assert ids == tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "A: 5"}], tokenize=True,
                                                return_dict=True)["input_ids"]
    assert tokenizer.decode([t for t, on in zip(ids, mask) if on]) == "A: 5<|im_end|>\n"
    assert "Answer with a line" in tokenizer.decode([t for t, on in zip(ids, mask) if not on])
    # the string form gives the same tokens when the prompt is one user turn
    assert tokenize_chat(tokenizer, "What is 2+3?", "A: 5") == tokenize_chat(
        tokenizer, [{"role": "user", "content": "What is 2+3?"}], [{"role": "assistant", "content": "A: 5"}])


@pytest.mark.parametrize("row, message", [
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "completion": "a"},
     "column 'prompt': the prompt conversation does not end with a user turn"),
    ({"prompt": ["q"], "completion": "a"}, "column 'prompt': turn 1 is not a"),
    ({"prompt": {"q": 1}, "completion": "a"}, r"column 'prompt': the value is an object .*not a string or a conversation"),
    ({"prompt": "q", "completion": [{"role": "user", "content": "a"}]},
     "column 'completion': an answer holds assistant turns only"),
])
def test_a_bad_sft_prompt_or_completion_is_named_with_the_forms_accepted(tmp_path, row, message):
    data = write_rows(tmp_path / "sft.jsonl", [row])
    task = build_task(compose_config(["task=jsonl", f"task.splits.sft={data}"]).task)
    with pytest.raises(ValueError, match=rf"split 'sft' \({data}\) row 1 \(line 1\), {message}"):
        task.validate(["sft"])


def test_a_list_where_only_a_string_is_accepted_is_named(tmp_path):
    data = write_rows(tmp_path / "rl.jsonl", [{"prompt": "q", "answer": ["5"]}])
    task = build_task(compose_config(["task=jsonl", f"task.splits.rl={data}"]).task)
    with pytest.raises(ValueError, match=r"split 'rl' .* row 1 \(line 1\), column 'answer': the value is a list \(\['5'\]\), "
                                         r"not a string; write it as a string"):
        task.validate(["rl"])


def rl_rows(answers: bool) -> list[dict]:
    rows = []
    for k, p in enumerate(arithmetic_problems("rl_prompts", 8)):
        row = {"prompt": [SYSTEM, {"role": "user", "content": p["prompt"]}], "difficulty": k % 3}
        rows += [{**row, "answer": p["answer"]} if answers else row]
    return rows


def test_grpo_on_conversational_prompts_hands_extra_columns_to_the_reward(user_module, smoke_chain_run, tmp_path):
    data = write_rows(tmp_path / "rl.jsonl", rl_rows(answers=False))  # no answer column, no eval split
    run_dir = tmp_path / "run"
    proc = run_cli("preset=smoke", "task=jsonl", f"task.splits.rl={data}", "run.stages=[grpo]", f"run.dir={run_dir}",
                   f"stages.grpo.init={smoke_chain_run / 'sft' / 'final'}", "stages.grpo.reward_weights.correct=0",
                   "+stages.grpo.reward_functions.short=my_user_rewards:short", "+stages.grpo.reward_weights.short=1",
                   "stages.grpo.max_steps=2", "stages.grpo.save_steps=2", "trainer.report_to=none")
    seen = calls(user_module)
    assert len(seen) == 2
    rows = {row["prompt"][1]["content"]: row["difficulty"] for row in rl_rows(answers=False)}
    for call in seen:
        assert all(p[0] == SYSTEM and p[-1]["role"] == "user" for p in call["prompts"])  # the system turn arrives
        assert call["difficulty"] == [rows[p[1]["content"]] for p in call["prompts"]]  # the extra column, row by row
        assert "answer" not in call["kwargs"] and {"trainer_state", "log_metric"} <= set(call["kwargs"])
    metrics = json.loads((run_dir / "grpo" / "metrics.json").read_text())
    assert metrics["train_steps"] == 2 and "eval_accuracy" not in metrics and "scaling_points" not in metrics
    assert "the task has no eval split" in proc.stdout
    assert not (run_dir / "grpo" / "pass_rate_curve.jsonl").exists()


def test_grpo_verifier_reward_without_an_answer_column_fails_before_compute(smoke_chain_run, tmp_path):
    data = write_rows(tmp_path / "rl.jsonl", rl_rows(answers=False))
    run_dir = tmp_path / "run"
    proc = run_cli("preset=smoke", "task=jsonl", f"task.splits.rl={data}", "run.stages=[grpo]", f"run.dir={run_dir}",
                   f"stages.grpo.init={smoke_chain_run / 'sft' / 'final'}", check=False)
    assert proc.returncode == 2
    assert "stages.grpo.reward_weights.correct compare with the reference answer, and the rl split has no answer column" \
        in proc.stderr
    assert not (run_dir / "grpo").exists()


def test_best_of_n_scores_with_a_user_function_and_the_eval_columns(user_module, smoke_chain_run, tmp_path):
    problems = arithmetic_problems("eval_problems", 6)
    data = write_rows(tmp_path / "eval.jsonl", [{**p, "tag": f"t{k}"} for k, p in enumerate(problems)])
    run_dir = tmp_path / "run"
    run_cli("preset=smoke", "task=jsonl", f"task.splits.eval={data}", "run.stages=[test_time]", f"run.dir={run_dir}",
            f"stages.test_time.init={smoke_chain_run / 'sft' / 'final'}", "stages.test_time.methods=[best_of_n]",
            "stages.test_time.reward_weights.reward_model=0", "+stages.test_time.reward_functions.oracle=my_user_rewards:oracle",
            "+stages.test_time.reward_weights.oracle=1", "stages.test_time.num_samples=4")
    (call,) = calls(user_module)
    assert len(call["values"]) == 6 * 4 and call["tag"] == [f"t{k}" for k in range(6) for _ in range(4)]
    assert call["answer"] == [p["answer"] for p in problems for _ in range(4)]
    # the oracle picks a correct candidate wherever there is one: accuracy = share of problems with one
    best = [max(call["values"][k * 4 : (k + 1) * 4]) for k in range(6)]
    metrics = json.loads((run_dir / "test_time" / "metrics.json").read_text())
    assert metrics["accuracy/best_of_n"] == pytest.approx(sum(best) / 6)


def test_best_of_n_keeps_the_candidate_the_user_function_scores_highest(smoke_chain_run):
    import functools

    from pipeline import rewards
    from pipeline.models import load_policy
    from pipeline.sampling import TestTimeSettings, run_method
    from pipeline.tokenizer import load_chat_tokenizer

    final = smoke_chain_run / "sft" / "final"
    model, tokenizer = load_policy(final), load_chat_tokenizer(final)
    task = build_task(compose_config(["preset=smoke"]).task)
    problems = [{**p, "weight": k + 1} for k, p in enumerate(task.eval_problems()[:4])]
    seen = {}

    def longest(prompts, completions, completion_ids, weight, **kwargs):
        seen.update(completions=completions, weight=weight, ids=completion_ids)
        return [w * len(ids) for w, ids in zip(weight, completion_ids)]

    score = functools.partial(rewards.weighted_sum, [rewards.checked("longest", longest)], [0.5], tokenizer=tokenizer)
    cache: dict = {}
    settings = TestTimeSettings(num_samples=4, max_new_tokens=12, batch_size=16)
    result = run_method("best_of_n", model, tokenizer, task, problems, settings, score, cache)
    ((texts, _, _),) = cache.values()
    assert seen["weight"] == [k + 1 for k in range(4) for _ in range(4)]
    assert seen["completions"][0] == [{"role": "assistant", "content": texts[0][0]}]
    lengths = [[len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in candidates] for candidates in texts]
    assert [len(i) for i in seen["ids"]] == [n for row in lengths for n in row]
    assert result.completions == [c[row.index(max(row))] for c, row in zip(texts, lengths)]
    assert any(len(set(row)) > 1 for row in lengths)  # candidates differ in length: the choice means something


def test_a_conversation_in_a_string_column_past_the_first_chunk_is_an_error_not_text(tmp_path):
    """`datasets` parses JSON in 10 MB chunks and, by default, JSON-encodes a value whose type
    differs from the column's as a string: the last row's conversation would come back as the
    text '[{"role": ...}]' and be trained on. The task loads with that off and names the line."""
    rows = [{"prompt": f"{k} " + "x" * 1000, "answer": str(k)} for k in range(12_000)]  # 12 MB
    rows[-1] = {"prompt": [{"role": "user", "content": "hi"}], "answer": "1"}
    data = write_rows(tmp_path / "rl.jsonl", rows)
    task = build_task(compose_config(["task=jsonl", f"task.splits.rl={data}"]).task)
    with pytest.raises(ValueError, match=r"split 'rl': data file .* line 12000, column 'prompt' is a list where line 1 has "
                                         r"a string: a column holds one form in every row"):
        task.validate(["rl"])


def test_sft_trains_on_conversational_prompt_completion_rows(tmp_path):
    from tests.stages.test_model_families import FAMILY_RUN
    from tests.tiny_models import save_tiny_family

    rows = [{"prompt": [SYSTEM, {"role": "user", "content": f"What is {a}+{b}?"}],
             "completion": [{"role": "assistant", "content": f"A: {a + b}"}]} for a in range(20) for b in range(3)]
    data = write_rows(tmp_path / "sft.jsonl", rows)
    model = save_tiny_family("qwen3", tmp_path / "qwen3")
    run_dir = tmp_path / "run"
    sft = [o for o in FAMILY_RUN if o.startswith(("preset", "trainer", "stages.sft"))]
    run_cli("model=qwen3", f"model.path={model}", "task=jsonl", f"task.splits.sft={data}", f"run.dir={run_dir}",
            *sft, "run.stages=[sft]", "stages.sft.eval_examples=10")
    metrics = json.loads((run_dir / "sft" / "metrics.json").read_text())
    assert metrics["train_loss"] < metrics["train_loss_first"] and metrics["train_examples"] == 50
