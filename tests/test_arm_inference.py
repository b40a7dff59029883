"""Exact profile limits of the arm-variance model (arm_inference, through the shared
engine.inference.profile_limit), checked against the profile itself: each limit is where the ML
deviance, re-optimised from the optimum, rises by qchisq(.95, 1), and on a dense grid between the
estimate and the limit it stays below that cut-off (so the search found the first crossing, not a
point where a warm-started inner optimiser was trapped on a boundary)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from refdata import REFERENCE_DIR
from therapist_effects.models.arm import ArmVarianceModel

Q95 = 3.841458820694124  # qchisq(0.95, 1)
FB = pd.read_csv(REFERENCE_DIR / "therapy_feedback.csv")


@pytest.fixture(scope="module")
def correlated():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ArmVarianceModel.from_frame(FB, "phq9_post", ["phq9_pre"], therapist="therapist_id", arm="feedback",
                                           correlated=True).fit()


@pytest.fixture(scope="module")
def singular_arm():
    """Eight therapists: the feedback arm's therapist variance is estimated at 0."""
    small = FB[FB["therapist_id"].isin(sorted(FB["therapist_id"].unique())[:8])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ArmVarianceModel.from_frame(small, "phq9_post", ["phq9_pre"], therapist="therapist_id",
                                           arm="feedback").fit()


def _excess(res, name, c):
    """The profiled ML deviance increase at ``c``, the inner optimisation started at the optimum."""
    t = res._targets("ML")[name]
    dev, _ = res._profile_dev(t, c, t.z0, "ML")
    return dev - res._optimum("ML").deviance


def _check_limits(res, name, lo, hi, est, grid=8):
    for end in (lo, hi):
        if end not in (-1.0, 0.0, 1.0):
            assert _excess(res, name, end) == pytest.approx(Q95, abs=2e-4), (name, end)
    for c in np.linspace(est, lo, grid + 2)[1:-1].tolist() + np.linspace(est, hi, grid + 2)[1:-1].tolist():
        assert _excess(res, name, c) < Q95, (name, c)


def test_correlation_limits_are_the_first_crossings(correlated):
    res = correlated
    est = res.correlation
    lo, hi = res.profile_interval("correlation")
    assert -1.0 < lo < est < hi < 1.0
    _check_limits(res, "correlation", lo, hi, est)
    # beyond the lower limit the profile is above the cut-off (the crossing is a real one)
    assert _excess(res, "correlation", lo - 0.05) > Q95


@pytest.mark.parametrize("name", ["therapist[0]", "icc[0]", "icc_ratio"])
def test_variance_icc_and_ratio_limits_are_roots(correlated, name):
    t = correlated._targets("ML")[name]
    lo, hi = correlated.profile_interval(name)
    assert 0.0 < lo < t.estimate < hi
    _check_limits(correlated, name, lo, hi, t.estimate, grid=4)


def test_singular_arm_gets_the_finite_upper_limit_its_profile_implies(singular_arm):
    res = singular_arm
    assert res.singular and res.vcomp["therapist[1]"] == 0.0
    for name in ("therapist[1]", "icc[1]"):
        lo, hi = res.profile_interval(name)
        assert lo == 0.0 and 0.0 < hi < (1.0 if name.startswith("icc") else np.inf)
        assert _excess(res, name, 0.0) < Q95  # the edge is inside the interval
        _check_limits(res, name, lo, hi, 0.0)
        assert _excess(res, name, hi * 1.05) > Q95
