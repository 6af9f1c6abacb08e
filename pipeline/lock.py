"""One invocation per run directory: `<run.dir>/.lock`, held from planning to exit.

The main process creates the file atomically (O_CREAT | O_EXCL) with who holds it (host, pid,
start time, SLURM job, command line). All ranks of one `accelerate launch` are one holder: the
main process's result is all-reduced, so the other ranks stop with it when the lock is taken.

A lock whose holder is provably gone is taken over with a warning: same host and the pid is
not alive (or is another process now: its start time differs, or the host rebooted), or a
SLURM requeue of the same job (same SLURM_JOB_ID, on any node). Anything else is held, and
the second invocation fails with ConfigError (exit 2) naming the holder and how to clear it.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import artifacts, distributed
from pipeline.errors import ConfigError, storage_problem

LOCK_FILE = ".lock"


@dataclass
class RunLock:
    path: Path
    token: str  # written into the file: release removes the file only while it still holds it


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _boot_id() -> str | None:
    text = _read_text(Path("/proc/sys/kernel/random/boot_id"))
    return text.strip() if text else None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str]:
    """Fields 3.. of /proc/<pid>/stat (state first, start time at index 19); [] without /proc."""
    stat = _read_text(Path(f"/proc/{pid}/stat"))
    return stat.rsplit(")", 1)[-1].split() if stat else []  # the command name may hold spaces and ")"


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, to tell a live holder from an
    unrelated process that reuses its pid; None where /proc is not available."""
    fields = _proc_stat(pid)
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    fields = _proc_stat(pid)
    return not fields or fields[0] not in ("Z", "X")  # a zombie has exited, its parent has not reaped it yet


def command_line() -> str:
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    if program.name == "__main__.py":  # python -m <package>
        program_text = f"python -m {program.parent.name}"
    else:
        program_text = shlex.quote(str(program))
    return " ".join([program_text, *map(shlex.quote, sys.argv[1:])])


def holder_record() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": artifacts.now(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "command": command_line(),
        "boot_id": _boot_id(),
        "pid_namespace": _pid_namespace(),  # containers may share a host name but not their pids
        "process_start": _process_start(os.getpid()),
        "token": uuid.uuid4().hex,
    }


def describe(holder: dict | None, path: Path) -> str:
    if holder is None:
        return f"{path} exists but cannot be read (a holder killed while writing it?)"
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (f"pid {holder.get('pid')} on host {holder.get('host')}{job}, since {holder.get('started')}, "
            f"command: {holder.get('command')}")


def held_message(run_dir: Path, holder: dict | None) -> str:
    path = run_dir / LOCK_FILE
    return (
        f"run dir {run_dir} is in use by another invocation: {describe(holder, path)}. One invocation per run dir: "
        f"wait for it to finish, or stop it, or use another run.dir. If that process is gone (e.g. its node died), "
        f"check it is not running and delete {path} by hand, then rerun the same command."
    )


def stale_reason(holder: dict) -> str | None:
    """Why the holder is gone (the lock can be taken over), or None if it may still run. Only
    a process this one can see (same host, same pid namespace) can be checked for life."""
    namespace = holder.get("pid_namespace")
    same_pids = holder.get("host") == socket.gethostname() and (not namespace or namespace == _pid_namespace())
    if same_pids:
        pid = holder.get("pid")
        if holder.get("boot_id") and holder.get("boot_id") != _boot_id():
            return "the host has rebooted since"
        if not isinstance(pid, int) or not _pid_alive(pid):
            return f"pid {pid} is no longer running"
        start = _process_start(pid)
        if holder.get("process_start") and start and start != holder["process_start"]:
            return f"pid {pid} is now another process"
        return None
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job:
        return f"SLURM requeued job {job} (this is its new run)"
    return None


def _read_holder(path: Path) -> tuple[str | None, dict | None]:
    """(raw text, parsed holder); the holder writes right after creating the file, so a reader
    that finds it empty or partial waits a moment before calling it unreadable."""
    for _ in range(20):
        text = _read_text(path)
        if text is None:
            return None, None
        try:
            holder = json.loads(text)
            if isinstance(holder, dict):
                return text, holder
        except json.JSONDecodeError:
            pass
        time.sleep(0.05)
    return text, None


def _create(path: Path, record: dict) -> bool:
    """Create the lock file with the record; False if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    try:
        data = (json.dumps(record, indent=2) + "\n").encode()
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


def _take_over(path: Path, seen: str) -> bool:
    """Move the stale lock (whose text was `seen`) out of the way. A rename is atomic, but a
    racing invocation may have replaced the stale file with its own fresh lock in between: then
    the fresh one is put back (a link does not overwrite) and False says "look again"."""
    aside = path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if _read_text(aside) == seen:
        aside.unlink(missing_ok=True)
        return True
    try:
        os.link(aside, path)  # not ours: give it back, unless yet another lock appeared meanwhile
    except FileExistsError:
        pass
    except OSError:  # no hard links on this filesystem
        os.rename(aside, path)
    aside.unlink(missing_ok=True)
    return False


def acquire(run_dir: Path) -> RunLock:
    """Take the lock of run_dir (creating run_dir) in this process, or raise ConfigError naming
    the holder, or a run dir that cannot be created or written (the filesystem's reason)."""
    path = run_dir / LOCK_FILE
    record = holder_record()
    for _ in range(10):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            created = _create(path, record)
        except OSError as err:
            problem = storage_problem(err, run_dir) or f"{type(err).__name__}: {err}"
            raise ConfigError(f"run.dir={run_dir} cannot be created or written: {problem}") from err
        if created:
            return RunLock(path, record["token"])
        text, holder = _read_holder(path)
        if text is None:
            continue  # released meanwhile: try again
        reason = stale_reason(holder) if holder else None
        if reason is None:
            raise ConfigError(held_message(run_dir, holder))
        print(f"[pipeline] warning: taking over the lock of {run_dir} from {describe(holder, path)}: {reason}",
              file=sys.stderr, flush=True)
        _take_over(path, text)
    raise ConfigError(f"could not take the lock {path}: other invocations keep taking it; {held_message(run_dir, _read_holder(path)[1])}")


def acquire_for_launch(run_dir: Path) -> RunLock | None:
    """Called on every rank: the main process takes the lock, every rank learns whether it did.
    Returns the lock on the main process, None on the others; raises on all ranks if it failed."""
    lock, error = None, None
    if distributed.is_main_process():
        try:
            lock = acquire(run_dir)
        except Exception as err:  # all ranks must reach the all-reduce below, or they hang in it
            error = err
    if distributed.world_size() > 1 and torch.distributed.is_initialized():
        try:
            ok = torch.tensor([int(error is None)], device=distributed.state().device)
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        except BaseException:
            release(lock)
            raise
        if not ok.item() and error is None:  # only the main process can fail: say what it found
            holder = _read_holder(run_dir / LOCK_FILE)[1]
            error = ConfigError(f"the main process could not take the lock of run dir {run_dir} (its error says why)"
                                + (f"; held by {describe(holder, run_dir / LOCK_FILE)}" if holder else ""))
    if error is not None:
        raise error
    return lock


def release(lock: RunLock | None) -> None:
    """Remove the lock file if this process still holds it (a lock taken over by a requeued
    job, or replaced by hand, is left alone)."""
    if lock is None:
        return
    _, holder = _read_holder(lock.path)
    if holder is None or holder.get("token") != lock.token:
        print(f"[pipeline] warning: {lock.path} is gone or no longer this invocation's lock; leaving it alone",
              file=sys.stderr, flush=True)
        return
    try:
        lock.path.unlink(missing_ok=True)
    except OSError as err:
        print(f"[pipeline] warning: could not remove {lock.path}: {err}; delete it by hand", file=sys.stderr, flush=True)
