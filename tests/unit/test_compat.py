"""pipeline/compat.py: the overrides of private TRL/transformers methods fit the installed
versions, and pyproject's lower bounds are the versions the suite runs on (constraints.txt)."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.version import Version

from pipeline import compat
from pipeline.compat import PrivateHook
from tests.unit.test_constraints import ROOT, canonical, pins

# torch stays loose on purpose: GPU clusters bring their own CUDA build (pyproject says why)
LIBRARIES = ("transformers", "trl", "peft", "accelerate", "datasets", "deepspeed", "hydra-core")


def lower_bounds() -> dict[str, str]:
    found = {}
    for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        match = re.match(r"([A-Za-z0-9._-]+)\s*>=\s*([^,;\s]+)", requirement)
        if match:
            found[canonical(match.group(1))] = match.group(2)
    return found


def test_every_override_fits_the_installed_libraries():
    assert compat.problems() == []


def test_the_lower_bounds_are_the_tested_versions():
    bounds, pinned = lower_bounds(), pins()
    for name in LIBRARIES:
        assert name in bounds and Version(bounds[name]) == Version(pinned[name]), \
            f"pyproject's {name}>={bounds.get(name)}, but the suite runs {pinned[name]}"
    for hook in compat.HOOKS:
        package, version = hook.written_against.split()
        assert pinned[package] == version, f"{hook.name} was written against {hook.written_against}; re-check it for {pinned[package]}"


def test_a_changed_private_method_stops_with_the_entry_text():
    gone = PrivateHook("trl:GRPOTrainer", "_no_such_method", (), used_by="a test", written_against="trl 1.16.0",
                       public_replacement="a public hook")
    moved = PrivateHook("trl:GRPOTrainer", "_generate", ("prompts", "extra"), used_by="a test",
                        written_against="trl 1.16.0", public_replacement="a public hook")
    lines = compat.problems((gone, moved))
    assert lines[0].startswith("GRPOTrainer._no_such_method is gone (trl ")
    assert "GRPOTrainer._generate now takes ('prompts',), not ('prompts', 'extra')" in lines[1]
    assert "the public hook that would replace it: a public hook" in lines[1]


def test_require_raises_for_a_broken_owner(monkeypatch):
    broken = PrivateHook("transformers:Trainer", "_gone", (), used_by="a test", written_against="transformers 5.24.0",
                         public_replacement="x")
    monkeypatch.setattr(compat, "HOOKS", (*compat.HOOKS, broken))
    compat.require("trl:GRPOTrainer")  # another owner is untouched
    with pytest.raises(RuntimeError, match=r"Trainer._gone is gone .* Install the versions of constraints.txt"):
        compat.require("transformers:Trainer")
