"""Profile intervals of singular fits (issue 9): the search brackets outward to the edge of the
parameter space, so a therapist variance estimated at exactly 0 gets the finite upper limit its
profile implies, for the variance, the ICC and the per-cluster ICCs.

References:
- an independent dense-matrix (RE)ML deviance (below), evaluated on a dense grid;
- lme4 1.1-31 ``confint(fit, method = "profile")`` on ``singular_profile.csv`` (8 therapists x 10
  patients, no therapist effect; written by ``tests/reference/singular_profile.R``).
"""

from __future__ import annotations

import json
import math
import time
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats

from refdata import REFERENCE_DIR
from therapist_effects.engine.inference import profile_limit
from therapist_effects.meta import per_cluster_estimates
from therapist_effects.models.reml import RandomInterceptModel

Q95 = float(stats.chi2.ppf(0.95, 1))


@pytest.fixture(scope="module")
def ref():
    return json.loads((REFERENCE_DIR / "singular_profile.json").read_text())


@pytest.fixture(scope="module")
def data():
    return pd.read_csv(REFERENCE_DIR / "singular_profile.csv")


@pytest.fixture(scope="module")
def fit(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RandomInterceptModel.from_frame(data, "y", ["x"]).fit()


def _dense_deviance(data: pd.DataFrame, sd_t: float, sigma: float | None, reml: bool,
                    g: float | None = None) -> float:
    """-2 logLik of y ~ x + (1 | therapist) from the full n x n covariance matrix (no sufficient
    statistics): ML at (sd_t, sigma), or, with ``g`` given, the (RE)ML criterion at the variance
    ratio g with sigma^2 profiled out (lme4's deviance / REMLcrit). V = a I + c ZZ' is inverted
    through the eigen-decomposition of ZZ' (computed once per data set)."""
    key = id(data)
    if key not in _EIG:
        y = data["y"].to_numpy(float)
        X = np.column_stack([np.ones(len(y)), data["x"].to_numpy(float)])
        Z = pd.get_dummies(data["therapist"]).to_numpy(float)
        lam, U = np.linalg.eigh(Z @ Z.T)
        _EIG[key] = (U.T @ y, U.T @ X, lam)
    uy, uX, lam = _EIG[key]
    n, p = uX.shape
    ev = 1.0 + g * lam if g is not None else sigma ** 2 + sd_t ** 2 * lam  # eigenvalues of V
    w = 1.0 / ev
    XtViX = uX.T @ (uX * w[:, None])
    b = np.linalg.solve(XtViX, uX.T @ (uy * w))
    e = uy - uX @ b
    r = float(e @ (e * w))
    ldv = float(np.log(ev).sum())
    if g is None:
        return n * math.log(2 * math.pi) + ldv + r
    m = n - p if reml else n
    crit = m * (1 + math.log(2 * math.pi * r / m)) + ldv
    return crit + (np.linalg.slogdet(XtViX)[1] if reml else 0.0)


_EIG: dict = {}


def _grid_root(f, grid: np.ndarray, target: float) -> float:
    """First upward crossing of ``f = target`` on a dense grid, linearly interpolated."""
    vals = np.array([f(x) for x in grid])
    k = int(np.flatnonzero(vals >= target)[0])
    x0, x1, v0, v1 = grid[k - 1], grid[k], vals[k - 1], vals[k]
    return float(x0 + (target - v0) * (x1 - x0) / (v1 - v0))


def test_singular_fit_like_lme4(fit, ref):
    assert ref["REML"]["singular"] and fit.singular
    assert fit.vcomp["therapist"] == 0.0
    assert fit.loglik == pytest.approx(ref["REML"]["logLik"], rel=1e-9)  # logLik(fit)
    assert math.sqrt(fit.vcomp["residual"]) == pytest.approx(ref["REML"]["sigma"], rel=1e-6)  # sigma(fit)


def test_variance_upper_limit_is_the_profile_root(fit, data):
    """Upper limit of the therapist variance: root of the ML profile deviance in the therapist SD
    (sigma re-optimised), located on a dense grid of an independent dense-matrix deviance."""
    ci = fit.conf_int()
    lo, hi = ci.loc["therapist", "lower"], ci.loc["therapist", "upper"]
    assert lo == 0.0 and math.isfinite(hi)

    def prof(sd_t):
        res = optimize.minimize_scalar(lambda ls: _dense_deviance(data, sd_t, math.exp(ls), False),
                                       bounds=(-3, 3), method="bounded", options={"xatol": 1e-10})
        return res.fun

    dmin = prof(0.0)  # the ML optimum is singular too
    grid = np.linspace(0.40, 0.47, 701)  # step 1e-4 in the SD
    root = _grid_root(lambda s: prof(s) - dmin, grid, Q95)
    assert math.sqrt(hi) == pytest.approx(root, abs=2e-5)


def test_icc_upper_limit_is_the_profile_root(fit, data):
    """Upper limit of the ICC: root of the REML criterion in the variance ratio g (ICC = g/(1+g)),
    checked on a dense grid of the independent dense-matrix REML criterion; below 1."""
    lo, hi = fit.icc_interval()
    assert lo == 0.0 and 0.0 < hi < 0.5
    cmin = _dense_deviance(data, 0, None, True, g=0.0)
    grid = np.linspace(0.0, 0.5, 5001)  # step 1e-4 in g
    g_root = _grid_root(lambda g: _dense_deviance(data, 0, None, True, g=g) - cmin, grid, Q95)
    assert hi == pytest.approx(g_root / (1 + g_root), abs=1e-5)


def test_profile_intervals_agree_with_lme4(fit, ref):
    """lme4's confint(method = "profile") refits by ML; it interpolates a spline (near the boundary
    linearly, ~3%), so agreement is to its precision, and the ML root to 1e-5."""
    ci = fit.conf_int()
    ml = dict(zip(ref["confint_profile_ML"]["rows"],
                  zip(ref["confint_profile_ML"]["lower"], ref["confint_profile_ML"]["upper"])))
    reml = dict(zip(ref["confint_profile"]["rows"],
                    zip(ref["confint_profile"]["lower"], ref["confint_profile"]["upper"])))
    sd_lo, sd_hi = np.sqrt(ci.loc["therapist"].to_numpy())
    # confint(lmer(y ~ x + (1|therapist), REML = FALSE), method = "profile")["sd_(Intercept)|therapist", ]
    assert sd_lo == 0.0 == ml["sd_(Intercept)|therapist"][0]
    assert sd_hi == pytest.approx(ml["sd_(Intercept)|therapist"][1], rel=1e-5)
    # confint(lmer(..., REML = TRUE), method = "profile"): the same profile, another spline
    assert sd_hi == pytest.approx(reml["sd_(Intercept)|therapist"][1], rel=0.03)
    # sigma row of confint(..., method = "profile")
    s_lo, s_hi = np.sqrt(ci.loc["residual"].to_numpy())
    assert (s_lo, s_hi) == pytest.approx(ml["sigma"], rel=1e-3)  # lme4's spline: ~4e-4 here
    assert tuple(ci.loc["x"]) == pytest.approx(ml["x"], rel=1e-4)


def test_profile_limit_brackets_to_the_edge():
    """The generic root search: from an estimate at 0 it finds a root far away (where a search of
    40 small steps stopped at ~0.03), stops at a finite edge whose excess is below the cut-off,
    and reports an open side only beyond the ceiling."""
    lim = profile_limit(lambda g: (g / 50.0) ** 2, 0.0, Q95, +1, lower=0.0, step=0.25,
                        log_scale=True, scale=1e-3)
    assert lim.status == "root" and lim.value == pytest.approx(50 * math.sqrt(Q95), rel=1e-10)
    lim = profile_limit(lambda r: 2.0 * (r - 0.5) ** 2, 0.5, Q95, +1, lower=-1.0, upper=1.0, step=0.1)
    assert lim.status == "edge" and lim.value == 1.0
    lim = profile_limit(lambda r: 40.0 * (r - 0.5) ** 2, 0.5, Q95, -1, lower=-1.0, upper=1.0, step=0.1)
    assert lim.status == "root" and lim.value == pytest.approx(0.5 - math.sqrt(Q95 / 40), rel=1e-10)
    lim = profile_limit(lambda g: 1.0 - 1.0 / (1.0 + g), 0.0, Q95, +1, lower=0.0, step=0.25,
                        log_scale=True, scale=1e-3)
    assert lim.status == "open" and lim.value == math.inf


def test_per_cluster_singular_trial_gets_a_finite_upper_limit(data):
    """per_cluster.csv uses the same interval: a singular trial's ICC interval is [0, u] with u < 1,
    the same u as the single-trial fit."""
    rng = np.random.default_rng(3)
    other = data.copy()
    other["therapist"] = "U" + other["therapist"]
    other["y"] = 1 + 0.5 * other["x"] + rng.normal(0, 1, 8)[np.arange(80) // 10] + rng.normal(0, 1, 80)
    both = pd.concat([data.assign(trial="A"), other.assign(trial="B")], ignore_index=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pc = per_cluster_estimates(both, "y", ["x"], therapist="therapist", cluster="trial")
        single = RandomInterceptModel.from_frame(data, "y", ["x"]).fit().icc_interval()
    row = pc.set_index("cluster").loc["A"]
    assert row["singular"] and row["icc"] == 0.0
    assert row["icc_ci_low"] == 0.0 and row["icc_ci_high"] == pytest.approx(single[1], rel=1e-9) and single[1] < 1


def _simulate(rng: np.random.Generator, k: int, n: int, icc: float) -> tuple[np.ndarray, np.ndarray]:
    u = rng.normal(0.0, math.sqrt(icc), k)
    y = np.repeat(u, n) + rng.normal(0.0, math.sqrt(1.0 - icc), k * n)
    return y, np.repeat(np.arange(k), n)


def test_icc_profile_coverage_with_singular_fits():
    """1,000 data sets of 10 therapists x 10 patients at ICC .05: coverage of the 95% ICC profile
    interval, singular fits included (they now have finite upper limits; before, every one reported
    an upper limit of 1). Printed (``pytest -s``); ~12 s."""
    rng = np.random.default_rng(20261129)
    truth, reps = 0.05, 1000
    covered = singular = 0
    upper_singular = []
    t0 = time.perf_counter()
    X = np.ones((100, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(reps):
            y, t = _simulate(rng, 10, 10, truth)
            res = RandomInterceptModel(y, X, t).fit()
            lo, hi = res.icc_interval()
            covered += lo <= truth <= hi
            if res.singular:
                singular += 1
                upper_singular.append(hi)
    cov = covered / reps
    print(f"\nICC profile interval, 10x10 at ICC .05, {reps} data sets: coverage {cov:.3f} "
          f"({singular} singular fits, their upper limits: median {np.median(upper_singular):.3f}, "
          f"max {np.max(upper_singular):.3f}); {time.perf_counter() - t0:.1f} s")
    assert singular > 100 and max(upper_singular) < 1.0
    se = math.sqrt(0.95 * 0.05 / reps)
    assert abs(cov - 0.95) < 4 * se + 0.02  # nominal up to the profile's small-sample error
