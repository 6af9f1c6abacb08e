"""RL compute-scaling fit (ScaleRL, Khatri et al. 2025): held-out pass rate against compute follows

    R(C) = R0 + (A - R0) / (1 + (C_mid / C) ** B)

A is the asymptotic pass rate, B the scaling exponent (how sharply the curve rises), C_mid the
compute at which half of the gain A - R0 is reached, R0 the pass rate before training. The fit
is a bounded least-squares fit (scipy) to the points after an initial warm-up fraction of the
compute range; the early points of an RL run sit on a transient that the sigmoid does not model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ScalingFit:
    A: float  # asymptote
    B: float  # exponent
    C_mid: float  # compute at half the gain
    R0: float  # pass rate at zero compute (given or fitted)
    rmse: float  # root mean squared residual of the fitted points
    num_points: int  # points the fit used (after the warm-up cut)

    def as_metrics(self, prefix: str = "scaling") -> dict[str, float]:
        return {f"{prefix}_{k}": float(v) for k, v in asdict(self).items()}


def sigmoid_curve(compute, A: float, B: float, C_mid: float, R0: float):
    """R(C) for compute C >= 0 (array or scalar); R(0) = R0."""
    compute = np.asarray(compute, dtype=float)
    with np.errstate(divide="ignore", over="ignore"):
        ratio = np.where(compute > 0, (C_mid / np.where(compute > 0, compute, 1.0)) ** B, np.inf)
    return R0 + (A - R0) / (1.0 + ratio)


def fit_scaling(
    compute, pass_rate, *, r0: float | None = None, warmup_fraction: float = 0.0, min_points: int | None = None
) -> ScalingFit:
    """Fit A, B, C_mid (and R0 when `r0` is None) to (compute, pass rate) points.

    Points with compute <= warmup_fraction * max(compute) are skipped (and points at zero
    compute always are: they only inform R0). Raises ValueError when fewer than `min_points`
    remain (default: one more than the number of fitted parameters) or the fit does not converge.
    """
    compute = np.asarray(compute, dtype=float)
    pass_rate = np.asarray(pass_rate, dtype=float)
    if compute.shape != pass_rate.shape or compute.ndim != 1:
        raise ValueError(f"compute and pass_rate must be 1-D and of equal length, got {compute.shape} and {pass_rate.shape}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction={warmup_fraction} must be in [0, 1)")
    n_params = 3 if r0 is not None else 4
    min_points = n_params + 1 if min_points is None else min_points
    if compute.size == 0:
        raise ValueError(f"the scaling fit needs at least {min_points} (compute, pass rate) points, got none")
    keep = compute > max(warmup_fraction * compute.max(), 0.0)
    x, y = compute[keep], pass_rate[keep]
    if x.size < min_points:
        raise ValueError(
            f"the scaling fit needs at least {min_points} (compute, pass rate) points after the warm-up "
            f"({warmup_fraction:.0%} of the compute range), got {x.size} of {compute.size}; "
            "measure the pass rate more often or train longer"
        )
    c_lo, c_hi = float(x.min()), float(x.max())
    # C_mid and B enter as log C_mid and log B: the residuals are far better conditioned that way
    if r0 is None:
        def model(c, A, log_b, log_cmid, R0):
            return sigmoid_curve(c, A, math.exp(log_b), math.exp(log_cmid), R0)

        p0 = [float(y.max()), 0.0, math.log(float(np.median(x))), float(y.min())]
        bounds = ([0.0, math.log(0.05), math.log(c_lo) - 5, 0.0], [1.0, math.log(20.0), math.log(c_hi) + 5, 1.0])
    else:
        def model(c, A, log_b, log_cmid):
            return sigmoid_curve(c, A, math.exp(log_b), math.exp(log_cmid), r0)

        p0 = [float(np.clip(y.max(), 0.0, 1.0)), 0.0, math.log(float(np.median(x)))]
        bounds = ([0.0, math.log(0.05), math.log(c_lo) - 5], [1.0, math.log(20.0), math.log(c_hi) + 5])
    from scipy.optimize import curve_fit

    try:
        params, _ = curve_fit(model, x, y, p0=p0, bounds=bounds, maxfev=20000)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"the scaling fit did not converge on {x.size} points: {err}") from err
    A, log_b, log_cmid = (float(p) for p in params[:3])
    R0 = float(params[3]) if r0 is None else float(r0)
    rmse = float(np.sqrt(np.mean((model(x, *params) - y) ** 2)))
    return ScalingFit(A=A, B=math.exp(log_b), C_mid=math.exp(log_cmid), R0=R0, rmse=rmse, num_points=int(x.size))


def plot_scaling(path: Path, compute, pass_rate, fit: ScalingFit | None, xlabel: str = "compute (tokens)") -> Path:
    """Save the measured points and, when there is one, the fitted curve (with A marked) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compute = np.asarray(compute, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(compute, pass_rate, "o", label="held-out pass rate")
    if fit is not None and compute.max() > 0:
        grid = np.linspace(0.0, compute.max() * 1.5, 200)
        ax.plot(grid, sigmoid_curve(grid, fit.A, fit.B, fit.C_mid, fit.R0),
                label=f"fit: A={fit.A:.3f}, B={fit.B:.2f}, C_mid={fit.C_mid:.3g}")
        ax.axhline(fit.A, linestyle=":", color="gray")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pass rate")
    ax.set_title("RL compute scaling")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
