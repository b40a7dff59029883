"""Random slopes across therapists (exact engine) and the narrowing-the-gap table.

lme4 agreement is in test_slopes_reference.py; statsmodels MixedLM appears here only as a cross-check."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from therapist_effects.models.arm import ArmVarianceModel
from therapist_effects.exceptions import ModelError
from therapist_effects.models.slopes import RandomSlopeModel
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


def test_exact_optimum_no_lower_than_statsmodels(recovery_fit):
    """Cross-check: statsmodels MixedLM (REML) on the same data reaches no higher a restricted
    log-likelihood than the exact engine, and the two agree where MixedLM converges."""
    import statsmodels.api as sm

    df = simulate_slopes(seed=11)
    exog = pd.DataFrame({"(Intercept)": 1.0, "baseline": df["baseline"], "feedback": df["feedback"].astype(float)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sm.MixedLM(df["end"], exog, groups=df["therapist"],
                         exog_re=exog[["(Intercept)", "feedback"]]).fit(reml=True, method=["lbfgs"])
    assert recovery_fit.loglik >= ref.llf - 1e-8
    assert recovery_fit.loglik == pytest.approx(ref.llf, abs=1e-3)


@pytest.fixture(scope="module")
def feedback_data():
    return pd.read_csv(REF_DIR / "therapy_feedback.csv")


@pytest.fixture(scope="module")
def feedback_fit(feedback_data):
    return RandomSlopeModel.from_frame(feedback_data, "phq9_post", ["phq9_pre", "feedback"],
                                       therapist="therapist_id", arm="feedback").fit()


def test_gap_table(feedback_fit):
    """Shape and arithmetic of the narrowing table (the BLUPs themselves are checked against lme4's
    ranef in test_slopes_reference.py)."""
    res = feedback_fit
    gap = res.gap_table()
    assert gap.shape == (60, 9)
    assert list(gap.columns) == ["therapist", "n_patients", "n_control", "n_feedback", "intercept", "slope",
                                 "effect_control", "effect_feedback", "feedback_effect"]
    assert gap["n_patients"].sum() == 2070
    assert (gap["n_control"] + gap["n_feedback"] == gap["n_patients"]).all()
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
    # one seed rule everywhere: seed=None is seed 0
    assert (feedback_fit.correlation_interval(method="bootstrap", n_boot=5)
            == feedback_fit.correlation_interval(method="bootstrap", n_boot=5, seed=0))
    assert feedback_fit.bootstrap(40, 5).n_failed == 0


def test_contract_entry(feedback_fit):
    c = feedback_fit.to_contract()
    json.dumps(c)
    assert c["type"] == "random_slope"
    assert set(c["variance_components"]) == {"therapist", "therapist_slope", "residual"}
    assert set(c["correlation"]) >= {"estimate", "ci_low", "ci_high"}
    assert {"fixed_effects", "converged", "singular", "warnings", "aic", "bic"} <= set(c)
    assert c["slope"] == "feedback"
    for v in c["variance_components"].values():
        assert v["ci_low"] < v["estimate"] < v["ci_high"]
    assert c["correlation"]["ci_low"] < c["correlation"]["estimate"] < c["correlation"]["ci_high"]


def test_continuous_slope_and_bad_input():
    """A continuous patient-level covariate is a valid slope variable; a slope needs therapists whose
    patients differ in it; an unknown feedback level is refused."""
    df = simulate_slopes(seed=1, n_therapists=20, per_arm=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = RandomSlopeModel.from_frame(df, "end", ["feedback"], slope="baseline").fit()
        assert res.model.slope_name == "baseline" and list(res.fe_params.index) == ["(Intercept)", "feedback", "baseline"]
        assert "n_control" not in res.gap_table().columns
        with pytest.raises(ModelError, match="differ"):
            RandomSlopeModel(df["end"], np.ones((len(df), 1)), df["therapist"], np.ones(len(df)))
        with pytest.raises(ModelError, match="feedback_level"):
            RandomSlopeModel.from_frame(df, "end", [], arm="feedback", feedback_level=2)


def test_icc_per_arm_from_slope_model(feedback_data, feedback_fit):
    """The slope model's ICCs per arm equal those of the (same) correlated arm model."""
    arm = ArmVarianceModel.from_frame(feedback_data, "phq9_post", ["phq9_pre", "feedback"],
                                      therapist="therapist_id", arm="feedback", correlated=True).fit()
    icc = feedback_fit.icc()
    expected = arm.icc_point()
    s = feedback_fit.model.slope_name
    assert icc[f"icc[{s}=0]"] == pytest.approx(expected[0], rel=5e-3)
    assert icc[f"icc[{s}=1]"] == pytest.approx(expected[1], rel=5e-3)


def test_fit_model_slope_key(tmp_path):
    """Config ``{type: random_slope, slope: <column>}``: (1 + <column> | therapist) by the exact engine,
    no arm column needed; the entry carries the contract's random_slope fields and validates."""
    import jsonschema
    import yaml

    from therapist_effects.config import load_config
    from therapist_effects.models.fitting import fit_model

    df = simulate_slopes(seed=4, n_therapists=30, per_arm=5)
    df["patient"] = [f"P{i}" for i in range(len(df))]
    dataset = {"path": "x.csv", "layout": "patient",
               "columns": {"patient": "patient", "therapist": "therapist", "outcome": "end", "baseline": "baseline"}}
    cfg = load_config({"datasets": {"d": dataset},
                       "models": [{"id": "sev", "type": "random_slope", "slope": "baseline", "interval": "wald"}]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entry, _, gap = fit_model(df, cfg["models"][0], cfg["datasets"]["d"], cfg)
    assert entry["formula"] == "end ~ baseline + (1 + baseline | therapist)"
    assert entry["slope"] == "baseline"
    assert set(entry["variance_components"]) == {"therapist", "therapist_slope", "residual"}
    assert {"estimate", "ci_low", "ci_high"} <= set(entry["correlation"])
    assert entry["aic"] == pytest.approx(-2 * entry["loglik"] + 2 * (2 + 3 + 1))
    ref = RandomSlopeModel.from_frame(df, "end", ["baseline"], slope="baseline", arm=None).fit()
    assert entry["loglik"] == pytest.approx(ref.loglik, rel=1e-12)
    schema_path = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "estimates.schema.yaml"
    schema = yaml.safe_load(schema_path.read_text())
    jsonschema.validate(entry, {"$defs": schema["$defs"], "$ref": "#/$defs/model"})
    assert len(gap) == 30
