"""Tests that kill the mutants of ``meta.py`` that survived the earlier tests (issue 16).

Expected values are the documented formulas worked by hand (delta-method variances, the log ratio of two
ICCs and its variance, intervals back-computed from a published CI) or :func:`pool`, which
tests/test_meta_metafor.py checks against metafor 3.8-1.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from therapist_effects.exceptions import InputError, StatisticalWarning
from therapist_effects.meta import (
    arms_long,
    dataset_meta,
    per_cluster_estimates,
    pool,
    pool_arms,
    study_table,
    var_from_ci,
)

Z95 = 1.959963984540054  # qnorm(0.975)


# ---- var_from_ci -----------------------------------------------------------------------------------------------------
def test_var_from_ci_defaults_to_fisher_z_at_95_percent():
    """((atanh .06 - atanh .004) / (2 * 1.959964))^2."""
    want = ((math.atanh(0.06) - math.atanh(0.004)) / (2 * Z95)) ** 2
    assert var_from_ci(0.02, 0.004, 0.06) == pytest.approx(want, rel=1e-12)


def test_var_from_ci_is_nan_when_the_interval_has_no_width():
    """A degenerate interval (lower = upper = ICC) gives no variance; on the logit scale a lower limit of 0
    with an ICC of 0 leaves neither half finite."""
    got = var_from_ci(0.1, 0.1, 0.1)
    assert isinstance(float(got), float) and math.isnan(got)
    assert math.isnan(var_from_ci(0.0, 0.0, 0.2, "logit"))


# ---- study tables given on the pooling scale (yi, vi): the ICC and its variance by the delta method ----------------
def test_yi_vi_rows_give_the_icc_and_its_delta_method_variance():
    """Fisher's z: ICC = tanh(yi), var(ICC) = vi (1 - ICC^2)^2. Logit: ICC = 1 / (1 + exp(-yi)),
    var(ICC) = vi (ICC (1 - ICC))^2."""
    raw = pd.DataFrame({"study": ["A", "B"], "yi": [0.2, -2.0], "vi": [0.01, 0.04]})
    t = study_table(raw, scale="fisher_z")
    icc = np.tanh([0.2, -2.0])
    np.testing.assert_allclose(t["icc"], icc, rtol=1e-12)
    np.testing.assert_allclose(t["var_icc"], [0.01, 0.04] * (1 - icc**2) ** 2, rtol=1e-12)
    t = study_table(raw, scale="logit")
    p = 1 / (1 + np.exp([-0.2, 2.0]))
    np.testing.assert_allclose(t["icc"], p, rtol=1e-12)
    np.testing.assert_allclose(t["var_icc"], [0.01, 0.04] * (p * (1 - p)) ** 2, rtol=1e-12)


def test_a_given_icc_with_yi_vi_keeps_the_icc_and_carries_vi_back_at_it():
    """An ICC of 0.05 given next to yi / vi on the logit scale: var(ICC) = vi (0.05 * 0.95)^2."""
    raw = pd.DataFrame({"study": ["A"], "icc": [0.05], "yi": [-2.9], "vi": [0.09]})
    t = study_table(raw, scale="logit")
    assert t.at[0, "icc"] == 0.05 and t.at[0, "var_icc"] == pytest.approx(0.09 * (0.05 * 0.95) ** 2, rel=1e-12)


def test_interval_rows_carry_the_variance_back_to_the_icc_scale():
    """ICC .02 [.004, .06] on Fisher's z: vi from the interval, var(ICC) = vi (1 - .02^2)^2; on the logit scale
    var(ICC) = vi (.02 * .98)^2."""
    raw = pd.DataFrame({"study": ["A"], "icc": [0.02], "ci_low": [0.004], "ci_high": [0.06]})
    t = study_table(raw, scale="fisher_z")
    vi = ((math.atanh(0.06) - math.atanh(0.004)) / (2 * Z95)) ** 2
    assert t.at[0, "var_icc"] == pytest.approx(vi * (1 - 0.02**2) ** 2, rel=1e-12)
    t = study_table(raw, scale="logit")
    logit = [math.log(x / (1 - x)) for x in (0.004, 0.06)]
    vi = ((logit[1] - logit[0]) / (2 * Z95)) ** 2
    assert t.at[0, "var_icc"] == pytest.approx(vi * (0.02 * 0.98) ** 2, rel=1e-12)


# ---- pool_arms: per-arm pools, the log ratio of the ICCs, the reduction ----------------------------------------------
def _arms(levels=("control", "feedback"), icc_c=(0.020, 0.012), icc_f=(0.015, 0.010)):
    rows = []
    for s, (c, f) in enumerate(zip(icc_c, icc_f)):
        rows += [{"study": f"T{s + 1}", "arm": levels[0], "icc": c, "var_icc": 4e-5 + 1e-5 * s},
                 {"study": f"T{s + 1}", "arm": levels[1], "icc": f, "var_icc": 3e-5 + 1e-5 * s}]
    t = pd.DataFrame(rows)
    return t, study_table(t, scale="fisher_z")


def _ratio_rows(icc_c, icc_f):
    """The per-study log ratios by hand: yi = log(ICC_f / ICC_c), vi = var_f / ICC_f^2 + var_c / ICC_c^2."""
    icc_c, icc_f = np.asarray(icc_c), np.asarray(icc_f)
    var_c = 4e-5 + 1e-5 * np.arange(len(icc_c))
    var_f = 3e-5 + 1e-5 * np.arange(len(icc_c))
    return np.log(icc_f / icc_c), var_f / icc_f**2 + var_c / icc_c**2


def test_pool_arms_with_two_studies_and_its_defaults():
    """Two studies are enough for each arm and for the ratio; defaults: REML, z test, 95%, Fisher's z."""
    _, t = _arms()
    out = pool_arms(t)
    assert out["levels"] == {"control": "control", "feedback": "feedback"}
    ctrl = t[t["arm"] == "control"]
    ref = pool(ctrl["yi"], ctrl["vi"], "REML", test="z", level=0.95, scale="fisher_z")
    assert out["control"]["estimate"] == pytest.approx(ref["estimate"], rel=1e-12)
    assert out["control"]["ci_low"] == pytest.approx(ref["ci_low"], rel=1e-12)
    assert {"index", "level_0"}.isdisjoint(out["control"]["studies"][0])
    yi, vi = _ratio_rows([0.020, 0.012], [0.015, 0.010])
    ref = pool(yi, vi, "REML", test="z", level=0.95, scale="log")
    r = out["ratio"]
    assert (r["method"], r["test"], r["scale"], r["left_out"]) == ("REML", "z", "log", [])
    assert r["estimate"] == pytest.approx(ref["estimate"], rel=1e-12)
    studies = pd.DataFrame(r["studies"])
    np.testing.assert_allclose(studies["icc_control"], [0.020, 0.012])
    np.testing.assert_allclose(studies["icc_feedback"], [0.015, 0.010])
    np.testing.assert_allclose(studies["icc_ratio"], [0.75, 0.010 / 0.012], rtol=1e-12)
    np.testing.assert_allclose(studies["ci_low"], np.exp(yi - Z95 * np.sqrt(vi)), rtol=1e-9)
    np.testing.assert_allclose(studies["ci_high"], np.exp(yi + Z95 * np.sqrt(vi)), rtol=1e-9)
    red = out["reduction"]
    assert red["ci_low"] == pytest.approx(1 - r["ratio"]["ci_high"], rel=1e-12)
    assert red["ci_high"] == pytest.approx(1 - r["ratio"]["ci_low"], rel=1e-12)


def test_pool_arms_passes_method_test_level_and_scale_to_every_pool():
    _, t = _arms(icc_c=(0.020, 0.012, 0.030), icc_f=(0.015, 0.010, 0.020))
    t = t.assign(yi=np.log(t["icc"] / (1 - t["icc"])), vi=t["var_icc"] / (t["icc"] * (1 - t["icc"])) ** 2)
    out = pool_arms(t, "DL", test="knha", level=0.9, scale="logit")
    fb = t[t["arm"] == "feedback"]
    ref = pool(fb["yi"], fb["vi"], "DL", test="knha", level=0.9, scale="logit")
    assert out["feedback"]["ci_high"] == pytest.approx(ref["ci_high"], rel=1e-12)
    assert out["feedback"]["icc"]["estimate"] == pytest.approx(ref["icc"]["estimate"], rel=1e-12)
    yi, vi = _ratio_rows([0.020, 0.012, 0.030], [0.015, 0.010, 0.020])
    ref = pool(yi, vi, "DL", test="knha", level=0.9, scale="log")
    r = out["ratio"]
    assert (r["method"], r["test"]) == ("DL", "knha")
    assert r["ci_low"] == pytest.approx(ref["ci_low"], rel=1e-12)
    z90 = 1.6448536269514722  # qnorm(0.95)
    np.testing.assert_allclose(pd.DataFrame(r["studies"])["ci_low"], np.exp(yi - z90 * np.sqrt(vi)), rtol=1e-9)


def test_pool_arms_levels_zero_one_and_an_explicit_feedback_level():
    """0/1 arms: 1 is feedback; feedback_level names it explicitly (here the other way round)."""
    _, t = _arms(levels=("0", "1"))
    assert pool_arms(t)["levels"] == {"control": "0", "feedback": "1"}
    out = pool_arms(t, feedback_level=0)
    assert out["levels"] == {"control": "1", "feedback": "0"}
    np.testing.assert_allclose(pd.DataFrame(out["ratio"]["studies"])["icc_ratio"], [0.020 / 0.015, 0.012 / 0.010])


def test_pool_arms_errors_are_one_line():
    _, t = _arms()
    with pytest.raises(InputError) as err:
        pool_arms(t, feedback_level="ROM")
    assert str(err.value) == "meta.feedback_level: 'ROM' is not a level of the arm column (['control', 'feedback'])"
    with pytest.raises(InputError) as err:
        pool_arms(t.assign(arm="control"))
    assert str(err.value) == ("study table: the arm column must have two levels (control, feedback), "
                              "found ['control']")


def test_a_control_arm_icc_of_zero_has_no_log_ratio_and_is_left_out_with_a_warning():
    _, t = _arms(icc_c=(0.020, 0.012, 0.0), icc_f=(0.015, 0.010, 0.010))
    with pytest.warns(StatisticalWarning) as caught:
        out = pool_arms(t)
    assert [str(w.message) for w in caught] == [
        "ICC ratio: studies ['T3'] have an arm ICC of 0 (singular) and no log ratio; left out of the two-stage "
        "ratio (the one-stage arm model keeps them)"]
    assert out["ratio"]["left_out"] == ["T3"] and out["ratio"]["k"] == 2


# ---- per_cluster_estimates: the default therapist column and the interval level -------------------------------------
def _clusters():
    rng = np.random.default_rng(16)
    rows = []
    for c in ("S1", "S2"):
        for t in range(8):
            u = rng.normal(0, 1.0)
            rows += [{"cluster": c, "therapist": f"{c}T{t}", "y": u + rng.normal()} for _ in range(12)]
    return pd.DataFrame(rows)


def test_per_cluster_estimates_default_columns_and_a_narrower_interval_at_a_lower_level():
    """A profile interval at 80% lies inside the 95% one (same estimate)."""
    df = _clusters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wide = per_cluster_estimates(df, "y")
        narrow = per_cluster_estimates(df, "y", level=0.8)
    assert wide["n_therapists"].tolist() == [8, 8]
    np.testing.assert_allclose(narrow["icc"], wide["icc"])
    interior = wide["icc_ci_low"] > 0
    assert interior.any()
    assert (narrow.loc[interior, "icc_ci_low"] > wide.loc[interior, "icc_ci_low"]).all()
    assert (narrow["icc_ci_high"] < wide["icc_ci_high"]).all()


# ---- arms_long and dataset_meta (what the workflow runs) --------------------------------------------------------------
def test_arms_long_makes_one_row_per_cluster_and_arm_with_a_usable_variance():
    """Fisher's z: yi = atanh(ICC), vi = var / (1 - ICC^2)^2; an arm without a positive finite variance is skipped;
    the study label is the cluster's when there is no study column."""
    per = pd.DataFrame({"cluster": ["S1", "S2"], "icc_control": [0.1, 0.2], "var_icc_control": [0.01, 0.0],
                        "icc_feedback": [0.05, 0.3], "var_icc_feedback": [0.02, 0.03],
                        "n0_control": [10.0, 11.0], "n0_feedback": [9.0, 8.0],
                        "n_patients_control": [100, 110], "n_patients_feedback": [90, 80],
                        "n_therapists_control": [10, 10], "n_therapists_feedback": [10, 10]})
    long = arms_long(per)
    assert list(long.columns) == ["study", "arm", "icc", "var_icc", "yi", "vi", "input", "n0", "n_patients",
                                  "n_therapists"]
    assert long[["study", "arm", "input"]].values.tolist() == [["S1", "control", "donner"], ["S1", "feedback", "donner"],
                                                               ["S2", "feedback", "donner"]]
    np.testing.assert_allclose(long["icc"], [0.1, 0.05, 0.3])
    np.testing.assert_allclose(long["yi"], np.arctanh([0.1, 0.05, 0.3]), rtol=1e-12)
    np.testing.assert_allclose(long["vi"], np.array([0.01, 0.02, 0.03]) / (1 - np.array([0.1, 0.05, 0.3]) ** 2) ** 2,
                               rtol=1e-12)
    assert long[["n0", "n_patients", "n_therapists"]].values.tolist() == [[10, 100, 10], [9, 90, 10], [8, 80, 10]]
    assert arms_long(per.assign(study=["A", "B"]))["study"].tolist() == ["A", "A", "B"]
    assert arms_long(per, "logit")["yi"].iloc[0] == pytest.approx(math.log(0.1 / 0.9), rel=1e-12)
    assert arms_long(per.iloc[:0]).empty


@pytest.fixture(scope="module")
def trials_meta():
    from refdata import REFERENCE_DIR

    df = pd.read_csv(REFERENCE_DIR / "therapy_trials.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table, out = dataset_meta(df, "phq9_post", ["phq9_pre", "feedback"], therapist="therapist_id",
                                  cluster="trial_id", arm="feedback")
    return df, table, out


def test_dataset_meta_pools_the_clusters_and_fits_the_nested_model_as_lme4(trials_meta):
    """therapy_trials: 6 trials, 120 therapists, 3597 patients. The one-stage ICC is lme4's
    lmer(phq9_post ~ phq9_pre + feedback + (1 | trial_id/therapist_id)) (tests/reference/lme4_reference.json):
    0.4235489 / (0.4235489 + 0.0572614 + 26.3174576) = 0.0158048."""
    _, table, out = trials_meta
    assert (out["method"], out["test"], out["scale"], out["level"]) == ("REML", "z", "fisher_z", 0.95)
    assert (out["n_clusters"], out["n_clusters_pooled"]) == (6, 6)
    ref = pool(table["yi"], table["vi"], "REML", test="z", scale="fisher_z")
    assert out["pooled"]["estimate"] == pytest.approx(ref["estimate"], rel=1e-12)
    assert "studies" not in out["pooled"] and "leave_one_out" not in out["pooled"]
    assert [r["study"] for r in out["leave_one_out"]] == ["S00", "S01", "S02", "S03", "S04", "S05"]
    one = out["one_stage"]
    assert one["estimate"] == pytest.approx(0.4235489072 / (0.4235489072 + 0.05726135832 + 26.31745758), rel=2e-4)
    assert one["tau2_cluster"] == pytest.approx(0.05726135832, rel=2e-2)
    assert one["ci_low"] < one["estimate"] < one["ci_high"]
    assert (one["model"], one["n_patients"], one["n_clusters"], one["singular"], one["converged"]) == (
        "nested", 3597, 6, False, True)


def test_dataset_meta_arms_two_stage_and_one_stage(trials_meta):
    """Two-stage: pool_arms of the clusters' arm ICCs (per-arm pools without their study
    lists). One-stage: the ratio is ICC_feedback / ICC_control and the reduction 1 - ratio, interval reversed."""
    _, table, out = trials_meta
    arms = out["arms"]
    assert arms["levels"] == {"control": "control", "feedback": "feedback"}
    zero = sorted(table.loc[(table["icc_control"] == 0) | (table["icc_feedback"] == 0), "cluster"].astype(str))
    assert arms["ratio"]["left_out"] == zero and len(arms["ratio"]["studies"]) == 6 - len(zero)
    assert arms["warnings"] == ([f"ICC ratio: studies {zero} have an arm ICC of 0 (singular) and no log ratio; left "
                                 "out of the two-stage ratio (the one-stage arm model keeps them)"] if zero else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StatisticalWarning)  # the same left-out warning, checked above
        ref = pool_arms(arms_long(table.assign(study=table["cluster"].astype(str))))
    assert arms["ratio"]["estimate"] == pytest.approx(ref["ratio"]["estimate"], rel=1e-12)
    for role in ("control", "feedback"):
        assert arms[role]["k"] == 6 and {"studies", "leave_one_out"}.isdisjoint(arms[role])
    one = out["one_stage_arms"]
    icc = one["icc_by_arm"]
    assert one["ratio"]["estimate"] == pytest.approx(icc["feedback"]["estimate"] / icc["control"]["estimate"],
                                                     rel=1e-6)
    assert one["reduction"] == pytest.approx({"estimate": 1 - one["ratio"]["estimate"],
                                              "ci_low": 1 - one["ratio"]["ci_high"],
                                              "ci_high": 1 - one["ratio"]["ci_low"]}, rel=1e-12)
    assert (one["singular"], one["converged"]) == (False, True)


def test_dataset_meta_takes_method_test_and_scale_from_the_meta_config(trials_meta):
    df, _, _ = trials_meta
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table, out = dataset_meta(df, "phq9_post", ["phq9_pre"], therapist="therapist_id", cluster="trial_id",
                                  meta_cfg={"method": "DL", "test": "knha", "scale": "logit"}, level=0.9)
    assert (out["method"], out["test"], out["scale"], out["level"]) == ("DL", "knha", "logit", 0.9)
    assert out["arms"] is None and out["one_stage_arms"] is None
    ref = pool(table["yi"], table["vi"], "DL", test="knha", level=0.9, scale="logit")
    assert out["pooled"]["ci_low"] == pytest.approx(ref["ci_low"], rel=1e-12)
