"""`python -m pipeline [overrides]`: compose conf/config.yaml with Hydra and run the stages.

Exit codes: 0 done, 2 bad config or input (Hydra's composition errors included: unknown key,
unknown group option, malformed override; a run dir that cannot be written), 75 preempted (rerun
to resume), 1 a failure while running. A failure of the filesystem (full, read-only, permission
denied) is one line on the terminal; its traceback goes to the stage's error.log.

With -m (a Hydra multirun) each job runs in its own run dir under run.dir (pipeline/sweep.py).
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import artifacts, sweep
from pipeline.config_check import LAUNCH_CONFIGS, launch_config_message
from pipeline.errors import ConfigError, storage_problem
from pipeline.preemption import REQUEUE_EXIT_CODE, Preempted
from pipeline.runner import run_pipeline

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # absolute: main() also runs in-process (tests)
CONFIG_ERROR_EXIT_CODE = 2
_started = False  # Hydra composed the config and called the task function


def config_groups() -> str:
    """--help's list of config groups: `group: option, ...` for each folder of conf/ with YAML files."""
    folders = sorted(d for d in Path(CONF_DIR).iterdir() if d.is_dir() and d.name not in LAUNCH_CONFIGS)
    return "\n".join(f"{d.name}: {', '.join(sorted(f.stem for f in d.glob('*.yaml')))}" for d in folders)


def launch_configs() -> str:
    return ", ".join(sorted(f.stem for f in (Path(CONF_DIR) / "accelerate").glob("*.yaml")))


OmegaConf.register_new_resolver("pipeline_config_groups", config_groups, replace=True)
OmegaConf.register_new_resolver("pipeline_launch_configs", launch_configs, replace=True)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _run(cfg: DictConfig) -> None:
    global _started
    _started = True
    if is_multirun():
        from hydra.core.hydra_config import HydraConfig

        cfg = sweep.job_config(cfg, list(HydraConfig.get().overrides.task), sys.argv[1:])
    run_dir = Path(str(cfg.run.dir)).expanduser().resolve()
    try:
        run_pipeline(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT_CODE)
    except Preempted as err:
        print(f"[pipeline] preempted: {err}; rerun the same command to resume", flush=True)
        sys.exit(REQUEUE_EXIT_CODE)
    except Exception as err:
        problem = storage_problem(err, run_dir)
        if problem is None:
            raise
        # one line: the cause and the fix; the traceback in the stage's error.log (the runner's note)
        notes = [n for n in getattr(err, "__notes__", ()) if n.startswith(artifacts.TRACEBACK_NOTE)]
        saved = notes[-1].removeprefix(artifacts.TRACEBACK_NOTE) if notes else artifacts.save_traceback(run_dir)
        print(f"error: {problem} (traceback: {saved})", file=sys.stderr)
        sys.exit(1)


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def main() -> None:
    """Hydra prints a composition error and exits 1, the code of a failed run; an error before
    the config existed is a config error, so it leaves with 2 (Hydra's message stays as printed)."""
    global _started
    _started = False
    try:
        _run()
    except SystemExit as exit_:
        if exit_.code == 1 and not _started:
            name_bad_override(sys.argv[1:])
            name_launch_config(sys.argv[1:])
            sys.exit(CONFIG_ERROR_EXIT_CODE)
        raise
    except Exception:  # HYDRA_FULL_ERROR=1: Hydra re-raises instead of printing
        if _started:
            raise
        import traceback

        traceback.print_exc()
        sys.exit(CONFIG_ERROR_EXIT_CODE)


def name_launch_config(args: list[str]) -> None:
    """accelerate=ddp (or deepspeed=...) reads like a config group; say what those files are for."""
    for arg in args:
        group = arg.lstrip("+~").split("=", 1)[0]
        if group in LAUNCH_CONFIGS:
            print(f"error: {launch_config_message(arg, group)}", file=sys.stderr)
            return


# Hydra's flags that take the next argument as their value
VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
               "--info", "-i", "--experimental-rerun"}


def name_bad_override(args: list[str]) -> None:
    """Hydra's parse error quotes only the bad fragment ("no viable alternative at input '[1,'");
    say which argument it was."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    overrides = []
    for index, arg in enumerate(args):
        after_flag = index > 0 and args[index - 1] in VALUE_FLAGS and "=" not in arg and not arg.startswith("~")
        if not arg.startswith("-") and not after_flag:  # `--cfg job`: "job" is the flag's value
            overrides.append(arg)
    for arg in overrides:
        try:
            parser.parse_overrides([arg])
        except OverrideParseException:
            print(f"error: cannot parse the override {arg!r} (Hydra's message above); quote a value with "
                  "special characters, e.g. 'key=\"a,b\"'", file=sys.stderr)
            return


if __name__ == "__main__":
    main()
