"""Random feedback slopes across therapists (statsmodels MixedLM) and the narrowing-the-gap table."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from therapist_effects.arm import ArmVarianceModel
from therapist_effects.exceptions import ModelError
from therapist_effects.slopes import RandomSlopeModel
from refdata import REFERENCE_DIR

REF_DIR = REFERENCE_DIR

# truth of the recovery simulation: (1 + feedback | therapist) with
TRUE_VAR_INTERCEPT, TRUE_VAR_SLOPE, TRUE_CORR, TRUE_RESIDUAL = 0.30, 0.20, -0.6, 1.0


def simulate_slopes(seed: int, n_therapists: int = 600, per_arm: int = 10) -> pd.DataFrame:
    """Patients randomised to feedback within therapist; therapist intercept and slope correlated."""
    rng = np.random.default_rng(seed)
    cov = np.array([
        [TRUE_VAR_INTERCEPT, TRUE_CORR * math.sqrt(TRUE_VAR_INTERCEPT * TRUE_VAR_SLOPE)],
        [TRUE_CORR * math.sqrt(TRUE_VAR_INTERCEPT * TRUE_VAR_SLOPE), TRUE_VAR_SLOPE],
    ])
    ab = rng.multivariate_normal(np.zeros(2), cov, size=n_therapists)
    therapist = np.repeat(np.arange(n_therapists), 2 * per_arm)
    feedback = np.tile(np.r_[np.zeros(per_arm), np.ones(per_arm)], n_therapists)
    baseline = rng.normal(16, 5, size=therapist.size)
    y = 2.0 + 0.5 * baseline - 0.8 * feedback + ab[therapist, 0] + ab[therapist, 1] * feedback
    y = y + rng.standard_normal(therapist.size) * math.sqrt(TRUE_RESIDUAL)
    return pd.DataFrame({"therapist": [f"T{t:04d}" for t in therapist], "feedback": feedback.astype(int),
                         "baseline": baseline, "end": y})


@pytest.fixture(scope="module")
def recovery_fit():
    df = simulate_slopes(seed=11)
    return RandomSlopeModel.from_frame(df, "end", ["baseline"], therapist="therapist", arm="feedback").fit()


def test_recovers_slope_variance_and_correlation(recovery_fit):
    res = recovery_fit
    assert res.converged and not res.singular
    # 600 therapists x 20 patients: estimates close to the truth, truth inside the 99% profile intervals
    assert res.vcomp["therapist_slope"] == pytest.approx(TRUE_VAR_SLOPE, rel=0.25)
    assert res.vcomp["therapist"] == pytest.approx(TRUE_VAR_INTERCEPT, rel=0.20)
    assert res.vcomp["residual"] == pytest.approx(TRUE_RESIDUAL, rel=0.05)
    assert res.correlation == pytest.approx(TRUE_CORR, abs=0.15)
    lo, hi = res.interval("therapist_slope", level=0.99)
    assert lo < TRUE_VAR_SLOPE < hi
    cor = res.correlation_interval(level=0.99)
    assert cor["ci_low"] < TRUE_CORR < cor["ci_high"] and cor["ci_high"] < 0  # the gap narrows
    assert res.fe_params["feedback"] == pytest.approx(-0.8, abs=0.1)
    assert res.fe_params["baseline"] == pytest.approx(0.5, abs=0.02)


def test_statsmodels_optimum_is_the_exact_optimum(recovery_fit):
    """statsmodels' REML optimum agrees with the exact criterion from per-(therapist, arm) sums."""
    z, dev = recovery_fit._optimum("REML")
    assert -0.5 * dev == pytest.approx(recovery_fit.loglik, abs=1e-3)


@pytest.fixture(scope="module")
def feedback_data():
    return pd.read_csv(REF_DIR / "therapy_feedback.csv")


@pytest.fixture(scope="module")
def feedback_fit(feedback_data):
    return RandomSlopeModel.from_frame(feedback_data, "phq9_post", ["phq9_pre", "feedback"],
                                       therapist="therapist_id", arm="feedback").fit()


def test_gap_table_matches_statsmodels_random_effects(feedback_fit):
    res = feedback_fit
    gap = res.gap_table()
    assert gap.shape == (60, 9)
    assert list(gap.columns) == ["therapist", "n_patients", "n_control", "n_feedback", "intercept", "slope",
                                 "effect_control", "effect_feedback", "feedback_effect"]
    assert gap["n_patients"].sum() == 2070
    for _, row in gap.iterrows():
        re = res.sm_result.random_effects[row["therapist"]]
        assert row["intercept"] == pytest.approx(re["(Intercept)"], abs=1e-12)
        assert row["slope"] == pytest.approx(re["feedback"], abs=1e-12)
    np.testing.assert_allclose(gap["effect_feedback"], gap["intercept"] + gap["slope"])
    np.testing.assert_allclose(gap["feedback_effect"], res.fe_params["feedback"] + gap["slope"])


def test_same_model_as_correlated_arm_model(feedback_data, feedback_fit):
    """(1 + feedback | therapist) = correlated arm-specific intercepts re-parameterised: the same
    likelihood, covariance A G A' with A = [[1, 0], [1, 1]], and the same BLUPs (independent engine)."""
    arm = ArmVarianceModel.from_frame(feedback_data, "phq9_post", ["phq9_pre", "feedback"],
                                      therapist="therapist_id", arm="feedback", correlated=True).fit()
    res = feedback_fit
    assert res.loglik == pytest.approx(arm.loglik, abs=1e-3)
    A = np.array([[1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(A @ res.cov_re.to_numpy() @ A.T, arm.cov_re, rtol=5e-3, atol=5e-3)
    eff = arm.therapist_effects().pivot(index="therapist", columns="arm", values="effect")
    gap = res.gap_table().set_index("therapist")
    np.testing.assert_allclose(gap["effect_control"], eff.loc[gap.index, "0"], atol=5e-3)
    np.testing.assert_allclose(gap["effect_feedback"], eff.loc[gap.index, "1"], atol=5e-3)


def test_bootstrap_is_seeded(feedback_fit):
    a = feedback_fit.correlation_interval(method="bootstrap", n_boot=40, seed=5)
    b = feedback_fit.correlation_interval(method="bootstrap", n_boot=40, seed=5)
    assert a == b and -1 <= a["ci_low"] <= a["ci_high"] <= 1
    with pytest.raises(ModelError, match="seed"):
        feedback_fit.correlation_interval(method="bootstrap", n_boot=5)


def test_contract_entry(feedback_fit):
    c = feedback_fit.to_contract()
    json.dumps(c)
    assert c["type"] == "random_slope"
    assert set(c["variance_components"]) == {"therapist", "therapist_slope", "residual"}
    assert set(c["correlation"]) >= {"estimate", "ci_low", "ci_high"}
    assert {"fixed_effects", "converged", "singular", "warnings"} <= set(c)
    for v in c["variance_components"].values():
        assert v["ci_low"] < v["estimate"] < v["ci_high"]
    assert c["correlation"]["ci_low"] < c["correlation"]["estimate"] < c["correlation"]["ci_high"]


def test_slope_variable_must_be_binary():
    df = simulate_slopes(seed=1, n_therapists=20, per_arm=3)
    with pytest.raises(ModelError, match="0/1"):
        RandomSlopeModel(df["end"], np.ones((len(df), 1)), df["therapist"], df["baseline"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ModelError, match="feedback_level"):
            RandomSlopeModel.from_frame(df, "end", [], arm="feedback", feedback_level=2)


def test_icc_per_arm_from_slope_model(feedback_data, feedback_fit):
    """The slope model's ICCs per arm equal those of the (same) correlated arm model."""
    arm = ArmVarianceModel.from_frame(feedback_data, "phq9_post", ["phq9_pre", "feedback"],
                                      therapist="therapist_id", arm="feedback", correlated=True).fit()
    icc = feedback_fit.icc()
    expected = arm.icc_point()
    assert icc["control"] == pytest.approx(expected[0], rel=5e-3)
    assert icc["feedback"] == pytest.approx(expected[1], rel=5e-3)
