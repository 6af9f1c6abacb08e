"""What every task provides: data for each stage, a prompt format, and a verifier."""

from __future__ import annotations

from abc import ABC, abstractmethod

from datasets import Dataset


class Task(ABC):
    """Rows are plain dicts so they go straight into `datasets.Dataset.from_list`.

    prompt      the user's question, without any template
    completion  the reference answer text the model should produce
    answer      the reference final answer the verifier compares against
    """

    name: str

    def validate(self, splits: list[str]) -> None:
        """Fail now, before any compute, if a split the coming stages need cannot be read."""

    def has_split(self, split: str) -> bool:
        """Whether the task has data for `split` (the embedded task has every split)."""
        return True

    def has_column(self, split: str, field: str) -> bool:
        """Whether `split`'s rows carry `field` (e.g. the rl split's answer; the embedded task's always do)."""
        return True

    @abstractmethod
    def pretrain_texts(self) -> list[str]: ...

    def tool_call_texts(self) -> list[str]:
        """Texts of the task's tool calls, which a tokenizer trained with tool markers
        (stages.pretrain.tokenizer_tools) also learns from; none by default."""
        return []

    @abstractmethod
    def eval_texts(self) -> list[str]:
        """Held-out documents in the pretraining format (for eval loss / perplexity)."""

    @abstractmethod
    def sft_examples(self) -> list[dict]: ...  # prompt, completion

    @abstractmethod
    def preference_pairs(self) -> list[dict]: ...  # prompt, chosen, rejected

    @abstractmethod
    def rl_prompts(self) -> list[dict]: ...  # prompt, answer (if the task has answers), any other columns

    @abstractmethod
    def eval_problems(self) -> list[dict]: ...  # prompt, answer (held out from all of the above)

    @abstractmethod
    def text_prompt(self, prompt: str | list[dict]) -> str:
        """The prompt in the plain-text (pretraining) format, ready for the model to continue."""

    @abstractmethod
    def extract_answer(self, completion: str) -> str | None:
        """The final answer a completion states, normalised so that equal answers compare
        equal (majority vote counts these); None if it states none. Never executes model text."""

    @abstractmethod
    def verify(self, completion: str, answer: str) -> float:
        """Reward in [0, 1] for a model completion. Parses strictly; never executes model text."""


def as_turns(value: str | list[dict], role: str) -> list[dict]:
    """A string as one turn of `role`; a conversation (a list of {role, content} turns) as it is."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def conversational_pairs(pairs: list[dict], n_eval: int) -> tuple[Dataset, Dataset]:
    """(train, eval) preference pairs in TRL's conversational form (a string prompt becomes
    [user], a string answer [assistant]; conversations stay as they are); the last n_eval pairs
    are held out."""
    if len(pairs) <= n_eval:  # n_eval=0: all of them train
        raise ValueError(f"{len(pairs)} preference pairs leave none for training after holding out {n_eval}")
    rows = [{"prompt": as_turns(p["prompt"], "user"), "chosen": as_turns(p["chosen"], "assistant"),
             "rejected": as_turns(p["rejected"], "assistant")} for p in pairs]
    return Dataset.from_list(rows[: len(rows) - n_eval]), Dataset.from_list(rows[len(rows) - n_eval :])
