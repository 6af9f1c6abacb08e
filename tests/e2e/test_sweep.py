"""A Hydra multirun (`-m`): every job runs in its own run dir named by its swept overrides, a
rerun of the sweep skips every finished job, and the sweep root has a summary of all jobs."""

import json

from pipeline.sweep import job_name, swept_keys
from tests.conftest import ROOT, run_cli

# a few steps and problems: the sweep's mechanics, not its figures
SHORT = ["stages.pretrain.max_steps=4", "stages.pretrain.save_steps=4", "stages.pretrain.eval_steps=4",
         "stages.pretrain.eval_problems=2", "stages.pretrain.max_new_tokens=8"]


def test_job_names_come_from_the_swept_overrides_only():
    argv = ["preset=smoke", "seed=0,1", "+stages.polish.lr=range(1,3)", "model.path=/a/b", "-m"]
    keys = swept_keys(argv)
    assert keys == ["seed", "stages.polish.lr"]
    assert job_name(["preset=smoke", "seed=1", "+stages.polish.lr=2", "model.path=/a/b"], keys) == "seed-1+stages.polish.lr-2"
    assert job_name(["task.splits.sft=/data/a b.jsonl"], ["task.splits.sft"]) == "task.splits.sft-_data_a_b.jsonl"


def test_a_sweep_over_seeds_gives_each_job_its_run_dir_and_a_summary(tmp_path):
    root = tmp_path / "sweep"
    args = ["-m", "preset=smoke", "run.stages=[pretrain]", "seed=0,1", f"run.dir={root}", "trainer.report_to=none",
            *SHORT]
    done = run_cli(*args)
    for seed in (0, 1):
        job = root / f"seed-{seed}"
        assert f"run dir {job} (sweep job seed-{seed})" in done.stdout
        manifest = json.loads((job / "pretrain" / "stage.json").read_text())
        assert manifest["status"] == "completed"
        assert f"Sweep job `seed-{seed}`" in (job / "report.md").read_text()
    assert not (root / "pretrain").exists() and not (root / "superseded").exists()  # no job replaced another
    weights = {seed: (root / f"seed-{seed}" / "pretrain" / "final" / "model.safetensors").read_bytes() for seed in (0, 1)}
    assert weights[0] != weights[1]  # each job ran with its own seed

    # Hydra's record of the sweep sits beside the summary, not in the directory it was typed in
    assert (root / "multirun.yaml").is_file() and not (ROOT / "multirun.yaml").exists()
    summary = json.loads((root / "sweep.json").read_text())
    assert [job["run_dir"] for job in summary] == ["seed-0", "seed-1"]
    assert all(job["stages"]["pretrain"]["status"] == "completed" for job in summary)
    assert all("eval_loss" in job["stages"]["pretrain"]["metrics"] for job in summary)
    table = (root / "sweep.md").read_text()
    assert "| [seed-0](seed-0/report.md) | pretrain completed |" in table and "[seed-1]" in table

    # a job's final/ goes on as a later stage's input, unquoted on the command line
    later = run_cli("preset=smoke", "run.stages=[sft]", f"stages.sft.init={root}/seed-1/pretrain/final",
                    f"run.dir={tmp_path / 'sft'}", "stages.sft.max_steps=2", "stages.sft.eval_problems=2",
                    "stages.sft.max_new_tokens=8", "trainer.report_to=none")
    assert "stage sft: completed" in later.stdout

    again = run_cli(*args)
    assert again.stdout.count("stage pretrain: already completed") == 2
