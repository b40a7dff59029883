"""Parameter recovery on simulated data with known truth (seeded), for the exact REML engine.

Run with ``-s`` to see the printed coverage and mean estimates:
``/work/venv/bin/python -m pytest tests/test_reml_recovery.py -q -s``
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from therapist_effects.models.reml import NestedModel, RandomInterceptModel


def simulate_ri(rng: np.random.Generator, n_therapists: int, caseload: int, icc: float,
                beta: tuple[float, float] = (10.0, 0.5)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patients of therapists: y = b0 + b1 x + u_therapist + e, total variance 1 (given x),
    therapist share ``icc``; x is an intake score varying within and between therapists."""
    t = np.repeat(np.arange(n_therapists), caseload)
    x = rng.normal(size=t.size) + 0.5 * rng.normal(size=n_therapists)[t]
    u = rng.normal(scale=np.sqrt(icc), size=n_therapists)[t]
    e = rng.normal(scale=np.sqrt(1.0 - icc), size=t.size)
    X = np.column_stack([np.ones(t.size), x])
    return X @ np.asarray(beta) + u + e, X, t


def test_icc_profile_interval_coverage_and_bias(capsys):
    """1,000 data sets, 100 therapists x 30 patients, true ICC .05: the 95% REML profile
    interval of the ICC covers the truth 93-97% of the time and the mean estimate is within
    .002 of the truth."""
    true_icc, n_sets = 0.05, 1000
    rng = np.random.default_rng(20240611)
    est, cover, lows = np.empty(n_sets), np.empty(n_sets, bool), np.empty(n_sets)
    for k in range(n_sets):
        y, X, t = simulate_ri(rng, 100, 30, true_icc)
        res = RandomInterceptModel(y, X, t, exog_names=["(Intercept)", "intake"]).fit()
        lo, hi = res.icc_interval(0.95, method="profile")
        est[k], lows[k] = res.icc(), lo
        cover[k] = lo <= true_icc <= hi
    coverage, mean_icc = cover.mean(), est.mean()
    with capsys.disabled():
        print(f"\n[ICC recovery] {n_sets} data sets, 100 therapists x 30 patients, true ICC "
              f"{true_icc}: 95% profile-interval coverage {coverage:.3f}, mean ICC estimate "
              f"{mean_icc:.5f} (MC SE {est.std(ddof=1) / np.sqrt(n_sets):.5f})")
    assert 0.93 <= coverage <= 0.97
    assert abs(mean_icc - true_icc) < 0.002
    assert np.all(lows >= 0.0)


def test_singular_fits_occur_with_zero_truth_and_intervals_keep_lower_end_zero():
    """With no therapist variance, about half of the REML estimates sit exactly at 0 (the
    boundary mixture behind the 0.5 chi2_0 + 0.5 chi2_1 LRT reference); the LRT's rejection
    rate at 5% is close to (below) 5%."""
    rng = np.random.default_rng(7)
    n_sets = 300
    zero, reject = 0, 0
    for _ in range(n_sets):
        y, X, t = simulate_ri(rng, 30, 10, 0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = RandomInterceptModel(y, X, t).fit()
            zero += res.vcomp["therapist"] == 0.0
            reject += res.lrt()["p_value"] < 0.05
            if res.singular:
                assert res.icc_interval()[0] == 0.0
    assert 0.35 < zero / n_sets < 0.65
    assert reject / n_sets < 0.08


def test_nested_recovers_variance_components():
    """Therapists nested in 40 services: mean REML estimates of the three variances are
    within 3 Monte-Carlo standard errors (+1%) of the truth."""
    rng = np.random.default_rng(99)
    s2_c, s2_t, s2 = 0.04, 0.08, 0.88
    n_sets, C, T, m = 60, 40, 8, 12
    est = np.empty((n_sets, 3))
    for k in range(n_sets):
        c = np.repeat(np.arange(C), T * m)
        t = np.repeat(np.arange(C * T), m)
        y = (1.0 + rng.normal(scale=np.sqrt(s2_c), size=C)[c]
             + rng.normal(scale=np.sqrt(s2_t), size=C * T)[t]
             + rng.normal(scale=np.sqrt(s2), size=t.size))
        res = NestedModel(y, np.ones((t.size, 1)), t, c).fit()
        est[k] = res.vcomp["cluster"], res.vcomp["therapist"], res.vcomp["residual"]
    mc_se = est.std(axis=0, ddof=1) / np.sqrt(n_sets)
    truth = np.array([s2_c, s2_t, s2])
    assert np.all(np.abs(est.mean(axis=0) - truth) < 3 * mc_se + 0.01 * truth)


def test_parametric_bootstrap_recovers_the_generating_values_and_is_seeded():
    """The bootstrap simulates from the fitted model, so its replicates' means recover the
    fitted (generating) values; the same seed gives identical replicates."""
    rng = np.random.default_rng(3)
    y, X, t = simulate_ri(rng, 60, 20, 0.1)
    res = RandomInterceptModel(y, X, t, exog_names=["(Intercept)", "intake"]).fit()
    bt = res.bootstrap(400, seed=12)
    assert len(bt) == 400 and bt["converged"].all()
    for col in ("(Intercept)", "intake", "therapist", "residual"):
        mc_se = bt[col].std(ddof=1) / np.sqrt(len(bt))
        # REML variances are unbiased up to truncation at 0 (rare at this ICC)
        assert abs(bt[col].mean() - res.params[col]) < 4 * mc_se
    again = RandomInterceptModel(y, X, t, exog_names=["(Intercept)", "intake"]).fit().bootstrap(400, 12)
    assert again.equals(bt)
    lo, hi = res.icc_interval(method="bootstrap", n_boot=400, seed=12)
    assert lo == pytest.approx(np.quantile(bt["icc"], 0.025)) and hi > res.icc() > lo
    plo, phi = res.icc_interval(method="profile")
    assert abs(lo - plo) < 0.5 * (phi - plo) and abs(hi - phi) < 0.5 * (phi - plo)
