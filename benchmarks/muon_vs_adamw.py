"""Muon vs AdamW: pretraining on the demo model and corpus, same token budget, each at the best
learning rate of a small sweep; optimizer step time; per-rank optimizer state under ZeRO.

    python benchmarks/muon_vs_adamw.py [--steps 200] [--batch-size 16] [--adamw-lrs 1e-3,3e-3,1e-2]
                                       [--muon-lrs 1e-3,3e-3,1e-2] [--no-zero] [hydra overrides...]

Every training run is `python -m pipeline run.stages=[pretrain]` (optim=muon uses one lr for both
of its groups, adjust_lr=match_rms_adamw) in a fresh run dir; the validation losses come from the
final checkpoint's trainer_state.json, the ZeRO figures from `accelerate launch` runs' metrics.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.models import load_model  # noqa: E402
from pipeline.muon import MuonSettings, hybrid_optimizer  # noqa: E402

TARGET = 2 / 3  # Muon should reach AdamW's final validation loss within this share of the tokens


def pretrain(run_dir: Path, optim: str, lr: float, steps: int, batch_size: int, overrides: list[str]) -> dict:
    eval_every = max(steps // 10, 1)
    subprocess.run(
        # stages.pretrain.optim=null: the optim group decides (preset=demo pins pretrain to Muon)
        [sys.executable, "-m", "pipeline", "run.stages=[pretrain]", f"run.dir={run_dir}", f"optim={optim}",
         "stages.pretrain.optim=null",
         f"stages.pretrain.lr={lr}", f"stages.pretrain.max_steps={steps}", f"stages.pretrain.batch_size={batch_size}",
         f"stages.pretrain.eval_steps={eval_every}", f"stages.pretrain.logging_steps={eval_every}",
         f"stages.pretrain.save_steps={steps}", "stages.pretrain.eval_problems=20", *overrides],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    stage = run_dir / "pretrain"
    metrics = json.loads((stage / "metrics.json").read_text())
    history = json.loads((stage / f"checkpoint-{steps}" / "trainer_state.json").read_text())["log_history"]
    tokens_per_step = metrics["train_tokens"] / metrics["train_steps"]
    curve = [(e["step"] * tokens_per_step, e["eval_loss"]) for e in history if "eval_loss" in e]
    return {"optim": optim, "lr": lr, "curve": curve, "final": curve[-1][1], "metrics": metrics, "final_dir": stage / "final"}


def tokens_to_reach(curve: list[tuple[float, float]], loss: float) -> float | None:
    """Tokens at which a validation curve first gets down to `loss` (linear between evals)."""
    previous = (0.0, float("inf"))
    for tokens, value in curve:
        if value <= loss:
            if previous[1] == float("inf"):
                return tokens
            return float(np.interp(loss, [value, previous[1]], [tokens, previous[0]]))
        previous = (tokens, value)
    return None


def optimizer_step_ms(model_dir: Path, lr: float, repeats: int = 10) -> dict[str, float]:
    """Wall time of optimizer.step() on the demo model with random gradients, per optimizer
    and, for the hybrid, per update rule."""
    model = load_model(str(model_dir))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizers = {
        "adamw": torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                   lr=lr, betas=(0.9, 0.95)),
        "muon": hybrid_optimizer(model, MuonSettings(lr, lr, 0.1, (0.9, 0.95), 1e-8, 0.95, "match_rms_adamw")),
    }
    timings: dict[str, float] = {}

    def timed(name: str, step) -> None:
        step()  # the first step allocates the state
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        timings[name] = 1000 * (time.perf_counter() - start) / repeats

    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    with torch.no_grad():
        for name, optimizer in optimizers.items():
            timed(name, optimizer.step)
        for rule, optimizer in optimizers["muon"].rules.items():
            timed(f"  muon: {rule} part", optimizer.step)
    return timings


def zero_state_mb(work: Path, overrides: list[str]) -> dict[tuple[str, str], float]:
    """optimizer_state_mb of rank 0 after a 2-step smoke pretrain: 1 process, and ZeRO-1/2/3 with 2."""
    results = {}
    common = ["preset=smoke", "run.stages=[pretrain]", "stages.pretrain.max_steps=2", "stages.pretrain.eval_steps=2",
              "stages.pretrain.save_steps=2", "stages.pretrain.eval_problems=4", *overrides]
    for optim in ("adamw", "muon"):
        for launch in ("1 process", "ZeRO-1", "ZeRO-2", "ZeRO-3"):
            run_dir = work / f"zero-{optim}-{launch.replace(' ', '')}"
            prefix = [sys.executable]
            if launch != "1 process":
                config = ROOT / "conf" / "accelerate" / f"zero{launch[-1]}.yaml"
                prefix = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2"]
            subprocess.run([*prefix, "-m", "pipeline", *common, f"optim={optim}", "stages.pretrain.optim=null", f"run.dir={run_dir}"],
                           cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results[optim, launch] = json.loads((run_dir / "pretrain" / "metrics.json").read_text())["optimizer_state_mb"]
    return results


def print_sweep(runs: list[dict]) -> None:
    print("\nlearning-rate sweep (final validation loss; * = tuned)")
    best = {optim: min((r for r in runs if r["optim"] == optim), key=lambda r: r["final"]) for optim in ("adamw", "muon")}
    for run in runs:
        mark = "*" if run is best[run["optim"]] else " "
        print(f"  {run['optim']:<6} lr={run['lr']:<8g} {run['final']:.4f} {mark}  "
              f"({run['metrics']['tokens_per_second']:,.0f} train tokens/s)")
    for optim, run in best.items():
        lrs = sorted(r["lr"] for r in runs if r["optim"] == optim)
        if len(lrs) > 2 and run["lr"] in (lrs[0], lrs[-1]):
            print(f"  note: {optim}'s best lr is at the edge of its sweep")


def print_curves(adamw: dict, muon: dict) -> None:
    print(f"\nvalidation loss, AdamW lr={adamw['lr']:g} vs Muon lr={muon['lr']:g}")
    print(f"  {'tokens':>10}  {'AdamW':>7}  {'Muon':>7}")
    for (tokens, a), (_, m) in zip(adamw["curve"], muon["curve"]):
        print(f"  {tokens:>10,.0f}  {a:7.4f}  {m:7.4f}")


def print_token_ratios(adamw: dict, muon: dict) -> None:
    budget = adamw["curve"][-1][0]
    muon_tokens = tokens_to_reach(muon["curve"], adamw["final"])
    adamw_tokens = tokens_to_reach(adamw["curve"], muon["final"])
    print(f"\ntoken budget per run: {budget:,.0f}")
    if muon_tokens is None:
        print(f"  Muon never reached AdamW's final loss {adamw['final']:.4f}  (target <= {TARGET:.2f}: MISSED)")
    else:
        verdict = "met" if muon_tokens / budget <= TARGET else "MISSED"
        print(f"  Muon reaches AdamW's final loss {adamw['final']:.4f} after {muon_tokens:,.0f} tokens = "
              f"{muon_tokens / budget:.2f} of AdamW's (target <= {TARGET:.2f}: {verdict})")
    if adamw_tokens is None:
        print(f"  AdamW does not reach Muon's final loss {muon['final']:.4f} within the budget "
              f"(tokens AdamW needs / Muon's: > 1.00)")
    else:
        print(f"  AdamW reaches Muon's final loss {muon['final']:.4f} after {adamw_tokens:,.0f} tokens "
              f"(tokens AdamW needs / Muon's: {adamw_tokens / budget:.2f})")


def float_list(text: str) -> list[float]:
    return [float(value) for value in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--adamw-lrs", type=float_list, default=[1e-3, 3e-3, 1e-2], help="comma-separated")
    parser.add_argument("--muon-lrs", type=float_list, default=[1e-3, 3e-3, 1e-2], help="comma-separated")
    parser.add_argument("--no-zero", action="store_true", help="skip the ZeRO memory runs")
    args, overrides = parser.parse_known_args()
    work = Path(tempfile.mkdtemp(prefix="bench-muon-"))
    print(f"Muon vs AdamW, {args.steps} steps x {args.batch_size} sequences per run (work dir {work})")

    start = time.perf_counter()
    runs = [pretrain(work / f"{optim}-{lr:g}", optim, lr, args.steps, args.batch_size, overrides)
            for optim, lrs in (("adamw", args.adamw_lrs), ("muon", args.muon_lrs)) for lr in lrs]
    adamw = min((r for r in runs if r["optim"] == "adamw"), key=lambda r: r["final"])
    muon = min((r for r in runs if r["optim"] == "muon"), key=lambda r: r["final"])
    print_sweep(runs)
    print_curves(adamw, muon)
    print_token_ratios(adamw, muon)

    print("\noptimizer.step() on the demo model, ms (random gradients, this machine)")
    for name, ms in optimizer_step_ms(adamw["final_dir"], adamw["lr"]).items():
        print(f"  {name:<26} {ms:8.1f}")

    if not args.no_zero:
        print("\noptimizer state held by rank 0, MB (moments, momentum buffers), same model")
        sizes = zero_state_mb(work, [o for o in overrides if not o.startswith("preset=")])
        launches = ("1 process", "ZeRO-1", "ZeRO-2", "ZeRO-3")
        print(f"  {'':<6}" + "".join(f"{launch + (' x2' if launch != '1 process' else ''):>14}" for launch in launches))
        for optim in ("adamw", "muon"):
            single = sizes[optim, "1 process"]
            cells = [f"{single:14.2f}"] + [f"{sizes[optim, l]:7.2f} ({sizes[optim, l] / single:.2f})" for l in launches[1:]]
            print(f"  {optim:<6}" + "".join(f"{cell:>14}" for cell in cells))
    print(f"\nbenchmark wall time: {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
