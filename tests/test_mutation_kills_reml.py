"""Tests that kill mutants of reml.py and profile.py found by ``MUTATION_SAMPLE=... tools/mutation.sh reml|profile``.

Expected values are independent of the code under test: closed forms of the balanced one-way ANOVA
(Searle, Casella & McCulloch 1992, sec. 3.7 and 4.7) and dense-matrix Gaussian likelihoods in numpy."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats
from threadpoolctl import threadpool_limits

from test_surviving_mutants import _balanced
from therapist_effects.exceptions import ConvergenceWarning, ModelError, SingularFitWarning, StatisticalWarning
from therapist_effects.models.profile import BOUNDARY_TOL, LOG_G_GRID, min1d_local, min_nd_local, min_nonneg_global
from therapist_effects.models.reml import NestedModel, RandomInterceptModel

LOG2PI = math.log(2.0 * math.pi)


def _dense_loglik(y, X, V, reml):
    """Gaussian (restricted) log-likelihood with ``V`` known, fixed effects at their GLS values."""
    n, p = X.shape
    W = np.linalg.inv(V)
    XWX = X.T @ W @ X
    b = np.linalg.solve(XWX, X.T @ W @ y)
    e = y - X @ b
    ll = -0.5 * (n * LOG2PI + np.linalg.slogdet(V)[1] + e @ W @ e)
    if reml:
        ll += 0.5 * p * LOG2PI - 0.5 * np.linalg.slogdet(XWX)[1]
    return ll


def _reml_null_loglik(y):
    """REML log-likelihood of ``lm(y ~ 1)``: -1/2 [(n-1) log(2 pi s^2) + log n + (n-1)], s^2 = var(y)."""
    n = len(y)
    s2 = np.var(y, ddof=1)
    return -0.5 * ((n - 1) * math.log(2 * math.pi * s2) + math.log(n) + (n - 1))


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_balanced_random_intercept_fit_is_the_anova_closed_form(method):
    G, m, msb, msw = 8, 5, 9.0, 2.0
    y, t = _balanced(G, m, msb, msw, 0)
    n = len(y)
    res = RandomInterceptModel(y, np.ones((n, 1)), t, method=method).fit()
    tau2 = (msb - msw) / m if method == "REML" else ((1 - 1 / G) * msb - msw) / m
    assert res.vcomp["residual"] == pytest.approx(msw, rel=1e-6)
    assert res.vcomp["therapist"] == pytest.approx(tau2, rel=1e-5)
    assert res.fe_params.iloc[0] == pytest.approx(y.mean(), rel=1e-12)
    # vcov of the mean: (s2 + m tau2) / (G m), which is MSB / (G m) under REML
    assert res.bse.iloc[0] == pytest.approx(math.sqrt((msw + m * tau2) / n), rel=1e-5)
    assert res.icc() == pytest.approx(tau2 / (tau2 + msw), rel=1e-5)
    codes = np.repeat(np.arange(G), m)
    V = msw * np.eye(n) + tau2 * (codes[:, None] == codes[None, :])
    assert res.loglik == pytest.approx(_dense_loglik(y, np.ones((n, 1)), V, method == "REML"), rel=1e-9)
    assert not res.singular and res.converged
    assert res.n_obs == n and res.n_therapists == G


def test_balanced_lrt_and_icc_profile_by_hand():
    """LRT against lm's REML log-likelihood (p halved, abs=0); ICC profile ends from the closed-form
    restricted likelihood in k = tau2 / s2: -2 l(k) = (N-1) log(SSW + SSB / (1 + m k)) + (G-1) log(1 + m k)."""
    G, m, msb, msw = 10, 4, 4.0, 2.0
    y, t = _balanced(G, m, msb, msw, seed=5)
    n = len(y)
    res = RandomInterceptModel(y, np.ones((n, 1)), t).fit()
    stat = 2 * (res.loglik - _reml_null_loglik(y))
    lrt = res.lrt()
    assert lrt["statistic"] == pytest.approx(stat, rel=1e-7)
    assert lrt["p_value"] == pytest.approx(0.5 * stats.chi2.sf(stat, 1), rel=1e-6, abs=0)
    ssb, ssw = msb * (G - 1), msw * G * (m - 1)

    def dev(k):
        return (n - 1) * math.log(ssw + ssb / (1 + m * k)) + (G - 1) * math.log(1 + m * k)

    khat = (msb - msw) / (m * msw)
    q = stats.chi2.ppf(0.95, 1)
    lo = optimize.brentq(lambda k: dev(k) - dev(khat) - q, 0.0, khat) if dev(0) - dev(khat) > q else 0.0
    hi = optimize.brentq(lambda k: dev(k) - dev(khat) - q, khat, 100.0)
    iv = res.icc_interval(0.95)
    assert iv[0] == pytest.approx(lo / (1 + lo), rel=1e-4)
    assert iv[1] == pytest.approx(hi / (1 + hi), rel=1e-4)


def _nested_data(seed=2, C=5, per=3, m=4):
    rng = np.random.default_rng(seed)
    G = C * per
    cl = np.repeat(np.arange(C), per)
    sizes = m + rng.integers(-1, 3, size=G)
    codes = np.repeat(np.arange(G), sizes)
    n = len(codes)
    x = rng.normal(size=n)
    y = 3.0 + 0.4 * x + 1.2 * rng.normal(size=C)[cl[codes]] + 0.9 * rng.normal(size=G)[codes] + rng.normal(size=n)
    return y, np.column_stack([np.ones(n), x]), codes, cl[codes]


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_nested_fit_is_the_dense_likelihood_maximum(method):
    """The reported variances maximise the dense (restricted) likelihood: the log-likelihood equals the
    dense one at the estimate, and no nearby point (+-2% in each variance) is higher."""
    y, X, codes, cl = _nested_data()
    n = len(y)
    res = NestedModel(y, X, codes, cl, method=method).fit()
    reml = method == "REML"
    same_t = codes[:, None] == codes[None, :]
    same_c = cl[:, None] == cl[None, :]

    def ll(vt, vc, s2):
        return _dense_loglik(y, X, s2 * np.eye(n) + vt * same_t + vc * same_c, reml)

    v = res.vcomp
    best = ll(v["therapist"], v["cluster"], v["residual"])
    assert res.loglik == pytest.approx(best, rel=1e-10)
    for dt, dc, ds in [(1.02, 1, 1), (0.98, 1, 1), (1, 1.02, 1), (1, 0.98, 1), (1, 1, 1.02), (1, 1, 0.98)]:
        assert ll(v["therapist"] * dt, v["cluster"] * dc, v["residual"] * ds) < best
    W = np.linalg.inv(v["residual"] * np.eye(n) + v["therapist"] * same_t + v["cluster"] * same_c)
    cov = np.linalg.inv(X.T @ W @ X)
    np.testing.assert_allclose(res.bse.to_numpy(), np.sqrt(np.diag(cov)), rtol=1e-8)
    np.testing.assert_allclose(res.cov_params.loc[["(Intercept)", "x1"], ["(Intercept)", "x1"]], cov, rtol=1e-8)
    np.testing.assert_allclose(res.fe_params.to_numpy(), cov @ X.T @ W @ y, rtol=1e-9)
    tot = sum(v.values())
    assert res.icc() == pytest.approx(v["therapist"] / tot, rel=1e-12)
    assert res.icc_cluster() == pytest.approx(v["cluster"] / tot, rel=1e-12)


# -- profile.py's minimisers on functions with known minima ---------------------------------------
def _bowl(c: float, a: float = 2.0):
    return lambda x: a * (x - c) ** 2 + 0.5 * (x - c) ** 4 + 3.0


@pytest.mark.parametrize("x0, c, lo", [(0.0, 0.4, -np.inf), (0.0, -0.4, -np.inf), (0.0, 37.0, -np.inf),
                                       (0.0, -37.0, -np.inf), (1.0, 1.02, -np.inf), (5.0, 2.0, 0.0)])
def test_min1d_local_finds_interior_minima_right_left_near_and_far(x0, c, lo):
    x, fx = min1d_local(_bowl(c), x0, 0.1, lo)
    assert x == pytest.approx(c, abs=1e-6)
    assert fx == pytest.approx(3.0, abs=1e-12)


@pytest.mark.parametrize("x0, lo", [(0.0, -0.05), (0.0, -3.0), (-0.3, -0.3), (2.0, 1.0)])
def test_min1d_local_returns_the_bound_exactly_when_the_minimum_lies_below_it(x0, lo):
    """Minimum of the bowl at -10, below every bound: the answer is the bound and f there."""
    f = _bowl(-10.0)
    x, fx = min1d_local(f, x0, 0.1, lo)
    assert x == lo and fx == f(lo)


def test_min_nonneg_global_interior_tiny_boundary_and_runaway():
    # interior: minimum at g = 2.5 in the middle of the grid
    g, fg, ok = min_nonneg_global(lambda g: (math.log(g + 1e-300) - math.log(2.5)) ** 2 if g > 0 else 50.0)
    assert ok and g == pytest.approx(2.5, rel=1e-9) and fg == pytest.approx(0.0, abs=1e-15)
    # tiny interior minimum, below the grid's first point exp(-14): refined on theta = sqrt(g)
    g, fg, ok = min_nonneg_global(lambda g: (math.sqrt(g) - 1e-4) ** 2 * 1e10)
    assert ok and math.sqrt(g) == pytest.approx(1e-4, rel=1e-6) and fg == pytest.approx(0.0, abs=1e-9)
    # boundary: increasing in g; exactly 0, f(0) reported
    g, fg, ok = min_nonneg_global(lambda g: 1.0 + g)
    assert ok and g == 0.0 and fg == 1.0
    # a boundary within BOUNDARY_TOL of the interior optimum wins; 1e-6 above it does not
    g, _, _ = min_nonneg_global(lambda g: (math.log(g) - 1.0) ** 2 if g > 0 else 5e-10)
    assert g == 0.0
    g, _, _ = min_nonneg_global(lambda g: (math.log(g) - 1.0) ** 2 if g > 0 else 1e-6)
    assert g == pytest.approx(math.e, rel=1e-8)
    # decreasing without end: the top of the grid, not converged
    g, fg, ok = min_nonneg_global(lambda g: 1.0 / (1.0 + g))
    assert ok is False and g == pytest.approx(math.exp(10.0), rel=1e-3) and fg == pytest.approx(1 / (1 + g), rel=1e-12)


def test_min_nd_local_one_and_two_coordinates_with_a_bound():
    """Two coordinates with the minimum on the bound of the first (Newton cannot vouch there, so the nested
    1-D searches answer): the first exactly on its bound, the second at its conditional optimum."""
    x, fx = min_nd_local(lambda z: float((z[0] - 2.0) ** 2 + 1.0), np.array([0.0]), np.array([0.1]), np.array([0.0]))
    assert x[0] == pytest.approx(2.0, abs=1e-7) and fx == pytest.approx(1.0, abs=1e-12)

    def f(z):
        return float((z[0] + 0.5) ** 2 + (z[1] - 1.0) ** 2 + 0.5 * z[0] * (z[1] - 1.0) + 2.0)

    x, fx = min_nd_local(f, np.array([0.4, 0.2]), np.array([0.1, 0.1]), np.array([0.0, -np.inf]))
    assert x[0] == 0.0
    assert x[1] == pytest.approx(1.0, abs=1e-6) and fx == pytest.approx(2.25, abs=1e-11)
    # interior: with u = x0 + 1/2, v = x1 - 1 the gradient is A (u, v) - (0, 1/4), A = [[2, 1/2], [1/2, 2]]
    x, fx = min_nd_local(f, np.array([0.4, 0.2]), np.array([0.1, 0.1]), np.array([-5.0, -5.0]))
    u, v = np.linalg.solve([[2.0, 0.5], [0.5, 2.0]], [0.0, 0.25])
    np.testing.assert_allclose(x, [u - 0.5, v + 1.0], atol=1e-7)
    assert fx == pytest.approx(f(np.array([u - 0.5, v + 1.0])), abs=1e-12)


def test_min_nonneg_global_keeps_a_grid_point_better_than_brents_answer():
    """The global minimiser returns the best point it evaluated: a dip exactly at a grid point, which the
    bounded Brent refinement cannot see, wins over Brent's answer (next to the boundary and inside)."""
    gs = np.exp(LOG_G_GRID)

    def dip(at: float, base):
        return lambda g: base(g) - (1.0 if g == at else 0.0)

    g, fg, ok = min_nonneg_global(dip(float(gs[0]), lambda g: 1.0 + g))
    assert ok and g == gs[0] and fg == pytest.approx(gs[0], abs=1e-15)
    k = int(np.argmin(np.abs(LOG_G_GRID - 3.0)))
    g, fg, ok = min_nonneg_global(dip(float(gs[k]), lambda g: 1.0 + (math.log(g) - 3.2) ** 2 if g > 0 else 9.0))
    assert ok and g == pytest.approx(gs[k], rel=1e-12) and fg == pytest.approx(0.04, abs=1e-12)


def test_min_nd_local_one_coordinate_stops_on_its_bound_and_rejects_three():
    f = _bowl(-3.0)
    x, fx = min_nd_local(lambda z: f(z[0]), np.array([1.0]), np.array([0.1]), np.array([0.5]))
    assert x[0] == 0.5 and fx == f(0.5)
    with pytest.raises(ValueError, match="^min_nd_local handles 1 or 2 coordinates$"):
        min_nd_local(lambda z: 0.0, np.zeros(3), np.ones(3), np.zeros(3))


def test_nested_icc_profile_ends_are_roots_of_the_dense_profile():
    """At each end of the therapist and cluster ICC intervals (REML), the dense restricted likelihood
    maximised over the other parameters with that ICC's odds k fixed lies q / 2 below its maximum
    (therapist: s2_t = k (s2 + s2_c); cluster: s2_c = k (s2 + s2_t)); icc(level) reports those intervals."""
    y, X, codes, cl = _nested_data(seed=6, C=6, per=3, m=3)
    n = len(y)
    res = NestedModel(y, X, codes, cl).fit()
    same_t = codes[:, None] == codes[None, :]
    same_c = cl[:, None] == cl[None, :]
    q = stats.chi2.ppf(0.95, 1)

    def profile(which, k):
        def neg(z):
            other, s2 = np.exp(z)
            mine = k * (s2 + other)
            vt, vc = (mine, other) if which == "therapist" else (other, mine)
            return -_dense_loglik(y, X, s2 * np.eye(n) + vt * same_t + vc * same_c, True)

        v = res.vcomp
        starts = [np.log([max(v["cluster" if which == "therapist" else "therapist"], 1e-3), v["residual"]]),
                  np.log([1e-3, v["residual"]])]
        return -min(optimize.minimize(neg, z0, method="Nelder-Mead",
                                      options={"xatol": 1e-8, "fatol": 1e-10}).fun for z0 in starts)

    table = res.icc(level=0.95)
    for which, row in (("therapist", "icc"), ("cluster", "icc_cluster")):
        lo, hi = res.icc_interval(0.95, which=which)
        assert (table.loc[row, "ci_low"], table.loc[row, "ci_high"]) == (lo, hi)
        assert hi < 1.0
        for end in (lo, hi):
            if end == 0.0:  # a lower end at the boundary: the profile there is still above the cut-off
                assert profile(which, 0.0) > res.loglik - q / 2
            else:
                assert profile(which, end / (1 - end)) == pytest.approx(res.loglik - q / 2, abs=2e-4)


def test_parametric_bootstrap_draws_the_fitted_variances():
    """ML, balanced: each replicate's residual variance is its MSW, unbiased for the fitted residual
    variance (sd of the mean of 40: 4%); nested REML: the replicates carry the fitted cluster variance."""
    G, m, msb, msw = 8, 5, 9.0, 2.0
    y, t = _balanced(G, m, msb, msw, seed=3)
    res = RandomInterceptModel(y, np.ones((len(y), 1)), t, method="ML").fit()
    boot = res.bootstrap(n_boot=40, seed=1)
    assert boot["residual"].mean() == pytest.approx(res.vcomp["residual"], rel=0.15)
    rng = np.random.default_rng(8)
    C, per, mm = 8, 3, 4
    cl = np.repeat(np.arange(C), per * mm)
    codes = np.repeat(np.arange(C * per), mm)
    yn = 2.0 * rng.normal(size=C)[cl] + 0.5 * rng.normal(size=C * per)[codes] + rng.normal(size=len(codes))
    nres = NestedModel(yn, np.ones((len(yn), 1)), codes, cl).fit()
    assert nres.vcomp["cluster"] > 1.0
    nboot = nres.bootstrap(n_boot=30, seed=2)
    assert nboot["cluster"].mean() > 0.5 * nres.vcomp["cluster"]
    total = nboot["therapist"] + nboot["cluster"] + nboot["residual"]
    np.testing.assert_allclose(nboot["icc"], nboot["therapist"] / total, rtol=1e-12)
    np.testing.assert_allclose(nboot["icc_cluster"], nboot["cluster"] / total, rtol=1e-12)


def test_contract_bootstrap_intervals_use_the_given_seed():
    y, t = _balanced(8, 5, 9.0, 2.0, seed=4)
    res = RandomInterceptModel(y, np.ones((len(y), 1)), t).fit()
    entry = res.to_contract(interval="bootstrap", n_boot=20, seed=7)
    draws = res.bootstrap(n_boot=20, seed=7)["icc"]
    assert (entry["icc"]["ci_low"], entry["icc"]["ci_high"]) == pytest.approx(
        tuple(np.percentile(draws, [2.5, 97.5])), rel=1e-12)
    y, X, codes, cl = _nested_data(seed=3)
    nres = NestedModel(y, X, codes, cl).fit()
    entry = nres.to_contract(interval="bootstrap", n_boot=12, seed=5)
    draws = nres.bootstrap(n_boot=12, seed=5)["icc_cluster"]
    assert entry["icc_cluster"]["ci_method"] == "bootstrap"
    assert (entry["icc_cluster"]["ci_low"], entry["icc_cluster"]["ci_high"]) == pytest.approx(
        tuple(np.percentile(draws, [2.5, 97.5])), rel=1e-12)


def test_profile_intervals_warn_only_when_an_end_is_missing_and_wald_leaves_variances_nan():
    y, t = _balanced(10, 4, 6.0, 2.0, seed=9)
    res = RandomInterceptModel(y, np.ones((len(y), 1)), t).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every end is found: no StatisticalWarning
        ci = res.conf_int()
    assert np.isfinite(ci.to_numpy(dtype=float)).all() and res.warnings == []
    wald = res.conf_int(method="wald")
    assert (wald.dtypes == float).all()
    assert wald.loc[["therapist", "residual"]].isna().all().all()
    z = stats.norm.ppf(0.975)
    assert wald["upper"].iloc[0] == pytest.approx(res.fe_params.iloc[0] + z * res.bse.iloc[0], rel=1e-12)
    assert wald["lower"].iloc[0] == pytest.approx(res.fe_params.iloc[0] - z * res.bse.iloc[0], rel=1e-12)
    assert list(wald.columns) == ["lower", "upper"]


def test_nested_fit_with_no_cluster_variance_is_the_random_intercept_fit():
    """A cluster variance estimated at the boundary is exactly 0, and the rest is then the random-intercept
    model of the therapist units: same therapist and residual variances and log-likelihood (the dense
    likelihood checks that optimum)."""
    rng = np.random.default_rng(3)
    C, per, m = 5, 4, 4
    cl = np.repeat(np.arange(C), per * m)
    codes = np.repeat(np.arange(C * per), m)
    y = 0.8 * rng.normal(size=C * per)[codes] + rng.normal(size=len(codes))
    X = np.ones((len(y), 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the singular fit's warning
        res = NestedModel(y, X, codes, cl).fit()
    assert res.vcomp["cluster"] == 0.0 and res.singular
    ri = RandomInterceptModel(y, X, codes).fit()
    assert res.vcomp["therapist"] == pytest.approx(ri.vcomp["therapist"], rel=1e-7)
    assert res.vcomp["residual"] == pytest.approx(ri.vcomp["residual"], rel=1e-9)
    assert res.loglik == pytest.approx(ri.loglik, rel=1e-12)
    same_t = codes[:, None] == codes[None, :]
    V = ri.vcomp["residual"] * np.eye(len(y)) + ri.vcomp["therapist"] * same_t
    assert ri.loglik == pytest.approx(_dense_loglik(y, X, V, True), rel=1e-10)


def test_missing_group_labels_are_named_and_from_frame_keeps_the_method():
    y, X, codes, cl = _nested_data()
    t = codes.astype(float)
    t[3] = np.nan
    with pytest.raises(ModelError, match="^therapist label missing in 1 rows$"):
        RandomInterceptModel(y, X, t)
    c = cl.astype(object)
    c[[0, 5]] = None
    with pytest.raises(ModelError, match="^cluster label missing in 2 rows$"):
        NestedModel(y, X, codes, c)
    df = pd.DataFrame({"y": y, "x": X[:, 1], "therapist": codes, "cluster": cl})
    assert NestedModel.from_frame(df, "y", ["x"], method="ML").fit().method == "ML"
    assert RandomInterceptModel.from_frame(df, "y", ["x"], method="ML").fit().method == "ML"


def test_bootstrap_singular_flag_marks_exactly_the_refits_at_zero_variance():
    """A weak therapist effect (8 therapists x 10 patients, ICC about .02): some refits land on the
    boundary. ``singular`` is lme4's isSingular for each refit (theta = sqrt(variance ratio) below
    1e-4), so it must be True exactly where the refitted therapist variance is (numerically) 0."""
    rng = np.random.default_rng(5)
    t = np.repeat(np.arange(8), 10)
    y = rng.normal(scale=0.15, size=8)[t] + rng.normal(size=80)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = RandomInterceptModel(y, np.ones((80, 1)), t).fit()
        draws = res.bootstrap(40, seed=3)
    ratio = draws["therapist"] / draws["residual"]
    at_zero = ratio < 1e-8  # theta^2 < (1e-4)^2
    assert draws["singular"].to_numpy().tolist() == at_zero.to_numpy().tolist()
    assert 0 < int(at_zero.sum()) < 40  # both kinds of refit occur


def _dense_blups(y, X, codes, cl, res):
    """BLUPs of the therapist effects and their conditional SDs from the dense marginal covariance at the
    estimates: ``u = s2_t Z' V^-1 (y - X b)``, ``Var(u | y) = s2_t I - s2_t^2 Z' V^-1 Z`` (Henderson)."""
    v = res.vcomp
    Zt = (codes[:, None] == np.arange(codes.max() + 1)[None, :]).astype(float)
    V = v["residual"] * np.eye(len(y)) + v["therapist"] * Zt @ Zt.T
    if cl is not None:
        Zc = (cl[:, None] == np.arange(cl.max() + 1)[None, :]).astype(float)
        V += v["cluster"] * Zc @ Zc.T
    W = np.linalg.inv(V)
    u = v["therapist"] * Zt.T @ W @ (y - X @ res.fe_params.to_numpy())
    cvar = v["therapist"] * np.eye(Zt.shape[1]) - v["therapist"] ** 2 * Zt.T @ W @ Zt
    return u, np.sqrt(np.diag(cvar))


@pytest.mark.parametrize("nested", [False, True])
def test_therapist_effects_are_the_dense_blups_with_their_conditional_sds(nested):
    """Every column of the therapist table against the dense Henderson BLUP and direct computations: labels
    sorted as strings (``T10`` before ``T2``; nested: within sorted clusters), caseloads, raw and case-mix-adjusted
    means, the 90% interval ``effect -+ z se`` and the classification of the intervals that exclude 0 for each
    direction."""
    y, X, codes, cl = _nested_data(seed=3)
    y = 10.0 * y  # a residual variance far from 1 (mixing up s2 and the variance ratio shows)
    labels = np.array([f"T{c}" for c in codes])
    clabels = np.array([f"S{c}" for c in cl])
    model = NestedModel(y, X, labels, clabels) if nested else RandomInterceptModel(y, X, labels)
    res = model.fit()
    te = res.therapist_effects(level=0.9, higher_is_better=True)
    u, se = _dense_blups(y, X, codes, cl if nested else None, res)
    order = [int(t[1:]) for t in te["therapist"]]
    units = sorted({(f"S{k}", f"T{c}") for c, k in zip(codes, cl)}) if nested else [("", f"T{c}") for c in set(codes)]
    assert list(te["therapist"]) == [t for _, t in sorted(units, key=lambda u: (u[0], u[1]))]  # nested: cluster first
    assert list(te.columns) == ["therapist", *(["cluster"] if nested else []), "caseload", "raw_mean",
                                "adjusted_mean", "effect", "effect_se", "ci_low", "ci_high", "classification"]
    if nested:
        assert list(te["cluster"]) == [f"S{cl[codes == c][0]}" for c in order]
    assert list(te["caseload"]) == [int(np.sum(codes == c)) for c in order]
    np.testing.assert_allclose(te["raw_mean"], [y[codes == c].mean() for c in order], rtol=1e-12)
    fitted = X @ res.fe_params.to_numpy()
    np.testing.assert_allclose(te["adjusted_mean"], [fitted.mean() + (y - fitted)[codes == c].mean() for c in order],
                               rtol=1e-10)
    np.testing.assert_allclose(te["effect"], u[order], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(te["effect_se"], se[order], rtol=1e-8)
    z = stats.norm.ppf(0.95)
    np.testing.assert_allclose(te["ci_low"], u[order] - z * se[order], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(te["ci_high"], u[order] + z * se[order], rtol=1e-8, atol=1e-10)
    lo, hi = u[order] - z * se[order], u[order] + z * se[order]
    expect = np.where(lo > 0, "better than average", np.where(hi < 0, "worse than average",
                                                               "not distinguishable from average"))
    assert list(te["classification"]) == list(expect)
    assert (lo > 0).any() and (hi < 0).any()  # both labels occur
    te95 = res.therapist_effects()  # the default level: 95%
    np.testing.assert_allclose(te95["ci_high"], u[order] + stats.norm.ppf(0.975) * se[order], rtol=1e-8, atol=1e-10)
    worse = res.therapist_effects(level=0.9, higher_is_better=False)["classification"]
    assert list(worse) == [{"better than average": "worse than average", "worse than average": "better than average"}
                           .get(c, c) for c in expect]


def test_nested_profile_intervals_are_roots_of_the_dense_ml_profile():
    """lme4's confint(profile) of a nested REML fit (profiled by the ML deviance, as lme4): at every end the dense
    ML log-likelihood maximised over the other parameters (variances by Nelder-Mead, the other fixed effects by
    GLS) lies q / 2 below its maximum. 12 clusters with a clear cluster variance (its lower end is interior) and a
    residual variance about 100, far from 1 (a start of the cluster SD's profile on the wrong scale shows)."""
    y, X, codes, cl = _nested_data(seed=3, C=12)
    y = 10.0 * y
    n = len(y)
    res = NestedModel(y, X, codes, cl).fit()
    ci = res.conf_int()
    assert ci.loc["cluster", "lower"] > 0.0
    same_t = codes[:, None] == codes[None, :]
    same_c = cl[:, None] == cl[None, :]
    start = np.log([res.vcomp["therapist"], res.vcomp["cluster"], res.vcomp["residual"]])

    def max_ll(var=None, value=None, beta=None):
        """Maximum over the free variances; ``var``: index of a variance fixed at ``value``; ``beta``:
        ``(j, b_j)``, fixed effect j fixed (its column moved to the outcome)."""
        free = [i for i in range(3) if i != var]
        yy, XX = (y, X) if beta is None else (y - beta[1] * X[:, beta[0]], np.delete(X, beta[0], axis=1))

        def neg(z):
            v = np.empty(3)
            v[free] = np.exp(z)
            if var is not None:
                v[var] = value
            return -_dense_loglik(yy, XX, v[2] * np.eye(n) + v[0] * same_t + v[1] * same_c, False)

        with threadpool_limits(1):  # many small dense products: BLAS threads only wait on a busy machine
            return -optimize.minimize(neg, start[free], method="Nelder-Mead",
                                      options={"xatol": 1e-7, "fatol": 1e-10, "maxiter": 20000}).fun

    cut = max_ll() - stats.chi2.ppf(0.95, 1) / 2
    for i, name in enumerate(["therapist", "cluster", "residual"]):
        lo, hi = ci.loc[name]
        assert 0.0 < lo < hi
        assert max_ll(i, lo) == pytest.approx(cut, abs=1e-6) and max_ll(i, hi) == pytest.approx(cut, abs=1e-6)
    for j, name in enumerate(res.fe_params.index):
        lo, hi = ci.loc[name]
        assert lo < res.fe_params[name] < hi
        assert max_ll(beta=(j, lo)) == pytest.approx(cut, abs=1e-6)
        assert max_ll(beta=(j, hi)) == pytest.approx(cut, abs=1e-6)


def test_failed_bootstrap_refits_are_counted_and_warned_as_convergence_warnings():
    """Outcomes constant within therapists up to 1e-5: the fit runs to the top of the variance-ratio search,
    and so do some refits of data simulated from it; those rows are NaN with ``converged`` False, and the
    count is reported once as a ConvergenceWarning (not a generic UserWarning)."""
    rng = np.random.default_rng(1)
    t = np.repeat(np.arange(10), 5)
    y = rng.normal(size=10)[t] + 1e-5 * rng.normal(size=t.size)
    with pytest.warns(ConvergenceWarning):
        res = RandomInterceptModel(y, np.ones(t.size), t).fit()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        draws = res.bootstrap(4, seed=0)
    failed = ~draws["converged"]
    assert 0 < int(failed.sum()) < 4
    assert draws.loc[failed, ["(Intercept)", "therapist", "residual", "icc"]].isna().all().all()
    assert draws.loc[~failed, ["(Intercept)", "therapist", "residual", "icc"]].notna().all().all()
    msg = (f"{int(failed.sum())} of 4 bootstrap refits failed (did not converge); they are left out of the "
           "percentile intervals")
    assert [(w.category, str(w.message)) for w in caught] == [(ConvergenceWarning, msg)]
    assert msg in res.warnings


@pytest.mark.parametrize("G, m, theta", [(30, 5, 3e-3), (50, 10, 1e-3), (100, 20, 1e-3)])
def test_profile_ends_of_a_therapist_sd_near_zero_are_found(G, m, theta):
    """ML estimate of the therapist SD a small interior value (theta = sd / sigma = 1e-3 .. 3e-3; balanced
    data built so that the ML estimate of s2_t / s2 is theta^2). The profile's upper end of the therapist
    variance is the root of the balanced one-way ML deviance, the mean at the grand mean and s2 profiled out
    (minimize_scalar), -2 l = N log 2 pi + G (m - 1) log s2 + G log(s2 + m s2_t) + SSW / s2 + SSB / (s2 + m s2_t),
    and the lower end is 0 (the deviance at 0 is within q of the minimum). Regressions: the first trial went
    sqrt(q var) / sd (~1e3) out on the log scale, past the search's ceiling, and the end was reported
    missing; for (100, 20, 1e-3) the finite-difference curvature is not positive definite and must not be used."""
    msb = (1.0 + m * theta**2) / (1.0 - 1.0 / G)  # ML: ((1 - 1/G) MSB - MSW) / m = theta^2 with MSW = 1
    y, t = _balanced(G, m, msb, 1.0, seed=5)
    n = len(y)
    res = RandomInterceptModel(y, np.ones((n, 1)), t, method="ML").fit()
    assert res.vcomp["therapist"] == pytest.approx(theta**2, rel=1e-2) and not res.singular  # a flat optimum
    with warnings.catch_warnings():
        warnings.simplefilter("error", StatisticalWarning)
        ci = res.conf_int()
    ssb, ssw = msb * (G - 1), 1.0 * G * (m - 1)

    def dev(vt):
        def d(ls2):
            s2 = math.exp(ls2)
            return n * LOG2PI + G * (m - 1) * ls2 + G * math.log(s2 + m * vt) + ssw / s2 + ssb / (s2 + m * vt)
        return optimize.minimize_scalar(d, bounds=(-3.0, 3.0), method="bounded", options={"xatol": 1e-10}).fun

    q = stats.chi2.ppf(0.95, 1)
    dmin = dev(theta**2)
    assert ci.loc["therapist", "lower"] == 0.0 and dev(0.0) - dmin < q
    assert dev(ci.loc["therapist", "upper"]) - dmin == pytest.approx(q, abs=1e-6)


def test_input_errors_name_the_shapes_and_the_design():
    """One-line errors with the numbers they promise; default names of an array design."""
    y, X, codes, cl = _nested_data()
    with pytest.raises(ModelError, match="^exog has 5 rows but endog has 6$"):
        RandomInterceptModel(y[:6], X[:5], codes[:6])
    Xd = np.column_stack([X, 2.0 * X[:, 1]])
    with pytest.raises(ModelError, match=r"^fixed-effects design \['a', 'b', 'c'\] is rank deficient$"):
        RandomInterceptModel(y, Xd, codes, exog_names=["a", "b", "c"])
    y_nan = y.copy()
    y_nan[4] = np.nan
    with pytest.raises(ModelError, match="^outcome or covariates contain missing or infinite values; drop those rows "
                                         "first$"):
        RandomInterceptModel(y_nan, X, codes)
    with pytest.raises(ModelError, match="^the outcome takes a single value: there is no variance to partition$"):
        RandomInterceptModel(np.full(len(y), 2.0), X, codes)
    with pytest.raises(ModelError, match="^3 patients for 3 fixed effects$"):
        RandomInterceptModel([1.0, 2.0, 4.0], np.eye(3), [0, 0, 1])
    df = pd.DataFrame({"y": y, "therapist": codes, "site": cl})
    with pytest.raises(ModelError, match="^cluster column 'cluster' is not a column of the patient table$"):
        NestedModel.from_frame(df, "y")
    model = RandomInterceptModel(y, X, codes)
    assert model.cluster_labels is None and model.cluster_codes is None and model.codes.dtype == np.int64
    nested = NestedModel(y, X, codes, np.array([f"S{c}" for c in cl]))
    assert list(nested.cluster_labels) == [f"S{c}" for c in range(5)] and nested.codes.dtype == np.int64
    res = model.fit()  # an array design: the column of ones is the intercept
    assert list(res.params.index) == ["(Intercept)", "x1", "therapist", "residual"]
    assert res.params.name == "estimate"
    assert list(res.cov_params.columns) == list(res.cov_params.index) == ["(Intercept)", "x1"]


def test_nested_singular_fit_names_both_zero_components():
    """Therapist means all equal (each therapist's outcomes are the same centred values plus one constant):
    no therapist or cluster variance; both are named in the one singular-fit warning."""
    rng = np.random.default_rng(0)
    e = rng.normal(size=(12, 5))
    e -= e.mean(axis=1, keepdims=True)
    y = 3.0 + e.ravel()
    codes = np.repeat(np.arange(12), 5)
    with pytest.warns(SingularFitWarning) as caught:
        res = NestedModel(y, np.ones((60, 1)), codes, codes // 3).fit()
    assert res.vcomp["therapist"] == 0.0 and res.vcomp["cluster"] == 0.0
    assert [str(w.message) for w in caught] == ["singular fit: therapist and cluster variance estimated at (or "
                                                "next to) zero"]


@pytest.mark.parametrize("x0, lo, dip, base_min", [
    (0.0, -np.inf, 0.0, 0.03),    # the start itself: both first neighbours higher
    (0.0, -np.inf, 0.1, 0.15),    # the last point of a bracket to the right
    (0.0, -0.15, -0.1, 0.0),      # the last point before a step to the left hits the bound
])
def test_min1d_local_returns_the_best_point_it_evaluated(x0, lo, dip, base_min):
    """A dip of depth 1 exactly at a point the bracketing evaluates (start 0, step 0.1), which the bounded Brent
    refinement cannot see: the answer is that point, not Brent's local minimum of the smooth part."""
    def f(x):
        return (x - base_min) ** 2 - (1.0 if x == dip else 0.0)

    x, fx = min1d_local(f, x0, 0.1, lo)
    assert x == dip and fx == f(dip)


def test_min_nd_local_stops_the_second_coordinate_on_its_bound():
    """The minimum of the quadratic lies below the second coordinate's bound 0: the answer is on that bound,
    the first coordinate at its conditional optimum there (2 (x0 + 1/2) + 1/2 = 0)."""
    def f(z):
        return float((z[0] + 0.5) ** 2 + (z[1] + 1.0) ** 2 + 0.5 * (z[0] + 0.5) * (z[1] + 1.0) + 2.0)

    x, fx = min_nd_local(f, np.array([0.4, 0.2]), np.array([0.1, 0.1]), np.array([-np.inf, 0.0]))
    assert x[1] == 0.0
    assert x[0] == pytest.approx(-0.75, abs=1e-6) and fx == pytest.approx(2.9375, abs=1e-11)


@pytest.mark.parametrize("theta", [1e-4, 3e-4])
def test_min_nonneg_global_refines_theta_next_to_the_boundary_tightly(theta):
    """A flat (quartic) criterion with its minimum at theta = sqrt(g) of lme4's singular tolerance 1e-4 and
    just above it, below the first grid point: theta is found to 1e-8 relative (Brent's tolerance there is
    about 1e-14 absolute), so the singular flag is decided by the optimum, not by the search's tolerance."""
    g, fg, ok = min_nonneg_global(lambda g: ((math.sqrt(g) - theta) * 1e3) ** 4)
    assert ok and math.sqrt(g) == pytest.approx(theta, rel=1e-8) and fg < 1e-40


def test_min_nonneg_global_boundary_wins_a_tie_at_exactly_boundary_tol():
    """The boundary is preferred when within BOUNDARY_TOL of the interior optimum, that value included: an
    interior minimum of exactly 0 (a flat bottom around g = e) and f(0) = BOUNDARY_TOL give g = 0."""
    def f(g):
        return max(abs(math.log(g) - 1.0) - 0.3, 0.0) ** 2 if g > 0 else BOUNDARY_TOL

    g, fg, ok = min_nonneg_global(f)
    assert ok and g == 0.0 and fg == BOUNDARY_TOL
    g, fg, _ = min_nonneg_global(lambda g: f(g) if g > 0 else 2 * BOUNDARY_TOL)
    assert g > 0.0 and fg == 0.0


def test_integer_and_boolean_outcomes_are_fitted_as_floats():
    """Scores stored as integers and a yes/no outcome (a linear probability model) give the fit of the same
    values as floats; the model keeps the outcome as floats."""
    y, X, codes, _ = _nested_data(seed=1)
    for raw in (np.round(3.0 * y).astype(int), y > np.median(y)):
        model = RandomInterceptModel(raw, X, codes)
        assert model.endog.dtype == float
        ref = RandomInterceptModel(raw.astype(float), X, codes).fit()
        pd.testing.assert_series_equal(model.fit().params, ref.params)
