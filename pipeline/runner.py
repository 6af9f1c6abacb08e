"""The orchestrator: walks run.stages, resolves each stage's input, skips finished stages,
resumes interrupted ones, and writes manifests, metrics and the report.

A stage is its recipe module, `stages.<name>` or `<package>.<name>` for a package in
run.stage_packages, read into the typed contract of pipeline/stage.py (what it reads, whether it
needs, trains or writes a model, its checks and run). Its config lives at
conf/stages/<name>.yaml (or <package>/<name>.yaml); `init` sets its input checkpoint explicitly
and `input_stage` names the stage whose final/ it starts from by default, or lists candidates in
order of preference (e.g. [grpo, dpo, sft, pretrain]): the first one planned earlier in this
invocation, else the first one completed in the run dir. The candidate `model` is the model
group's checkpoint (model.path): a pretrained model starts sft (or grpo, ...) when no earlier
stage ran.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import pkgutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import set_seed

from pipeline import artifacts, distributed, generation, hub, lock, preemption, sweep, trainer_settings
from pipeline.adapters import check_peft_config
from pipeline.config_check import check_config, check_run
from pipeline.errors import ConfigError
from pipeline.log import log
from pipeline.models import check_trainable_input
from pipeline.report import write_report
from pipeline.stage import Stage, StageContext
from pipeline.tasks import Task, build_task

# the canonical chain; the report lists stages in this order
RECIPES = "stages"  # the package of the built-in recipes; run.stage_packages adds the user's
MODEL_INPUT = "model"  # an input_stage candidate: the model group's checkpoint


@dataclass
class StagePlan:
    name: str
    stage: Stage
    input_path: Path | None
    input_fingerprint: str | None
    config_hash: str


def recipe_packages(cfg: DictConfig) -> list[str]:
    return [RECIPES, *(str(p) for p in (cfg.run.get("stage_packages") or []))]


def import_package(package: str):
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as err:
        raise ConfigError(f"run.stage_packages: {package!r} does not import ({err}); put the package on the Python "
                          "path (PYTHONPATH, or pip install it)") from err


def recipes_in(package: str) -> list[str]:
    return [m.name for m in pkgutil.iter_modules(import_package(package).__path__) if not m.ispkg]


def available_stages(cfg: DictConfig) -> list[str]:
    """The stages that exist: a recipe module (in `stages/` or a run.stage_packages package) with
    a config under `stages`."""
    found = {name for package in recipe_packages(cfg) for name in recipes_in(package)}
    return [name for name in cfg.stages if name in found]


def with_stage_packages(cfg: DictConfig) -> DictConfig:
    """cfg with the config of every recipe in run.stage_packages: <package>/<name>.yaml under
    stages.<name>, with the values the command line set there (+stages.<name>.key=value) on top."""
    packages = recipe_packages(cfg)[1:]
    if not packages:
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for package in packages:
            folder = Path(import_package(package).__path__[0])
            for name in recipes_in(package):
                if (folder / f"{name}.yaml").is_file():
                    given = cfg.stages.get(name) or {}
                    cfg.stages[name] = OmegaConf.merge(OmegaConf.load(folder / f"{name}.yaml"), given)
    return cfg


def load_stage_module(name: str, cfg: DictConfig):
    if name not in cfg.stages:
        raise ConfigError(f"unknown stage {name!r} in run.stages; valid stages: {', '.join(available_stages(cfg))} "
                          "(a stage of your own: its package in run.stage_packages, with <name>.py and <name>.yaml)")
    for package in recipe_packages(cfg):
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as err:
            if err.name not in (f"{package}.{name}", package):
                raise
    raise ConfigError(f"stage {name!r} has a config but no recipe ({RECIPES}/{name}.py or {name}.py in a "
                      "run.stage_packages package)")


def load_stage(name: str, cfg: DictConfig) -> Stage:
    """The typed contract of stage `name` (pipeline/stage.py), from its recipe module."""
    return Stage.of(name, load_stage_module(name, cfg))


# keys of a group that cannot change what a stage computes: left out of its config hash
NOT_RESULTS = {"trainer": ("report_to",), "model": ("trust_remote_code",)}


def stage_hash(cfg: DictConfig, stage: Stage, input_fingerprint: str | None, extra: str | None = None) -> str:
    payload = {group: {k: v for k, v in OmegaConf.to_container(cfg[group], resolve=True).items()
                       if k not in NOT_RESULTS.get(group, ())} for group in stage.uses}
    payload["stage"] = OmegaConf.to_container(cfg.stages[stage.name], resolve=True)
    payload["seed"] = cfg.seed
    payload["input"] = input_fingerprint
    payload["data"] = data_fingerprints(cfg.task, stage.splits_read())
    if extra is not None:
        payload["extra_inputs"] = extra
    return artifacts.config_hash(payload)


def plan_stages(cfg: DictConfig, run_dir: Path) -> list[StagePlan]:
    """Check every stage and its input before anything runs; raise ConfigError on bad input."""
    check_run(cfg)
    names = list(cfg.run.stages)
    if not names:
        raise ConfigError("run.stages is empty; e.g. run.stages=[pretrain]")
    if len(set(names)) != len(names):
        raise ConfigError(f"run.stages lists a stage twice: {names}")
    stages = [load_stage(name, cfg) for name in names]
    check_config(cfg, stages)  # types and ranges of every key, model files: before anything reads them
    plans: list[StagePlan] = []
    hashes: dict[str, str] = {}  # stage -> config hash, for stages planned in this invocation
    for stage in stages:
        name, stage_cfg = stage.name, cfg.stages[stage.name]
        input_path, fingerprint = resolve_input(cfg, name, stage_cfg, run_dir, hashes)
        if input_path is None and stage.needs_input:
            raise ConfigError(f"stage {name!r} needs an input checkpoint: set stages.{name}.input_stage or stages.{name}.init")
        if "peft" in stage.uses:
            check_peft_config(cfg.peft)
        if "generation" in stage.uses:
            generation.check(generation.Engine.of(trainer_settings.stage_group(cfg, "generation", name)), name)
        check_stage(cfg, stage, None if pending_input(stage_cfg, run_dir, hashes) else input_path)
        extra = stage.extra_inputs(cfg, run_dir, hashes) if stage.extra_inputs else None
        config_hash = stage_hash(cfg, stage, fingerprint, extra)
        hashes[name] = config_hash
        plans.append(StagePlan(name, stage, input_path, fingerprint, config_hash))
    return plans


def pending_input(stage_cfg, run_dir: Path, planned: dict[str, str]) -> bool:
    """The stage's input is the final/ of a stage planned earlier in this invocation (not there yet)."""
    return not stage_cfg.get("init") and upstream_stage(stage_cfg, run_dir, planned) in planned


def check_stage(cfg: DictConfig, stage: Stage, input_path: Path | None) -> None:
    """The recipe's validate() and, for a stage that trains its input, the input's check."""
    if input_path is not None and stage.trains_input:
        check_trainable_input(input_path, stage.name, bool(cfg.model.trust_remote_code))
    if stage.validate is not None:
        stage.validate(cfg, input_path)


def resolve_input(cfg, name, stage_cfg, run_dir: Path, planned: dict[str, str]) -> tuple[Path | None, str | None]:
    """(checkpoint path, fingerprint) of a stage's input. The fingerprint is the upstream
    stage's config hash when the input comes from this run, so a changed upstream reruns
    everything downstream of it."""
    if stage_cfg.get("init"):
        return checkpoint_input(stage_cfg.init, f"stages.{name}.init")
    upstream = upstream_stage(stage_cfg, run_dir, planned)
    if not upstream or upstream == MODEL_INPUT:  # the `model` group: a checkpoint, or built from its config
        if OmegaConf.is_missing(cfg.model, "path"):
            raise ConfigError("model=hf needs model.path: a local model directory or a hub name (org/name)")
        if cfg.model.path:
            return checkpoint_input(cfg.model.path, "model.path")
        if upstream == MODEL_INPUT:  # a model built from config has no weights to start from
            others = [c for c in input_candidates(stage_cfg) if c != MODEL_INPUT]
            raise ConfigError(
                f"stage {name!r} starts from the final/ of {' or '.join(others)} (none runs before it or has "
                f"completed in {run_dir}) or from model.path, and model={cfg.model.arch or 'this model'} is built from "
                f"config with no weights. Add {others[0]} to run.stages before {name}, set model.path, "
                f"or set stages.{name}.init=/path/to/checkpoint"
            )
        return None, None
    final = run_dir / upstream / artifacts.FINAL
    if upstream in planned:
        return final, planned[upstream]
    manifest = artifacts.completed_manifest(run_dir, upstream)
    if manifest:
        return final, manifest["config_hash"]
    candidates = input_candidates(stage_cfg)
    if len(candidates) > 1:
        raise ConfigError(
            f"stage {name!r} starts from the final/ of the first of {', '.join(candidates)} that runs before it or "
            f"has completed in {run_dir}, and there is none. Add one of them to run.stages before {name}, "
            f"or set stages.{name}.init=/path/to/checkpoint"
        )
    raise ConfigError(
        f"stage {name!r} starts from {upstream}/final/, which is not in {run_dir} "
        f"(no completed '{upstream}' stage there). Add {upstream} to run.stages before {name}, "
        f"or set stages.{name}.init=/path/to/checkpoint"
    )


def input_candidates(stage_cfg) -> list[str]:
    """`input_stage` as a list: one stage name, or candidates in order of preference."""
    value = stage_cfg.get("input_stage")
    if not value:
        return []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def upstream_stage(stage_cfg, run_dir: Path, planned: dict[str, str]) -> str | None:
    """The stage whose final/ is the input (None: the `model` group): the first candidate
    planned earlier in this invocation, else the first one completed in run_dir, else the first
    candidate (which resolve_input then reports as missing)."""
    candidates = input_candidates(stage_cfg)
    for found in (lambda c: c in planned, lambda c: artifacts.completed_manifest(run_dir, c) is not None):
        for candidate in candidates:
            if candidate != MODEL_INPUT and found(candidate):
                return candidate
    if MODEL_INPUT in candidates:
        return MODEL_INPUT
    return candidates[0] if candidates else None


def checkpoint_input(value, field: str) -> tuple[Path, str]:
    """(directory, fingerprint) of a checkpoint named by a local path or a Hugging Face hub name."""
    path = Path(str(value)).expanduser()
    if not path.exists() and hub.is_repo_id(str(value)):
        path = hub.download(str(value), field)
    if not artifacts.is_hf_checkpoint(path):
        raise ConfigError(
            f"{field}={value} is not a checkpoint directory (no config.json); "
            "point it at a Hugging Face model directory or a stage's final/"
        )
    return path, f"content:{artifacts.fingerprint(path)}"


def data_fingerprints(task_cfg, splits) -> dict[str, str]:
    """Content fingerprints of the local data files a stage reads (task.splits), so a file
    rewritten at the same path reruns the stages that read it. Hub names are taken as they are."""
    sources = task_cfg.get("splits") or {}
    found = {split: Path(str(sources[split])).expanduser() for split in splits if sources.get(split)}
    return {split: artifacts.fingerprint(path) for split, path in found.items() if path.exists()}


def prepare_stage_dir(plan: StagePlan, stage_dir: Path, force: bool) -> tuple[str, Path | None]:
    """Decide what to do with a stage dir, reading only, so every rank decides the same:
    "skip" (completed, same config), "resume" (interrupted, same config, has a checkpoint),
    "start" (nothing worth keeping), "replace" (other config or forced: move the old aside) or
    "finish" (killed after its final/ was committed: record the metrics saved with it)."""
    manifest = artifacts.read_manifest(stage_dir)
    if manifest is None:
        return "start", None
    if manifest.get("config_hash") != plan.config_hash:
        return "replace", None
    has_final = artifacts.is_hf_checkpoint(stage_dir / artifacts.FINAL) or not plan.stage.writes_final
    completed = manifest.get("status") == "completed" and has_final
    if completed:
        return ("replace", None) if force else ("skip", None)
    record = artifacts.final_record(stage_dir)
    if record is not None and record.get("config_hash") == plan.config_hash and "metrics" in record:
        return "finish", None
    checkpoint = artifacts.find_resume_checkpoint(stage_dir)
    return ("resume", checkpoint) if checkpoint is not None else ("start", None)


def run_pipeline(cfg: DictConfig) -> dict[str, dict]:
    """Run cfg.run.stages in order; returns each stage's metrics."""
    cfg = with_stage_packages(cfg)
    distributed.state()  # before any Trainer builds an Accelerator
    preemption.install_handlers()
    run_dir = Path(str(cfg.run.dir)).expanduser().resolve()
    plans = plan_stages(cfg, run_dir)
    # one invocation per run dir: taken before anything is written there, released however
    # this ends (the lock file is removed only by the process that holds it)
    if cfg.run.get("dry_run"):
        task = checked_task(cfg, plans, run_dir)
        for number, plan in enumerate(plans, 1):
            action, checkpoint = prepare_stage_dir(plan, run_dir / plan.name, bool(cfg.run.force))
            where = f" from {checkpoint.name}" if checkpoint else ""
            log(f"dry run: stage {number}/{len(plans)} {plan.name}: would {action}{where} "
                f"(input: {plan.input_path or 'model config'}; config {plan.config_hash})")
        log(f"dry run: every check passed for {run_dir}; nothing was run or written")
        return {}
    existed = run_dir.exists()
    held = lock.acquire_for_launch(run_dir)
    try:
        task = checked_task(cfg, plans, run_dir)

        if distributed.is_main_process():
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / preemption.FLAG_FILE).unlink(missing_ok=True)  # a request to an earlier run
            artifacts.write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        job = f" (sweep job {cfg.run.sweep_job})" if cfg.run.get("sweep_job") else ""
        log(f"run dir {run_dir}{job}; stages: {' -> '.join(p.name for p in plans)}")

        results: dict[str, dict] = {}
        for number, plan in enumerate(plans, 1):
            log(f"stage {number}/{len(plans)}: {plan.name}")
            results[plan.name] = run_stage(cfg, plan, run_dir, task)
        return results
    finally:
        lock.release(held)
        if cfg.run.get("sweep_job") and held is not None:
            write_sweep_summary(run_dir.parent)
        if not existed and held is not None:
            with contextlib.suppress(OSError):  # not empty (a stage ran), or gone: leave it
                run_dir.rmdir()  # refused before anything was written: leave no empty run dir behind


def checked_task(cfg: DictConfig, plans: list[StagePlan], run_dir: Path) -> Task:
    """The task with every split the stages read loaded and checked, and each stage's
    check_data passed: the last checks before compute."""
    try:
        task = build_task(cfg.task)
        task.validate(sorted({split for plan in plans for split in plan.stage.splits_read(task)}))
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from err
    planned: dict[str, str] = {}
    for plan in plans:
        pending = pending_input(cfg.stages[plan.name], run_dir, planned)
        plan.stage.check(cfg, task, None if pending else plan.input_path)
        planned[plan.name] = plan.config_hash
    return task


def write_sweep_summary(root: Path) -> None:
    """The sweep's summary after one of its jobs, however the job ended (main process)."""
    try:
        log(f"sweep summary: {sweep.write_summary(root)}")
    except OSError as err:
        log(f"could not write the sweep summary in {root}: {type(err).__name__}: {err}")


def run_stage(cfg: DictConfig, plan: StagePlan, run_dir: Path, task: Task) -> dict:
    stage_dir = run_dir / plan.name
    action, checkpoint = prepare_stage_dir(plan, stage_dir, bool(cfg.run.force))
    log(f"stage {plan.name}: decision {action} (config {plan.config_hash})", every_rank=True)
    distributed.barrier()  # every rank has read the old state before anyone changes it
    if action == "skip":
        log(f"stage {plan.name}: already completed with config {plan.config_hash}, skipping")
        return artifacts.read_metrics(stage_dir) or {}
    if action == "finish":
        return finish_committed_stage(plan, run_dir, cfg)
    check_stage(cfg, plan.stage, plan.input_path)  # again: an earlier stage may have just written the input
    plan.stage.check(cfg, task, plan.input_path)
    if distributed.is_main_process():
        if action == "replace":
            moved = artifacts.archive_stage_dir(stage_dir, "superseded")
            log(f"stage {plan.name}: config changed (or forced); previous results moved to {moved}")
        unusable = artifacts.scan_checkpoints(stage_dir)[1]
        for bad, problem in unusable:  # never resumed from, and out of the way of the next saves
            moved = artifacts.move_to_superseded(bad, run_dir, f"{plan.name}-{bad.name}-unusable")
            log(f"stage {plan.name}: warning: {bad.name} is unusable ({problem}); moved to {moved}")
        if unusable and checkpoint is None:
            log(f"stage {plan.name}: no checkpoint of the interrupted run verifies; starting the stage from the beginning")
        stage_dir.mkdir(parents=True, exist_ok=True)
        manifest = {
            "stage": plan.name,
            "status": "running",
            "config_hash": plan.config_hash,
            "input": str(plan.input_path) if plan.input_path else None,
            "resumed_from": checkpoint.name if checkpoint else None,
            "started": artifacts.now(),
            "argv": sys.argv[1:],
            "versions": artifacts.library_versions(),
        }
        artifacts.write_manifest(stage_dir, manifest)
    distributed.barrier()
    where = f"resuming from {checkpoint.name}" if checkpoint else "starting"
    log(f"stage {plan.name}: {where} (input: {plan.input_path or 'model config'})")

    ctx = StageContext(plan.name, cfg, cfg.stages[plan.name], run_dir, stage_dir, plan.input_path, checkpoint, task,
                       uses=plan.stage.uses)
    start = time.perf_counter()
    # Every stage starts from the run's seed: a model built from config (pretrain), a new head
    # (reward) and data order then depend on `seed` alone, so a rerun reproduces its numbers.
    set_seed(int(cfg.seed))
    try:
        engine = ctx.generation if "generation" in plan.stage.uses else generation.Engine()
        with generation.using(engine):
            metrics = plan.stage.run(ctx)
        metrics = {**metrics, **ctx.shared_metrics}
        if "generation" in plan.stage.uses:
            metrics["generation_engine"] = engine.name
        wall = time.perf_counter() - start
        if distributed.is_main_process():
            # final/ (with its metrics) first, then metrics.json, then the manifest: a kill between
            # any two is finished by the next invocation without training again (action "finish")
            artifacts.commit_final(stage_dir, {"stage": plan.name, "config_hash": plan.config_hash, "metrics": metrics})
            artifacts.write_metrics(stage_dir, metrics)
            manifest.update(status="completed", ended=artifacts.now(), wall_time_s=round(wall, 1))
            artifacts.write_manifest(stage_dir, manifest)
    except BaseException as err:
        if distributed.is_main_process():
            status = "preempted" if isinstance(err, preemption.Preempted) else "failed"
            manifest.update(status=status, ended=artifacts.now(), error=f"{type(err).__name__}: {err}")
            try:  # on a full disk too: in place if the atomic write fails
                artifacts.record_manifest(stage_dir, manifest)
            except OSError as write_err:
                log(f"stage {plan.name}: could not record status {status} in {stage_dir / artifacts.MANIFEST}, which "
                    f"still says running ({type(write_err).__name__}: {write_err}); the stage failed with: {manifest['error']}")
            if isinstance(err, Exception) and not isinstance(err, (ConfigError, preemption.Preempted)):
                # the entry point prints one line for a filesystem failure and names this file
                err.add_note(f"{artifacts.TRACEBACK_NOTE}{artifacts.save_traceback(stage_dir)}")
        raise
    if distributed.is_main_process():
        write_report(run_dir, list(cfg.run.stages), cfg.run.get("sweep_job"))
    distributed.barrier()
    headline = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("eval_"))
    log(f"stage {plan.name}: completed in {wall:.0f}s; {headline}")
    return metrics


def finish_committed_stage(plan: StagePlan, run_dir: Path, cfg: DictConfig) -> dict:
    """A stage killed after its final/ was committed: write the metrics saved with it and mark
    it completed, without training again."""
    stage_dir = run_dir / plan.name
    metrics = artifacts.final_record(stage_dir)["metrics"]
    if distributed.is_main_process():
        artifacts.write_metrics(stage_dir, metrics)
        manifest = artifacts.read_manifest(stage_dir) or {"stage": plan.name, "config_hash": plan.config_hash}
        manifest.update(status="completed", ended=artifacts.now(), recovered="final/ was complete; metrics from final/")
        artifacts.write_manifest(stage_dir, manifest)
        write_report(run_dir, list(cfg.run.stages), cfg.run.get("sweep_job"))
    distributed.barrier()
    log(f"stage {plan.name}: its final/ was complete when the last run stopped; recorded it as completed, no training")
    return metrics
