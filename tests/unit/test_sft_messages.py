"""SFT on `messages` rows: the labels cover exactly the assistant turns of a multi-turn
conversation (token ids, two chat templates), bad conversations fail before compute naming the
row, and a chat set with no eval split trains with eval_loss only."""

import json

import pytest

from pipeline.tasks import build_task
from pipeline.tokenizer import train_tokenizer
from stages.sft import tokenize_messages
from tests.conftest import compose_config, run_cli
from tests.stages.test_model_families import FAMILY_RUN
from tests.tiny_models import save_tiny_family, tokenizer_for

CONVERSATION = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "2+3=5"},
    {"role": "user", "content": "And 5+4?"},
    {"role": "assistant", "content": "5+4=9"},
]


@pytest.mark.parametrize("tokenizer_name", ["chatml", "llama3"])
def test_the_labels_cover_every_assistant_turn_and_nothing_else(tokenizer_name):
    if tokenizer_name == "chatml":
        tokenizer, end = train_tokenizer(["What is 2+3? 2+3=5 And 5+4? 5+4=9 You add numbers."] * 20, 320), "<|im_end|>\n"
    else:
        tokenizer, end = tokenizer_for("llama3"), "<|eot_id|>"
    row = tokenize_messages(tokenizer, CONVERSATION)
    ids, mask = row["input_ids"], row["completion_mask"]
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    runs, current = [], []
    for token, on in zip(ids, mask):
        if on:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    assert [tokenizer.decode(r) for r in runs] == ["2+3=5" + end, "5+4=9" + end]
    # the rest decodes to the system and user turns with their markers, none of it trained on
    assert "What is 2+3?" in tokenizer.decode([t for t, on in zip(ids, mask) if not on])


def write_rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "hi"}], "the conversation has no assistant turn"),
    ([{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}], "turn 1 has role 'human'; roles are system, user, assistant"),
    ([{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": ["yo"]}], "turn 1's content is list, not a string"),
    ("hello", "the value is str, not a conversation"),
])
def test_a_bad_conversation_fails_naming_split_row_and_column(tmp_path, messages, message):
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": messages}])
    task = build_task(compose_config(["task=jsonl", f"task.splits.sft={data}"]).task)
    with pytest.raises(ValueError, match=rf"split 'sft' \({data}\) row 1 \(line 1\), column 'messages': {message}"):
        task.validate(["sft"])


@pytest.mark.parametrize("bad, message", [
    ("hello", r"line 2, column 'messages' is a string where line 1 has a list"),
    ([{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "yo"}],
     r"line 2, column 'messages' \(messages\[\].content\) is a list where line 1 has a string"),
])
def test_a_column_that_changes_form_between_rows_is_named_by_line(tmp_path, bad, message):
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": bad}])
    task = build_task(compose_config(["task=jsonl", f"task.splits.sft={data}"]).task)
    with pytest.raises(ValueError, match=rf"split 'sft': data file .*chat.jsonl' {message}: a column holds one form"):
        task.validate(["sft"])


def test_chat_sft_without_an_eval_split_trains_with_eval_loss_only(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What is {a}+{b}?"}, {"role": "assistant", "content": f"{a + b}"},
                          {"role": "user", "content": "Double it."}, {"role": "assistant", "content": f"{2 * (a + b)}"}]}
            for a in range(20) for b in range(3)]
    data = write_rows(tmp_path / "chat.jsonl", rows)
    model = save_tiny_family("qwen3", tmp_path / "qwen3")
    run_dir = tmp_path / "run"
    sft = [o for o in FAMILY_RUN if o.startswith(("preset", "trainer", "stages.sft"))]
    proc = run_cli("model=qwen3", f"model.path={model}", "task=jsonl", f"task.splits.sft={data}", f"run.dir={run_dir}",
                   *sft, "run.stages=[sft]", "stages.sft.eval_examples=10")
    assert "stage sft: the task has no eval split (problems with answers): no answer accuracy" in proc.stdout
    metrics = json.loads((run_dir / "sft" / "metrics.json").read_text())
    assert metrics["train_loss"] < metrics["train_loss_first"] and metrics["eval_loss"] > 0
    assert "eval_accuracy" not in metrics and metrics["train_examples"] == 50
