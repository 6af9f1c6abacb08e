"""The RL compute-scaling fit recovers known parameters and refuses to fit too few points."""

import numpy as np
import pytest

from pipeline.scaling import fit_scaling, plot_scaling, sigmoid_curve

TRUE = dict(A=0.61, B=1.9, C_mid=2500.0, R0=0.12)


def synthetic(n: int = 24, noise: float = 0.005, seed: int = 0):
    rng = np.random.default_rng(seed)
    compute = np.geomspace(150, 60000, n)
    return compute, sigmoid_curve(compute, **TRUE) + rng.normal(0.0, noise, n)


def test_curve_shape():
    assert sigmoid_curve(0.0, **TRUE) == pytest.approx(TRUE["R0"])
    assert sigmoid_curve(TRUE["C_mid"], **TRUE) == pytest.approx((TRUE["A"] + TRUE["R0"]) / 2)
    assert sigmoid_curve(1e12, **TRUE) == pytest.approx(TRUE["A"], abs=1e-6)


@pytest.mark.parametrize("r0", [TRUE["R0"], None])
def test_fit_recovers_synthetic_parameters(r0):
    compute, rate = synthetic()
    fit = fit_scaling(compute, rate, r0=r0)
    assert fit.A == pytest.approx(TRUE["A"], abs=0.02)
    assert fit.B == pytest.approx(TRUE["B"], rel=0.15)
    assert fit.C_mid == pytest.approx(TRUE["C_mid"], rel=0.15)
    assert fit.R0 == pytest.approx(TRUE["R0"], abs=0.03)
    assert 0.002 < fit.rmse < 0.01  # about the noise level: neither a failed fit nor an overfit
    assert fit.num_points == len(compute)
    assert set(fit.as_metrics()) == {"scaling_A", "scaling_B", "scaling_C_mid", "scaling_R0", "scaling_rmse", "scaling_num_points"}


def test_fit_is_not_fooled_by_a_different_curve():
    compute, _ = synthetic()
    rate = sigmoid_curve(compute, A=0.9, B=0.8, C_mid=20000.0, R0=0.12)
    fit = fit_scaling(compute, rate, r0=0.12)
    assert fit.A == pytest.approx(0.9, abs=0.02) and fit.B == pytest.approx(0.8, rel=0.1)


def test_warmup_fraction_skips_the_early_points_and_zero_compute():
    compute, rate = synthetic()
    compute, rate = np.concatenate([[0.0], compute]), np.concatenate([[TRUE["R0"]], rate])
    fit = fit_scaling(compute, rate, r0=TRUE["R0"], warmup_fraction=0.05)
    assert fit.num_points == int(np.sum(compute > 0.05 * compute.max()))
    assert fit.num_points < len(compute) - 1
    assert fit.A == pytest.approx(TRUE["A"], abs=0.03)


def test_too_few_points_is_refused_with_a_clear_message():
    compute, rate = synthetic(n=3)
    with pytest.raises(ValueError, match=r"needs at least 4 \(compute, pass rate\) points.*got 3 of 3"):
        fit_scaling(compute, rate, r0=0.1)
    with pytest.raises(ValueError, match=r"needs at least 5 .*got 3"):
        fit_scaling(compute, rate)  # R0 free: one more parameter
    compute, rate = synthetic(n=10)
    with pytest.raises(ValueError, match=r"after the warm-up \(95% of the compute range\), got 1 of 10"):
        fit_scaling(compute, rate, r0=0.1, warmup_fraction=0.95)
    with pytest.raises(ValueError, match="got none"):
        fit_scaling([], [], r0=0.1)


def test_plot_is_written(tmp_path):
    compute, rate = synthetic()
    path = plot_scaling(tmp_path / "fit.png", compute, rate, fit_scaling(compute, rate, r0=TRUE["R0"]))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
