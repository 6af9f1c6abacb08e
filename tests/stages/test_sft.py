"""The sft stage through the real entry point, on preset=smoke: full fine-tuning in the chain,
and each PEFT method from the shared smoke pretrain run."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import ROOT, python_in_fresh_process, run_cli

EXPECTED_METRICS = {
    "eval_loss", "eval_accuracy", "eval_accuracy_sampled", "trainable_parameters", "total_parameters",
    "train_loss", "train_loss_first", "train_tokens", "tokens_per_second",
}


def metrics(stage: Path) -> dict:
    return json.loads((stage / "metrics.json").read_text())


def generate_in_fresh_process(load: str) -> list[str]:
    """Load a model with `load` (code that sets `model`, `tok`), answer a chat prompt greedily."""
    return python_in_fresh_process(f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
{load}
prompt = tok.apply_chat_template([{{"role": "user", "content": "12+34=?"}}], tokenize=False, add_generation_prompt=True)
batch = tok([prompt, prompt], return_tensors="pt", add_special_tokens=False)
out = model.generate(**batch, max_new_tokens=8, do_sample=False)
print(type(model).__name__, out.shape[0], out.shape[1] > batch["input_ids"].shape[1])
""").split()


def test_full_sft_in_the_chain(smoke_chain_run):
    """sft inside the one-command chain (tests/conftest.py): full fine-tuning from pretrain's final/."""
    run_dir = smoke_chain_run
    stage = run_dir / "sft"
    result = metrics(stage)
    assert EXPECTED_METRICS <= result.keys()
    assert result["train_loss"] < result["train_loss_first"] - 0.2, result  # full fine-tuning learns fast
    assert result["trainable_parameters"] == result["total_parameters"]
    assert 0.0 <= result["eval_accuracy"] <= 1.0 and 0.0 <= result["eval_accuracy_sampled"] <= 1.0
    manifest = json.loads((stage / "stage.json").read_text())
    assert manifest["status"] == "completed" and manifest["input"] == str(run_dir / "pretrain" / "final")
    assert "| sft | completed |" in (run_dir / "report.md").read_text()
    assert not (stage / "final" / "adapter").exists()
    final = stage / "final"
    out = generate_in_fresh_process(f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(final)!r})
tok = AutoTokenizer.from_pretrained({str(final)!r})
""")
    assert out == ["Qwen3MoeForCausalLM", "2", "True"]


@pytest.fixture(scope="module", params=["lora", "prefix", "prompt"])
def adapter_run(request, smoke_pretrain_run, tmp_path_factory) -> tuple[str, Path, Path]:
    """(method, the pretrain final/ it started from, its sft stage dir)"""
    method = request.param
    run_dir = tmp_path_factory.mktemp(f"sft-{method}") / "run"
    pretrain_final = smoke_pretrain_run / "pretrain" / "final"
    run_cli("preset=smoke", f"run.dir={run_dir}", "run.stages=[sft]", f"stages.sft.init={pretrain_final}", f"peft={method}")
    return method, pretrain_final, run_dir / "sft"


def test_adapter_lowers_loss_and_trains_only_itself(adapter_run):
    method, pretrain_final, stage = adapter_run
    result = metrics(stage)
    assert EXPECTED_METRICS <= result.keys()
    assert result["train_loss"] < result["train_loss_first"], result
    assert 0 < result["trainable_parameters"] < 0.2 * result["total_parameters"]
    final = stage / "final"
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    if method != "lora":  # the frozen base is handed off unchanged, bit for bit
        before, after = load_file(pretrain_final / "model.safetensors"), load_file(final / "base" / "model.safetensors")
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before)
        assert load_file(final / "adapter_model.safetensors").keys() == adapter.keys()
        return
    # LoRA: final/ is the merged model; it must equal the untouched base plus the adapter's
    # update, and weights LoRA does not target must be bit-identical to the input. Compared as
    # loaded models: on disk transformers writes MoE experts one by one, in memory they are 3D.
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)

    def load(path: Path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    before, merged = load(pretrain_final).state_dict(), load(final).state_dict()
    expected = PeftModel.from_pretrained(load(pretrain_final), final / "adapter").merge_and_unload().state_dict()
    targeted = ("q_proj", "k_proj", "v_proj", "o_proj", "experts.gate_up_proj", "experts.down_proj")
    assert merged.keys() == expected.keys() == before.keys()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
        if not any(t in name for t in targeted):
            assert torch.equal(tensor, before[name]), name
    # the update reaches the fused 3D expert weights, which no module name matches
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        assert merged[name].dim() == 3 and not torch.equal(merged[name], before[name]), name


def test_adapter_final_reloads_and_generates_in_a_fresh_process(adapter_run, tmp_path):
    method, _, stage = adapter_run
    final = stage / "final"
    if method == "lora":  # a plain checkpoint, no project code needed
        out = generate_in_fresh_process(f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(final)!r})
tok = AutoTokenizer.from_pretrained({str(final)!r})
""")
        assert out == ["Qwen3MoeForCausalLM", "2", "True"]
        return
    out = generate_in_fresh_process(f"""
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
model = AutoPeftModelForCausalLM.from_pretrained({str(final)!r})
tok = AutoTokenizer.from_pretrained({str(final)!r})
""")
    assert out == ["PeftModelForCausalLM", "2", "True"]
    moved = shutil.copytree(final, tmp_path / "elsewhere")  # load_policy does not need the run dir
    out = generate_in_fresh_process(f"""
from transformers import AutoTokenizer
from pipeline.models import load_policy
model = load_policy({str(moved)!r})
tok = AutoTokenizer.from_pretrained({str(moved)!r})
""")
    assert out == ["PeftModelForCausalLM", "2", "True"]
