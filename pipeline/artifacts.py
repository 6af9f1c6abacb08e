"""The run directory contract: manifests, metrics, atomic writes, checkpoints (docs/run_directory.md;
docs/design.md "The run directory" says what other code relies on).

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
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline import distributed

MANIFEST = "stage.json"
METRICS = "metrics.json"
FINAL = "final"
PENDING_FINAL = ".final.tmp"  # a final/ being written, renamed into place by commit_final
FINAL_RECORD = "pipeline_stage.json"  # in final/: the stage, config hash and metrics it came with
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


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint-N cannot be resumed from (a file and what is wrong with it), or None.

    Cheap checks that catch a kill or a full disk mid-save: trainer_state.json (the Trainer
    writes it last) parses; every safetensors file's header parses and its size is what the
    header says; every torch file (optimizer, scheduler, RNG, DeepSpeed states) is a readable
    zip archive, whose directory sits at its end, so a truncated one fails; JSON files parse.
    """
    state = read_json(path / "trainer_state.json")
    if not isinstance(state, dict) or "global_step" not in state:
        return "trainer_state.json is missing or does not parse (the save did not finish)"
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if not any(f.suffix in (".safetensors", ".bin", ".pt") for f in files):
        return "it holds no weights file"
    for file in files:
        problem = None
        if file.suffix == ".safetensors":
            problem = safetensors_problem(file)
        elif file.suffix in (".pt", ".pth", ".bin"):
            try:
                with zipfile.ZipFile(file):
                    pass
            except (zipfile.BadZipFile, OSError) as err:
                problem = f"not a readable torch file ({err})"
        elif file.suffix == ".json" and read_json(file) is None:
            problem = "does not parse as JSON"
        if problem:
            return f"{file.relative_to(path)}: {problem}"
    return None


def safetensors_problem(file: Path) -> str | None:
    """None if the file's header parses and the file is as long as the header says."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or header_len > size - 8:
                return f"{size} bytes, shorter than its header claims"
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as err:
        return f"its header does not parse ({err})"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if size != 8 + header_len + end:
        return f"{size} bytes, but its header describes {8 + header_len + end} (truncated or overwritten)"
    return None


def scan_checkpoints(stage_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint-N that verifies, [(newer checkpoint, why it does not) ...])."""
    if not stage_dir.is_dir():
        return None, []
    steps = sorted(
        ((int(m.group(1)), p) for p in stage_dir.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()),
        reverse=True,
    )
    unusable = []
    for _, path in steps:
        problem = checkpoint_problem(path)
        if problem is None:
            return path, unusable
        unusable.append((path, problem))
    return None, unusable


def find_resume_checkpoint(stage_dir: Path) -> Path | None:
    """The newest checkpoint-N under the stage dir that verifies; half-written ones are passed over."""
    return scan_checkpoints(stage_dir)[0]


def is_hf_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def save_final(stage_dir: Path, save_fn, dtype=None) -> Path:
    """Write the stage's final checkpoint to a temporary sibling of final/ (`save_fn(tmp_dir)`
    fills it) and return that path. The runner renames it into place with commit_final once
    the stage has returned its metrics, so a final/ on disk is always complete and comes with
    the numbers and config hash it was made with.

    Called on every rank: sharded models (ZeRO-3, FSDP) need all ranks to gather the weights,
    so the temporary path is the same on all of them. `dtype` (a torch floating dtype): the
    floating-point weights are stored in it (cast_checkpoint); None keeps what save_fn wrote.
    """
    tmp = stage_dir / PENDING_FINAL
    if distributed.is_main_process() and tmp.exists():
        shutil.rmtree(tmp)  # left by a killed run; never trusted
    distributed.barrier()
    save_fn(tmp)
    if dtype is not None and distributed.is_main_process():
        cast_checkpoint(tmp, dtype)
    distributed.barrier()
    return tmp


def cast_checkpoint(directory: Path, dtype) -> None:
    """Store every floating-point tensor of the safetensors files under `directory` (a model, its
    base/ and adapter/) in `dtype` (a torch dtype), one file at a time, and record the dtype in
    each model config.json. Integer and bool tensors stay as they are."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    stored = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}[str(dtype)]
    for file in sorted(directory.rglob("*.safetensors")):
        if safetensors_header(file)[1] <= {stored}:  # nothing to cast: the file is not read
            continue
        tensors = load_file(file)
        with safe_open(file, "pt") as opened:
            metadata = opened.metadata()
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, file, metadata=metadata)
    for index in directory.rglob("*.safetensors.index.json"):  # its total_size follows the cast
        record = json.loads(index.read_text())
        shards = sorted(set(record.get("weight_map", {}).values()))
        record.setdefault("metadata", {})["total_size"] = sum(safetensors_header(index.parent / s)[0] for s in shards)
        index.write_text(json.dumps(record, indent=2) + "\n")
    name = str(dtype).removeprefix("torch.")
    for config in directory.rglob("config.json"):
        record = json.loads(config.read_text())
        if "model_type" in record and (record.get("dtype") != name or "torch_dtype" in record):  # a model's config
            record["dtype"] = name
            record.pop("torch_dtype", None)
            config.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def safetensors_header(file: Path) -> tuple[int, set[str]]:
    """(bytes of tensor data, the floating-point dtypes: F32, BF16, F16, ...) a safetensors
    file's header declares."""
    with open(file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    entries = [v for k, v in header.items() if k != "__metadata__"]
    size = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in entries)
    return size, {v["dtype"] for v in entries if v["dtype"].startswith(("F", "BF"))}


def commit_final(stage_dir: Path, record: dict) -> Path | None:
    """Main process: put the pending final/ in place with `record` (stage, config hash, metrics)
    inside it; an older final/ moves to superseded/. None when the stage saved no final/."""
    tmp, final = stage_dir / PENDING_FINAL, stage_dir / FINAL
    if not tmp.is_dir():
        return None
    write_json_atomic(tmp / FINAL_RECORD, record)
    apply_umask(tmp)
    if final.exists():
        move_to_superseded(final, stage_dir.parent, f"{stage_dir.name}-final")
    os.replace(tmp, final)
    return final


def apply_umask(folder: Path) -> None:
    """Give the files under folder the umask's permissions, as any file the user creates:
    safetensors writes its files with mode 0600 (unreadable to the user's group where the umask
    would allow it)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~umask | (path.stat().st_mode & 0o111))


def final_record(stage_dir: Path) -> dict | None:
    """The record commit_final left in final/ (None for a final/ without one)."""
    return read_json(stage_dir / FINAL / FINAL_RECORD) if is_hf_checkpoint(stage_dir / FINAL) else None


def move_to_superseded(path: Path, run_dir: Path, label: str) -> Path:
    """Move `path` (a stage dir, a final/, a checkpoint) to <run_dir>/superseded/<label>-<time>
    and return where it went: results are set aside, never deleted."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target, n = run_dir / "superseded" / f"{label}-{stamp}", 1
    while target.exists():
        n += 1
        target = run_dir / "superseded" / f"{label}-{stamp}-{n}"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    return target


def archive_stage_dir(stage_dir: Path, reason: str) -> Path:
    """Move a stage directory aside (never delete a user's results) and return where it went."""
    return move_to_superseded(stage_dir, stage_dir.parent, f"{stage_dir.name}-{reason}")


def fingerprint(path: Path, sample_bytes: int = 1 << 20) -> str:
    """A content fingerprint of a file or directory, cheap for large files: each file's relative
    name, size, modification time and a hash of its first, middle and last `sample_bytes`.
    A rewrite at the same path changes it; a copy elsewhere (new mtime) does too."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if file != path else file.name}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
        with open(file, "rb") as f:
            for offset in sorted({0, max(0, stat.st_size // 2 - sample_bytes // 2), max(0, stat.st_size - sample_bytes)}):
                f.seek(offset)
                digest.update(f.read(sample_bytes))
    return digest.hexdigest()[:16]


def completed_manifest(run_dir: Path, stage: str) -> dict | None:
    """The manifest of a completed stage in run_dir whose final/ is there, else None."""
    manifest = read_manifest(run_dir / stage)
    if manifest and manifest.get("status") == "completed" and is_hf_checkpoint(run_dir / stage / FINAL):
        return manifest
    return None


ERROR_LOG = "error.log"  # in a stage dir: the traceback of its last failure
TRACEBACK_NOTE = "traceback saved to "  # the note the runner adds to a stage's exception


def save_traceback(folder: Path) -> Path | str:
    """The exception being handled, with its traceback, in folder/error.log, or in the system's
    temp dir when folder cannot take it (a full or read-only disk). Returns where it went."""
    import tempfile
    import traceback

    text = traceback.format_exc()
    for path in (Path(folder) / ERROR_LOG, Path(tempfile.gettempdir()) / f"pipeline-{Path(folder).name}-{ERROR_LOG}"):
        try:
            path.write_text(text)
            return path
        except OSError:
            path.unlink(missing_ok=True)  # a full disk leaves the file empty
            continue
    return "not written: no writable place"
