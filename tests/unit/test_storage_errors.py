"""A filesystem that refuses a write (full, read-only, permission denied, a directory gone) ends
the run with one line naming the path, the cause and the fix: exit 1 while running (the
traceback in the stage's error.log, stage.json failed), exit 2 when the run dir cannot be made."""

import errno
import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from pipeline.errors import storage_problem
from tests.conftest import run_cli


@pytest.mark.parametrize("err, says", [
    (OSError(errno.ENOSPC, "No space left on device", "/r/pretrain/checkpoint-5/optimizer.pt"),
     "no space left on the device writing /r/pretrain/checkpoint-5/optimizer.pt"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/r/x"), "no space left"),
    (OSError(errno.EROFS, "Read-only file system", "/r/x"), "/r/x is on a read-only filesystem"),
    (PermissionError(errno.EACCES, "Permission denied", "/r/x"), "permission denied for /r/x"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/r/pretrain/final"), "a directory of the run is missing"),
    (RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"), "no space left"),  # safetensors
])
def test_filesystem_refusals_are_named(err, says):
    problem = storage_problem(err, Path("/r"))
    assert problem is not None and says in problem and "\n" not in problem


def test_other_failures_are_not_storage_problems(tmp_path):
    assert storage_problem(ValueError("bad shape"), tmp_path) is None
    assert storage_problem(FileNotFoundError(errno.ENOENT, "No such file", "/data/train.jsonl"), tmp_path) is None
    # torch's short write on a disk with room left is not called a full disk
    assert storage_problem(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2"), tmp_path) is None


def test_a_wrapped_refusal_is_found_through_the_chain(tmp_path):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert "no space left" in storage_problem(outer, tmp_path)


# An injected full disk in a real run: torch.save of the first checkpoint's optimizer state fails
# with ENOSPC, as on a filesystem that fills up while the trainer saves.
SITECUSTOMIZE = '''
import errno, torch
_save = torch.save
def save(obj, f, *args, **kwargs):
    if "checkpoint-10" in str(f):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return _save(obj, f, *args, **kwargs)
torch.save = save
'''


def assert_one_line_about_space(done: subprocess.CompletedProcess, run_dir: Path) -> None:
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "space" in errors[0] and "rerun the same command" in errors[0]
    assert "Traceback" not in done.stderr
    manifest = json.loads((run_dir / "pretrain" / "stage.json").read_text())
    assert manifest["status"] == "failed"
    assert not (run_dir / "pretrain" / "final").exists()


def test_a_full_disk_at_a_checkpoint_save_is_one_line_and_a_failed_record(tmp_path, monkeypatch):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    monkeypatch.setenv("PYTHONPATH", str(inject))
    run_dir = tmp_path / "run"
    done = run_cli("preset=smoke", "run.stages=[pretrain]", f"run.dir={run_dir}", "trainer.report_to=none", check=False)
    assert_one_line_about_space(done, run_dir)
    error_log = run_dir / "pretrain" / "error.log"
    assert str(error_log) in done.stderr and "Traceback" in error_log.read_text()
    assert "checkpoint-10" in error_log.read_text()


@pytest.fixture
def small_filesystem(tmp_path):
    """A 12 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_filesystem_is_one_line_and_a_failed_record(small_filesystem):
    run_dir = small_filesystem / "run"
    done = run_cli("preset=smoke", "run.stages=[pretrain]", f"run.dir={run_dir}", "trainer.report_to=none", check=False)
    assert_one_line_about_space(done, run_dir)


@pytest.mark.parametrize("where", ["under_a_file", "read_only"])
def test_a_run_dir_that_cannot_be_made_is_exit_2_with_one_line(tmp_path, where):
    if where == "under_a_file":
        (tmp_path / "afile").write_text("x")
        run_dir = tmp_path / "afile" / "run"
    else:
        mount = tmp_path / "ro"
        mount.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mount)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        run_dir = mount / "run"
    try:
        done = run_cli("preset=smoke", "run.stages=[pretrain]", f"run.dir={run_dir}", check=False)
    finally:
        if where == "read_only":
            subprocess.run(["umount", str(tmp_path / "ro")], check=True)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: run.dir={run_dir} cannot be created or written")
    if where == "read_only":
        assert "read-only filesystem" in done.stderr
