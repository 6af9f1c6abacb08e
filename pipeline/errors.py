"""What the user must fix, as the entry point says it in one line: ConfigError (bad input caught
before compute, exit 2) and storage_problem (the filesystem under the run refused a write: exit
1, or a ConfigError when found before compute)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class ConfigError(ValueError):
    """Bad input, caught before any compute starts."""


FULL = (errno.ENOSPC, errno.EDQUOT)
DENIED = (errno.EACCES, errno.EPERM)
# what torch's zip writer and safetensors say when a write comes up short (neither raises OSError)
SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed", "file write failed", "inline_container.cc")
FULL_TEXT = ("No space left on device", "Disk quota exceeded", "StorageFull", "os error 28")
LOW_SPACE = 64 * 2**20  # a short write with less than this free on the run's filesystem: the disk is full


def chain(err: BaseException):
    """err and the exceptions it was raised from or during."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def storage_problem(err: BaseException, run_dir: Path) -> str | None:
    """One line (path, cause, what to do) when err is a refusal of the filesystem, else None.
    `run_dir` is where the run writes: a short write with that filesystem (nearly) full is a
    full disk, and a missing file counts only under it (elsewhere it is an input's problem)."""
    resume = "then rerun the same command: finished stages are kept and the failed one resumes from its last checkpoint"
    for e in chain(err):
        path = getattr(e, "filename", None) or run_dir
        if isinstance(e, OSError) and e.errno in FULL or any(t in str(e) for t in FULL_TEXT):
            return f"no space left on the device writing {path}; free space there or set run.dir to a larger disk, {resume}"
        if isinstance(e, OSError) and e.errno == errno.EROFS:
            return f"{path} is on a read-only filesystem; set run.dir to a directory on a writable one"
        if isinstance(e, OSError) and e.errno in DENIED:
            return (f"permission denied for {path} ({e.strerror}); make it writable for this user or set run.dir "
                    "to a directory you own")
        if isinstance(e, OSError) and e.errno == errno.ENOENT and is_under(path, run_dir):
            return (f"{path}: a directory of the run is missing (removed while the run was going?); "
                    f"recreate {run_dir} or set run.dir, {resume}")
        if isinstance(e, RuntimeError) and any(t in str(e) for t in SHORT_WRITE) and free_bytes(run_dir) < LOW_SPACE:
            return (f"no space left on the device under {run_dir} (a checkpoint write came up short, "
                    f"{free_bytes(run_dir) // 2**20} MiB free); free space there or set run.dir to a larger disk, {resume}")
    return None


def is_under(path, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
        return True
    except (ValueError, OSError):
        return False


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding path (its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 2**62
