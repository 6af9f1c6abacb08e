"""Real model families (model=qwen3|qwen3_moe|llama3|smollm2, model=hf): each family's code path
offline on a tiny random checkpoint of its architecture, hub names through the hub cache, and a
pretrained model's chain with none of the demo's tuning."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.runner import plan_stages
from tests.conftest import CONF, compose_config, run_cli
from tests.tiny_models import FAMILIES, save_tiny_family

HUB_NAMES = {"qwen3": "Qwen/Qwen3-0.6B", "qwen3_moe": "Qwen/Qwen3-30B-A3B", "llama3": "meta-llama/Llama-3.2-1B-Instruct",
             "smollm2": "HuggingFaceTB/SmolLM2-360M-Instruct"}
# smoke sizes on the family's own trainer settings (sdpa, gradient checkpointing)
FAMILY_RUN = [
    "preset=smoke", "trainer.attn_implementation=sdpa", "trainer.gradient_checkpointing=true", "trainer.report_to=none",
    "run.stages=[sft,dpo,grpo,test_time]",
    "stages.sft.max_steps=6", "stages.sft.save_steps=6", "stages.sft.eval_steps=6", "stages.sft.logging_steps=2",
    "stages.sft.eval_problems=8", "stages.sft.eval_samples=1",
    "stages.dpo.max_steps=4", "stages.dpo.save_steps=4", "stages.dpo.eval_steps=4", "stages.dpo.logging_steps=2",
    "stages.dpo.eval_problems=8", "stages.dpo.eval_samples=1", "stages.dpo.eval_pairs=8",
    "stages.grpo.max_steps=2", "stages.grpo.save_steps=2", "stages.grpo.eval_problems=8", "stages.grpo.eval_samples=1",
    "stages.grpo.curve_problems=4", "stages.grpo.eval_every=2",
    "stages.test_time.eval_problems=4", "stages.test_time.methods=[greedy,power,majority_vote]",
]


def metrics(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "metrics.json").read_text())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_preset_names_the_hub_model_and_starts_from_pretrained_settings(family):
    cfg = compose_config([f"model={family}"])
    assert cfg.model.path == HUB_NAMES[family]
    assert cfg.trainer.attn_implementation == "sdpa" and cfg.trainer.gradient_checkpointing is True
    assert cfg.trainer.precision == "auto"
    assert "tiny_lr" not in cfg.peft and list(cfg.stages.grpo.train_only) == []
    assert cfg.stages.sft.max_length == 1024 and cfg.peft.lr == 2e-5  # TRL's SFT defaults


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_runs_sft_dpo_grpo_test_time_offline(family, tmp_path):
    """sft starts from model.path (the `model` candidate of its input_stage), then the chain."""
    checkpoint = save_tiny_family(family, tmp_path / family)
    run_dir = tmp_path / "run"
    proc = run_cli(f"model={family}", f"model.path={checkpoint}", f"run.dir={run_dir}", *FAMILY_RUN)
    assert f"stage sft: starting (input: {checkpoint})" in proc.stdout
    sft = metrics(run_dir, "sft")
    assert sft["train_loss"] < sft["train_loss_first"]
    template = FAMILIES[family][2]["template"]
    for stage in ("sft", "dpo", "grpo"):
        final = run_dir / stage / "final"
        assert json.loads((final / "config.json").read_text())["model_type"] == FAMILIES[family][0], stage
        assert (final / "chat_template.jinja").read_text() == template, stage  # the family's, carried through
    assert metrics(run_dir, "dpo")["train_probe_loss"] < metrics(run_dir, "dpo")["train_probe_loss_before"]
    assert {"accuracy/greedy", "accuracy/power", "accuracy/majority_vote"} <= set(metrics(run_dir, "test_time"))


def cache_snapshot(hf_home: Path, repo_id: str, source: Path) -> Path:
    """Lay `source` out in the hub cache as huggingface_hub stores a downloaded snapshot."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_a_hub_name_runs_from_the_hub_cache_and_an_uncached_one_stops_before_compute(tmp_path, monkeypatch):
    hf_home = tmp_path / "hf_home"
    snapshot = cache_snapshot(hf_home, HUB_NAMES["smollm2"], save_tiny_family("smollm2", tmp_path / "smollm2"))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir = tmp_path / "run"
    proc = run_cli("model=smollm2", f"run.dir={run_dir}", "preset=smoke", "run.stages=[sft]", "trainer.report_to=none",
                   "stages.sft.max_steps=2", "stages.sft.save_steps=2", "stages.sft.eval_steps=2", "stages.sft.eval_problems=4",
                   "stages.sft.eval_samples=1")
    assert f"stage sft: starting (input: {snapshot})" in proc.stdout
    assert (run_dir / "sft" / "final" / "config.json").is_file()

    missing = run_cli("model=qwen3", f"run.dir={tmp_path / 'missing'}", "preset=smoke", "run.stages=[sft]", check=False)
    assert missing.returncode == 2
    assert "model.path=Qwen/Qwen3-0.6B is not a local directory, and the Hugging Face hub did not serve it" in missing.stderr
    assert "hf download Qwen/Qwen3-0.6B" in missing.stderr
    assert not (tmp_path / "missing" / "sft").exists()


# a dense pretrained model's whole chain at smoke sizes, every size on the command line: no preset
# but the model's own (pretrained)
HF_SIZES = [
    "task.n_pretrain=300", "task.n_sft=60", "task.n_preference=40", "task.n_rl=20", "task.n_eval=16",
    "trainer.report_to=none",
    *(f"stages.{s}.{k}={v}" for s in ("pretrain", "sft", "reward", "dpo")
      for k, v in dict(batch_size=4, max_steps=3, save_steps=3, eval_steps=3, logging_steps=1).items()),
    "stages.pretrain.seq_len=64", "stages.pretrain.eval_problems=4", "stages.pretrain.max_new_tokens=16",
    "stages.sft.max_length=128", "stages.sft.eval_examples=8", "stages.sft.eval_problems=4", "stages.sft.eval_samples=1",
    "stages.sft.max_new_tokens=16", "stages.reward.max_length=128", "stages.reward.eval_pairs=8",
    "stages.dpo.pairs=task", "stages.dpo.max_length=128", "stages.dpo.eval_pairs=8", "stages.dpo.eval_problems=4",
    "stages.dpo.eval_samples=1", "stages.dpo.max_new_tokens=16",
    "stages.grpo.batch_size=8", "stages.grpo.num_generations=4", "stages.grpo.max_steps=2", "stages.grpo.save_steps=2",
    "stages.grpo.logging_steps=1", "stages.grpo.max_new_tokens=16", "stages.grpo.eval_every=2",
    "stages.grpo.curve_problems=4", "stages.grpo.eval_problems=4", "stages.grpo.eval_samples=1",
    "stages.test_time.eval_problems=4", "stages.test_time.max_new_tokens=16", "stages.test_time.mcmc_steps=1",
    "stages.test_time.num_samples=2",
]


def leaves(node, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        out.update(leaves(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def test_a_dense_hf_model_runs_the_whole_chain_with_no_demo_setting(tmp_path):
    checkpoint = save_tiny_family("qwen3", tmp_path / "qwen3")
    overrides = ["model=hf", f"model.path={checkpoint}"]
    cfg = compose_config(overrides)
    general = compose_config(["preset=none"])  # the stage defaults with no preset over them
    demo = OmegaConf.to_container(OmegaConf.load(CONF / "preset" / "demo.yaml"))
    for key in leaves(demo):
        assert OmegaConf.select(cfg, key) == OmegaConf.select(general, key), key  # the demo left nothing behind
    assert cfg.trainer.attn_implementation == "sdpa" and cfg.trainer.gradient_checkpointing is True
    assert [p.name for p in plan_stages(compose_config(overrides + [f"run.dir={tmp_path / 'plan'}"]), tmp_path / "plan")] == \
        ["pretrain", "sft", "reward", "dpo", "grpo", "test_time"]

    run_dir = tmp_path / "run"
    run_cli(*overrides, f"run.dir={run_dir}", *HF_SIZES)
    for stage in ("pretrain", "sft", "reward", "dpo", "grpo", "test_time"):
        assert json.loads((run_dir / stage / "stage.json").read_text())["status"] == "completed", stage
    assert metrics(run_dir, "pretrain")["train_steps"] == 3
