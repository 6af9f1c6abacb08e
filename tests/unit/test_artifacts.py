import json
import time

import pytest
import torch
from safetensors.torch import save_file

from pipeline import artifacts
from pipeline.evaluate import generated_length, pass_at_k


def make_checkpoint(stage_dir, step, complete=True):
    """A checkpoint-N with the files the Trainer writes: weights, optimizer, trainer state."""
    path = stage_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.full((4, 4), float(step))}, path / "model.safetensors")
    torch.save({"state": {0: torch.zeros(16)}}, path / "optimizer.pt")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_resume_checkpoint_is_newest_complete_one(tmp_path):
    assert artifacts.find_resume_checkpoint(tmp_path / "missing") is None
    make_checkpoint(tmp_path, 10)
    best = make_checkpoint(tmp_path, 20)
    make_checkpoint(tmp_path, 30, complete=False)  # killed while saving
    (tmp_path / "checkpoint-40").mkdir()
    (tmp_path / "checkpoint-40" / "trainer_state.json").write_text('{"global_st')  # torn write
    make_checkpoint(tmp_path, 9)  # numeric, not lexical, order
    assert artifacts.find_resume_checkpoint(tmp_path) == best


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda c: truncate(c / "model.safetensors"), "model.safetensors"),
        (lambda c: truncate(c / "model.safetensors", keep=0.999), "model.safetensors"),
        (lambda c: (c / "model.safetensors").write_bytes(b"\xff" * 64), "model.safetensors"),
        (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt"),
        (lambda c: (c / "optimizer.pt").write_bytes(b""), "optimizer.pt"),
        (lambda c: (c / "model.safetensors").unlink() or (c / "optimizer.pt").unlink(), "no weights"),
    ],
)
def test_a_damaged_newest_checkpoint_is_passed_over_with_the_file_named(tmp_path, damage, named):
    good = make_checkpoint(tmp_path, 10)
    newest = make_checkpoint(tmp_path, 20)
    damage(newest)
    checkpoint, unusable = artifacts.scan_checkpoints(tmp_path)
    assert checkpoint == good
    assert [p for p, _ in unusable] == [newest] and named in unusable[0][1]


def test_save_final_stays_pending_until_committed(tmp_path):
    def good(version):
        def save(path):
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.json").write_text("{}")
            (path / "weights").write_text(version)
        return save

    artifacts.save_final(tmp_path, good("v1"))
    assert not (tmp_path / "final").exists()  # nothing final until the stage's metrics are in
    artifacts.commit_final(tmp_path, {"config_hash": "h1", "metrics": {"eval_loss": 1.0}})
    assert (tmp_path / "final" / "weights").read_text() == "v1"
    assert artifacts.final_record(tmp_path) == {"config_hash": "h1", "metrics": {"eval_loss": 1.0}}

    def crashes(path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError):
        artifacts.save_final(tmp_path, crashes)
    assert (tmp_path / "final" / "weights").read_text() == "v1"  # the old final/ is untouched
    artifacts.save_final(tmp_path, good("v2"))  # a later save clears the leftover
    artifacts.commit_final(tmp_path, {"config_hash": "h2", "metrics": {}})
    assert (tmp_path / "final" / "weights").read_text() == "v2"
    superseded = list((tmp_path.parent / "superseded").iterdir())  # the replaced final/ is kept
    assert [(p / "weights").read_text() for p in superseded] == ["v1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_fingerprint_follows_content_and_is_fast_on_large_files(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a"}\n' * 1000)
    first = artifacts.fingerprint(data)
    assert artifacts.fingerprint(data) == first
    data.write_text('{"text": "b"}\n' * 1000)  # same size, same path, new content
    assert artifacts.fingerprint(data) != first
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # 1 GiB (sparse)
    start = time.perf_counter()
    artifacts.fingerprint(tmp_path)
    assert time.perf_counter() - start < 1.0


def test_json_writes_are_atomic_and_hash_is_stable(tmp_path):
    artifacts.write_json_atomic(tmp_path / "m.json", {"b": 1, "a": 2})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 2, "b": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
    assert artifacts.config_hash({"a": 1, "b": [1, 2]}) == artifacts.config_hash({"b": [1, 2], "a": 1})
    assert artifacts.config_hash({"a": 1}) != artifacts.config_hash({"a": 2})


def test_pass_at_k_matches_definition():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 5) == 1.0


def test_generated_length_stops_at_first_stop_token():
    import torch

    assert generated_length(torch.tensor([5, 6, 2, 0, 0]), [2, 3]) == 3
    assert generated_length(torch.tensor([5, 3, 2, 0]), [2, 3]) == 2
    assert generated_length(torch.tensor([5, 6, 7]), [2]) == 3  # ran to the limit
