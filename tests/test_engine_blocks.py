"""The block engine (engine.gaussian.BlockEngine) with its optional cluster level, residual strata and
diagonal covariance: its (RE)ML criterion, GLS fixed effects and their covariance equal a dense-matrix
computation of ``V`` (numpy, small n) at random parameter values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from therapist_effects.engine.gaussian import BlockEngine, theta_to_lambda

LOG2PI = math.log(2.0 * math.pi)


def _data(seed: int, G: int = 14, C: int = 4, n_max: int = 9):
    """Unbalanced caseloads (some equal, so the caseload sums group therapists), clusters of
    unequal size, two arms with unequal residual SDs, an intercept and two covariates."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, n_max, size=G)
    codes = np.repeat(np.arange(G), sizes)
    n = len(codes)
    cluster = np.sort(rng.integers(0, C, size=G))
    cluster[:C] = np.arange(C)
    cluster = np.sort(cluster)
    arm = rng.integers(0, 2, size=n)
    x = rng.normal(size=n)
    X = np.column_stack([np.ones(n), x, arm])
    y = 20.0 + 0.5 * x + rng.normal(size=G)[codes] + rng.normal(size=C)[cluster[codes]] \
        + rng.normal(size=n) * np.where(arm == 1, 1.5, 1.0)
    return y, X, codes, cluster, arm


def _dense(y, X, Z, codes, lam, cluster=None, gc=0.0, strata=None, ratios=None):
    """``V / s2`` by dense matrices and the criterion's pieces: ``(r, log|X'WX|, log|V/s2|, b, (X'WX)^-1)``."""
    n = len(y)
    rdiag = np.ones(n) if strata is None else np.asarray(ratios)[strata]
    V = np.diag(rdiag)
    same_t = codes[:, None] == codes[None, :]
    V += same_t * (Z @ lam @ lam.T @ Z.T)
    if cluster is not None:
        cp = cluster[codes]
        V += gc * (cp[:, None] == cp[None, :])
    W = np.linalg.inv(V)
    XWX = X.T @ W @ X
    b = np.linalg.solve(XWX, X.T @ W @ y)
    e = y - X @ b
    return float(e @ W @ e), np.linalg.slogdet(XWX)[1], np.linalg.slogdet(V)[1], b, np.linalg.inv(XWX)


def _criterion(r, ldx, ldv, n, p, reml, sigma2=None):
    nu = n - p if reml else n
    extra = ldv + ldx if reml else ldv
    if sigma2 is not None:
        return nu * (LOG2PI + math.log(sigma2)) + r / sigma2 + extra
    return nu * (1.0 + LOG2PI + math.log(r / nu)) + extra


def _check(eng, theta, lam, y, X, Z, codes, cluster=None, strata=None, ratios=None):
    gc = float(theta[-1]) ** 2 if cluster is not None else 0.0
    r, ldx, ldv, b, cov = _dense(y, X, Z, codes, lam, cluster, gc, strata, ratios)
    n, p = X.shape
    for reml in (True, False):
        assert eng.crit(theta, reml, ratios=ratios) == pytest.approx(_criterion(r, ldx, ldv, n, p, reml), rel=1e-10)
        assert eng.crit(theta, reml, ratios=ratios, sigma2=1.7) == pytest.approx(
            _criterion(r, ldx, ldv, n, p, reml, 1.7), rel=1e-10)
    be, cove, re, _ = eng.fixed(theta, ratios=ratios)
    np.testing.assert_allclose(be, b, rtol=1e-10)
    np.testing.assert_allclose(cove, cov, rtol=1e-9, atol=1e-12 * np.abs(cov).max())
    assert re == pytest.approx(r, rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_intercept_with_and_without_cluster_level(seed):
    """q = 1 (the caseload sums) and the nested model's cluster level by Woodbury."""
    y, X, codes, cluster, _ = _data(seed)
    G = codes.max() + 1
    Z = np.ones((len(y), 1))
    rng = np.random.default_rng(100 + seed)
    plain = BlockEngine(y, X, Z, codes, G)
    nested = BlockEngine(y, X, Z, codes, G, cluster=cluster)
    assert plain._caseloads and len(plain._nu) < G  # therapists share caseloads: the sums group them
    for _ in range(3):
        th = rng.uniform(0.0, 1.5, size=2)
        _check(plain, th[:1], np.array([[th[0]]]), y, X, Z, codes)
        _check(nested, th, np.array([[th[0]]]), y, X, Z, codes, cluster)
    _check(nested, np.array([0.0, 0.7]), np.zeros((1, 1)), y, X, Z, codes, cluster)  # therapist variance 0


@pytest.mark.parametrize("diagonal", [True, False])
def test_arm_indicators_with_residual_ratios_and_cluster_level(diagonal):
    """``(0 + arm0 + arm1 | therapist)``, diagonal or correlated, residual variance per arm, with
    and without a cluster level: the arm-variance model."""
    y, X, codes, cluster, arm = _data(3)
    G = codes.max() + 1
    Z = np.column_stack([arm == 0, arm == 1]).astype(float)
    rng = np.random.default_rng(7)
    for with_cluster in (False, True):
        eng = BlockEngine(y, X, Z, codes, G, cluster=cluster if with_cluster else None, strata=arm,
                          diagonal=diagonal)
        for _ in range(3):
            nt = 2 if diagonal else 3
            th = rng.uniform(0.1, 1.2, size=nt + with_cluster)
            if not diagonal:
                th[1] = rng.uniform(-1.0, 1.0)
            lam = np.diag(th[:2]) if diagonal else theta_to_lambda(th[:3], 2)
            ratios = np.array([1.0, rng.uniform(0.3, 3.0)])
            _check(eng, th, lam, y, X, Z, codes, cluster if with_cluster else None, arm, ratios)
            _check(eng, th, lam, y, X, Z, codes, cluster if with_cluster else None)  # ratios None: all 1


def test_random_slope_and_three_effects_with_cluster_level_and_strata():
    """q = 2 with a centred slope column (the random-slope model) and q = 3 (batched Cholesky),
    with a cluster level and residual strata."""
    y, X, codes, cluster, arm = _data(5)
    G = codes.max() + 1
    rng = np.random.default_rng(11)
    Z2 = X[:, [0, 1]]
    eng2 = BlockEngine(y, X, Z2, codes, G, cluster=cluster)
    Z3 = X.copy()
    eng3 = BlockEngine(y, X, Z3, codes, G, cluster=cluster, strata=arm)
    for _ in range(2):
        th = rng.uniform(0.1, 1.0, size=4)
        th[1] = rng.uniform(-0.8, 0.8)
        _check(eng2, th, theta_to_lambda(th[:3], 2), y, X, Z2, codes, cluster)
        th3 = rng.uniform(0.1, 1.0, size=7)
        th3[[1, 2, 4]] = rng.uniform(-0.5, 0.5, size=3)
        ratios = np.array([1.0, 0.6])
        _check(eng3, th3, theta_to_lambda(th3[:6], 3), y, X, Z3, codes, cluster, arm, ratios)


def test_with_y_recomputes_the_outcome_statistics_only():
    """The bootstrap's copies: a new outcome, the design's statistics shared."""
    y, X, codes, cluster, arm = _data(8)
    G = codes.max() + 1
    Z = np.ones((len(y), 1))
    eng = BlockEngine(y, X, Z, codes, G, cluster=cluster)
    y2 = y[::-1].copy()
    new = eng.with_y(y2)
    fresh = BlockEngine(y2, X, Z, codes, G, cluster=cluster)
    th = np.array([0.4, 0.3])
    assert new.crit(th, True) == pytest.approx(fresh.crit(th, True), rel=1e-12)
    assert eng.crit(th, True) != pytest.approx(new.crit(th, True), rel=1e-6)
    assert new.ZZ is eng.ZZ


def test_fit_finds_the_optimum_on_the_boundary_exactly():
    """A diagonal arm model whose second arm has no therapist variance: the fit puts theta at exactly
    0 there, and the criterion there is no higher than anywhere nearby."""
    rng = np.random.default_rng(2)
    G, m = 30, 12
    codes = np.repeat(np.arange(G), m)
    arm = np.tile(np.r_[np.zeros(m // 2, int), np.ones(m // 2, int)], G)
    n = len(codes)
    y = np.where(arm == 0, 0.8 * rng.normal(size=G)[codes], 0.0) + rng.normal(size=n)
    y[arm == 1] -= np.bincount(codes[arm == 1], y[arm == 1], G)[codes[arm == 1]] / (m // 2)
    X = np.column_stack([np.ones(n), arm])
    Z = np.column_stack([arm == 0, arm == 1]).astype(float)
    eng = BlockEngine(y, X, Z, codes, G, diagonal=True)
    th, fmin, _ = eng.fit(True)
    assert th[1] == 0.0 and th[0] > 0.3
    for d in (1e-3, 1e-2):
        assert fmin <= eng.crit(th + np.array([0.0, d]), True)
        assert fmin <= eng.crit(th + np.array([d, 0.0]), True) and fmin <= eng.crit(th - np.array([d, 0.0]), True)


def test_criterion_over_a_batch_equals_one_at_a_time():
    """crit_many (the optimiser's grids, vectorised for the random intercept) equals crit row by row,
    with and without the cluster level, at 0 and at ratios far out."""
    y, X, codes, cluster, _ = _data(9)
    G = codes.max() + 1
    Z = np.ones((len(y), 1))
    rng = np.random.default_rng(5)
    for eng, m in ((BlockEngine(y, X, Z, codes, G), 1), (BlockEngine(y, X, Z, codes, G, cluster=cluster), 2)):
        th = np.vstack([np.zeros(m), rng.uniform(0.0, 2.0, size=(6, m)), np.full(m, 150.0)])
        for reml in (True, False):
            np.testing.assert_allclose(eng.crit_many(th, reml), [eng.crit(t, reml) for t in th], rtol=1e-12)
