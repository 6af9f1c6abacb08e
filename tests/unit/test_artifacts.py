import json

import pytest

from pipeline import artifacts
from pipeline.evaluate import generated_length, pass_at_k


def make_checkpoint(stage_dir, step, complete=True):
    path = stage_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_text("x")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_resume_checkpoint_is_newest_complete_one(tmp_path):
    assert artifacts.find_resume_checkpoint(tmp_path / "missing") is None
    make_checkpoint(tmp_path, 10)
    best = make_checkpoint(tmp_path, 20)
    make_checkpoint(tmp_path, 30, complete=False)  # killed while saving
    (tmp_path / "checkpoint-40").mkdir()
    (tmp_path / "checkpoint-40" / "trainer_state.json").write_text('{"global_st')  # torn write
    make_checkpoint(tmp_path, 9)  # numeric, not lexical, order
    assert artifacts.find_resume_checkpoint(tmp_path) == best


def test_save_final_is_atomic(tmp_path):
    def good(path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")
        (path / "weights").write_text("v1")

    artifacts.save_final(tmp_path, good)
    assert (tmp_path / "final" / "weights").read_text() == "v1"

    def crashes(path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError):
        artifacts.save_final(tmp_path, crashes)
    assert (tmp_path / "final" / "weights").read_text() == "v1"  # the old final/ is untouched
    artifacts.save_final(tmp_path, good)  # and a later save clears the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


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
