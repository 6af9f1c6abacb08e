"""The fault-injection table (issue 17): kill runs at chosen points, rerun the same command, and
compare every tensor of each final/ with an uninterrupted run's.

Kill points:
  mid-stage        SIGKILL of the process group once checkpoint-N of the stage is on disk
  truncated        as mid-stage, then the newest checkpoint's model.safetensors cut in half
  at max_steps     final/ and metrics removed after the checkpoint at max_steps (a kill before final/)
  after final/     manifest set back to running, metrics.json removed (a kill after the final/ commit)

    python benchmarks/kill_resume.py            # preset=smoke; about 5 minutes on 2 idle cores
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["pretrain", "sft", "reward", "dpo", "grpo"]
SAVE_EVERY = {"pretrain": 5, "sft": 5, "reward": 5, "dpo": 5, "grpo": 2}
KILL_AFTER = {"pretrain": 10, "sft": 10, "reward": 5, "dpo": 10, "grpo": 2}
KINDS = {  # model kind -> (overrides, stages); the PEFT kinds start sft from the MoE run's pretrain
    "MoE": (["preset=smoke"], STAGES),  # its pretrain's newest checkpoint is also truncated after the kill
    "dense": (["preset=smoke", "model=tiny_dense"], ["pretrain", "sft"]),
    "MoE + LoRA": (["preset=smoke", "peft=lora"], ["sft"]),
    "MoE + prefix": (["preset=smoke", "peft=prefix"], ["sft"]),
    "MoE + prompt": (["preset=smoke", "peft=prompt"], ["sft"]),
}


def pipeline(args: list[str], wait: bool = True) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE if wait else subprocess.DEVNULL, text=True, start_new_session=True)
    if wait:
        _, stderr = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"pipeline {' '.join(args)} exited {proc.returncode}:\n{stderr[-2000:]}")
    return proc


def kill_after_checkpoint(args: list[str], stage_dir: Path, step: int) -> None:
    proc = pipeline(args, wait=False)
    while not (stage_dir / f"checkpoint-{step}" / "trainer_state.json").exists():
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before {stage_dir.name} saved checkpoint-{step}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def tensors(final: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in final.glob("*.safetensors"):
        out.update(load_file(file))
    return out


def compare(resumed: Path, reference: Path) -> str:
    a, b = tensors(resumed), tensors(reference)
    differ = sum(not torch.equal(a[k], b[k]) for k in a) if a.keys() == b.keys() else len(a)
    return "yes" if differ == 0 else f"NO ({differ} of {len(a)} differ)"


def stage_summary(stage_dir: Path) -> tuple[str, int]:
    manifest = json.loads((stage_dir / "stage.json").read_text())
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    resumed_from = manifest.get("resumed_from") or ("none: recorded from final/" if manifest.get("recovered") else "-")
    return resumed_from, int(metrics.get("train_steps", 0))


def main() -> None:
    rows = []
    work = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    for kind, (overrides, stages) in KINDS.items():
        base = [*overrides, f"run.stages=[{','.join(stages)}]"] + [f"stages.{s}.save_steps={SAVE_EVERY[s]}" for s in stages]
        if "pretrain" not in stages:
            base.append(f"stages.sft.init={work / 'MoE-whole' / 'pretrain' / 'final'}")
        reference, killed = work / f"{kind}-whole", work / f"{kind}-killed"
        pipeline([*base, f"run.dir={reference}"])
        for stage in stages:
            kill_after_checkpoint([*base, f"run.dir={killed}"], killed / stage, KILL_AFTER[stage])
            if stage == "pretrain" and kind == "MoE":
                newest = max((killed / stage).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
                with open(newest / "model.safetensors", "r+b") as f:
                    f.truncate(os.path.getsize(newest / "model.safetensors") // 2)
        pipeline([*base, f"run.dir={killed}"])
        for stage in stages:
            point = f"after checkpoint-{KILL_AFTER[stage]}"
            point += ", newest truncated" if kind == "MoE" and stage == "pretrain" else ""
            resumed_from, steps = stage_summary(killed / stage)
            rows.append((stage, kind, point, resumed_from, steps, compare(killed / stage / "final", reference / stage / "final")))

    # the two kill points around the end of a stage, on the MoE pretrain
    source = work / "MoE-whole"
    base = [*KINDS["MoE"][0], "run.stages=[pretrain]", f"stages.pretrain.save_steps={SAVE_EVERY['pretrain']}"]
    for point in ("at max_steps, before final/", "after final/, before manifest"):
        run_dir = work / ("end-before-final" if point.startswith("at max_steps") else "end-after-final")
        shutil.copytree(source, run_dir)
        stage = run_dir / "pretrain"
        manifest = json.loads((stage / "stage.json").read_text())
        (stage / "stage.json").write_text(json.dumps({**manifest, "status": "running"}))
        (stage / "metrics.json").unlink()
        if point.startswith("at max_steps"):
            shutil.rmtree(stage / "final")
        pipeline([*base, f"run.dir={run_dir}"])
        resumed_from, steps = stage_summary(stage)
        rows.append(("pretrain", "MoE", point, resumed_from, steps, compare(stage / "final", source / "pretrain" / "final")))

    versions = subprocess.run([sys.executable, "-c", "import torch, transformers, trl, peft; print('torch', torch.__version__, "
                               "'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)"],
                              capture_output=True, text=True).stdout.strip()
    print(f"preset=smoke; {versions}")
    print("| stage | model | kill point | resumed from | steps | final/ tensors equal |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
