"""One invocation per run directory (pipeline/lock.py): the lock names its holder, a second
invocation exits 2 without touching the run dir, a dead holder's or a requeued SLURM job's
lock is taken over, and only the holder removes it."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import lock
from pipeline.errors import ConfigError
from pipeline.runner import run_pipeline
from tests.conftest import ROOT, compose_config, run_cli

HOLD = """
import sys, time
from pathlib import Path
from pipeline import lock
lock.acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding run_dir's lock (it sleeps until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()  # reaped: no zombie keeps the pid alive


def tree(path: Path) -> dict:
    """Every file under path with its bytes and modification time."""
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()}


def write_lock(run_dir: Path, **fields) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-01T00:00:00+00:00",
              "slurm_job_id": None, "command": "python -m pipeline run.stages=[pretrain]", "token": "t", **fields}
    (run_dir / lock.LOCK_FILE).write_text(json.dumps(record))
    return run_dir / lock.LOCK_FILE


def test_lock_names_its_holder_and_refuses_a_second_taker(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/x/pipeline/__main__.py", "run.stages=[pretrain]", "run.dir=/tmp/a b"])
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    run_dir = tmp_path / "run"
    held = lock.acquire(run_dir)
    record = json.loads((run_dir / ".lock").read_text())
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid() and record["slurm_job_id"] == "77"
    assert record["command"] == "python -m pipeline 'run.stages=[pretrain]' 'run.dir=/tmp/a b'" and record["started"]
    assert stat.S_IMODE((run_dir / ".lock").stat().st_mode) == 0o666 & ~current_umask()
    with pytest.raises(ConfigError) as err:  # this same, live process: held
        lock.acquire(run_dir)
    message = str(err.value)
    for part in (f"pid {os.getpid()}", f"host {socket.gethostname()}", "SLURM job 77", record["started"],
                 record["command"], f"delete {run_dir / '.lock'} by hand"):
        assert part in message
    lock.release(held)
    assert not (run_dir / ".lock").exists()
    lock.release(lock.acquire(run_dir))  # free again


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_release_leaves_a_lock_it_does_not_hold(tmp_path, capsys):
    run_dir = tmp_path / "run"
    held = lock.acquire(run_dir)
    path = write_lock(run_dir, token="someone-else")  # e.g. taken over by a requeued job
    lock.release(held)
    assert path.exists() and "no longer this invocation's lock" in capsys.readouterr().err
    lock.release(None)  # an invocation that never took it removes nothing
    assert path.exists()


def test_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        with pytest.raises(ConfigError, match=f"pid {holder.pid} on host"):
            lock.acquire(run_dir)
    finally:
        stop(holder)
    taken = lock.acquire(run_dir)
    warning = capsys.readouterr().err
    assert f"taking over the lock of {run_dir} from pid {holder.pid}" in warning
    assert f"pid {holder.pid} is no longer running" in warning
    assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # the stale one is not kept aside
    lock.release(taken)


def test_zombie_reused_pid_and_rebooted_host_count_as_gone(tmp_path):
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while not lock._proc_stat(zombie.pid) or lock._proc_stat(zombie.pid)[0] != "Z":
        time.sleep(0.05)  # exited, not yet reaped by us
    try:
        assert "no longer running" in lock.stale_reason({"host": socket.gethostname(), "pid": zombie.pid})
    finally:
        zombie.wait()
    # a container with this host name but its own pids: its holder cannot be checked from here
    assert lock.stale_reason({"host": socket.gethostname(), "pid": zombie.pid, "pid_namespace": "pid:[1]"}) is None
    me = {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": lock._boot_id(),
          "process_start": lock._process_start(os.getpid())}
    assert lock.stale_reason(me) is None
    assert "another process" in lock.stale_reason({**me, "process_start": "1"})
    assert "rebooted" in lock.stale_reason({**me, "boot_id": "another-boot"})


def test_slurm_requeue_of_the_same_job_takes_the_lock_over_from_another_node(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    write_lock(run_dir, host="node-17", pid=4321, slurm_job_id="4242")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ConfigError, match="pid 4321 on host node-17, SLURM job 4242"):
        lock.acquire(run_dir)  # another node, no job: cannot tell it is gone
    monkeypatch.setenv("SLURM_JOB_ID", "999")
    with pytest.raises(ConfigError, match="in use by another invocation"):
        lock.acquire(run_dir)  # another job
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    taken = lock.acquire(run_dir)
    assert "SLURM requeued job 4242" in capsys.readouterr().err
    record = json.loads((run_dir / ".lock").read_text())
    assert record["host"] == socket.gethostname() and record["slurm_job_id"] == "4242"
    lock.release(taken)


def test_same_job_on_the_same_host_with_the_holder_alive_is_held(tmp_path, monkeypatch):
    """Two invocations inside one SLURM job at once: not a requeue (the holder still runs)."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run_dir = tmp_path / "run"
    held = lock.acquire(run_dir)
    with pytest.raises(ConfigError, match="in use"):
        lock.acquire(run_dir)
    lock.release(held)


def test_unreadable_lock_is_held_and_says_so(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text("")
    with pytest.raises(ConfigError, match=r"exists but cannot be read.*delete .*\.lock by hand"):
        lock.acquire(run_dir)


def test_take_over_puts_back_a_fresh_lock_that_replaced_the_stale_one(tmp_path):
    """Two invocations taking over the same stale lock: the slower one must not remove the
    lock the faster one has just created in its place."""
    path = write_lock(tmp_path, token="fresh")
    assert lock._take_over(path, seen='{"token": "stale"}') is False
    assert json.loads(path.read_text())["token"] == "fresh"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


@pytest.fixture
def signal_handlers():
    """run_pipeline installs the preemption handlers: give pytest its own back."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_run_pipeline_refuses_a_held_run_dir_before_writing(tmp_path, signal_handlers):
    run_dir = tmp_path / "run"
    (run_dir / "pretrain").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("the first invocation's config\n")
    (run_dir / "pretrain" / "stage.json").write_text('{"status": "running"}\n')
    (run_dir / ".preempt").touch()  # a request to the holder, which a new run would clear
    holder = hold_lock(run_dir)
    try:
        before = tree(run_dir)
        cfg = compose_config(["preset=smoke", "run.stages=[pretrain]", f"run.dir={run_dir}"])
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            run_pipeline(cfg)
        assert tree(run_dir) == before
    finally:
        stop(holder)


def test_cli_real_pair_then_a_killed_holder_is_taken_over(tmp_path):
    """Two real `python -m pipeline` runs on one run dir: the second exits 2 naming the first,
    whose files it does not touch; once the first is killed (-9, no cleanup), the next
    invocation takes the stale lock over and runs."""
    run_dir = tmp_path / "run"
    first_args = ["preset=smoke", "run.stages=[pretrain]", f"run.dir={run_dir}", "stages.pretrain.max_steps=5000",
                  "stages.pretrain.save_steps=100000", "stages.pretrain.eval_steps=100000"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    first = subprocess.Popen([sys.executable, "-m", "pipeline", *first_args], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (run_dir / "pretrain" / "tokenizer").exists():  # saved just before training starts
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        config_before = (run_dir / "config.yaml").read_bytes()
        manifest_before = (run_dir / "pretrain" / "stage.json").read_bytes()
        second = run_cli("preset=smoke", "run.stages=[pretrain]", f"run.dir={run_dir}", "stages.pretrain.max_steps=3",
                         check=False)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "stages.pretrain.max_steps=5000" in second.stderr  # the holder's command line
        assert (run_dir / "config.yaml").read_bytes() == config_before
        assert (run_dir / "pretrain" / "stage.json").read_bytes() == manifest_before
        assert first.poll() is None  # still training, undisturbed
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert json.loads((run_dir / ".lock").read_text())["pid"] == first.pid  # left behind by the kill
    third = run_cli("preset=smoke", "run.stages=[pretrain]", f"run.dir={run_dir}", "stages.pretrain.max_steps=3",
                    "stages.pretrain.eval_problems=4")
    assert f"taking over the lock of {run_dir} from pid {first.pid}" in third.stderr
    assert json.loads((run_dir / "pretrain" / "stage.json").read_text())["status"] == "completed"
    assert not (run_dir / ".lock").exists()  # released at the end
