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

from therapist_effects.exceptions import InputError, ModelError, StatisticalWarning
from therapist_effects.meta import (
    arms_long,
    dataset_meta,
    donner_n0,
    one_stage_icc,
    one_stage_ratio,
    per_cluster_estimates,
    pool,
    pool_arms,
    pool_study_table,
    pool_table,
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
def test_per_cluster_estimates_drops_a_covariate_constant_in_a_cluster_and_reports_a_lone_therapist():
    """A covariate constant within each cluster is collinear with the intercept there and is dropped (the ICC is
    the intercept-only one); a cluster with one therapist gets NaN estimates, estimable False and the reason."""
    df = _clusters()
    df["site_size"] = df["cluster"].map({"S1": 3.0, "S2": 5.0})
    df = pd.concat([df, pd.DataFrame({"cluster": "S3", "therapist": "S3T0", "y": [0.1, 0.5, -0.2, 0.3],
                                      "site_size": 4.0})], ignore_index=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = per_cluster_estimates(df[df["cluster"] != "S3"], "y")
        with_arm = per_cluster_estimates(df.assign(arm=np.arange(len(df)) % 2), "y", arm="arm")
    with pytest.warns(StatisticalWarning, match=r"cluster 'S3': ICC not estimable \(a random-intercept ICC needs at "
                      r"least two therapists\)"):
        got = per_cluster_estimates(df, "y", ["site_size"])
    assert list(got.columns) == list(plain.columns)
    np.testing.assert_allclose(got["icc"].iloc[:2], plain["icc"], rtol=1e-8)
    s3 = got.iloc[2].to_dict()
    assert (s3["cluster"], s3["n_patients"], s3["n_therapists"], s3["estimable"]) == ("S3", 4, 1, False)
    assert s3["not_estimable"] == "a random-intercept ICC needs at least two therapists"
    assert all(math.isnan(s3[c]) for c in ("icc", "vi", "yi", "logit_icc", "var_logit_icc"))
    assert math.isnan(with_arm["icc_control"].iloc[2]) and with_arm["icc_control"].iloc[:2].notna().all()


def test_donner_n0_and_pool_study_table_need_two():
    with pytest.raises(ModelError) as err:
        donner_n0([12, 0])
    assert str(err.value) == "Donner's n0 needs at least two therapists"
    raw = pd.DataFrame({"study": ["A", "B"], "icc": [0.05, 0.02], "var_icc": [4e-4, 1e-4]})
    assert pool_study_table(raw)["k"] == 2
    with pytest.raises(InputError) as err:
        pool_study_table(raw.iloc[:1], source="pub.csv")
    assert str(err.value) == "pub.csv: at least two studies are needed to pool, found 1"


def test_pool_study_table_pools_the_arms_at_its_level():
    t, _ = _arms()
    out = pool_study_table(t, level=0.9)
    yi, vi = _ratio_rows([0.020, 0.012], [0.015, 0.010])
    z90 = 1.6448536269514722  # qnorm(0.95)
    np.testing.assert_allclose(pd.DataFrame(out["arms"]["ratio"]["studies"])["ci_low"], np.exp(yi - z90 * np.sqrt(vi)),
                               rtol=1e-9)


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


def test_dataset_meta_on_the_trials():
    """therapy_trials: 6 trials, 120 therapists, 3597 patients (one test: mutmut maps a test to the functions it
    calls, which a shared module-scoped fixture would hide).

    The one-stage ICC is lme4's lmer(phq9_post ~ phq9_pre + feedback + (1 | trial_id/therapist_id))
    (tests/reference/lme4_reference.json): 0.4235489 / (0.4235489 + 0.0572614 + 26.3174576) = 0.0158048. The pooled
    ICC is pool() of the clusters' yi / vi; arms: pool_arms of the clusters' arm ICCs (per-arm pools without their
    study lists); the one-stage ratio is ICC_feedback / ICC_control and the reduction 1 - ratio, interval reversed."""
    from refdata import REFERENCE_DIR

    df = pd.read_csv(REFERENCE_DIR / "therapy_trials.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table, out = dataset_meta(df, "phq9_post", ["phq9_pre", "feedback"], therapist="therapist_id",
                                  cluster="trial_id", arm="feedback")
        table90, out90 = dataset_meta(df, "phq9_post", ["phq9_pre", "feedback"], therapist="therapist_id",
                                      cluster="trial_id", meta_cfg={"method": "DL", "test": "knha", "scale": "logit"},
                                      level=0.9)
    # pooling
    assert (out["method"], out["test"], out["scale"], out["level"]) == ("REML", "z", "fisher_z", 0.95)
    assert (out["n_clusters"], out["n_clusters_pooled"]) == (6, 6)
    ref = pool(table["yi"], table["vi"], "REML", test="z", scale="fisher_z")
    assert out["pooled"]["estimate"] == pytest.approx(ref["estimate"], rel=1e-12)
    assert "studies" not in out["pooled"] and "leave_one_out" not in out["pooled"]
    assert [r["study"] for r in out["leave_one_out"]] == ["S00", "S01", "S02", "S03", "S04", "S05"]
    assert (out90["method"], out90["test"], out90["scale"], out90["level"]) == ("DL", "knha", "logit", 0.9)
    assert out90["arms"] is None and out90["one_stage_arms"] is None
    ref = pool(table90["yi"], table90["vi"], "DL", test="knha", level=0.9, scale="logit")
    assert out90["pooled"]["ci_low"] == pytest.approx(ref["ci_low"], rel=1e-12)
    # one stage: the nested model
    one = out["one_stage"]
    assert one["estimate"] == pytest.approx(0.4235489072 / (0.4235489072 + 0.05726135832 + 26.31745758), rel=2e-4)
    assert one["tau2_cluster"] == pytest.approx(0.05726135832, rel=2e-2)
    assert out90["one_stage"]["estimate"] == one["estimate"]
    assert one["ci_low"] < out90["one_stage"]["ci_low"] < one["estimate"] < out90["one_stage"]["ci_high"] < one["ci_high"]
    assert (one["model"], one["n_patients"], one["n_clusters"], one["singular"], one["converged"]) == (
        "nested", 3597, 6, False, True)
    # arm-specific caseloads: Donner's n0 = (N - sum n_i^2 / N) / (k - 1) over each arm's therapists
    loads = df[(df["trial_id"] == "S00") & (df["feedback"] == 0)].groupby("therapist_id").size().to_numpy(float)
    assert table.at[0, "n0_control"] == pytest.approx((loads.sum() - (loads**2).sum() / loads.sum()) / (len(loads) - 1))
    # two stage, per arm
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
    # one stage, per arm
    one = out["one_stage_arms"]
    icc = one["icc_by_arm"]
    assert all(set(icc[a]) == {"estimate", "ci_low", "ci_high"} for a in ("control", "feedback"))
    assert one["ratio"]["estimate"] == pytest.approx(icc["feedback"]["estimate"] / icc["control"]["estimate"],
                                                     rel=1e-6)
    assert one["reduction"] == pytest.approx({"estimate": 1 - one["ratio"]["estimate"],
                                              "ci_low": 1 - one["ratio"]["ci_high"],
                                              "ci_high": 1 - one["ratio"]["ci_low"]}, rel=1e-12)
    assert (one["singular"], one["converged"], one["warnings"]) == (False, True, [])


# ---- study_table's own intervals, scale column and arm labels; pool_table's defaults and leave-one-out level ---------
def test_study_table_intervals_for_rows_given_without_one_and_checks():
    """A row given by ICC and var_icc gets the interval tanh(yi -/+ z sqrt(vi)) (lower end floored at 0);
    numeric arm labels are kept; a published upper limit of 1 is rejected."""
    raw = pd.DataFrame({"study": ["A", "A", "B", "B"], "arm": [0, 1, 0, 1], "icc": [0.05, 0.01, 0.08, 0.04],
                        "var_icc": [4e-4, 1e-4, 9e-4, 2e-4]})
    t = study_table(raw)
    assert t["arm"].tolist() == ["0", "1", "0", "1"] and (t["scale"] == "fisher_z").all()
    yi, vi = np.arctanh(raw["icc"]), raw["var_icc"] / (1 - raw["icc"] ** 2) ** 2
    np.testing.assert_allclose(t["ci_low"], np.maximum(np.tanh(yi - Z95 * np.sqrt(vi)), 0), rtol=1e-9)
    np.testing.assert_allclose(t["ci_high"], np.tanh(yi + Z95 * np.sqrt(vi)), rtol=1e-9)
    assert t.at[1, "ci_low"] == 0.0  # .01 - 1.96 * .01 < 0
    bad = pd.DataFrame({"study": ["A"], "icc": [0.5], "ci_low": [0.2], "ci_high": [1.0]})
    with pytest.raises(InputError, match=r"expected 0 <= ci_low <= icc <= ci_high < 1, got \[0\.2, 1\.0\]"):
        study_table(bad)
    with pytest.raises(ModelError) as err:
        study_table(raw, scale="probit")
    assert str(err.value) == "pooling scale must be one of ['fisher_z', 'logit'], got 'probit'"


def test_study_table_logit_interval_from_zero_uses_the_upper_half():
    """ICC .01 [0, .05] on the logit scale: vi = ((logit .05 - logit .01) / 1.959964)^2 (var_from_ci's rule)."""
    raw = pd.DataFrame({"study": ["A"], "icc": [0.01], "ci_low": [0.0], "ci_high": [0.05]})
    t = study_table(raw, scale="logit")
    want = ((math.log(0.05 / 0.95) - math.log(0.01 / 0.99)) / Z95) ** 2
    assert t.at[0, "vi"] == pytest.approx(want, rel=1e-9)


def test_pool_table_defaults_and_leave_one_out_at_its_level():
    raw = pd.DataFrame({"study": list("ABCD"), "yi": [0.02, 0.05, 0.01, 0.04], "vi": [1e-4, 2e-4, 1.5e-4, 3e-4]})
    t = study_table(raw)
    out = pool_table(t)
    ref = pool(t["yi"], t["vi"], "REML", test="z", level=0.95, scale="fisher_z")
    assert out["ci_low"] == pytest.approx(ref["ci_low"], rel=1e-12)
    assert out["icc"]["pi_low"] == pytest.approx(max(math.tanh(ref["pi_low"]), 0.0), rel=1e-12)
    assert out["icc"]["pi_high"] == pytest.approx(math.tanh(ref["pi_high"]), rel=1e-12)
    out = pool_table(t, "DL", level=0.9)
    first = pool(t["yi"].iloc[1:], t["vi"].iloc[1:], "DL", level=0.9)
    assert out["leave_one_out"][0]["ci_low"] == pytest.approx(first["ci_low"], rel=1e-12)


def test_per_arm_pools_evaluate_donner_variances_at_the_arms_mean_icc():
    """Donner rows (ICC, N, k): within each arm's pool the Fisher-z variance is Donner's at that arm's mean ICC,
    2 (1 - r)^2 (1 + (n0 - 1) r)^2 / (n0 (n0 - 1) (k - 1)) / (1 - r^2)^2 with n0 = N / k."""
    raw = pd.DataFrame({"study": ["A", "A", "B", "B"], "arm": ["control", "feedback"] * 2,
                        "icc": [0.06, 0.02, 0.04, 0.01], "n_patients": [200, 210, 300, 280],
                        "n_therapists": [20, 21, 25, 28]})
    out = pool_study_table(raw)
    r = (0.06 + 0.04) / 2
    n0, k = np.array([10.0, 12.0]), np.array([20.0, 25.0])
    vi = 2 * (1 - r) ** 2 * (1 + (n0 - 1) * r) ** 2 / (n0 * (n0 - 1) * (k - 1)) / (1 - r * r) ** 2
    np.testing.assert_allclose([s["vi"] for s in out["arms"]["control"]["studies"]], vi, rtol=1e-12)


def test_one_stage_icc_reports_a_singular_fit_and_one_stage_ratio_reads_default_columns():
    """Every therapist with the same four outcomes: no therapist or trial variance, a singular fit."""
    df = pd.DataFrame({"cluster": np.repeat(["S1", "S2", "S3"], 16), "therapist": np.repeat([f"T{i}" for i in range(12)], 4),
                       "y": np.tile([1.0, 2.0, 4.0, 7.0], 12)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = one_stage_icc(df, "y")
    assert one["singular"] is True and one["estimate"] == pytest.approx(0.0, abs=1e-8)
    rng = np.random.default_rng(7)
    df["arm"] = np.repeat([0, 1], 4)[np.arange(48) % 8]
    df["y"] = rng.normal(size=48) + np.repeat(rng.normal(0, 1.0, 12), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ratio = one_stage_ratio(df, "y")
    icc = ratio["icc_by_arm"]
    assert ratio["ratio"]["estimate"] == pytest.approx(icc["feedback"]["estimate"] / icc["control"]["estimate"],
                                                       rel=1e-6)


def test_arm_caseloads_give_donner_n0_from_two_therapists_and_a_lone_cluster_keeps_the_arm_columns():
    """Control arm: two therapists with 10 and 14 patients, n0 = (24 - (100 + 196) / 24) / 1 = 11.6666667;
    feedback: 12, 9, 11, n0 = (32 - (144 + 81 + 121) / 32) / 2 = 10.59375."""
    rng = np.random.default_rng(3)
    rows = []
    for t, (arm, n) in enumerate([(0, 10), (0, 14), (1, 12), (1, 9), (1, 11)]):
        u = rng.normal(0, 1)
        rows += [{"cluster": "S1", "therapist": f"T{t}", "arm": arm, "y": u + rng.normal()} for _ in range(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = per_cluster_estimates(pd.DataFrame(rows), "y", arm="arm")
        lone = per_cluster_estimates(pd.DataFrame({"cluster": "S1", "therapist": "T0", "arm": [0, 1, 0],
                                                   "y": [1.0, 2.0, 3.0]}), "y", arm="arm")
    assert got.at[0, "n0_control"] == pytest.approx(24 - 296 / 24, rel=1e-12)
    assert got.at[0, "n0_feedback"] == pytest.approx(10.59375, rel=1e-12)
    assert (got.at[0, "n_therapists_control"], got.at[0, "n_therapists_feedback"]) == (2, 3)
    assert list(lone.columns[-3:]) == ["icc_control", "icc_feedback", "icc_ratio"] and lone["icc_control"].isna().all()
