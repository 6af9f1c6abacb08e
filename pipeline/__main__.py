"""`python -m pipeline [overrides]`: compose conf/config.yaml with Hydra and run the stages."""

import sys

import hydra
from omegaconf import DictConfig

from pipeline.preemption import REQUEUE_EXIT_CODE, Preempted
from pipeline.runner import ConfigError, run_pipeline


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run_pipeline(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Preempted as err:
        print(f"[pipeline] preempted: {err}; rerun the same command to resume", flush=True)
        sys.exit(REQUEUE_EXIT_CODE)


if __name__ == "__main__":
    main()
