"""User data through `datasets`: local JSONL/JSON/Parquet/CSV files or a Hugging Face dataset name.

Each split is read only when a stage asks for it, and a missing column fails with the split, the
column, the columns that are there, and the override that fixes it.
"""

from __future__ import annotations

import os
import re

from pipeline.tasks.base import Task

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(source: str, hf_split: str = "train"):
    """A `datasets.Dataset` from a local file or a dataset name ("name" or "name:config")."""
    import datasets

    ext = os.path.splitext(source)[1].lower()
    if ext in LOCAL_BUILDERS:
        if not os.path.exists(source):
            raise FileNotFoundError(f"data file {source!r} does not exist")
        return datasets.load_dataset(LOCAL_BUILDERS[ext], data_files=source, split="train")
    if os.path.isdir(source):
        return datasets.load_from_disk(source) if os.path.exists(os.path.join(source, "dataset_info.json")) else datasets.load_dataset(source, split=hf_split)
    name, _, config = source.partition(":")
    return datasets.load_dataset(name, config or None, split=hf_split)


class JsonlTask(Task):
    name = "jsonl"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self._pattern = re.compile(cfg.answer_pattern)
        if "answer" not in self._pattern.groupindex:
            raise ValueError(f"task.answer_pattern {cfg.answer_pattern!r} needs a named group (?P<answer>...)")

    def _read(self, split: str, fields: list[str]) -> list[dict]:
        source = self.cfg.splits.get(split)
        if not source:
            raise ValueError(f"task=jsonl: a stage needs the '{split}' split; set task.splits.{split}=/path/to/file.jsonl")
        rows = load_rows(str(source), self.cfg.hf_split)
        wanted = {field: self.cfg.columns[field] for field in fields}
        for field, column in wanted.items():
            if column not in rows.column_names:
                raise ValueError(
                    f"task=jsonl: split '{split}' ({source}) has no column {column!r} for '{field}'; "
                    f"its columns are {rows.column_names}. Set task.columns.{field}=<column name>."
                )
        return [{field: str(row[column]) for field, column in wanted.items()} for row in rows]

    def validate(self, splits: list[str]) -> None:
        """Read the named splits now, so a bad path or column fails before any compute."""
        fields = {"pretrain": ["text"], "sft": ["prompt", "completion"],
                  "preference": ["prompt", "chosen", "rejected"], "rl": ["prompt", "answer"], "eval": ["prompt", "answer"]}
        for split in splits:
            self._read(split, fields[split])

    def pretrain_texts(self) -> list[str]:
        return [r["text"] for r in self._read("pretrain", ["text"])]

    def eval_texts(self) -> list[str]:
        return [self.text_prompt(r["prompt"]) + r["answer"] for r in self._read("eval", ["prompt", "answer"])]

    def sft_examples(self) -> list[dict]:
        return self._read("sft", ["prompt", "completion"])

    def preference_pairs(self) -> list[dict]:
        return self._read("preference", ["prompt", "chosen", "rejected"])

    def rl_prompts(self) -> list[dict]:
        return self._read("rl", ["prompt", "answer"])

    def eval_problems(self) -> list[dict]:
        return self._read("eval", ["prompt", "answer"])

    def text_prompt(self, prompt: str) -> str:
        return self.cfg.text_prompt.replace("{prompt}", prompt)

    def extract_answer(self, completion: str) -> str | None:
        match = self._pattern.search(completion)
        return match.group("answer").strip() if match else None

    def verify(self, completion: str, answer: str) -> float:
        match = self._pattern.search(completion)
        return 1.0 if match and match.group("answer").strip() == answer.strip() else 0.0
