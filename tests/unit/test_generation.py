"""pipeline/generation.py: the generation engine. Continuous batching answers as padded
`generate` does (token for token when greedy, in distribution when sampling), stops at the chat
template's end-of-turn marker, and every place that samples follows the stage's engine; bad
engine settings stop before compute."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf
from transformers import Qwen3Config, Qwen3ForCausalLM

from pipeline import generation
from pipeline.errors import ConfigError
from pipeline.evaluate import EvalSettings, evaluate, evaluate_policy, generate
from pipeline.generation import Engine
from pipeline.tasks import build_task
from pipeline.tokenizer import IM_END, train_tokenizer
from tests.conftest import CONF

CB = Engine("continuous_batching", {"num_blocks": 32, "max_batch_tokens": 256, "page_size": 32})
TEXTS = [f"Q: {a}+{b}=?\n{a}+{b}={a + b}\nA: {a + b}\n" for a in range(10, 60) for b in range(10, 60, 7)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, 300, tools=True)  # renders plain chats as the default one, and tools


def tiny_model(tokenizer, sharpen: float = 1.0, end_of_turn_bias: float = 0.0, seed: int = 0):
    """A random tiny Qwen3; `end_of_turn_bias` is added to <|im_end|>'s logit (some answers end there)."""
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
        head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.convert_tokens_to_ids(IM_END)] = end_of_turn_bias
        model.lm_head = head
    return model


def chat(tokenizer, questions: list[str]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in questions]


def test_greedy_continuous_batching_equals_generate_token_for_token_and_stops_at_the_end_of_turn(tokenizer):
    model = tiny_model(tokenizer, sharpen=3.0, end_of_turn_bias=0.8)
    prompts = chat(tokenizer, ["12+34=?", "5=?", "47+18-9+33-21=?", "1+1=?", "56-7=?", "23+45+11=?"])
    padded = generate(model, tokenizer, prompts, max_new_tokens=20, batch_size=4, skip_special_tokens=False)
    continuous = generate(model, tokenizer, prompts, max_new_tokens=20, batch_size=4, skip_special_tokens=False, engine=CB)
    assert continuous == padded
    texts, counts = continuous
    ended = [t[0].endswith(IM_END) for t in texts]
    assert any(ended) and not all(ended)  # some answers end at the marker, the others run to the limit
    assert {c[0] for c, e in zip(counts, ended) if not e} == {20}


def test_sampled_continuous_batching_follows_the_models_distribution(tokenizer):
    """The first token of 1500 samples at temperature 1, against the model's exact next-token
    distribution (decoded; tokens below 1% pooled): as close as padded generate's."""
    model = tiny_model(tokenizer, sharpen=15.0)
    prompt = chat(tokenizer, ["47+18=?"])
    with torch.no_grad():
        ids = tokenizer(prompt[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
        p = torch.softmax(model(input_ids=ids).logits[0, -1].double(), -1)
    exact: Counter = Counter()
    for token, q in enumerate(p.tolist()):
        exact[tokenizer.decode([token], skip_special_tokens=False)] += q
    common = {t for t, q in exact.items() if q >= 0.01}
    assert len(common) > 5  # a distribution worth sampling from

    def pooled(counts: dict) -> Counter:
        out: Counter = Counter()
        for text, q in counts.items():
            out[text if text in common else "other"] += q
        return out

    target, distances = pooled(exact), {}
    for name, engine in (("generate", Engine()), ("continuous_batching", CB)):
        torch.manual_seed(0)
        (texts,), _ = generate(model, tokenizer, prompt, temperature=1.0, num_samples=1500, max_new_tokens=1,
                               batch_size=1, skip_special_tokens=False, engine=engine)
        seen = pooled({t: c / 1500 for t, c in Counter(texts).items()})
        distances[name] = 0.5 * sum(abs(seen[t] - target[t]) for t in set(seen) | set(target))
    # 1500 draws over these 12 categories: 0.043 (generate) and 0.039 (continuous batching) with this seed
    assert distances["continuous_batching"] < 0.06 and distances["generate"] < 0.06, distances


def arithmetic_task():
    cfg = OmegaConf.load(CONF / "task" / "arithmetic.yaml")
    cfg.update({"n_pretrain": 50, "n_sft": 20, "n_preference": 10, "n_rl": 12, "n_eval": 6})
    return build_task(cfg)


def stage_cfg(**keys):
    return OmegaConf.create({"pair_prompts": 3, "samples_per_prompt": 2, "sample_temperature": 1.0, "max_new_tokens": 6,
                             "eval_batch_size": 4, **keys})


def place_held_out(model, tokenizer, task):
    evaluate_policy(model, tokenizer, task, EvalSettings(3, 2, 6, 4), seed=0)


def place_prompt_filter(model, tokenizer, task):
    from pipeline.prompt_filter import prompt_pass_rates

    prompt_pass_rates(model, tokenizer, task, task.rl_prompts()[:3], samples=2, temperature=1.0, max_new_tokens=6,
                      batch_size=4, seed=0)


def place_pass_rate_curve(model, tokenizer, task, tmp_path):
    from types import SimpleNamespace

    from pipeline.pass_rate_curve import PassRateCurve

    curve = PassRateCurve(lambda m: evaluate(m, tokenizer, task, task.eval_problems()[:3], temperature=1.0,
                                             max_new_tokens=6).accuracy, 1, 1, tmp_path / "curve.jsonl", 0)
    curve.record(SimpleNamespace(global_step=0, num_input_tokens_seen=0), model)


def place_on_policy_pairs(model, tokenizer, task):
    from pipeline.policy_pairs import sample_pairs

    sample_pairs(model, tokenizer, task, stage_cfg(), seed=0)


def place_test_time(model, tokenizer, task):
    from pipeline.sampling import TestTimeSettings, run_method

    for method in ("greedy", "sample", "majority_vote"):
        run_method(method, model, tokenizer, task, task.eval_problems()[:3],
                   TestTimeSettings(num_samples=2, max_new_tokens=6, batch_size=4))


def place_tool_loop(model, tokenizer, task):
    from pipeline.tasks.arithmetic import calculator
    from pipeline.tool_loop import ToolSetup

    ToolSetup((calculator,), max_iterations=1).generate(model, tokenizer, ["12+34=?"], [{"answer": "46"}],
                                                       max_new_tokens=6, batch_size=4)


PLACES = {"held-out evaluation": place_held_out, "prompt filter": place_prompt_filter,
          "pass-rate curve": place_pass_rate_curve, "on-policy pairs": place_on_policy_pairs,
          "test_time sampling methods": place_test_time, "tool loop": place_tool_loop}


@pytest.mark.parametrize("place", sorted(PLACES))
def test_every_place_that_samples_follows_the_stages_engine(tokenizer, place, tmp_path, monkeypatch):
    model, task = tiny_model(tokenizer), arithmetic_task()
    calls = {"generate": 0, "generate_batch": 0}
    for method in calls:
        original = getattr(model, method)

        def spy(*args, _original=original, _method=method, **kwargs):
            calls[_method] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(model, method, spy)
    run = PLACES[place]
    arguments = (model, tokenizer, task, tmp_path) if place == "pass-rate curve" else (model, tokenizer, task)
    run(*arguments)  # outside a stage: padded generate
    assert calls["generate"] > 0 and calls["generate_batch"] == 0
    calls.update(generate=0)
    with generation.using(CB):  # what the runner does around a stage with engine continuous_batching
        run(*arguments)
    assert calls["generate_batch"] > 0 and calls["generate"] == 0


def test_grpo_rollouts_take_the_engine_as_trl_fields(monkeypatch):
    assert Engine().trl_fields() == {}
    fields = CB.trl_fields()
    assert fields["use_transformers_continuous_batching"] and fields["transformers_continuous_batching_config"]["num_blocks"] == 32
    # on a machine without a GPU an unsized paged cache takes a small share of the memory, not transformers' 60%
    assert Engine("continuous_batching").continuous_batching_options() == {"max_memory_percent": generation.CPU_CACHE_SHARE}
    server = Engine("vllm", vllm={"mode": "server", "server_base_url": "http://node1:8000", "server_timeout_s": 60}).trl_fields()
    assert server == {"use_vllm": True, "vllm_mode": "server", "vllm_importance_sampling_correction": True,
                      "vllm_server_base_url": "http://node1:8000", "vllm_server_timeout": 60.0}
    colocate = Engine("vllm", vllm={"gpu_memory_utilization": 0.4, "enable_sleep_mode": True}).trl_fields()
    assert colocate["vllm_mode"] == "colocate" and colocate["vllm_gpu_memory_utilization"] == 0.4
    assert colocate["vllm_enable_sleep_mode"] and Engine("vllm").sampler == "generate"

    # the server the sbatch scripts started comes through the environment (the config hash stays put)
    monkeypatch.setenv(generation.SERVER_ENV, "http://gpu-a01:8123")
    started = Engine("vllm", vllm={"mode": "server", "server_host": "elsewhere"})
    assert started.trl_fields()["vllm_server_base_url"] == started.server_url == "http://gpu-a01:8123"


def test_a_server_mode_stage_waits_for_the_server_and_names_the_fix_when_none_answers(monkeypatch):
    """The health route answers after a delay (refused, then 503, then 200): the wait returns.
    A closed port: a bounded wait, then an error naming the address, the timeout field and what
    to check."""
    ready_at = time.monotonic() + 0.6

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" and time.monotonic() >= ready_at else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health, bind_and_activate=False)
    server.server_bind()  # the port is taken, and refuses connections until the server listens

    def serve():
        time.sleep(0.3)
        server.server_activate()
        server.serve_forever(poll_interval=0.05)

    threading.Thread(target=serve, daemon=True).start()
    try:
        waited = generation.wait_for_server(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=20, interval_s=0.1)
    finally:
        server.shutdown()
        server.server_close()
    assert 0.6 <= waited < 10

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.delenv(generation.SERVER_ENV, raising=False)
    engine = Engine("vllm", vllm={"mode": "server", "server_host": "127.0.0.1", "server_port": port, "server_timeout_s": 0.5})
    start = time.monotonic()
    with pytest.raises(generation.ServerUnavailable, match=rf"no vLLM server answered at 127.0.0.1:{port} .* within "
                       r"generation.vllm.server_timeout_s=0.5s .*Check the server's log .*`trl vllm-serve"):
        engine.wait_for_server()
    assert time.monotonic() - start < 5
    Engine().wait_for_server()  # not server mode: returns at once


@pytest.mark.parametrize("engine, message", [
    (Engine("paged"), r"generation.engine \(stages.grpo.generation.engine\)='paged' is unknown; valid: generate, "
                      r"continuous_batching, vllm"),
    (Engine("continuous_batching", {"blocks": 3}), r"generation.continuous_batching=\{'blocks': 3\}: .*ContinuousBatchingConfig"),
    (Engine("vllm", vllm={"mode": "remote"}), r"generation.vllm.mode='remote'; valid: colocate, server"),
])
def test_bad_engine_settings_are_refused_before_compute(engine, message):
    with pytest.raises(ConfigError, match=message):
        generation.check(engine, "grpo")


def test_vllm_without_the_package_or_a_gpu_is_refused_naming_the_fix(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else object())
    with pytest.raises(ConfigError, match=r"the vllm package is not installed; pip install -e '.\[vllm\]'"):
        generation.check(Engine("vllm"), "grpo")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(generation.metadata, "version", lambda name: {"vllm": "0.10.0", "trl": "1.16.0"}[name])
    with pytest.raises(ConfigError, match=r"vllm 0.10.0 is outside the range TRL 1.16.0 supports \(0.22.0 to 0.31.0\)"):
        generation.check(Engine("vllm"), "grpo")
    monkeypatch.setattr(generation.metadata, "version", lambda name: {"vllm": "0.25.0", "trl": "1.16.0"}[name])
    with pytest.raises(ConfigError, match=r"needs a CUDA GPU, and this machine has none"):
        generation.check(Engine("vllm"), "grpo")


def test_the_vllm_extra_is_the_range_trl_supports():
    import tomllib

    from tests.conftest import ROOT

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    low, high = generation.vllm_range()
    assert extras["vllm"] == [f"vllm>={low},<={high}"]
