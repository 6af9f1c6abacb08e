"""Stage `test_time`: answer the held-out problems with each test-time method and compare them
side by side (pipeline/sampling.py): greedy, sampling at temperature 1, low temperature
(1/alpha), power sampling (MCMC from p^alpha), majority vote and best-of-N over sampled
candidates. No training and no final/: the outputs are metrics.json, a table (summary.md, also
in the run report) and a bar chart.

Input: the newest policy of the run (input_stage lists grpo, dpo, sft, pretrain in order of
preference; `init` takes any checkpoint or prefix/prompt adapter final/, loaded with
pipeline.models.load_policy; power sampling places prefix/prompt-tuning virtual tokens itself).

best_of_n picks the candidate with the highest reward, a weighted sum configured as grpo's
(pipeline/rewards.py): the reward model (`reward_model: auto` = this run's reward stage) and
functions of your own by import path, called as TRL calls them. The built-ins that read the
reference answer (correct, math) are not offered: best-of-N by the answer is pass@N.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from pipeline import artifacts, distributed, preemption, rewards, tools
from pipeline.models import ADAPTER_CONFIG, is_adapter_checkpoint, load_policy
from pipeline.report import STAGE_SUMMARY, format_value
from pipeline.errors import ConfigError
from pipeline.log import log
from pipeline.sampling import METHODS, VIRTUAL_TOKEN_TYPES, MethodResult, TestTimeSettings, run_method
from pipeline.tokenizer import load_chat_tokenizer
from pipeline.tool_loop import ToolSetup

SPLITS = ("eval",)
USES = ("task", "trainer", "generation")
WRITES_FINAL = False
AUTO = "auto"  # methods: every method the run can score
BEST_OF_N_REWARDS = ("reward_model",)  # the built-in best_of_n offers, beside the user's functions
PROMPT_LEARNING_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT", "CARTRIDGE")


def chosen_methods(cfg, run_dir: Path) -> tuple[list[str], str | None]:
    """(the methods to run, why best_of_n was left out or None). `auto`: every method the run can
    score, so best_of_n only with a reward (the reward stage runs before test_time or has
    completed, a reward_model path, or a function of yours); a list is taken as it is."""
    stage = cfg.stages.test_time
    if isinstance(stage.methods, str):
        if stage.methods != AUTO:
            raise ConfigError(f"stages.test_time.methods={stage.methods}: must be {AUTO} or a list of methods from "
                              f"{', '.join(METHODS)}")
        # power sampling has no tool loop: with tools it is left out (run() says so)
        methods = [m for m in METHODS if not (m == "power" and tool_config(cfg)[0] is not None)]
        try:
            check_best_of_n(cfg, run_dir)
            return methods, None
        except ConfigError as err:
            if str(stage.reward_model) != rewards.AUTO or set(rewards.active(stage)) != {"reward_model"}:
                raise  # a reward the user set up that does not work is an error, not a reason to leave it out
            return [m for m in methods if m != "best_of_n"], str(err)
    return list(stage.methods), None


def tool_config(cfg):
    """(the stage config holding the tools the policy answers with, its name), or (None, None)."""
    return tools.tools_from(cfg, "test_time")


def check_best_of_n(cfg, run_dir: Path) -> None:
    rewards.check(cfg.stages.test_time, "test_time", list(cfg.run.stages), run_dir,
                  BEST_OF_N_REWARDS, why_not=" (correct and math read the reference answer: best-of-N by it is pass@N; "
                                             "format is grpo's)")


def validate(cfg, input_path: Path | None) -> None:
    stage = cfg.stages.test_time
    run_dir = Path(str(cfg.run.dir)).expanduser()
    methods, _ = chosen_methods(cfg, run_dir)
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise ConfigError(
            f"stages.test_time.methods={methods}: list each method once, from {', '.join(METHODS)}, or {AUTO}"
        )
    checks = {
        "alpha": stage.alpha >= 1.0, "mcmc_steps": stage.mcmc_steps >= 0, "block_size": stage.block_size >= 1,
        "num_samples": stage.num_samples >= 1, "max_new_tokens": stage.max_new_tokens >= 1,
        "eval_problems": stage.eval_problems >= 1, "batch_size": stage.batch_size >= 1,
        "sample_temperature": stage.sample_temperature > 0,
    }
    for name, ok in checks.items():
        if not ok:
            raise ConfigError(f"stages.test_time.{name}={stage[name]} is out of range "
                              "(alpha >= 1, mcmc_steps >= 0, temperature > 0, the rest >= 1)")
    tool_cfg, tool_stage = tool_config(cfg)
    if tool_cfg is not None:
        tools.check(tool_cfg, tool_stage)
    if "power" in methods and tool_cfg is not None:
        raise ConfigError(f"stages.test_time.methods lists power, and the policy answers with {tool_stage}'s tools "
                          f"(stages.test_time.tools_from={tool_stage}): power sampling has no tool loop and would measure "
                          "the model without them; drop power from the methods, or set stages.test_time.tools_from=null "
                          "to measure the bare model")
    if "best_of_n" in methods and not isinstance(stage.methods, str):  # auto has checked it already
        check_best_of_n(cfg, run_dir)
    if input_path is None:
        return
    if "power" in methods and is_adapter_checkpoint(input_path):
        peft_type = json.loads((input_path / ADAPTER_CONFIG).read_text()).get("peft_type")
        if peft_type in PROMPT_LEARNING_TYPES and peft_type not in VIRTUAL_TOKEN_TYPES:
            raise ConfigError(
                f"the test_time input {input_path} is a {peft_type} adapter; power sampling places the virtual tokens "
                f"of {' and '.join(VIRTUAL_TOKEN_TYPES)} adapters only. Drop power from stages.test_time.methods, or "
                "evaluate a full, LoRA, prefix or prompt tuning checkpoint"
            )
    try:
        tokenizer = load_chat_tokenizer(input_path, bool(cfg.model.trust_remote_code))
    except ValueError as err:
        raise ConfigError(f"test_time input: {err}") from err
    if tool_cfg is not None:
        tools.check_tokenizer(tokenizer, tool_stage, str(input_path))


def extra_inputs(cfg, run_dir: Path, planned: dict[str, str]) -> str | None:
    """Part of the config hash: the sources of the tools the policy answers with, and when
    best_of_n runs, of the user's reward functions and the reward model's identity (a new reward
    model in the run reruns test_time)."""
    tool_cfg, _ = tool_config(cfg)
    parts = [tools.fingerprint(tool_cfg) if tool_cfg is not None else None]
    if "best_of_n" in chosen_methods(cfg, run_dir)[0]:
        parts.append(rewards.fingerprint(cfg.stages.test_time, run_dir, planned))
    return "|".join(p for p in parts if p) or None


def summary_table(results: list[MethodResult], settings: TestTimeSettings) -> str:
    lines = [
        "## test_time: methods side by side", "",
        f"alpha={settings.alpha:g}, MH steps per block={settings.mcmc_steps}, block={settings.block_size} tokens, "
        f"candidates for vote / best-of-N={settings.num_samples} at T={settings.sample_temperature:g}, "
        f"{results[0].num_problems} held-out problems", "",
        "| method | accuracy | tokens / problem | wall time (s) |", "| --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(f"| {r.method} | {r.accuracy:.3f} | {format_value(r.tokens_per_problem)} | {r.wall_time_s:.1f} |")
    return "\n".join(lines) + "\n"


def plot_methods(results: list[MethodResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar([r.method for r in results], [r.accuracy for r in results], color="tab:blue")
    for bar, r in zip(bars, results):
        ax.annotate(f"{r.accuracy:.3f}\n{r.tokens_per_problem:.0f} tok", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.15)
    ax.set_title("test-time methods (label: accuracy, generated tokens per problem)")
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


SAMPLES_FILE = "samples.jsonl"


def sample_records(results: list[MethodResult], problems: list[dict], task) -> list[dict]:
    """One record per problem: its prompt and reference answer, the candidates that majority
    vote and best-of-N chose among (each with its extracted answer, verdict and reward), and
    what each method kept, so a figure can be checked by reading the file."""
    records = []
    for i, problem in enumerate(problems):
        record = {"problem": i, "prompt": problem["prompt"], "answer": problem.get("answer"), "methods": {}}
        for r in results:
            kept = {"text": r.completions[i], "correct": task.verify(r.completions[i], problem["answer"]) >= 1.0}
            if r.picks is not None:
                kept["pick"] = r.picks[i]
                if "candidates" not in record:
                    record["candidates"] = [{"text": t, "answer": task.extract_answer(t),
                                             "correct": task.verify(t, problem["answer"]) >= 1.0}
                                            for t in r.candidates[i]]
            if r.scores is not None:
                for candidate, reward in zip(record["candidates"], r.scores[i]):
                    candidate["reward"] = reward
            record["methods"][r.method] = kept
        records.append(record)
    return records


def stop_if_preempted(run_dir: Path, method: str) -> None:
    """Between generation batches: a SIGUSR1/SIGTERM or the .preempt flag file stops the stage
    (exit 75, as a training stage at a step). It keeps no partial results: the rerun evaluates
    every method again, from the same seed, so its numbers equal an uninterrupted run's."""
    if preemption.requested(run_dir):
        raise preemption.Preempted(f"test_time stopped during {method} (no checkpoint: the rerun starts it again)")


def run(ctx) -> dict[str, float]:
    cfg = ctx.stage_cfg
    trust = ctx.trust_remote_code
    tokenizer = load_chat_tokenizer(ctx.input_path, trust)
    dtype = ctx.forward_dtype()  # test_time only runs forward
    model = load_policy(ctx.input_path.resolve(), trust, dtype).to(distributed.state().device)
    settings = TestTimeSettings.of(cfg, ctx.seed)
    methods, left_out = chosen_methods(ctx.cfg, ctx.run_dir)
    if left_out:
        log(f"stage test_time: best_of_n left out of methods=auto: no reward to rank candidates by ({left_out})")
    tool_cfg, tool_stage = tool_config(ctx.cfg)
    setup = ToolSetup.of(tool_cfg, tool_stage) if tool_cfg is not None else None
    if setup is not None and isinstance(cfg.methods, str):
        log("stage test_time: power left out of methods=auto: the policy answers with tools, and power sampling has "
            "no tool loop")
    score = None
    if "best_of_n" in methods:
        funcs, weights = rewards.build(cfg, "test_time", ctx.task, ctx.run_dir, trust, settings.batch_size, dtype)
        score = functools.partial(rewards.weighted_sum, funcs, weights, tokenizer=tokenizer)
    problems = ctx.task.eval_problems()[: cfg.eval_problems]
    results, candidates = [], {}  # majority_vote and best_of_n share their candidates
    for method in methods:
        result = run_method(method, model, tokenizer, ctx.task, problems, settings, score, candidates,
                            before_batch=lambda: stop_if_preempted(ctx.run_dir, method), tools=setup)
        log(f"stage test_time: {method}: accuracy {result.accuracy:.3f}, {result.tokens_per_problem:.1f} tokens/problem, "
            f"{result.wall_time_s:.1f}s")
        results.append(result)
    metrics: dict[str, float] = {"eval_num_problems": len(problems), "model_dtype": str(dtype).removeprefix("torch.")}
    for r in results:
        metrics[f"accuracy/{r.method}"] = r.accuracy
        metrics[f"tokens_per_problem/{r.method}"] = r.tokens_per_problem
        metrics[f"wall_time_s/{r.method}"] = round(r.wall_time_s, 2)
        metrics.update({f"{name}/{r.method}": value for name, value in r.extras.items()})
    if distributed.is_main_process():
        lines = [json.dumps(record) for record in sample_records(results, problems, ctx.task)]
        artifacts.write_text_atomic(ctx.stage_dir / SAMPLES_FILE, "\n".join(lines) + "\n")
        artifacts.write_text_atomic(ctx.stage_dir / STAGE_SUMMARY, summary_table(results, settings)
                                    + f"\nEvery problem's candidates and what each method kept: [{SAMPLES_FILE}]"
                                      f"({ctx.name}/{SAMPLES_FILE})\n")
        plot_methods(results, ctx.stage_dir / "methods.png")
    return metrics
