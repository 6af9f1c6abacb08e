"""The stage contract: what the runner and the config checks know about a stage, read once from
its recipe module into a typed `Stage`. Nothing keys on a built-in stage's name, so a stage from
a user's package (run.stage_packages) gets every check a built-in one gets.

A recipe module declares:
    SPLITS           task splits it reads (checked before any compute starts)
    OPTIONAL_SPLITS  optional: splits it reads when the task has them (e.g. sft's eval)
    USES             top-level config groups that change its result (part of its config hash).
                     They also say what the stage is: with `optim` it trains (the optimizer and
                     launcher are checked for it, and the trainer's tracking), with `trainer` it
                     runs models at the trainer group's precision and attention (checked against
                     this machine), with `peft` it reads the peft group (checked).
    NEEDS_INPUT      optional, default True: the stage starts from a checkpoint (`init`, or the
                     final/ of an `input_stage` candidate); False: it may start without (pretrain)
    TRAINS_INPUT     optional, default False: the runner checks that the input is a trainable
                     model (not a saved adapter) with a chat-template tokenizer
    WRITES_FINAL     optional, default True; False for a stage that only evaluates (no final/):
                     it counts as completed from its manifest alone
    run(ctx: StageContext) -> dict[str, float]   trains, saves final/, returns metrics; ctx is
                     the stage's view of its settings: ctx.stage_cfg, ctx.optim and ctx.trainer
                     (the groups merged with the stage's overrides), ctx.peft, ctx.task, ...
    validate(cfg, input_path) -> None   optional: cheap checks of the stage's config and of an
                     existing input checkpoint, raising ConfigError. Called before any stage runs
                     (input_path None when an earlier stage of this run writes the input) and
                     again just before run(), when the input exists
    check_data(cfg, task[, input_path]) -> None   optional: checks of the config against the
                     task's data (e.g. sft's rows that keep a response token within max_length),
                     after the task has read its splits and before any stage runs; input_path as
                     for validate
    extra_inputs(cfg, run_dir, planned) -> str | None   optional: a fingerprint of inputs other
                     than its input checkpoint (e.g. test_time's reward model), part of its hash
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from omegaconf import DictConfig

from pipeline import trainer_settings
from pipeline.generation import Engine
from pipeline.errors import ConfigError
from pipeline.optim import stage_optim

GROUPS = ("model", "task", "optim", "peft", "trainer", "generation")  # the config groups a stage may read


@dataclass
class StageContext:
    """What run() is handed."""

    name: str
    cfg: DictConfig  # the whole composed config, read-only
    stage_cfg: DictConfig
    run_dir: Path
    stage_dir: Path
    input_path: Path | None  # checkpoint to start from; None = build from `model`
    resume_checkpoint: Path | None  # checkpoint-N of this stage to resume from
    task: object  # pipeline.tasks.Task
    # facts every training stage shares, recorded by preemption.train (e.g. the trainer's mixed
    # precision); the runner adds them to the stage's metrics
    shared_metrics: dict = field(default_factory=dict)
    # the groups the stage declares (Stage.uses): the views below refuse any other, so what a
    # recipe reads through them is what its config hash covers. None: unchecked (a context
    # built by hand, e.g. in a benchmark)
    uses: tuple[str, ...] | None = None

    def group(self, name: str) -> DictConfig:
        """A config group as this stage sees it; RuntimeError if the stage's USES lacks it."""
        if self.uses is not None and name not in self.uses:
            raise RuntimeError(f"stage {self.name!r} reads the {name} group, which its USES {list(self.uses)} lacks: "
                               f"add {name!r} to USES so that its config hash covers it (pipeline/stage.py)")
        if name == "optim":
            return stage_optim(self.cfg, self.name)
        if name in ("trainer", "generation"):
            return trainer_settings.stage_group(self.cfg, name, self.name)
        return self.cfg[name]

    # The stage's view of its settings: each group as this stage sees it (stages.<name>.optim
    # and stages.<name>.trainer merged over the groups), so a recipe never passes (cfg, name).
    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def model(self) -> DictConfig:
        """The `model` group (what to build, or model.path)."""
        return self.group("model")

    @property
    def trust_remote_code(self) -> bool:
        return bool(self.cfg.model.trust_remote_code)  # how to load, not what is computed

    @property
    def peft(self) -> DictConfig:
        return self.group("peft")

    @property
    def optim(self) -> DictConfig:
        return self.group("optim")

    @property
    def trainer(self) -> DictConfig:
        return self.group("trainer")

    @property
    def generation(self) -> Engine:
        """The engine every place of this stage that samples uses (pipeline/generation.py)."""
        return Engine.of(self.group("generation"))

    def attn_implementation(self) -> str | None:
        self.group("trainer")
        return trainer_settings.attn_implementation(self.cfg, self.name)

    def forward_dtype(self):
        """The dtype of the models this stage only runs forward (references, reward models)."""
        self.group("trainer")
        return trainer_settings.forward_dtype(self.cfg, self.name)

    def policy_dtype(self):
        """The dtype in which this stage loads the model it trains (trainer_settings.policy_dtype)."""
        self.group("trainer")
        return trainer_settings.policy_dtype(self.cfg, self.name, self.input_path, str(self.peft.method))

    def autocast(self):
        """The context in which this stage evaluates the model it trained."""
        self.group("trainer")
        return trainer_settings.autocast(self.cfg, self.name)

    def save_dtype(self):
        """The dtype of the weights in this stage's final/."""
        self.group("trainer")
        return trainer_settings.save_dtype(self.cfg, self.name, self.input_path)

    def shared_arguments(self, reference: bool = False) -> dict:
        """TrainingArguments fields of the trainer group (precision, checkpointing, tracking);
        `reference`: and those that load a frozen reference in the forward dtype (dpo, grpo)."""
        self.group("trainer")
        shared = trainer_settings.arguments(self.cfg, self.name, self.stage_dir)
        return {**shared, **trainer_settings.reference(self.cfg, self.name)} if reference else shared


@dataclass(frozen=True)
class Stage:
    """One stage as the runner sees it, read from its recipe module by `Stage.of`."""

    name: str
    run: Callable[[StageContext], dict]
    splits: tuple[str, ...]
    uses: tuple[str, ...]
    optional_splits: tuple[str, ...] = ()
    needs_input: bool = True
    trains_input: bool = False
    writes_final: bool = True
    validate: Callable | None = None
    check_data: Callable | None = None
    extra_inputs: Callable | None = None
    source: Path | None = None  # the recipe's file

    @property
    def trains(self) -> bool:
        """It trains a model: it reads the optimizer group."""
        return "optim" in self.uses

    @property
    def runs_models(self) -> bool:
        """It runs models under the trainer group's settings (precision, attention, ...)."""
        return "trainer" in self.uses

    def splits_read(self, task=None) -> tuple[str, ...]:
        """SPLITS, and the OPTIONAL_SPLITS the task has (all of them, without a task)."""
        return self.splits + tuple(s for s in self.optional_splits if task is None or task.has_split(s))

    def check(self, cfg, task, input_path: Path | None) -> None:
        """check_data, with the input checkpoint when the recipe's function takes it."""
        if self.check_data is None:
            return
        if len(inspect.signature(self.check_data).parameters) >= 3:
            self.check_data(cfg, task, input_path)
        else:
            self.check_data(cfg, task)

    @classmethod
    def of(cls, name: str, module: ModuleType) -> Stage:
        """The contract a recipe module declares; ConfigError naming what is missing or wrong."""
        where = getattr(module, "__file__", None) or module.__name__
        missing = [attr for attr in ("SPLITS", "USES", "run") if not hasattr(module, attr)]
        if missing:
            raise ConfigError(f"stage {name!r} ({where}) lacks {', '.join(missing)}; a recipe declares SPLITS, USES "
                              "and run(ctx) (see pipeline/stage.py)")
        uses = tuple(str(g) for g in module.USES)
        unknown = [g for g in uses if g not in GROUPS]
        if unknown:
            raise ConfigError(f"stage {name!r} ({where}): USES names {unknown}, not config groups; valid: {', '.join(GROUPS)}")
        return cls(
            name=name,
            run=module.run,
            splits=tuple(module.SPLITS),
            uses=uses,
            optional_splits=tuple(getattr(module, "OPTIONAL_SPLITS", ())),
            needs_input=bool(getattr(module, "NEEDS_INPUT", True)),
            trains_input=bool(getattr(module, "TRAINS_INPUT", False)),
            writes_final=bool(getattr(module, "WRITES_FINAL", True)),
            validate=getattr(module, "validate", None),
            check_data=getattr(module, "check_data", None),
            extra_inputs=getattr(module, "extra_inputs", None),
            source=Path(module.__file__) if getattr(module, "__file__", None) else None,
        )
