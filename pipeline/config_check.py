"""Types and ranges of the composed config, and the model files it points at, checked before any
compute: `check_config(cfg, stages)` raises ConfigError (exit 2) naming the full key and what it must be.

One table, RULES, says what each key may hold, by key name; a "<stage>.<key>" entry wins over
the plain "<key>" one for that stage. Only the stages in run.stages are checked, so a key of a
stage the run leaves out never blocks it; the groups (model, task, optim, peft) always are.
Choices that belong to one recipe (dpo's loss types, test_time's methods, ...) stay in that
recipe's validate(), and so do the ranges a recipe checks with its reason (grpo's
num_generations >= 2: "a group needs at least 2"); for those the table holds the type only, so
the recipe's comparison never meets a string. A key with no rule is not checked
(tests/unit/test_bad_inputs.py holds every shipped key to having one).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline import artifacts, generation, trainer_settings
from pipeline.errors import ConfigError
from pipeline.stage import GROUPS, Stage

SEED_MAX = 2**32 - 1  # numpy's seed range, which transformers.set_seed feeds
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay")


@dataclass(frozen=True)
class Rule:
    kind: str  # int | number | bool | text | regex | choice | texts | numbers | pair | mapping | names | any
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low < value instead of low <= value
    high_open: bool = False
    null: str | None = None  # what null means, when null is allowed
    choices: tuple = ()

    def problem(self, value) -> str | None:
        """None if value fits, else what it must be."""
        if value is None:
            return None if self.null is not None else self.describe()
        ok = {
            "int": lambda v: is_int(v) and self.in_range(v),
            "number": lambda v: is_number(v) and self.in_range(v),
            "bool": lambda v: isinstance(v, bool),
            "text": lambda v: isinstance(v, str),
            "regex": lambda v: isinstance(v, str) and compiles(v),
            "choice": lambda v: v in self.choices,
            "texts": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
            "numbers": lambda v: isinstance(v, list) and all(is_number(x) for x in v),
            "pair": lambda v: isinstance(v, list) and len(v) == 2 and all(is_number(x) and self.in_range(x) for x in v),
            "mapping": lambda v: isinstance(v, dict) and all(is_number(x) for x in v.values()),
            "names": lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
            "any": lambda v: True,
        }[self.kind]
        return None if ok(value) else self.describe()

    def in_range(self, value) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        what = {
            "int": "an integer", "number": "a number", "bool": "true or false", "text": "a string",
            "regex": "a regular expression with valid syntax", "choice": f"one of {', '.join(map(str, self.choices))}",
            "texts": "a list of strings, e.g. [a,b]", "numbers": "a list of numbers",
            "pair": "a list of two numbers", "mapping": "a mapping of names to numbers",
            "names": "a name or a list of names", "any": "anything",
        }[self.kind] + self.range_text()
        return f"must be {what}" + (f", or null ({self.null})" if self.null is not None else "")

    def range_text(self) -> str:
        if self.low is not None and self.high is not None:
            return f" in {'(' if self.low_open else '['}{fmt(self.low)}, {fmt(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {fmt(self.low)}"
        if self.high is not None:
            return f" {'<' if self.high_open else '<='} {fmt(self.high)}"
        return ""


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
        return True
    except re.error:
        return False


def fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


COUNT = Rule("int", low=1)
COUNT_OR_ZERO = Rule("int", low=0)
POSITIVE = Rule("number", low=0, low_open=True)
NON_NEGATIVE = Rule("number", low=0)
FRACTION = Rule("number", low=0, high=1, high_open=True)  # [0, 1)
PROBABILITY = Rule("number", low=0, high=1)  # [0, 1]
LR = Rule("number", low=0, low_open=True, null="falls back to peft.lr, then optim.lr")
BOOL, TEXT, TEXTS, REGEX, ANY = Rule("bool"), Rule("text"), Rule("texts"), Rule("regex"), Rule("any")
INT, NUMBER = Rule("int"), Rule("number")
PATH = Rule("text", null="not set")
SEED = Rule("int", low=0, high=SEED_MAX)

RULES: dict[str, Rule] = {
    # --- top level and run
    "seed": SEED, "run.name": TEXT, "run.dir": TEXT, "run.stages": TEXTS, "run.force": BOOL, "run.dry_run": BOOL, "run.stage_packages": TEXTS,
    "run.sweep_job": Rule("text", null="not a job of a sweep"),
    # --- every stage: sizes, steps, paths
    "init": PATH, "input_stage": Rule("names", null="start from the model group"),
    "max_steps": COUNT, "batch_size": COUNT, "grad_accum": COUNT, "seq_len": COUNT, "max_length": COUNT,
    "save_steps": COUNT, "eval_steps": COUNT, "logging_steps": COUNT,
    "save_total_limit": Rule("int", low=1, null="keep every checkpoint"),
    "eval_problems": COUNT, "eval_samples": COUNT, "eval_batch_size": COUNT, "eval_examples": COUNT, "eval_pairs": COUNT,
    "max_new_tokens": COUNT, "tokenizer_vocab_size": COUNT, "tokenizer_tools": BOOL, "pair_prompts": COUNT, "samples_per_prompt": COUNT,
    "num_iterations": COUNT, "eval_every": COUNT, "curve_problems": COUNT,
    "block_size": COUNT, "num_samples": COUNT, "mcmc_steps": COUNT_OR_ZERO,
    "lr": LR, "adam_epsilon": Rule("number", low=0, low_open=True, null="falls back to optim.eps"),
    "gradient_checkpointing": BOOL, "packing": BOOL, "step_level": BOOL, "precompute_ref_log_probs": BOOL, "ds3_gather_for_generation": BOOL, "mask_truncated_completions": BOOL,
    "train_only": TEXTS, "freeze": TEXTS, "train_only_by_peft": Rule("any"), "methods": Rule("names"),
    "sample_temperature": POSITIVE, "temperature": POSITIVE, "curve_temperature": POSITIVE,
    "zero_variance_weight": PROBABILITY,
    "pairs": TEXT, "loss_type": Rule("names"), "loss_weights": Rule("numbers", null="every loss weighs 1"),
    "label_smoothing": Rule("number", low=0, high=0.5),
    "epsilon": POSITIVE, "epsilon_high": POSITIVE, "entropy_coef": NUMBER,
    "scale_rewards": TEXT, "zero_variance": TEXT, 
    "reward_weights": Rule("mapping"), "reward_model": TEXT, "reward_functions": Rule("any"),
    "tools": Rule("any"), "environment": Rule("text", null="no environment"),
    "max_tool_calling_iterations": Rule("int", low=1, null="until the model stops calling tools"),
    "tool_timeout_s": POSITIVE, "tools_from": Rule("text", null="the bare model, no tools"),
    "optim": Rule("any", null="the optim group as is"),
    "trainer": Rule("any", null="the trainer group as is"),
    "generation": Rule("any", null="the generation group as is"),  # a stage's group overrides: checked merged over the group below
    "router_aux_loss_coef": Rule("number", low=0, null="the model config's coefficient"),
    "center_rewards_coefficient": Rule("number", low=0, null="no centring"),
    # the type only: the recipe's validate() checks the range and says why
    "test_time.alpha": NUMBER, "dpo.beta": NUMBER, "grpo.beta": NUMBER, "grpo.num_generations": INT, "grpo.filter_samples": INT,
    "grpo.filter_max_pass_rate": NUMBER, "grpo.scaling_warmup_fraction": NUMBER, "grpo.format_pattern": TEXT,
    "sft.pretrain_mix": NUMBER,
    # --- model
    "model.arch": Rule("text", null="read from model.path"), "model.path": Rule("text", null="build from model.config"),
    "model.trust_remote_code": BOOL, "model.config": ANY,
    # --- optim
    "optim.name": TEXT, "optim.lr": POSITIVE, "optim.weight_decay": NON_NEGATIVE,
    "optim.betas": Rule("pair", low=0, high=1, high_open=True), "optim.eps": POSITIVE,
    "optim.scheduler": Rule("choice", choices=SCHEDULERS), "optim.warmup_ratio": FRACTION,
    "optim.max_grad_norm": NON_NEGATIVE, "optim.momentum": FRACTION, "optim.adjust_lr": TEXT,
    "optim.muon_lr": Rule("number", low=0, low_open=True, null="falls back to optim.lr"),
    # --- trainer (pipeline/trainer_settings.check adds what this machine can run)
    "trainer.precision": Rule("choice", choices=trainer_settings.PRECISIONS), "trainer.attn_implementation": TEXT,
    "trainer.save_dtype": Rule("choice", choices=trainer_settings.PRECISIONS),
    "trainer.gradient_checkpointing": BOOL, "trainer.report_to": Rule("names"), "trainer.use_liger_kernel": BOOL,
    # --- generation (pipeline/generation.check adds what this machine and environment can run)
    "generation.engine": Rule("choice", choices=generation.ENGINES), "generation.continuous_batching": ANY,
    "generation.vllm": ANY,
    # --- peft
    "peft.method": TEXT, "peft.lr": Rule("number", low=0, low_open=True, null="falls back to optim.lr"), "peft.rank": COUNT,
    "peft.alpha": POSITIVE, "peft.dropout": FRACTION, "peft.target_modules": TEXTS, "peft.target_parameters": TEXTS,
    "peft.tiny_lr": Rule("mapping"),  # the tiny models' presets: lr per method

    "peft.num_virtual_tokens": COUNT, "peft.init": Rule("choice", choices=("random", "sample_vocab")),
    # --- task (arithmetic)
    "task.name": TEXT, "task.seed": SEED, "task.min_operands": Rule("int", low=2), "task.max_operands": Rule("int", low=2),
    "task.digits": Rule("int", low=1, high=6), "task.ops": TEXT,
    "task.pretrain_max_operands": Rule("int", low=2, null="the same operands as every split"),
    "task.sft_slip_rate": Rule("number", low=0.0, high=0.99), "task.calculator": BOOL,
    "task.eval_min_operands": Rule("int", low=2, null="task.min_operands"),
    "task.eval_max_operands": Rule("int", low=2, null="task.max_operands"),
    "task.n_pretrain": COUNT, "task.n_sft": COUNT, "task.n_preference": COUNT, "task.n_rl": COUNT, "task.n_eval": COUNT,
    # --- task (jsonl)
    "task.splits": Rule("any"), "task.hf_split": TEXT, "task.columns": Rule("any"), "task.answer_pattern": REGEX,
    "task.verifier": Rule("choice", choices=("regex", "math")), "task.hf_splits": Rule("any"),
    "task.text_prompt": TEXT, "task.max_chars": COUNT,
}
NESTED = {  # mappings whose values are checked one by one
    "task.splits": Rule("text", null="no stage of this run reads it"),
    "task.columns": TEXT,
}


def rule_for(group: str, key: str) -> Rule | None:
    """The rule of `<group>.<key>`: for a stage (group "stages.<name>") "<name>.<key>", then "<key>"."""
    if group.startswith("stages."):
        stage = group.split(".", 1)[1]
        return RULES.get(f"{stage}.{key}") or RULES.get(key)
    return RULES.get(f"{group}.{key}" if group else key)


LAUNCH_CONFIGS = ("accelerate", "deepspeed")  # folders of conf/ that hold launch configs, not config groups


def launch_config_message(arg: str, group: str) -> str:
    return (f"{arg}: conf/{group}/ holds launch configs, not a config group; launch with them instead: accelerate "
            'launch --config_file conf/accelerate/<name>.yaml -m pipeline ... (README "GPU nodes, ZeRO/FSDP and SLURM")')


def check_run(cfg: DictConfig) -> None:
    """seed and the run group: before the stages they name are looked up; no launch config
    merged in as if it were a group (+accelerate=ddp)."""
    for group in LAUNCH_CONFIGS:
        if group in cfg:
            raise ConfigError(launch_config_message(f"+{group}=...", group))
    check_node(cfg, "", ["seed"])
    check_node(cfg.run, "run")


def check_config(cfg: DictConfig, stages: Sequence[Stage] | None = None) -> None:
    """Raise ConfigError on the first value of the wrong type or out of range, or model file that
    cannot load: the run's stages, the groups, then the weights model.path and stages.*.init name.
    What a stage is (it trains; it runs models under the trainer group) is read from its
    contract (pipeline/stage.py), so a user's stage is checked as a built-in one is. stages=None
    (the config rules alone, without the recipes): every stage of run.stages counts as training."""
    check_run(cfg)
    if stages is None:
        stages = [Stage(name=str(s), run=lambda ctx: {}, splits=(), uses=GROUPS)
                  for s in cfg.run.stages if isinstance(s, str) and s in cfg.stages]
    names = [stage.name for stage in stages]
    for name in names:
        check_node(cfg.stages[name], f"stages.{name}")
    for group in ("model", "optim", "peft", "task", "trainer", "generation"):
        check_node(cfg[group], group)
    if cfg.task.get("name") == "arithmetic" and cfg.task.min_operands > cfg.task.max_operands:
        raise ConfigError(f"task.min_operands={cfg.task.min_operands} is above task.max_operands="
                          f"{cfg.task.max_operands}; set min_operands <= max_operands")
    if any(stage.trains for stage in stages):
        check_optimizer_launch(cfg.optim)
    for name in names:
        for group in ("optim", "trainer", "generation"):
            if cfg.stages[name].get(group):
                check_stage_group(cfg, name, group)
    trainer_settings.check(cfg, [s.name for s in stages if s.runs_models], trains=[s.name for s in stages if s.trains])
    check_model_files(cfg, stages)


def check_stage_group(cfg: DictConfig, stage: str, group: str) -> None:
    """stages.<stage>.<group>: a mapping of the group's keys, checked merged over the group."""
    override = cfg.stages[stage][group]
    key = f"stages.{stage}.{group}"
    example = {"optim": "{name: muon, max_grad_norm: 0}", "trainer": "{precision: fp32}",
               "generation": "{engine: continuous_batching}"}[group]
    if not isinstance(override, DictConfig):
        raise ConfigError(f"{key}={override}: must be a mapping of {group} keys to override for this stage, "
                          f"e.g. {example}, or null")
    valid = sorted(k.split(".", 1)[1] for k in RULES if k.startswith(f"{group}."))
    unknown = sorted(set(override) - set(valid))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: not a key of the {group} group; valid: {', '.join(valid)}")
    merged = trainer_settings.stage_group(cfg, group, stage)
    check_node(merged, group)
    if group == "optim":
        try:
            check_optimizer_launch(merged)
        except ConfigError as err:
            raise ConfigError(f"{key}={OmegaConf.to_container(override)}: {err}; "
                              f"or set {key}=null to train {stage} with the optim group") from err


def check_node(node: DictConfig, prefix: str, keys: list[str] | None = None) -> None:
    for key in keys if keys is not None else list(node.keys()):
        full = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_missing(node, key):
            continue  # ??? values: the code that needs one says which
        try:
            value = node[key]
        except Exception as err:  # an interpolation that does not resolve
            raise ConfigError(f"{full}: {err}") from err
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        rule = rule_for(prefix, str(key))
        if rule is None:
            continue
        check_value(full, value, rule)
        if full in NESTED and isinstance(value, dict):
            for sub, sub_value in value.items():
                check_value(f"{full}.{sub}", sub_value, NESTED[full])


def check_value(key: str, value, rule: Rule) -> None:
    problem = rule.problem(value)
    if problem:
        shown = "null" if value is None else value
        raise ConfigError(f"{key}={shown}: {problem}")


def check_optimizer_launch(optim_cfg) -> None:
    """Optimizer/launcher combinations that would fail once training starts (optim=muon under
    FSDP, under ZeRO-3 without reduce_scatter: false, with clipping under ZeRO)."""
    from pipeline.optim import check_supported

    try:
        check_supported(optim_cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from err


# ----------------------------------------------------------------------------- model files

def check_model_files(cfg: DictConfig, stages: Sequence[Stage]) -> None:
    """The weights of every model directory this run loads from the config (model.path for a
    stage built from the model group, stages.<name>.init) are there and not truncated; a stage
    that trains a model is not pointed at a PEFT adapter (sft and later say so themselves)."""
    for stage in stages:
        stage_cfg = cfg.stages[stage.name]
        if stage_cfg.get("init"):
            check_model_dir(Path(str(stage_cfg.init)).expanduser(), f"stages.{stage.name}.init", stage)
        elif reads_model_group(stage_cfg) and not OmegaConf.is_missing(cfg.model, "path") and cfg.model.get("path"):
            check_model_dir(Path(str(cfg.model.path)).expanduser(), "model.path", stage)


def reads_model_group(stage_cfg) -> bool:
    """The stage may start from the model group: no input_stage, or `model` among its candidates."""
    value = stage_cfg.get("input_stage")
    return not value or value == "model" or (not isinstance(value, str) and "model" in list(value))


def check_model_dir(path: Path, key: str, stage: Stage) -> None:
    if not path.is_dir():
        return  # the runner reports a missing directory, naming the key
    if (path / "adapter_config.json").is_file():
        if stage.trains and not stage.trains_input:  # a stage that trains its input (sft, ...) says so itself
            raise ConfigError(
                f"{key}={path} is a PEFT adapter (adapter_config.json), not a model; {stage.name} trains a whole model. "
                "Point it at a plain checkpoint: the adapter's base model, the base/ inside a prefix/prompt final/, "
                "or a LoRA run's merged final/"
            )
        for name in ("adapter_model.safetensors",):
            if (path / name).is_file():
                check_safetensors(path / name, key)
        return
    if not (path / "config.json").is_file():
        return  # the runner reports it: not a checkpoint directory
    check_weights(path, key)


def check_weights(path: Path, key: str) -> None:
    """A model directory holds weights: a safetensors file or index (every shard there and
    intact) or a PyTorch .bin; ConfigError naming the file and the fix otherwise."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{key}={path}: {index} is not a safetensors index ({err}); re-save the model "
                              "with save_pretrained or copy the file again") from err
        for shard in shards:
            check_safetensors(path / shard, key)
        return
    if (path / "model.safetensors").is_file():
        check_safetensors(path / "model.safetensors", key)
        return
    if any((path / name).is_file() for name in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        return
    raise ConfigError(
        f"{key}={path} has a config.json but no weights (model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin); copy the weights into it, or point the key at a complete model directory"
    )


def check_safetensors(file: Path, key: str) -> None:
    """The file exists, its header parses and the tensor data it describes fills the file exactly
    (a truncated copy, or one still being written, does not): the checkpoint verification's test."""
    fix = "copy it again, or re-save the model with save_pretrained"
    if not file.is_file():
        raise ConfigError(f"{key}: weights file {file} is missing; {fix}")
    try:
        problem = artifacts.safetensors_problem(file)
    except (KeyError, TypeError, AttributeError, IndexError) as err:  # JSON, but not a safetensors header
        problem = f"its header is not a safetensors header ({type(err).__name__}: {err})"
    if problem:
        raise ConfigError(f"{key}: weights file {file} is not a readable safetensors file: {problem}; {fix}")
