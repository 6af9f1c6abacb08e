"""Kill -9 of a 2-process launch mid-pretrain, then the same launch again: the final/ equals an
uninterrupted 2-process run's, tensor for tensor, under DDP (the Trainer loads the weights
through ExactResume) and DeepSpeed ZeRO-2 (DeepSpeed restores its own module states).

    python -m pytest -q -m distributed tests/distributed/test_resume.py
"""

import os
import subprocess
import sys

import pytest

from tests.conftest import CONF, ROOT, free_port
from tests.stages.test_kill_resume import assert_same_weights, run_until_checkpoint

ARGS = ["preset=smoke", "run.stages=[pretrain]", "stages.pretrain.save_steps=5"]


@pytest.mark.distributed
@pytest.mark.parametrize("launch", ["ddp", "zero2"])
def test_two_process_pretrain_killed_mid_stage_equals_the_uninterrupted_run(tmp_path, launch):
    env = {"OMP_NUM_THREADS": "1", **({"ACCELERATE_USE_CPU": "1"} if launch == "ddp" else {})}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
               "--main_process_port", str(free_port()),
               "--config_file", str(CONF / "accelerate" / f"{launch}.yaml"), "-m", "pipeline"]

    def run(*args: str) -> None:
        proc = subprocess.run([*command, *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run(*ARGS, f"run.dir={tmp_path / 'whole'}")
    killed = tmp_path / "killed"
    run_until_checkpoint([*ARGS, f"run.dir={killed}"], killed / "pretrain", 10, command=command, env=env)
    run(*ARGS, f"run.dir={killed}")
    assert_same_weights(killed / "pretrain" / "final", tmp_path / "whole" / "pretrain" / "final")
