"""Tests that kill mutants of the Gaussian engine (engine/gaussian.py, engine/derivatives.py) found by
``MUTATION_SAMPLE=... tools/mutation.sh gaussian|derivatives``: each value is checked against an
independent truth (closed forms of the balanced one-way ANOVA, dense-matrix ``V`` computations in numpy
or finite differences), never against the engine itself."""

from __future__ import annotations

import math

import numpy as np
import pytest

from therapist_effects.engine.gaussian import BlockEngine

LOG2PI = math.log(2.0 * math.pi)


def _balanced(seed: int, G: int = 9, m: int = 6, tau: float = 1.0):
    rng = np.random.default_rng(seed)
    codes = np.repeat(np.arange(G), m)
    y = 10.0 + tau * rng.normal(size=G)[codes] + rng.normal(size=G * m)
    return y, codes


def _anova(y, codes, G, m):
    means = np.bincount(codes, weights=y) / m
    msb = m * np.sum((means - y.mean()) ** 2) / (G - 1)
    msw = np.sum((y - means[codes]) ** 2) / (G * (m - 1))
    return means, msb, msw


def _intercept_engine(y, codes, G):
    n = len(y)
    return BlockEngine(y, np.ones((n, 1)), np.ones((n, 1)), codes, G)


@pytest.mark.parametrize("seed", [0, 3])
def test_balanced_one_way_reml_and_ml_optima_are_the_anova_closed_forms(seed):
    """REML: sigma2 = MSW, tau2 = (MSB - MSW) / m; ML: tau2 = ((1 - 1/G) MSB - MSW) / m (both interior)."""
    G, m = 9, 6
    y, codes = _balanced(seed, G, m)
    means, msb, msw = _anova(y, codes, G, m)
    assert msb > 2 * msw  # interior optimum for both criteria
    eng = _intercept_engine(y, codes, G)
    theta, fmin, ok = eng.fit(reml=True)
    assert ok
    s2 = eng.scale(theta, True)
    assert s2 == pytest.approx(msw, rel=1e-6)
    assert theta[0] ** 2 * s2 == pytest.approx((msb - msw) / m, rel=1e-5)
    assert fmin == pytest.approx(eng.crit(theta, True), rel=1e-12)
    theta_ml, _, ok = eng.fit(reml=False)
    assert ok
    s2_ml = eng.scale(theta_ml, False)
    assert s2_ml == pytest.approx(msw, rel=1e-6)
    assert theta_ml[0] ** 2 * s2_ml == pytest.approx(((1 - 1 / G) * msb - msw) / m, rel=1e-5)


def test_balanced_fixed_effect_blups_and_ml_deviance_by_hand():
    """GLS mean = grand mean with unscaled variance (1 + m theta^2) / (G m); BLUPs shrink the therapist
    means by m tau2 / (sigma2 + m tau2); dev_ml equals the dense Gaussian log-likelihood."""
    G, m = 7, 5
    y, codes = _balanced(11, G, m, tau=0.8)
    means, _, _ = _anova(y, codes, G, m)
    eng = _intercept_engine(y, codes, G)
    theta = np.array([0.7])
    b, cov, r, bc = eng.fixed(theta)
    assert b[0] == pytest.approx(y.mean(), rel=1e-12)
    assert cov[0, 0] == pytest.approx((1 + m * 0.49) / (G * m), rel=1e-12)
    sigma2 = 1.3
    u, ucov = eng.blups(theta, bc, sigma2)
    tau2 = 0.49 * sigma2
    shrink = m * tau2 / (sigma2 + m * tau2)
    np.testing.assert_allclose(u[:, 0], shrink * (means - y.mean()), rtol=1e-10)
    np.testing.assert_allclose(ucov[:, 0, 0], tau2 * sigma2 / (sigma2 + m * tau2), rtol=1e-10)
    n = G * m
    V = sigma2 * (np.eye(n) + 0.49 * (codes[:, None] == codes[None, :]))
    e = y - y.mean()
    dense = n * LOG2PI + np.linalg.slogdet(V)[1] + e @ np.linalg.solve(V, e)
    assert eng.dev_ml(theta, sigma2) == pytest.approx(dense, rel=1e-12)
