"""Reward functions a user names by import path (`stages.grpo.reward_functions`), with TRL's
reward signature:

    def brevity(prompts, completions, completion_ids, **kwargs) -> list[float | None]

`kwargs` holds the dataset's other columns (e.g. `answer`), one value per completion, as TRL
passes them. The path is `package.module:function` (or `package.module.function`), imported
from the Python path (the working directory, PYTHONPATH, installed packages). A path that does
not import or names something that is not callable is a ConfigError before any compute; a
function that returns the wrong number of rewards, or values that are not numbers or None,
fails when it first does so, with its name in the message.
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
from collections.abc import Callable

from pipeline.errors import ConfigError


def load(path: str, key: str) -> Callable:
    """The callable `path` names; ConfigError naming `key`, the path and what is wrong."""
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
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
    """A fingerprint of the file that defines the module of `path` (artifacts.fingerprint), so that an
    edited reward function reruns the stage; "unknown" when it has no file."""
    import importlib.util
    from pathlib import Path

    from pipeline.artifacts import fingerprint

    module_name = path.partition(":")[0] if ":" in path else path.rpartition(".")[0]
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return "unknown"
    origin = spec.origin if spec is not None else None
    return fingerprint(Path(origin)) if origin and Path(origin).is_file() else "unknown"


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
