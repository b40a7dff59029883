"""Parameter recovery of the random-intercept logistic GLMM on simulated data with known truth.

Design (every data set seeded with ``numpy.random.default_rng(seed)``): 100 therapists x 30
patients, latent ICC 0.05, i.e. therapist variance s_u^2 = 0.05 / 0.95 * pi^2 / 3 = 0.1732 on the
log-odds scale; a standardised-ish baseline covariate (SD 4, slope -0.05) and a 0/1 feedback arm
(log-odds ratio 0.25); intercept -0.3 (recovery rate about 0.43).

Default run: 200 data sets for the point estimates (Laplace) and the first 100 of them for the
coverage of the profile-likelihood interval (about 15-30 s in all). The slow study (``pytest -m slow
tests/test_glmm_recovery.py -s``) repeats the coverage on all 200 and does the same for AGQ10.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.special import expit

from therapist_effects.models.glmm import LogisticRandomInterceptModel

N_THERAPISTS, CASELOAD = 100, 30
ICC_TRUE = 0.05
S2_TRUE = ICC_TRUE / (1 - ICC_TRUE) * math.pi**2 / 3  # 0.17315
B_TRUE = np.array([-0.3, -0.05, 0.25])  # (Intercept), baseline (centred, SD 4), feedback
NAMES = ["(Intercept)", "baseline", "feedback"]
N_SETS = 200


def simulate(seed: int):
    """One data set: therapist effects u_j ~ N(0, S2_TRUE), y ~ Bernoulli(expit(x'b + u_j))."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(N_THERAPISTS), CASELOAD)
    n = g.size
    X = np.column_stack([np.ones(n), rng.normal(0, 4, n), rng.integers(0, 2, n).astype(float)])
    u = rng.normal(0, math.sqrt(S2_TRUE), N_THERAPISTS)
    y = (rng.random(n) < expit(X @ B_TRUE + u[g])).astype(float)
    return y, X, g


def _fit(seed: int, method: str = "laplace"):
    y, X, g = simulate(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular fits are legitimate outcomes in a simulation
        return LogisticRandomInterceptModel(y, X, g, exog_names=NAMES, method=method).fit()


_CACHE: dict[str, list] = {}


def _fits(method: str) -> list:
    if method not in _CACHE:
        _CACHE[method] = [_fit(1000 + r, method) for r in range(N_SETS)]
    return _CACHE[method]


def test_laplace_recovers_therapist_variance_and_fixed_effects():
    fits = _fits("laplace")
    s2 = np.array([f.vcomp["therapist"] for f in fits])
    b = np.array([f.fe_params.to_numpy() for f in fits])
    mcse = s2.std(ddof=1) / math.sqrt(N_SETS)
    print(
        f"\nLaplace, {N_SETS} data sets: mean s2_u = {s2.mean():.4f} (truth {S2_TRUE:.4f},"
        f" Monte Carlo SE {mcse:.4f}); singular fits {sum(f.singular for f in fits)};"
        f" mean b = {np.round(b.mean(0), 4)} (truth {B_TRUE})"
    )
    assert all(f.converged for f in fits)
    # Tolerance 10% of the truth (0.0173). Why: (i) ML variance components are biased downward in
    # finite samples, by about (s2_u + 1/(n p (1-p))) / G = (0.173 + 0.145) / 100 = 0.003 (2%);
    # (ii) the Laplace approximation underestimates s2_u for binary outcomes (AGQ10 - Laplace on
    # these data sets averages +0.0026, 1.5%); (iii) the Monte Carlo SE of the mean over 200 data
    # sets is about 0.0034 (2%), so 3 MCSE is 6%. 2 + 1.5 + 6 = 9.5% < 10%. An estimator of the
    # SD instead of the variance, or a wrong likelihood, fails this by far.
    assert s2.mean() == pytest.approx(S2_TRUE, rel=0.10)
    assert mcse < 0.005  # the study is precise enough for the tolerance above to mean something
    # median close to the truth too (skewed sampling distribution, occasional zeros)
    assert np.median(s2) == pytest.approx(S2_TRUE, rel=0.15)
    # fixed effects: logistic ML is nearly unbiased here; tolerance 4 Monte Carlo SEs
    b_mcse = b.std(0, ddof=1) / math.sqrt(N_SETS)
    assert np.all(np.abs(b.mean(0) - B_TRUE) < 4 * b_mcse), (b.mean(0), b_mcse)
    # model-based SEs agree with the spread of the estimates (ratio within 15%)
    se = np.array([f.bse.to_numpy()[:3] for f in fits])
    np.testing.assert_allclose(se.mean(0) / b.std(0, ddof=1), 1.0, atol=0.15)
    # the latent ICC is recovered with the same relative accuracy as s2_u
    icc = np.array([f.icc() for f in fits])
    assert icc.mean() == pytest.approx(ICC_TRUE, rel=0.10)


def _coverage(fits, level=0.95):
    hits, widths = [], []
    for f in fits:
        # profile interval of the therapist SD only (what conf_int(method="profile") squares for
        # the variance), leaving out the fixed effects' profiles to save time
        lo, hi = f._profile_interval(len(NAMES), level)
        hits.append(lo * lo <= S2_TRUE <= hi * hi)
        widths.append(hi * hi - lo * lo)
    return float(np.mean(hits)), float(np.median(widths))


def test_profile_interval_coverage_laplace():
    fits = _fits("laplace")[:100]
    cov, width = _coverage(fits)
    wald_hits = []
    for f in fits:
        w = f.conf_int(method="wald").loc["feedback"]
        wald_hits.append(w["lower"] <= B_TRUE[2] <= w["upper"])
    print(
        f"\nLaplace profile 95% interval for s2_u: coverage {cov:.3f} over {len(fits)} data sets"
        f" (median width {width:.3f}); Wald 95% coverage for the feedback effect"
        f" {np.mean(wald_hits):.3f}"
    )
    # 100 data sets: binomial SD of the coverage at 0.95 is 0.022; 0.88 is 3 SD below nominal
    assert 0.88 <= cov <= 1.0
    assert 0.88 <= np.mean(wald_hits) <= 1.0


@pytest.mark.slow
def test_profile_interval_coverage_200_sets_laplace_and_agq10():
    """Slow (about 1.5 min): ``pytest -m slow tests/test_glmm_recovery.py -s`` (tests/conftest.py)."""
    for method in ("laplace", "agq"):
        fits = _fits(method)
        cov, width = _coverage(fits)
        s2 = np.array([f.vcomp["therapist"] for f in fits])
        print(
            f"\n{fits[0].method}: mean s2_u {s2.mean():.4f} (truth {S2_TRUE:.4f});"
            f" profile 95% coverage {cov:.3f} over {N_SETS} data sets (median width {width:.3f})"
        )
        # 200 data sets: binomial SD 0.015; 0.905 is 3 SD below nominal
        assert 0.905 <= cov <= 1.0
        assert s2.mean() == pytest.approx(S2_TRUE, rel=0.10)
    lap = np.array([f.vcomp["therapist"] for f in _fits("laplace")])
    agq = np.array([f.vcomp["therapist"] for f in _fits("agq")])
    # AGQ corrects Laplace's downward bias for binary data: paired differences are positive on avg
    assert np.mean(agq - lap) > 0
