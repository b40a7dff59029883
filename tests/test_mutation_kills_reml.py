"""Tests that kill mutants of reml.py and profile.py found by ``MUTATION_SAMPLE=... tools/mutation.sh reml|profile``.

Expected values are independent of the code under test: closed forms of the balanced one-way ANOVA
(Searle, Casella & McCulloch 1992, sec. 3.7 and 4.7) and dense-matrix Gaussian likelihoods in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from therapist_effects.reml import NestedModel, RandomInterceptModel

LOG2PI = math.log(2.0 * math.pi)


def _exact_balanced(G: int, m: int, msb: float, msw: float, seed: int = 0):
    """Balanced one-way data whose ANOVA mean squares are exactly ``msb`` and ``msw``."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((G, m))
    e -= e.mean(axis=1, keepdims=True)
    e *= math.sqrt(msw * G * (m - 1) / np.sum(e**2))
    u = rng.standard_normal(G)
    u -= u.mean()
    u *= math.sqrt(msb * (G - 1) / (m * np.sum(u**2)))
    return (10.0 + u[:, None] + e).ravel(), np.repeat([f"T{i}" for i in range(G)], m)


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
    y, t = _exact_balanced(G, m, msb, msw)
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
    y, t = _exact_balanced(G, m, msb, msw, seed=5)
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
    np.testing.assert_allclose(res.fe_params.to_numpy(), cov @ X.T @ W @ y, rtol=1e-9)
    tot = sum(v.values())
    assert res.icc() == pytest.approx(v["therapist"] / tot, rel=1e-12)
    assert res.icc_cluster() == pytest.approx(v["cluster"] / tot, rel=1e-12)
