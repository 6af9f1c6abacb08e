"""Rewards: grpo's training reward and test_time's best-of-N score, one weighted sum of reward
functions with TRL's signature

    def brevity(prompts, completions, completion_ids, **kwargs) -> list[float | None]

configured the same way in both stages: `reward_weights` maps names to weights (0 leaves one
out) and `reward_functions` maps a name of your own to `package.module:function`. Built-ins:

    correct       the task's verifier (1 for a correct final answer, else 0)
    math          math-verify's equality of the answer with the `answer` column
    format        1 when the completion matches `format_pattern`
    reward_model  the score of a sequence-classification reward model (`reward_model`: a model
                  directory, or auto = this run's reward/final/)

`kwargs` holds the dataset's other columns (e.g. `answer`), one value per completion, as TRL
passes them. A user function is imported from the Python path (the working directory,
PYTHONPATH, installed packages); a path that does not import or names something that is not
callable is a ConfigError before any compute; a function that returns the wrong number of
rewards, or values that are not numbers or None, fails when it first does so, naming it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import numbers
import re
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline import artifacts, math_answers
from pipeline.errors import ConfigError
from pipeline.reward_model import RewardScorer
from pipeline.tasks.base import as_turns

BUILTINS = ("correct", "format", "reward_model", "math")
REWARD_STAGE = "reward"
AUTO = "auto"  # reward_model=auto: this run's reward/final/


# --------------------------------------------------------------------------- built-ins


def completion_text(completion) -> str:
    """TRL hands conversational completions as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


def verifier_reward(task) -> Callable[..., list[float]]:
    """The task's verifier: 1.0 for a correct final answer, else 0.0. It parses strictly and
    never executes model text."""

    def correct(prompts, completions, answer, **kwargs) -> list[float]:
        return [float(task.verify(completion_text(c), a)) for c, a in zip(completions, answer, strict=True)]

    return correct


def math_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's answer (its last \\boxed{}, else its last number) is
    mathematically equal to the reference `answer` (math-verify; pipeline/math_answers.py)."""
    return [math_answers.verify(completion_text(c), str(a)) for c, a in zip(completions, answer, strict=True)]


math_reward.__name__ = "math"  # TRL logs rewards/math


def format_reward(pattern: str) -> Callable[..., list[float]]:
    """1.0 when the completion contains a match of `pattern` (e.g. a well-formed answer line)."""
    regex = re.compile(pattern)

    def format(prompts, completions, **kwargs) -> list[float]:  # noqa: A001 - TRL logs it by this name
        return [1.0 if regex.search(completion_text(c)) else 0.0 for c in completions]

    return format


def scorer_reward(scorer: RewardScorer) -> Callable[..., list[float]]:
    """A reward model's score of the prompt (every turn of it) followed by the completion."""

    def reward_model(prompts, completions, **kwargs) -> list[float]:
        return scorer.score(list(prompts), [completion_text(c) for c in completions])

    return reward_model


# --------------------------------------------------------------------------- functions by import path


def split_path(path: str) -> tuple[str, str]:
    """(module, attribute) of package.module:function or package.module.function."""
    module_name, sep, attribute = path.partition(":")
    return (module_name, attribute) if sep else path.rpartition(".")[::2]


def load(path: str, key: str) -> Callable:
    """The callable `path` names; ConfigError naming `key`, the path and what is wrong."""
    module_name, attribute = split_path(path)
    if not module_name or not attribute:
        raise ConfigError(f"{key}={path!r}: not an import path; write package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ModuleNotFoundError, or the module's own import failing
        raise ConfigError(f"{key}={path!r}: module {module_name!r} does not import ({type(err).__name__}: {err}); "
                          "put it on the Python path (PYTHONPATH, or pip install its package)") from err
    try:
        function = getattr(module, attribute)
    except AttributeError as err:
        raise ConfigError(f"{key}={path!r}: module {module_name!r} has no attribute {attribute!r}") from err
    if not callable(function):
        raise ConfigError(f"{key}={path!r}: {attribute!r} is a {type(function).__name__}, not a function")
    return function


def source_fingerprint(path: str) -> str:
    """A fingerprint of the file that defines the module of `path`, so that an edited reward
    function reruns the stage; "unknown" when it has no file."""
    try:
        spec = importlib.util.find_spec(split_path(path)[0])
    except (ImportError, ValueError):
        return "unknown"
    origin = spec.origin if spec is not None else None
    return artifacts.fingerprint(Path(origin)) if origin and Path(origin).is_file() else "unknown"


def checked(name: str, function: Callable) -> Callable:
    """`function` under `name` (TRL logs rewards/<name>), raising a clear error when what it
    returns is not one number or None per completion."""

    @functools.wraps(function)
    def reward(prompts, completions, **kwargs):
        values = function(prompts, completions, **kwargs)
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
            raise ValueError(f"reward function {name!r} returned {got} for {len(completions)} completions; "
                             "return a list with one float (or None) per completion")
        for value in values:
            if value is not None and (not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value)):
                raise ValueError(f"reward function {name!r} returned {value!r}; each reward must be a number or None")
        return [None if v is None else float(v) for v in values]

    reward.__name__ = name
    return reward


# --------------------------------------------------------------------------- config


def active(stage_cfg) -> dict[str, float]:
    """The rewards with a non-zero weight, in config order."""
    return {name: float(w) for name, w in stage_cfg.reward_weights.items() if float(w) != 0.0}


def user_functions(stage_cfg) -> dict[str, str]:
    return {name: str(path) for name, path in (stage_cfg.get("reward_functions") or {}).items()}


def reward_model_path(stage_cfg, run_dir: Path) -> Path:
    value = str(stage_cfg.reward_model)
    return Path(run_dir) / REWARD_STAGE / artifacts.FINAL if value == AUTO else Path(value).expanduser()


def check(stage_cfg, stage: str, run_stages: list[str], run_dir: Path, builtins: tuple[str, ...] = BUILTINS,
          why_not: str = "") -> None:
    """The reward config of `stage` (stages.<stage>.reward_weights, reward_functions,
    format_pattern, reward_model), raising ConfigError before any compute. `builtins`: the
    built-ins this stage offers; `why_not`: why the others are not offered."""
    key = f"stages.{stage}"
    weights, user = dict(stage_cfg.reward_weights), user_functions(stage_cfg)
    clash = sorted(set(user) & set(BUILTINS))
    if clash:
        raise ConfigError(f"{key}.reward_functions.{clash[0]}: {clash[0]} is a built-in reward; choose another name")
    # neither yours nor a built-in; or a built-in this stage does not offer, given a weight
    unknown = {name for name, weight in weights.items()
               if name not in user and (name not in BUILTINS or (name not in builtins and float(weight) != 0.0))}
    if unknown:
        raise ConfigError(f"{key}.reward_weights has unknown rewards {sorted(unknown)}; valid: "
                          f"{', '.join([*builtins, *user])} (a function of your own: add it to {key}.reward_functions "
                          f"as name: package.module:function){why_not}")
    weighted = active(stage_cfg)
    if not weighted:
        raise ConfigError(f"{key}.reward_weights are all 0; give at least one reward a weight, e.g. {builtins[0]}: 1.0")
    for name in weighted:
        if name in user:
            load(user[name], f"{key}.reward_functions.{name}")
    if "format" in weighted:
        try:
            re.compile(stage_cfg.format_pattern)
        except (re.error, TypeError) as err:
            raise ConfigError(f"{key}.format_pattern={stage_cfg.format_pattern!r} is not a regular expression: {err}") from err
    if "reward_model" in weighted:
        check_reward_model(stage_cfg, stage, run_stages, run_dir)


def check_reward_model(stage_cfg, stage: str, run_stages: list[str], run_dir: Path) -> None:
    """A reward model directory, or auto with the reward stage before `stage` in run.stages or
    completed in run.dir."""
    key = f"stages.{stage}.reward_model"
    if str(stage_cfg.reward_model) != AUTO:
        if not (reward_model_path(stage_cfg, run_dir) / "config.json").is_file():
            raise ConfigError(f"{key}={stage_cfg.reward_model} is not a model directory (no config.json); point it at "
                              f"a reward stage's final/, or use reward_model={AUTO} for this run's reward stage")
        return
    names = list(run_stages)
    if REWARD_STAGE in names and stage in names and names.index(REWARD_STAGE) > names.index(stage):
        raise ConfigError(f"run.stages lists reward after {stage}, whose reward_model={AUTO} reads reward/final/; "
                          "put reward first")
    final = reward_model_path(stage_cfg, run_dir)
    if REWARD_STAGE not in names and not (final / "config.json").is_file():
        raise ConfigError(f"stages.{stage} scores with the reward model and {key}={AUTO} reads {final}, which does not "
                          f"exist; add reward to run.stages before {stage}, or point {key} at a reward model, or set "
                          f"stages.{stage}.reward_weights.reward_model=0")


def fingerprint(stage_cfg, run_dir: Path, planned: dict[str, str]) -> str | None:
    """Part of the stage's config hash: the source files of the user's reward functions (an
    edited one reruns the stage) and the reward model's identity (its files, or the config hash
    of this run's reward stage: `planned` in this invocation, else its completed manifest's)."""
    weighted, user = active(stage_cfg), user_functions(stage_cfg)
    parts = [f"{name}:{source_fingerprint(user[name])}" for name in sorted(weighted) if name in user]
    if "reward_model" in weighted:
        if str(stage_cfg.reward_model) != AUTO:
            parts.append(f"content:{artifacts.fingerprint(reward_model_path(stage_cfg, run_dir))}")
        elif REWARD_STAGE in planned:
            parts.append(f"reward:{planned[REWARD_STAGE]}")
        elif manifest := artifacts.completed_manifest(run_dir, REWARD_STAGE):
            parts.append(f"reward:{manifest['config_hash']}")
    return "|".join(parts) or None


def build(stage_cfg, stage: str, task, run_dir: Path, trust_remote_code: bool, batch_size: int,
          dtype: torch.dtype = torch.float32) -> tuple[list[Callable], list[float]]:
    """(reward functions, weights) of the non-zero rewards; a reward model scores in `dtype`."""
    funcs, weights, user = [], [], user_functions(stage_cfg)
    for name, weight in active(stage_cfg).items():
        if name == "correct":
            funcs.append(verifier_reward(task))
        elif name == "format":
            funcs.append(format_reward(stage_cfg.format_pattern))
        elif name == "math":
            funcs.append(math_reward)
        elif name in user:
            funcs.append(checked(name, load(user[name], f"stages.{stage}.reward_functions.{name}")))
        else:
            path = reward_model_path(stage_cfg, run_dir)
            try:
                funcs.append(scorer_reward(RewardScorer.load(path, trust_remote_code, batch_size, dtype)))
            except (ValueError, FileNotFoundError) as err:
                raise ConfigError(f"stages.{stage}.reward_model {path}: {err}") from err
        weights.append(weight)
    return funcs, weights


def weighted_sum(funcs: list[Callable], weights: list[float], problems: list[dict], texts: list[str],
                 tokenizer) -> list[float]:
    """Each text's reward as GRPOTrainer computes it: the functions called as TRL calls them
    (prompts and completions as conversations, completion_ids, every other column of the
    problem as a keyword argument), None counting as 0 in the weighted sum. problems[i] is the
    problem texts[i] answers."""
    prompts = [as_turns(p["prompt"], "user") for p in problems]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    columns = {key: [p[key] for p in problems] for key in (problems[0] if problems else {}) if key != "prompt"}
    total = [0.0] * len(texts)
    for func, weight in zip(funcs, weights):
        values = func(prompts=prompts, completions=completions, completion_ids=ids, **columns)
        total = [t + weight * v if v is not None else t for t, v in zip(total, values)]
    return total
