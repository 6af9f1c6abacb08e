"""Shared helpers: compose configs in-process, run the real entry point in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import compose_config  # noqa: F401 (the tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs in two pytest-xdist workers (pyproject's addopts) on as many cores: one
    # OpenMP thread each (and in the subprocesses they start), since two processes with a
    # thread per core each wait on one another several-fold. Set before anything imports torch.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

SLOW_FOLDERS = {"stages", "e2e", "distributed"}  # training runs through the entry point
SLOW_CALLS = ("run_cli(", "run_accelerate(", "python_in_fresh_process(", "subprocess.")


def is_slow(item) -> bool:
    """A test that trains or runs the pipeline in a subprocess: under tests/stages, e2e or
    distributed, reading a session smoke run, or calling the entry point itself."""
    import inspect

    if SLOW_FOLDERS & set(Path(str(item.fspath)).relative_to(ROOT / "tests").parts[:-1]):
        return True
    if any(name.startswith("smoke_") for name in getattr(item, "fixturenames", ())):
        return True
    try:
        source = inspect.getsource(item.function)
    except (OSError, TypeError, AttributeError):
        return False
    return any(call in source for call in SLOW_CALLS)


def launches_processes(item) -> bool:
    """A test that starts `accelerate launch` (a 2-process run)."""
    import inspect

    if "distributed" in Path(str(item.fspath)).relative_to(ROOT / "tests").parts:
        return True
    try:
        return "run_accelerate(" in inspect.getsource(item.function)
    except (OSError, TypeError, AttributeError):
        return False


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark the slow tests (`-m "not slow"`: the quick tier) and leave the 2-process tests out
    unless the marker expression names them (`-m distributed`)."""
    for item in items:
        if item.get_closest_marker("slow") is None and is_slow(item):
            item.add_marker(pytest.mark.slow)
        if launches_processes(item):
            # accelerate launch listens on one port (29500): such tests share a worker (--dist loadgroup)
            item.add_marker(pytest.mark.xdist_group("accelerate"))
    if "distributed" not in (config.option.markexpr or ""):
        deselected = [item for item in items if item.get_closest_marker("distributed") is not None]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if item.get_closest_marker("distributed") is None]


def run_cli(*overrides: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m pipeline <overrides>` from the repo root, as a user types it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def free_port() -> int:
    """A TCP port nothing listens on now: a launch's rendezvous does not depend on 29500 being free
    (a process of another test, or one left over, may hold it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def run_accelerate(config: str, *args: str, num_processes: int = 2, timeout: float = 900) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file conf/accelerate/<config>.yaml --num_processes N <args>`
    from the repo root (the configs point at conf/deepspeed/*.json by relative path)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONF / "accelerate" / f"{config}.yaml"),
               "--num_processes", str(num_processes), "--main_process_port", str(free_port()), *args]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(command[3:])} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-5000:]}")
    return proc


def python_in_fresh_process(code: str, timeout: float = 300) -> str:
    """Run code in a new interpreter (nothing from this test process leaks into it)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="session")
def smoke_pretrain_run(tmp_path_factory) -> Path:
    """One smoke pretrain run shared by the tests that only read its outputs."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    run_cli("preset=smoke", f"run.dir={run_dir}", "run.stages=[pretrain]")
    return run_dir


# every stage there is, in chain order; the chain test and the stage tests read this one run
SMOKE_CHAIN = "run.stages=[pretrain,sft,reward,dpo,grpo,test_time]"


@pytest.fixture(scope="session")
def smoke_chain_run(tmp_path_factory) -> Path:
    """The whole chain on preset=smoke in one command, shared by the tests that read its outputs."""
    run_dir = tmp_path_factory.mktemp("chain") / "run"
    run_cli("preset=smoke", f"run.dir={run_dir}", SMOKE_CHAIN)
    return run_dir


@pytest.fixture(scope="session")
def smoke_muon_run(tmp_path_factory) -> Path:
    """The same smoke pretrain run with optim=muon."""
    run_dir = tmp_path_factory.mktemp("smoke-muon") / "run"
    run_cli("preset=smoke", "optim=muon", f"run.dir={run_dir}", "run.stages=[pretrain]")
    return run_dir
