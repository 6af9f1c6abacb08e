"""The default demo chain over several seeds: every stage's figures per seed, with mean and
spread (max - min), the targets per seed, library versions and CPU, so the README's results
table comes from one command.

    python benchmarks/demo_seeds.py [--seeds 0,1,2] [--out DIR] [--heldout-n 2000] \
        [--heldout-samples 4] [--threads N] [hydra overrides...]

Per seed S, one after another (the figures include wall times): `python -m pipeline
run.dir=OUT/seedS run.name=seedS seed=S OVERRIDES` (output to OUT/seedS.log; completed stages
are skipped, so rerunning resumes), then benchmarks/heldout_eval.py's evaluation of sft/final and
grpo/final on --heldout-n fresh problems (problem seed 0, the same for every seed), cached in
OUT/seedS/heldout.json. Writes OUT/summary.json and OUT/summary.md. Wall times are stage.json's
wall_time_s; "chain span" runs from the first stage's start to the last one's end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # heldout_eval (which puts ROOT on the path itself)

STAGES = ("pretrain", "sft", "reward", "dpo", "grpo", "test_time")
METHODS = ("power", "sample", "greedy", "low_temperature", "majority_vote", "best_of_n")
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed")
DIFF = "held-out grpo - sft sampled"
SPAN = "wall chain span (s)"
VERDICT = {True: "PASS", False: "FAIL", None: "n/a"}
TARGETS = {
    "pretrain greedy >= 0.30": lambda f: f["pretrain greedy"] >= 0.30,
    "sft greedy >= 0.80": lambda f: f["sft greedy"] >= 0.80,
    "sft greedy >= pretrain greedy + 0.10": lambda f: f["sft greedy"] >= f["pretrain greedy"] + 0.10,
    "held-out grpo sampled >= sft sampled + 0.05": lambda f: f["held-out grpo sampled"] >= f["held-out sft sampled"] + 0.05,
    "test_time power >= sample + 0.05": lambda f: f["test_time power"] >= f["test_time sample"] + 0.05,
    "reward pairwise on-policy >= 0.80": lambda f: f["reward pairwise on-policy"] >= 0.80,
    "best-of-N >= sample + 0.10": lambda f: f["test_time best_of_n"] >= f["test_time sample"] + 0.10,
    "best-of-N >= majority vote - 0.02": lambda f: f["test_time best_of_n"] >= f["test_time majority_vote"] - 0.02,
    "chain span < 720 s": lambda f: f[SPAN] < 720,
}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_chain(seed: int, out: Path, overrides: list[str]) -> bool:
    cmd = [sys.executable, "-m", "pipeline", f"run.dir={out / f'seed{seed}'}", f"run.name=seed{seed}", f"seed={seed}",
           *overrides]
    log = out / f"seed{seed}.log"
    print(f"seed {seed}: {shlex.join(['python', *cmd[1:]])} >> {log}", flush=True)
    with log.open("a") as f:
        f.write(f"\n=== {datetime.now().isoformat(timespec='seconds')} {shlex.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    if code:
        print(f"seed {seed}: the pipeline exited with {code}; see {log}", flush=True)
    return code == 0


def heldout(run_dir: Path, n: int, samples: int) -> dict:
    """Held-out greedy/sampled accuracy of sft and grpo and their paired difference (cached)."""
    key = {"n": n, "samples": samples, "problem_seed": 0,
           **{f"{s}_config_hash": read_json(run_dir / s / "stage.json").get("config_hash") for s in ("sft", "grpo")}}
    cached = read_json(run_dir / "heldout.json")
    if cached.get("key") == key:
        print(f"{run_dir.name}: held-out figures from {run_dir / 'heldout.json'}", flush=True)
        return cached
    print(f"{run_dir.name}: held-out evaluation of sft and grpo on {n} problems, {samples} samples each", flush=True)
    import heldout_eval
    from omegaconf import OmegaConf

    from pipeline.tasks import build_task

    task = build_task(OmegaConf.load(run_dir / "config.yaml").task)
    problems = task.fresh_eval_problems(n, 0)
    scores = {s: heldout_eval.score_policy(run_dir / s / "final", task, problems, samples) for s in ("sft", "grpo")}
    result: dict = {"key": key}
    for mode in ("greedy", "sampled"):
        for s in scores:
            result[f"{s}_{mode}"], result[f"{s}_{mode}_se"] = heldout_eval.mean_and_se(scores[s][mode])
        paired = [b - a for a, b in zip(scores["sft"][mode], scores["grpo"][mode])]
        result[f"diff_{mode}"], result[f"diff_{mode}_se"] = heldout_eval.mean_and_se(paired)
    tmp = run_dir / "heldout.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(run_dir / "heldout.json")
    return result


def figures(run_dir: Path, held: dict, notes: list[str]) -> dict[str, float]:
    m = {s: read_json(run_dir / s / "metrics.json") for s in STAGES}
    wanted = [("pretrain greedy", "pretrain", "eval_accuracy"), ("sft greedy", "sft", "eval_accuracy"),
              ("sft sampled", "sft", "eval_accuracy_sampled"), ("reward pairwise", "reward", "eval_pairwise_accuracy"),
              ("reward pairwise on-policy", "reward", "eval_pairwise_accuracy_on_policy"),
              ("reward pairwise hard negatives", "reward", "eval_pairwise_accuracy_task"),
              ("dpo greedy", "dpo", "eval_accuracy"), ("dpo sampled", "dpo", "eval_accuracy_sampled"),
              ("grpo greedy", "grpo", "eval_accuracy"), ("grpo sampled", "grpo", "eval_accuracy_sampled")]
    f = {label: float(m[s][k]) for label, s, k in wanted if k in m[s]}
    for label, k in [("sft greedy", "sft_greedy"), ("sft sampled", "sft_sampled"), ("grpo greedy", "grpo_greedy"),
                     ("grpo sampled", "grpo_sampled"), ("grpo - sft sampled", "diff_sampled")]:
        if k in held:
            f[f"held-out {label}"] = held[k]
    f.update({f"test_time {x}": float(m["test_time"][f"accuracy/{x}"]) for x in METHODS if f"accuracy/{x}" in m["test_time"]})
    if "test_time power" in f and "test_time sample" in f:
        f["test_time power - sample"] = f["test_time power"] - f["test_time sample"]
    manifests = [(s, read_json(run_dir / s / "stage.json")) for s in STAGES if (run_dir / s / "stage.json").is_file()]
    done = [(s, x) for s, x in manifests if x.get("status") == "completed"]
    times = [(datetime.fromisoformat(x["started"]), datetime.fromisoformat(x["ended"])) for _, x in done]
    for (s, x), (start, end) in zip(done, times):
        f[f"wall {s} (s)"] = float(x.get("wall_time_s", (end - start).total_seconds()))
        if x.get("resumed_from") or x.get("recovered"):
            notes.append(f"{run_dir.name}: {s} was resumed or recovered, so its wall time is not one whole run")
    if done and len(done) == len(manifests):
        f["wall chain, sum of stages (s)"] = sum(f[f"wall {s} (s)"] for s, _ in done)
        f[SPAN] = (times[-1][1] - times[0][0]).total_seconds()
        gaps = [(a[0], (t[0] - p[1]).total_seconds()) for a, p, t in zip(done[1:], times, times[1:])]
        notes += [f"{run_dir.name}: {gap:.0f} s between {s} and the stage before it (the span includes it)"
                  for s, gap in gaps if gap > 60]
    return f


def cell(label: str, value: float | None, se: float | None = None) -> str:
    if value is None:
        return "-"
    if label.startswith("wall"):
        return f"{value:.0f}"
    text = f"{value:+.3f}" if " - " in label else f"{value:.3f}"
    return text + (f" ± {se:.3f}" if se is not None else "")


def machine() -> dict:
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
            "torch_threads_in_this_process": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo_seeds")
    parser.add_argument("--heldout-n", type=int, default=2000, help="fresh held-out problems")
    parser.add_argument("--heldout-samples", type=int, default=4, help="completions per problem at temperature 1")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs (default: as is)")
    args, overrides = parser.parse_known_args()
    if any(o.startswith("-") for o in overrides):
        parser.error(f"unknown options {[o for o in overrides if o.startswith('-')]} (hydra overrides are key=value)")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.threads is not None:  # before torch is imported here, and inherited by the runs
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    ok = {seed: run_chain(seed, out, overrides) for seed in seeds}
    notes = [f"seed{s}: the pipeline failed (see {out / f'seed{s}.log'})" for s in seeds if not ok[s]]
    per_seed: dict[int, dict[str, float]] = {}
    held: dict[int, dict] = {}
    for seed in seeds:
        run_dir = out / f"seed{seed}"
        if ok[seed]:
            held[seed] = heldout(run_dir, args.heldout_n, args.heldout_samples)
        per_seed[seed] = figures(run_dir, held.get(seed, {}), notes)

    labels = list(dict.fromkeys(label for f in per_seed.values() for label in f))
    table, summary = [["figure", *[f"seed {s}" for s in seeds], "mean", "spread", "spread <= 0.03"]], {}
    for label in labels:
        values = [per_seed[s].get(label) for s in seeds]
        present = [v for v in values if v is not None]
        mean, spread = sum(present) / len(present), max(present) - min(present)
        ses = [held.get(s, {}).get("diff_sampled_se") if label == DIFF else None for s in seeds]
        accuracy = not label.startswith("wall") and " - " not in label  # not a wall time or a difference
        table.append([label, *[cell(label, v, se) for v, se in zip(values, ses)], cell(label, mean),
                      f"{spread:.{0 if label.startswith('wall') else 3}f}", VERDICT[spread <= 0.03] if accuracy else ""])
        summary[label] = {**{f"seed{s}": v for s, v in zip(seeds, values)}, "mean": mean, "spread": spread,
                          **({"spread_le_0.03": spread <= 0.03} if accuracy else {})}
    targets = {name: {f"seed{s}": judge(check, per_seed[s]) for s in seeds} for name, check in TARGETS.items()}
    versions = {"python": platform.python_version(), **{lib: version(lib) for lib in LIBRARIES}}
    command, host = shlex.join(["python", *sys.argv]), machine()
    md = [*markdown(table), "",
          *markdown([["target", *[f"seed {s}" for s in seeds]], *[[name, *map(VERDICT.get, r.values())] for name, r in targets.items()]]),
          "", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".  ",
          "Machine: " + ", ".join(f"{k} {v}" for k, v in host.items()) + ".  ", f"Command: `{command}`",
          *[f"\nNote: {n}" for n in notes]]
    print("\n" + "\n".join(md), flush=True)
    (out / "summary.md").write_text("\n".join(md) + "\n")
    (out / "summary.json").write_text(json.dumps(
        {"command": command, "seeds": seeds, "overrides": overrides, "figures": summary, "heldout": held,
         "targets": targets, "versions": versions, "machine": host, "notes": notes}, indent=2) + "\n")
    print(f"\nwrote {out / 'summary.md'} and {out / 'summary.json'}")
    sys.exit(0 if all(ok.values()) else 1)


def judge(check, f: dict[str, float]) -> bool | None:
    """The target's verdict, None when a figure it needs is missing."""
    try:
        return bool(check(f))
    except KeyError:
        return None


def version(lib: str) -> str:
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return "not installed"


def markdown(rows: list[list[str]]) -> list[str]:
    """An aligned markdown table (first column left, the others right); rows[0] is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"
             for row in rows]
    return [lines[0], "|" + "|".join(":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|",
            *lines[1:]]


if __name__ == "__main__":
    main()
