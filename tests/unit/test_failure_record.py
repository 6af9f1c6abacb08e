"""Failures leave a true record: a failed write leaves no temporary file, run-dir files get the
usual umask permissions, a stage that fails on a full disk is recorded `failed` with the cause,
and test_time stops on a preemption request like the training stages."""

import errno
import json
import os
import signal
import stat
from pathlib import Path

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import stages.pretrain
from pipeline import artifacts, lock, preemption, sampling
from pipeline.runner import run_pipeline
from pipeline.tokenizer import train_tokenizer
from tests.conftest import compose_config

WRITERS = {
    "json": (artifacts.write_json_atomic, {"status": "completed"}),
    "text": (artifacts.write_text_atomic, "a report\n"),
}


def fill_disk(monkeypatch) -> None:
    """From now on every file the pipeline writes through os.fdopen (the atomic writes) is on a
    full disk: its descriptor points at /dev/full, whose writes fail with ENOSPC in the kernel.
    The temporary file itself is created as usual, as on a disk with inodes but no blocks left."""
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)
        os.close(full)
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)


def fail_fsync(monkeypatch) -> None:
    """ENOSPC at fsync: how ext4's delayed allocation reports a full disk."""
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("fault", [fill_disk, fail_fsync])
def test_a_failed_atomic_write_leaves_no_temp_file_and_the_old_file_intact(tmp_path, monkeypatch, writer, fault):
    write, data = WRITERS[writer]
    target = tmp_path / "stage.json"
    target.write_text("old\n")
    fault(monkeypatch)
    with pytest.raises(OSError) as err:
        write(target, data)
    assert err.value.errno == errno.ENOSPC
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["stage.json"]


def test_unserialisable_json_leaves_no_temp_file(tmp_path):
    with pytest.raises(TypeError):
        artifacts.write_json_atomic(tmp_path / "m.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_run_dir_files_get_the_umask_permissions(tmp_path, umask):
    previous = os.umask(umask)
    try:
        artifacts.write_json_atomic(tmp_path / "new.json", {"a": 1})
        (tmp_path / "old.txt").write_text("x")
        os.chmod(tmp_path / "old.txt", 0o600)
        artifacts.write_text_atomic(tmp_path / "old.txt", "y")  # a replaced file gets them too
        held = lock.acquire(tmp_path / "run")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "new.json", tmp_path / "old.txt", held.path]}
        lock.release(held)
    finally:
        os.umask(previous)
    assert modes == {"new.json": 0o666 & ~umask, "old.txt": 0o666 & ~umask, ".lock": 0o666 & ~umask}


def test_failure_manifest_is_rewritten_in_place_when_the_disk_is_full(tmp_path, monkeypatch):
    manifest = {"stage": "pretrain", "status": "running", "config_hash": "abc", "versions": {"torch": "2.13.0"}}
    artifacts.write_manifest(tmp_path, manifest)
    fill_disk(monkeypatch)
    failed = {**manifest, "status": "failed", "error": "OSError: [Errno 28] No space left on device"}
    artifacts.record_manifest(tmp_path, failed)
    assert artifacts.read_manifest(tmp_path) == failed
    assert [p.name for p in tmp_path.iterdir()] == ["stage.json"]

    def pwrite(fd, data, offset):  # no room even in place (e.g. a copy-on-write filesystem)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OSError) as err:
        artifacts.record_manifest(tmp_path, {**failed, "status": "preempted"})
    assert err.value.errno == errno.ENOSPC
    assert artifacts.read_manifest(tmp_path) == failed  # untouched, still parses


@pytest.fixture
def pipeline_process(monkeypatch):
    """run_pipeline in this process: it installs the preemption handlers and may set the flag;
    give pytest its own back."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    monkeypatch.setattr(preemption, "_requested", False)
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def temp_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


def test_stage_failing_on_a_full_disk_is_recorded_failed_and_the_error_propagates(tmp_path, monkeypatch, pipeline_process):
    run_dir = tmp_path / "run"
    cause = OSError(errno.ENOSPC, "No space left on device", str(run_dir / "pretrain" / "checkpoint-5" / "optimizer.pt"))

    def run(ctx):  # the disk fills up while the stage saves a checkpoint
        fill_disk(monkeypatch)
        raise cause

    monkeypatch.setattr(stages.pretrain, "run", run)
    cfg = compose_config(["preset=smoke", "run.stages=[pretrain]", f"run.dir={run_dir}"])
    with pytest.raises(OSError) as err:
        run_pipeline(cfg)
    assert err.value is cause  # the stage's error, not the failed manifest write's: exit 1 from the entry point
    manifest = json.loads((run_dir / "pretrain" / "stage.json").read_text())
    assert manifest["status"] == "failed" and "No space left on device" in manifest["error"]
    assert "checkpoint-5/optimizer.pt" in manifest["error"] and manifest["ended"]
    assert temp_files(run_dir) == []
    assert not (run_dir / ".lock").exists()  # released on the way out


# --------------------------------------------------------------------------- test_time preemption

TEXTS = ["Q: 47+18-9=?\n47+18=65\n65-9=56\nA: 56\n", "Q: 3+4=?\n3+4=7\nA: 7\n"] * 20


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> Path:
    tokenizer = train_tokenizer(TEXTS, 300)
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=2, num_experts_per_tok=1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("policy") / "final"
    Qwen3MoeForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def ask_to_stop(how: str, run_dir: Path) -> None:
    if how == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)  # the handler run_pipeline installed takes it
    else:
        (run_dir / preemption.FLAG_FILE).touch()  # what the sbatch scripts do on SLURM's warning


def count_and_stop_after_first(monkeypatch, owner, name: str, how: str, run_dir: Path) -> list[int]:
    """Wrap owner.name (one generation batch) to count calls and ask to stop after the first."""
    real, calls = getattr(owner, name), []

    def batch(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            ask_to_stop(how, run_dir)
        return out

    monkeypatch.setattr(owner, name, batch)
    return calls


@pytest.mark.parametrize("how", ["sigterm", "flag_file"])
@pytest.mark.parametrize("method", ["majority_vote", "power"])
def test_test_time_stops_between_batches_on_a_preemption_request(tmp_path, monkeypatch, pipeline_process, tiny_policy,
                                                                  how, method):
    run_dir = tmp_path / "run"
    cfg = compose_config(["preset=smoke", "run.stages=[test_time]", f"run.dir={run_dir}",
                          f"stages.test_time.init={tiny_policy}", f"stages.test_time.methods=[{method}]",
                          "stages.test_time.batch_size=3", "stages.test_time.num_samples=3",
                          "stages.test_time.max_new_tokens=8", "stages.test_time.eval_problems=6"])
    # 6 problems: 6 batches of one prompt's 3 candidates (vote), or 2 batches of 3 prompts (power)
    owner, name = (sampling, "_power_sample_batch") if method == "power" else (Qwen3MoeForCausalLM, "generate")
    calls = count_and_stop_after_first(monkeypatch, owner, name, how, run_dir)
    with pytest.raises(preemption.Preempted, match=f"test_time stopped during {method}"):
        run_pipeline(cfg)
    assert len(calls) == 1  # stopped at the next batch, not at the end
    stage = run_dir / "test_time"
    manifest = json.loads((stage / "stage.json").read_text())
    assert manifest["status"] == "preempted"
    assert not (stage / "metrics.json").exists() and not (run_dir / ".lock").exists()

    monkeypatch.setattr(preemption, "_requested", False)  # the requeued job: a fresh process
    run_pipeline(cfg)  # the rerun evaluates again from the start (test_time keeps no checkpoint)
    assert json.loads((stage / "stage.json").read_text())["status"] == "completed"
    assert len(calls) == 1 + (2 if method == "power" else 6)
    assert 0.0 <= json.loads((stage / "metrics.json").read_text())[f"accuracy/{method}"] <= 1.0
