"""The run directory contract (DESIGN.md section 3): manifests, metrics, atomic writes, checkpoints.

    <run.dir>/<stage>/stage.json     status, input, config hash, times, versions
    <run.dir>/<stage>/metrics.json   flat numbers
    <run.dir>/<stage>/checkpoint-N/  trainer state to resume from
    <run.dir>/<stage>/final/         plain HF checkpoint for the next stage

Everything that another process or a later run trusts is written to a temporary sibling and
renamed into place, so a kill at any moment leaves either the old file or the new one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import secrets
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline import distributed

MANIFEST = "stage.json"
METRICS = "metrics.json"
FINAL = "final"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
VERSIONED = ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets", "tokenizers", "hydra-core")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a temporary sibling, fsync it, rename it over `path`. On any error (a full disk
    shows up at write, flush or fsync) the temporary file is removed and the error re-raised,
    leaving `path` as it was."""
    fd, tmp = _create_temp_sibling(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_temp_sibling(path: Path) -> tuple[int, Path]:
    """(fd, path) of a new `.<name>.<random>.tmp` next to `path`. Created with mode 0o666 so the
    kernel applies the umask, as for any file a user creates (mkstemp's files are 0600, and the
    rename would carry that mode onto the manifest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def rewrite_in_place(path: Path, text: str) -> None:
    """Overwrite an existing file's bytes where they lie, with no temporary file: the last
    resort when the disk is full. Needs no free space while the text fits the blocks the file
    already holds (a shorter text always does on ext4 and xfs; copy-on-write filesystems such
    as btrfs and ZFS may still refuse). Not atomic: a kill midway leaves a torn file, which
    read_json reads as no file."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY)  # no O_CREAT, no O_TRUNC: keep the file's blocks
    try:
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], written)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def record_manifest(stage_dir: Path, manifest: dict) -> None:
    """write_manifest for a stage's end (failed, preempted): if the atomic write fails (a full
    disk), rewrite the existing manifest in place, compactly, so it does not stay `running`.
    Raises the atomic write's error if that fails too."""
    try:
        write_manifest(stage_dir, manifest)
    except OSError as err:
        try:
            rewrite_in_place(stage_dir / MANIFEST, json.dumps(manifest, sort_keys=True, separators=(",", ":")) + "\n")
        except OSError:
            raise err from None


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def config_hash(data: Any) -> str:
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def read_manifest(stage_dir: Path) -> dict | None:
    return read_json(stage_dir / MANIFEST)


def write_manifest(stage_dir: Path, manifest: dict) -> None:
    write_json_atomic(stage_dir / MANIFEST, manifest)


def write_metrics(stage_dir: Path, metrics: dict[str, float]) -> None:
    write_json_atomic(stage_dir / METRICS, metrics)


def read_metrics(stage_dir: Path) -> dict | None:
    return read_json(stage_dir / METRICS)


def is_complete_checkpoint(path: Path) -> bool:
    """The HF Trainer writes trainer_state.json last, so its presence (and validity) marks a
    checkpoint whose model, optimizer, scheduler and RNG files are all on disk."""
    return read_json(path / "trainer_state.json") is not None


def find_resume_checkpoint(stage_dir: Path) -> Path | None:
    """The newest complete checkpoint-N under the stage dir; a half-written one is ignored."""
    if not stage_dir.is_dir():
        return None
    steps = sorted(
        ((int(m.group(1)), p) for p in stage_dir.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()),
        reverse=True,
    )
    return next((p for _, p in steps if is_complete_checkpoint(p)), None)


def is_hf_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def save_final(stage_dir: Path, save_fn) -> Path:
    """Write final/ atomically: `save_fn(tmp_dir)` fills a temporary sibling, which is then
    renamed into place (an older final/ is moved aside first and removed after).

    Called on every rank: sharded models (ZeRO-3, FSDP) need all ranks to gather the weights,
    so the temporary path is the same on all of them and only the main process renames.
    """
    final = stage_dir / FINAL
    tmp = stage_dir / ".final.tmp"
    if distributed.is_main_process() and tmp.exists():
        shutil.rmtree(tmp)  # left by a killed run; never trusted
    distributed.barrier()
    save_fn(tmp)
    distributed.barrier()
    if distributed.is_main_process():
        old = stage_dir / ".final.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def archive_stage_dir(stage_dir: Path, reason: str) -> Path:
    """Move a stage directory aside (never delete a user's results) and return where it went."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = stage_dir.parent / "superseded" / f"{stage_dir.name}-{stamp}-{reason}"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(stage_dir, target)
    return target
