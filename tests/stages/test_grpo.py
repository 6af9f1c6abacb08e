"""The grpo stage on preset=smoke: the pretrain -> sft -> grpo chain through the real entry
point, and (in process, from that chain's sft final/) that training moves the policy and leaves
the reference alone, for full fine-tuning and LoRA; the reward-model reward; resume."""

import json
from types import SimpleNamespace
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipeline import artifacts, rewards
from pipeline.adapters import build_peft_config
from pipeline.models import load_model, save_policy
from pipeline.tasks import build_task
from pipeline.tokenizer import load_chat_tokenizer, stop_token_ids
from pipeline.errors import ConfigError
from pipeline.pass_rate_curve import CURVE_FILE
from pipeline.prompt_filter import FILTER_FILE
from stages.grpo import build_dataset, build_trainer, training_args, training_prompts
from tests.conftest import compose_config, run_cli

EXPECTED_METRICS = {
    "eval_accuracy", "eval_accuracy_sampled", "reward_mean", "kl", "scaling_fit_ok", "scaling_points",
    "step_time_s", "generation_share", "trainable_parameters", "total_parameters",
}
FIT_METRICS = {"scaling_A", "scaling_B", "scaling_C_mid", "scaling_R0", "scaling_rmse"}


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("grpo") / "run"
    run_cli("run.stages=[pretrain,sft,grpo]", "preset=smoke", f"run.dir={run_dir}")
    return run_dir


def test_chain_pretrain_sft_grpo_in_one_command(chain):
    stage = chain / "grpo"
    metrics = json.loads((stage / "metrics.json").read_text())
    assert EXPECTED_METRICS <= metrics.keys(), metrics
    assert FIT_METRICS <= metrics.keys() if metrics["scaling_fit_ok"] else not FIT_METRICS & metrics.keys()
    assert metrics["train_steps"] == 6 and metrics["trainable_parameters"] == metrics["total_parameters"]
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and 0.0 <= metrics["eval_accuracy_sampled"] <= 1.0
    assert metrics["kl"] >= 0.0 and 0.0 < metrics["generation_share"] < 1.0 and metrics["step_time_s"] > 0
    manifest = json.loads((stage / "stage.json").read_text())
    assert manifest["status"] == "completed" and manifest["input"] == str(chain / "sft" / "final")

    # the held-out curve: a point before training and one per step, compute strictly increasing
    points = [json.loads(line) for line in (stage / CURVE_FILE).read_text().splitlines()]
    assert [p["step"] for p in points] == list(range(7)) and metrics["scaling_points"] == 7
    assert points[0]["compute"] == 0 and all(b["compute"] > a["compute"] for a, b in zip(points, points[1:]))
    assert all(p["compute"] == 2 * p["tokens"] for p in points)  # one generation + one training pass

    report = (chain / "report.md").read_text()
    assert "| grpo | completed |" in report and "grpo/scaling_fit.png" in report and "grpo/reward.png" in report

    # final/ is a plain checkpoint that differs from its input and generates with the chat stops
    final, before = stage / "final", chain / "sft" / "final"
    after_weights, before_weights = load_file(final / "model.safetensors"), load_file(before / "model.safetensors")
    assert any(not torch.equal(after_weights[k], before_weights[k]) for k in before_weights)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.output_router_logits is False
    assert model.generation_config.eos_token_id == stop_token_ids(load_chat_tokenizer(final))


def test_beta_zero_holds_no_reference_model(chain, tmp_path):
    """beta 0 (no KL term): TRL builds no reference, so full fine-tuning holds one model."""
    cfg = compose_config(["preset=smoke", "stages.grpo.beta=0"])
    stage_cfg, task = cfg.stages.grpo, build_task(cfg.task)
    sft_final = chain / "sft" / "final"
    tokenizer = load_chat_tokenizer(sft_final)
    model = load_model(str(sft_final.resolve()))
    reward_funcs = rewards.build(stage_cfg, "grpo", task, chain, False, 1)
    args = training_args(stage_cfg, cfg.optim, cfg.peft, tmp_path, cfg.seed, reward_funcs[1])
    trainer = build_trainer(model, tokenizer, build_dataset(task), args, reward_funcs, stage_cfg, None, cfg.optim)
    assert trainer.ref_model is None


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_policy_moves_and_reference_does_not(chain, tmp_path, peft):
    cfg = compose_config(["preset=smoke", f"peft={peft}", "stages.grpo.max_steps=2", "stages.grpo.beta=0.1",
                          "stages.grpo.lr=1e-3"])
    stage_cfg, task = cfg.stages.grpo, build_task(cfg.task)
    sft_final = chain / "sft" / "final"
    tokenizer = load_chat_tokenizer(sft_final)
    tokenizer.padding_side = "left"
    model = load_model(str(sft_final.resolve()))
    reward_funcs = rewards.build(stage_cfg, "grpo", task, chain, False, 1)
    args = training_args(stage_cfg, cfg.optim, cfg.peft, tmp_path, cfg.seed, reward_funcs[1])
    trainer = build_trainer(model, tokenizer, build_dataset(task), args, reward_funcs, stage_cfg,
                            build_peft_config(cfg.peft, model), cfg.optim)
    policy_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    policy_after = dict(trainer.model.named_parameters())
    changed = {n for n, p in policy_after.items() if not torch.equal(p, policy_before[n])}
    kl = [e["kl"] for e in trainer.state.log_history if "kl" in e]
    assert len(kl) == 2 and all(k >= 0 for k in kl)
    untouched = load_model(str(sft_final)).state_dict()
    if peft == "none":
        assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
        assert len(changed) > 0.5 * len(policy_after)
        reference = trainer.ref_model.state_dict()
        assert reference.keys() == untouched.keys()
        assert all(torch.equal(reference[k], untouched[k]) for k in untouched)
        return
    # LoRA: the reference is the base with the adapter disabled; only the adapter trains
    assert trainer.ref_model is None
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # lora_B starts at 0: the update is not a no-op
    with trainer.model.disable_adapter():
        base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                for k, v in trainer.model.state_dict().items() if "lora_" not in k}
    assert base.keys() == untouched.keys()
    assert all(torch.equal(base[k], untouched[k]) for k in untouched)
    # hand-off: the merged model in final/, the adapter in final/adapter/
    handed_off = save_policy(trainer, tokenizer, tmp_path)  # into the pending final/ the runner commits
    pending = tmp_path / artifacts.PENDING_FINAL
    assert (pending / "config.json").is_file() and (pending / "adapter" / "adapter_config.json").is_file()
    assert not isinstance(handed_off, type(trainer.model))


def test_reward_model_scores_the_chat_rendering_of_prompt_and_completion(chain, tmp_path):
    """The reward-model reward, weighted in with the verifier: a tiny sequence classifier built
    here (the reward stage's contract: num_labels=1, pad_token_id set, chat-template tokenizer)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    sft_final = chain / "sft" / "final"
    tokenizer = load_chat_tokenizer(sft_final)
    config = AutoConfig.from_pretrained(sft_final, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    rm_dir = tmp_path / "rm"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)

    cfg = compose_config(["preset=smoke", f"stages.grpo.reward_model={rm_dir}", "stages.grpo.reward_weights.reward_model=0.5"])
    stage_cfg, task = cfg.stages.grpo, build_task(cfg.task)
    funcs, weights = rewards.build(stage_cfg, "grpo", task, chain, False, 1)
    assert weights == [1.0, 1.0, 0.5] and funcs[2].__name__ == "reward_model"
    tokenizer.padding_side = "left"
    args = training_args(stage_cfg, cfg.optim, cfg.peft, tmp_path / "out", cfg.seed, weights)
    trainer = build_trainer(load_model(str(sft_final)), tokenizer, build_dataset(task), args, (funcs, weights), stage_cfg)
    prompts = [[{"role": "user", "content": "47+18-9=?"}]] * 2
    completions = [[{"role": "assistant", "content": "47+18=65\n65-9=56\nA: 56"}], [{"role": "assistant", "content": "A: 7"}]]
    inputs = [{"prompt": p, "answer": "56"} for p in prompts]
    values = trainer._calculate_rewards(inputs, prompts, completions, [[1], [1]])

    assert values[:, 0].tolist() == [1.0, 0.0] and values[:, 1].tolist() == [1.0, 1.0]  # verifier, format "A:"
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            expected = rm(**ids).logits[0, 0].item()
        assert values[i, 2].item() == pytest.approx(expected, abs=1e-4)
    assert values[0, 2] != values[1, 2]


def test_interrupted_run_resumes_and_keeps_its_pass_rate_curve(chain, tmp_path):
    run_dir = tmp_path / "run"
    args = ["preset=smoke", "run.stages=[grpo]", f"stages.grpo.init={chain / 'sft' / 'final'}", f"run.dir={run_dir}"]
    run_cli(*args)
    stage = run_dir / "grpo"
    first = [json.loads(line) for line in (stage / CURVE_FILE).read_text().splitlines()]
    # as if killed after checkpoint-3 was written: no final/, the manifest still says running
    manifest = json.loads((stage / "stage.json").read_text())
    manifest["status"] = "running"
    (stage / "stage.json").write_text(json.dumps(manifest))
    for leftover in ("final", "checkpoint-6"):
        shutil.rmtree(stage / leftover)
    (stage / "metrics.json").unlink()

    out = run_cli(*args)
    assert "resuming from checkpoint-3" in out.stdout
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["train_steps"] == 6 and metrics["scaling_points"] == 7
    points = [json.loads(line) for line in (stage / CURVE_FILE).read_text().splitlines()]
    assert [p["step"] for p in points] == list(range(7))  # steps 0-3 kept, 4-6 measured again, none twice
    assert points[:4] == first[:4]
    assert [p["compute"] for p in points] == sorted(p["compute"] for p in points)  # token count restored


class EasyHalf:
    """The smoke task, cut to 12 RL prompts, with a verifier that passes every completion of the
    even-numbered prompts and none of the odd ones: pass rates 1, 0, 1, 0, ..."""

    def __init__(self, task) -> None:
        self.task, self.prompts = task, task.rl_prompts()[:12]
        self.easy = {p["answer"] for p in self.prompts[::2]} - {p["answer"] for p in self.prompts[1::2]}

    def __getattr__(self, name):
        return getattr(self.task, name)

    def rl_prompts(self):
        return self.prompts

    def verify(self, completion: str, answer: str) -> float:
        return float(answer in self.easy)


def test_prompt_filter_drops_the_prompts_the_policy_always_solves(chain, tmp_path):
    cfg = compose_config(["preset=smoke", "stages.grpo.filter_samples=3", "stages.grpo.batch_size=8"])
    task = EasyHalf(build_task(cfg.task))
    sft_final = chain / "sft" / "final"
    tokenizer = load_chat_tokenizer(sft_final)
    def ctx(config):
        return SimpleNamespace(cfg=config, stage_cfg=config.stages.grpo, task=task, stage_dir=tmp_path)

    data, metrics = training_prompts(load_model(str(sft_final)), tokenizer, ctx(cfg))
    expected = [p["answer"] for p in task.prompts if p["answer"] not in task.easy]
    assert data["answer"] == expected and len(expected) >= 5
    assert data[0]["prompt"] == [{"role": "user", "content": task.prompts[1]["prompt"]}]
    rates = json.loads((tmp_path / FILTER_FILE).read_text())
    assert rates == [0.0 if p["answer"] in expected else 1.0 for p in task.prompts]
    assert metrics["filter_kept_prompts"] == len(expected) and metrics["filter_prompts"] == 12
    assert metrics["filter_pass_rate_mean"] == pytest.approx(1 - len(expected) / 12)

    # a resumed run reads the saved rates (here: made-up ones) instead of sampling again
    (tmp_path / FILTER_FILE).write_text(json.dumps([0.5] * 11 + [1.0]))
    again, _ = training_prompts(None, tokenizer, ctx(cfg))
    assert again["answer"] == [p["answer"] for p in task.prompts[:11]]
    # too few prompts left for one step (8 completions / 4 per group = 2 prompts): a clear error
    (tmp_path / FILTER_FILE).write_text(json.dumps([1.0] * 11 + [0.0]))
    with pytest.raises(ConfigError, match=r"kept 1 of 12 RL prompts .* fewer than the 2 one step takes"):
        training_prompts(None, tokenizer, ctx(cfg))
    # without the filter every prompt trains
    plain, none = training_prompts(None, tokenizer, ctx(compose_config(["preset=smoke"])))
    assert len(plain) == 12 and none == {}


def test_grpo_and_test_time_generate_with_continuous_batching(chain, tmp_path):
    """generation.engine=continuous_batching: grpo's rollouts through TRL's continuous batching and
    every sampling place of grpo and test_time through generate_batch; recorded in metrics.json."""
    run = tmp_path / "run"
    done = run_cli("preset=smoke", "run.stages=[grpo,test_time]", f"run.dir={run}", "trainer.report_to=none",
                   f"stages.grpo.init={chain / 'sft' / 'final'}", "generation.engine=continuous_batching",
                   "+generation.continuous_batching.num_blocks=64", "+generation.continuous_batching.max_batch_tokens=512",
                   "stages.test_time.methods=[greedy,sample]")
    grpo = json.loads((run / "grpo" / "metrics.json").read_text())
    assert grpo["generation_engine"] == "continuous_batching" and grpo["train_steps"] == 6
    assert grpo["rollout_tokens"] > 0 and 0.0 < grpo["generation_share"] < 1.0
    test_time = json.loads((run / "test_time" / "metrics.json").read_text())
    assert test_time["generation_engine"] == "continuous_batching" and "accuracy/sample" in test_time
    assert "stage test_time: completed" in done.stdout
