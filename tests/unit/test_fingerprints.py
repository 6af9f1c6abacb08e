"""A stage's config hash covers its inputs' content: a data file or an input checkpoint rewritten
at the same path reruns the stages that depend on it, and nothing else."""

import json
import shutil

from pipeline.runner import plan_stages
from tests.conftest import compose_config


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def hashes(overrides, run_dir) -> dict[str, str]:
    return {plan.name: plan.config_hash for plan in plan_stages(compose_config(overrides), run_dir)}


def test_a_rewritten_data_file_reruns_the_stages_that_read_it(tmp_path):
    corpus, sft, held_out = tmp_path / "corpus.jsonl", tmp_path / "sft.jsonl", tmp_path / "eval.jsonl"
    write_jsonl(corpus, [{"text": f"{a}+{a}={2 * a}"} for a in range(50)])
    write_jsonl(sft, [{"prompt": f"{a}+1", "completion": str(a + 1)} for a in range(50)])
    write_jsonl(held_out, [{"prompt": f"{a}+2", "answer": str(a + 2)} for a in range(10)])
    overrides = ["preset=smoke", "task=jsonl", "run.stages=[pretrain,sft]", f"task.splits.pretrain={corpus}",
                 f"task.splits.sft={sft}", f"task.splits.eval={held_out}"]
    before = hashes(overrides, tmp_path / "run")
    assert hashes(overrides, tmp_path / "run") == before  # planning is repeatable

    write_jsonl(sft, [{"prompt": f"{a}+1", "completion": str(a + 2)} for a in range(50)])  # same path, same size
    after_sft = hashes(overrides, tmp_path / "run")
    assert after_sft["pretrain"] == before["pretrain"] and after_sft["sft"] != before["sft"]

    write_jsonl(corpus, [{"text": f"{a}+{a}={2 * a} "} for a in range(50)])
    after_corpus = hashes(overrides, tmp_path / "run")
    # pretrain reads the corpus; sft starts from pretrain's final/, so it reruns too
    assert after_corpus["pretrain"] != after_sft["pretrain"] and after_corpus["sft"] != after_sft["sft"]


def test_a_rewritten_input_checkpoint_reruns_the_stage(smoke_pretrain_run, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(smoke_pretrain_run / "pretrain" / "final", model)
    overrides = ["preset=smoke", "run.stages=[sft]", f"stages.sft.init={model}"]
    before = hashes(overrides, tmp_path / "run")
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)  # new weights at the same path, same size
    weights.write_bytes(bytes(data))
    assert hashes(overrides, tmp_path / "run")["sft"] != before["sft"]
