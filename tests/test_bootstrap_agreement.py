"""The logistic model's parametric bootstrap (glmm, through engine.inference.parametric_bootstrap)
against the model's own asymptotics, on simulated data (60 therapists x 40 patients, s2_u = 0.5):
the replicates of s2_u centre on the fitted variance and their spread equals the delta-method SE
from the observed information (an independent computation: second derivatives of the Laplace
log-likelihood at the maximum), within the Monte Carlo error of 80 replicates."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.special import expit

from therapist_effects.models.glmm import LogisticRandomInterceptModel


@pytest.fixture(scope="module")
def fit():
    rng = np.random.default_rng(11)
    g = np.repeat(np.arange(60), 40)
    x = rng.normal(size=g.size)
    y = (rng.random(g.size) < expit(-0.3 + 0.5 * x + np.sqrt(0.5) * rng.normal(size=60)[g])).astype(float)
    X = np.column_stack([np.ones_like(x), x])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LogisticRandomInterceptModel(y, X, g, exog_names=["(Intercept)", "x"]).fit()


def test_bootstrap_spread_equals_the_observed_information_se(fit):
    s2, se = fit.vcomp["therapist"], fit.bse["therapist"]
    draws = fit._bootstrap(80, 4)
    ok = draws[np.isfinite(draws)]
    assert ok.size >= 76  # refits of this size do not fail
    assert abs(np.median(ok) - s2) < 0.5 * se
    assert np.std(ok, ddof=1) == pytest.approx(se, rel=0.25)
    assert fit.icc_interval(method="bootstrap", n_boot=80, seed=4) == pytest.approx(
        tuple(v / (v + np.pi**2 / 3) for v in np.quantile(ok, [0.025, 0.975])), rel=1e-12)
