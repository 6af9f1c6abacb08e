"""User data through `datasets`: local JSONL/JSON/Parquet/CSV files or a Hugging Face dataset name.

Each split is read only when a stage asks for it (the runner's validate() reads them all before
any compute). Whatever is wrong with a file fails there, naming the split, the file, the line or
row, the column and the forms accepted: a missing file or column, an empty file, a line that is
not JSON, a value of the wrong form (a string where only a string goes, a conversation, a list
of {role, content} turns, where TRL's formats take one: conversation_form), a value longer than
task.max_chars. Nothing is turned into text silently; an answer may be an integer.
"""

from __future__ import annotations

import json
import os
import re

from pipeline import math_answers
from pipeline.tasks.base import Task

VERIFIERS = ("regex", "math")  # task.verifier
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
DEFAULT_MAX_CHARS = 100_000


def load_rows(source: str, hf_split: str = "train"):
    """A `datasets.Dataset` from a local file or a dataset name ("name" or "name:config")."""
    import datasets

    ext = os.path.splitext(source)[1].lower()
    if ext in LOCAL_BUILDERS:
        if not os.path.exists(source):
            raise FileNotFoundError(f"data file {source!r} does not exist")
        if os.path.getsize(source) == 0:
            raise ValueError(f"data file {source!r} is empty; add data to it")
        try:
            options = json_options() if LOCAL_BUILDERS[ext] == "json" else {}
            return datasets.load_dataset(LOCAL_BUILDERS[ext], data_files=source, split="train", **options)
        except Exception as err:  # an empty JSON file ends in a bare StopIteration, a bad line in a generic error
            bad_line = first_bad_json_line(source) if ext == ".jsonl" else None
            if bad_line:
                fix = "fix or remove that line" if bad_line.startswith("line") else "add data to it"
                raise ValueError(f"data file {source!r} {bad_line}; {fix}") from err
            cause = err.__cause__ or err.__context__ or err
            raise ValueError(f"data file {source!r} could not be read: {type(cause).__name__}: {cause}") from err
    if os.path.isdir(source):
        return datasets.load_from_disk(source) if os.path.exists(os.path.join(source, "dataset_info.json")) else datasets.load_dataset(source, split=hf_split)
    name, _, config = source.partition(":")
    return datasets.load_dataset(name, config or None, split=hf_split)


def json_options() -> dict:
    """load_dataset("json") options: a column whose type changes between rows is an error. By
    default (datasets 5: on_mixed_types="use_json") such values come back JSON-encoded as
    strings, so a conversation in a string column would be trained on as the text of a list."""
    import dataclasses

    from datasets.packaged_modules.json.json import JsonConfig

    return {"on_mixed_types": None} if "on_mixed_types" in {f.name for f in dataclasses.fields(JsonConfig)} else {}


KINDS = {str: "a string", list: "a list", dict: "an object", bool: "a boolean", int: "a number", float: "a number"}


def leaf_kinds(value, path: str = ""):
    """(path, kind) of a JSON value and everything in it ("messages[].content", "a string"), as
    pyarrow types a column; nulls have no kind."""
    kind = KINDS.get(type(value))
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaf_kinds(item, f"{path}.{key}" if path else key)
        if path:
            yield path, kind
    elif kind is not None:
        yield path, kind
        if isinstance(value, list):
            for item in value:
                yield from leaf_kinds(item, f"{path}[]")


def first_bad_json_line(path: str) -> str | None:
    """Where a JSON-lines file stops being one JSON object per line ("line 3 is not valid JSON
    (...)"), or a column changes its type ("line 9, column 'prompt' is a list where line 1 has a
    string"); "has no rows" when every line is blank; None if every line is fine."""
    rows = 0
    first: dict[str, tuple[str, int]] = {}  # column -> (kind, line) of its first non-null value
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number} is not valid JSON ({err.msg} at character {err.pos + 1})"
            if not isinstance(value, dict):
                return f"line {number} is a JSON {type(value).__name__}, not an object of column: value"
            for path, kind in leaf_kinds(value):
                seen = first.setdefault(path, (kind, number))
                if seen[0] != kind:
                    column = path.split(".")[0].split("[")[0]
                    where = f"column {column!r}" + (f" ({path})" if path != column else "")
                    return (f"line {number}, {where} is {kind} where line {seen[1]} has {seen[0]}: a column holds one "
                            "form in every row (strings, or conversations; answers all strings or all numbers)")
            rows += 1
    return None if rows else "has no rows (only blank lines)"


def row_name(source: str, index: int) -> str:
    """"row 3", and for a JSON-lines file the line it is on (blank lines are skipped)."""
    name = f"row {index + 1}"
    if os.path.splitext(source)[1].lower() != ".jsonl" or not os.path.isfile(source):
        return name
    with open(source, encoding="utf-8", errors="replace") as f:
        seen = -1
        for number, line in enumerate(f, start=1):
            seen += bool(line.strip())
            if seen == index:
                return f"{name} (line {number})"
    return name


def value_problem(field: str, value, max_chars: int, conversation_ok: bool = False) -> str | None:
    """What is wrong with one value, or None. Text must be a string; an `answer` may also be an
    integer (compared as its decimal string). Nothing else is turned into text."""
    forms = "a string or a conversation (a list of {\"role\", \"content\"} turns)" if conversation_ok else "a string"
    if value is None:
        return f"the value is null (missing); give every row {forms} there or drop the row"
    if field == "answer" and isinstance(value, int) and not isinstance(value, bool):
        return None
    if not isinstance(value, str):
        kind = {list: "a list", dict: "an object", bool: "a boolean", int: "a number", float: "a number"}.get(
            type(value), type(value).__name__)
        return f"the value is {kind} ({str(value)[:60]}), not {forms}; write it as {forms} in the file"
    if len(value) > max_chars:
        return (f"{len(value)} characters, more than task.max_chars={max_chars}; shorten or split that row, "
                f"or raise task.max_chars")
    return None


ROLES = ("system", "user", "assistant")
TOOL_ROLES = (*ROLES, "tool")  # sft's messages may hold tool calls and their results (TRL's format)
TURN_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id"}


def without_nulls(value):
    """A JSON value with its null object members dropped: a column's rows share one Arrow type, so
    `datasets` gives every object the keys any row has (a tool call's arguments, a schema's
    properties), null where that row has none."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def tool_call_problem(call, number: int) -> str | None:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return (f"turn {number} has a tool call that is not {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                f"\"arguments\": {{...}}}}}} ({str(call)[:80]})")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return f"turn {number} calls {function['name']!r} with arguments that are not a JSON object"
    if not isinstance(arguments, dict):
        return f"turn {number} calls {function['name']!r} with arguments that are not an object"
    return None


def tool_turns_problem(value: list[dict], tools) -> str | None:
    """The tool-calling parts of a messages conversation: every tool turn answers a call made
    before it, and every call names a tool of the row's `tools` column."""
    names = None if tools is None else {t.get("function", t).get("name") for t in tools if isinstance(t, dict)}
    pending = 0
    for number, turn in enumerate(value, start=1):
        if turn["role"] == "assistant" and turn.get("tool_calls"):
            if names is None:
                return f"turn {number} calls tools, and the row has no tools column (TRL's format: the JSON schemas of the tools)"
            for call in turn["tool_calls"]:
                problem = tool_call_problem(call, number)
                if problem:
                    return problem
                if call["function"]["name"] not in names:
                    return (f"turn {number} calls {call['function']['name']!r}, which is not among the row's tools "
                            f"({', '.join(sorted(n for n in names if n))})")
            pending = len(turn["tool_calls"])
        elif turn["role"] == "tool":
            if pending == 0:
                return f"turn {number} is a tool result with no tool call before it to answer"
            pending -= 1
        elif turn["role"] != "system":
            pending = 0
    return None


def conversation_problem(value, kind: str, max_chars: int = DEFAULT_MAX_CHARS, tools=None) -> str | None:
    """What is wrong with a conversation value (a list of {role, content} turns; a system turn
    only first), or None. kind: "messages" (at least one assistant turn; tool calls and tool
    results allowed, checked against the row's `tools`), "implicit" (a whole preference
    conversation: ends with the assistant's answer), "prompt" (ends with a user turn), "answer"
    (assistant turns only: an explicit preference answer)."""
    if not isinstance(value, list) or not value:
        return (f"the value is {type(value).__name__ if value is not None else 'null'}, not a conversation; "
                "write a list of {\"role\": ..., \"content\": ...} turns")
    roles = TOOL_ROLES if kind == "messages" else ROLES
    for number, turn in enumerate(value, start=1):
        if isinstance(turn, dict):
            turn = {k: v for k, v in turn.items() if v is not None}
        if not isinstance(turn, dict) or set(turn) - TURN_KEYS or "role" not in turn:
            return f"turn {number} is not a {{\"role\", \"content\"}} object ({str(turn)[:60]})"
        if turn["role"] not in roles:
            return f"turn {number} has role {turn['role']!r}; roles are {', '.join(roles)}"
        if (turn.get("tool_calls") or turn.get("tool_call_id")) and kind != "messages":
            return f"turn {number} has tool calls; only sft's messages column may hold tool-calling conversations"
        if turn["role"] == "system" and number != 1:
            return f"turn {number} is a system turn; only the first turn may be one"
        if turn["role"] == "assistant" and turn.get("tool_calls") and "content" not in turn:
            continue  # a turn that only calls tools
        if not isinstance(turn.get("content"), str):
            return f"turn {number}'s content is {type(turn.get('content')).__name__}, not a string"
        if len(turn["content"]) > max_chars:
            return (f"turn {number} has {len(turn['content'])} characters, more than task.max_chars={max_chars}; "
                    "shorten or split that row, or raise task.max_chars")
    roles = [turn["role"] for turn in value]
    if kind == "messages" and "assistant" not in roles:
        return "the conversation has no assistant turn, so nothing to train on"
    if kind == "messages" and (tools is not None or any(t.get("tool_calls") or t["role"] == "tool" for t in value)):
        problem = tool_turns_problem(value, tools)
        if problem:
            return problem
    if kind == "implicit" and roles[-1] != "assistant":
        return "the conversation does not end with the assistant's answer"
    if kind == "prompt" and roles[-1] != "user":
        return "the prompt conversation does not end with a user turn"
    if kind == "answer" and set(roles) != {"assistant"}:
        return "an answer holds assistant turns only (the prompt goes in the prompt column)"
    return None


def tools_problem(value) -> str | None:
    """What is wrong with a row's `tools` value (TRL's format: a list of JSON schemas of functions)."""
    if value is None:
        return None  # a row without tools (allowed while it calls none)
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        return "the value is not a list of tool schemas ({\"type\": \"function\", \"function\": {\"name\": ...}})"
    for number, tool in enumerate(value, start=1):
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return f"tool {number} has no function name ({str(tool)[:80]})"
    return None


def split_implicit_prompt(chosen: list[dict], rejected: list[dict]) -> dict | str:
    """{prompt, chosen, rejected} from two whole conversations sharing their prompt turns (TRL's
    implicit-prompt preference form), or what is wrong."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] == "assistant":  # an identical first answer turn is an answer
        shared -= 1
    if not shared or chosen[shared - 1]["role"] != "user":
        return "chosen and rejected do not share prompt turns ending with a user turn"
    if shared == len(chosen) or shared == len(rejected):
        return "chosen or rejected has no answer after the shared prompt turns"
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def conversation_form(split: str, field: str, has_prompt: bool) -> tuple[str | None, bool]:
    """(the conversation kind a field's value may take, or None; whether a string is accepted).
    prompt: a string or turns ending with a user turn; completion, and chosen/rejected beside a
    prompt: a string or assistant turns; messages, and chosen/rejected without a prompt (the
    implicit-prompt form): a whole conversation only; text and answer: strings only."""
    if field == "messages":
        return "messages", False
    if field == "prompt":
        return "prompt", True
    if field == "completion" or (split == "preference" and field in ("chosen", "rejected")):
        return ("answer", True) if field == "completion" or has_prompt else ("implicit", False)
    return None, True


class JsonlTask(Task):
    name = "jsonl"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self._datasets: dict[str, object] = {}
        self.verifier = str(cfg.get("verifier", "regex"))
        if self.verifier not in VERIFIERS:
            raise ValueError(f"task.verifier={self.verifier!r}; valid: {', '.join(VERIFIERS)}")
        self._pattern = re.compile(cfg.answer_pattern)
        if "answer" not in self._pattern.groupindex:
            raise ValueError(f"task.answer_pattern {cfg.answer_pattern!r} needs a named group (?P<answer>...)")

    def _dataset(self, split: str):
        """The split's rows as `datasets` loads them, once per task (validate() and the stage
        that reads the split, and the column checks that pick a data form, share them)."""
        if split not in self._datasets:
            source = self.cfg.splits.get(split)
            if not source:
                raise ValueError(f"task=jsonl: a stage needs the '{split}' split; set task.splits.{split}=/path/to/file.jsonl")
            try:
                self._datasets[split] = load_rows(str(source), str((self.cfg.get("hf_splits") or {}).get(split, self.cfg.hf_split)))
            except FileNotFoundError as err:
                raise FileNotFoundError(f"task=jsonl: split '{split}': {err}; set task.splits.{split} to an existing file") from err
            except ValueError as err:
                raise ValueError(f"task=jsonl: split '{split}': {err}") from err
        return self._datasets[split]

    def _read(self, split: str, fields: list[str], optional: tuple[str, ...] = (), other_columns: bool = False) -> list[dict]:
        """The split's rows as {field: value}: `fields` must have a column, `optional` ones are
        read when the split has theirs; with other_columns every other column comes along as it
        is (under its own name). Every value of a field is checked (conversation_form)."""
        source = self.cfg.splits.get(split)
        rows = self._dataset(split)
        if len(rows) == 0:
            raise ValueError(f"task=jsonl: split '{split}' ({source}) has no rows; point task.splits.{split} at a file with data")
        wanted = {field: self.cfg.columns[field] for field in fields}
        for field, column in wanted.items():
            if column not in rows.column_names:
                raise ValueError(
                    f"task=jsonl: split '{split}' ({source}) has no column {column!r} for '{field}'; "
                    f"its columns are {rows.column_names}. Set task.columns.{field}=<column name>."
                )
        wanted.update({f: self.cfg.columns[f] for f in optional if self.cfg.columns[f] in rows.column_names})
        others = [c for c in rows.column_names if c not in wanted.values()] if other_columns else []
        max_chars = int(self.cfg.get("max_chars", DEFAULT_MAX_CHARS))
        forms = {field: conversation_form(split, field, "prompt" in wanted) for field in wanted}
        out = []
        for index, row in enumerate(rows.select_columns(list(dict.fromkeys([*wanted.values(), *others])))):
            values = {column: row[column] for column in others}
            tools = without_nulls(row[wanted["tools"]]) if "tools" in wanted else None
            for field, column in wanted.items():
                value, (kind, string_ok) = row[column], forms[field]
                if field == "tools":
                    problem = tools_problem(value)
                    value = tools
                elif kind and (isinstance(value, list) or not string_ok):
                    problem = conversation_problem(value, kind, max_chars, tools)
                    value = without_nulls(value) if field == "messages" else value
                else:
                    problem = value_problem(field, value, max_chars, conversation_ok=kind is not None)
                if problem:
                    named = f"column {column!r}" + (f" (task.columns.{field})" if column != field else "")
                    raise ValueError(f"task=jsonl: split '{split}' ({source}) {row_name(str(source), index)}, {named}: {problem}")
                values[field] = value if isinstance(value, (str, list)) else str(value)
            out.append(values)
        return out

    def validate(self, splits: list[str]) -> None:
        """Read the named splits now, so a bad path or column fails before any compute."""
        readers = {"pretrain": self.pretrain_texts, "sft": self.sft_examples, "preference": self.preference_pairs,
                   "rl": self.rl_prompts, "eval": self.eval_problems}
        for split in splits:
            readers[split]()

    def has_split(self, split: str) -> bool:
        return bool(self.cfg.splits.get(split))

    def _sft_fields(self) -> list[str]:
        """messages when the sft split has the messages column (task.columns.messages) and no
        completion column, else prompt and completion."""
        if self.cfg.splits.get("sft") and self.has_column("sft", "messages") and not self.has_column("sft", "completion"):
            return ["messages"]
        return ["prompt", "completion"]

    def pretrain_texts(self) -> list[str]:
        return [r["text"] for r in self._read("pretrain", ["text"])]

    def eval_texts(self) -> list[str]:
        return [self.text_prompt(r["prompt"]) + r["answer"] for r in self._read("eval", ["prompt", "answer"])]

    def sft_examples(self) -> list[dict]:
        """{messages[, tools]} or {prompt, completion} rows; `tools` (the JSON schemas a
        tool-calling conversation's template renders) when the split has that column."""
        fields = self._sft_fields()
        return self._read("sft", fields, optional=("tools",) if fields == ["messages"] else ())

    def preference_pairs(self) -> list[dict]:
        """Strings or conversations as the file has them; the implicit-prompt form (no prompt
        column, chosen and rejected whole conversations) split into prompt and answers."""
        if self.has_column("preference", "prompt"):
            return self._read("preference", ["prompt", "chosen", "rejected"])
        pairs = []
        source = str(self.cfg.splits.preference)
        for index, row in enumerate(self._read("preference", ["chosen", "rejected"])):
            pair = split_implicit_prompt(row["chosen"], row["rejected"])
            if isinstance(pair, str):
                raise ValueError(f"task=jsonl: split 'preference' ({source}) {row_name(source, index)}: {pair} "
                                 "(the implicit-prompt form); or give a prompt column")
            pairs.append(pair)
        return pairs

    def has_column(self, split: str, field: str) -> bool:
        """Whether the split has field's column (True when the split cannot be read: _read says why)."""
        try:
            return self.cfg.columns[field] in self._dataset(split).column_names
        except (FileNotFoundError, ValueError):
            return True

    def rl_prompts(self) -> list[dict]:
        """prompt (a string or a conversation), answer when the split has that column, and every
        other column as it is (TRL hands them to the reward functions as keyword arguments)."""
        return self._read("rl", ["prompt"], optional=("answer",), other_columns=True)

    def eval_problems(self) -> list[dict]:
        """prompt (a string or a conversation), answer, and every other column as it is (best-of-N's
        reward functions get them as keyword arguments)."""
        return self._read("eval", ["prompt", "answer"], other_columns=True)

    def text_prompt(self, prompt: str | list[dict]) -> str:
        """A conversation prompt's plain-text form is its turns' contents, one per line."""
        text = prompt if isinstance(prompt, str) else "\n".join(turn["content"] for turn in prompt)
        return self.cfg.text_prompt.replace("{prompt}", text)

    def extract_answer(self, completion: str) -> str | None:
        if self.verifier == "math":
            return math_answers.extract(completion)
        match = self._pattern.search(completion)
        return match.group("answer").strip() if match else None

    def verify(self, completion: str, answer: str) -> float:
        if self.verifier == "math":
            return math_answers.verify(completion, answer)
        match = self._pattern.search(completion)
        return 1.0 if match and match.group("answer").strip() == answer.strip() else 0.0
