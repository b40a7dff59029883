"""Two-stage pooling of therapist ICCs against metafor, and formulas checked by hand."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import optimize

from therapist_effects.exceptions import InputError, ModelError
from therapist_effects.meta import donner_var_icc, logit_icc, per_cluster_estimates, pool, pool_study_table
from refdata import REFERENCE_DIR

REF_DIR = REFERENCE_DIR


@pytest.fixture(scope="module")
def trials_ref():
    return json.loads((REF_DIR / "lme4_reference.json").read_text())["therapy_trials"]


@pytest.fixture(scope="module")
def per_trial(trials_ref):
    # In R, per trial s: fit <- lmer(phq9_post ~ phq9_pre + feedback + (1 | therapist_id),
    #   data = subset(d, trial_id == s), REML = TRUE); icc = therapist var / (therapist var + residual);
    #   var_icc = 2 (1-icc)^2 (1 + (n0-1) icc)^2 / (n0 (n0-1) (k-1)), n0 = n / k;
    #   p = max(icc, 1e-4); yi = qlogis(p); vi = var_icc / (p * (1 - icc))^2
    return pd.DataFrame(trials_ref["per_trial"])


def test_per_cluster_estimates_reproduce_reference(per_trial):
    df = pd.read_csv(REF_DIR / "therapy_trials.csv")
    est = per_cluster_estimates(df, "phq9_post", ["phq9_pre", "feedback"], therapist="therapist_id", cluster="trial_id",
                                scale="fisher_z")
    assert list(est["cluster"]) == list(per_trial["trial"])
    np.testing.assert_array_equal(est["n_patients"], per_trial["n"])
    np.testing.assert_array_equal(est["n_therapists"], per_trial["k"])
    # icc: 1e-4 relative where positive (REML optimum), exactly 0 where lme4's fit is singular
    for mine, theirs in zip(est["icc"], per_trial["icc"]):
        if theirs == 0:
            assert mine == 0.0
        else:
            assert mine == pytest.approx(theirs, rel=1e-4)
    # var_icc: Donner's formula with the unbalanced n0 = (N - sum n_i^2 / N) / (k - 1) of each trial's
    # caseloads, written out here; R's reference used n0 = N / k, which is never smaller than n0, so
    # the variance here is never smaller than R's
    for (trial, d), row in zip(df.groupby("trial_id"), est.itertuples()):
        n_i = d.groupby("therapist_id").size().to_numpy(float)
        big_n, k = n_i.sum(), len(n_i)
        n0 = (big_n - (n_i**2).sum() / big_n) / (k - 1)
        assert row.n0 == pytest.approx(n0, rel=1e-12) and n0 <= big_n / k
        rho = row.icc
        assert row.var_icc == pytest.approx(2 * (1 - rho) ** 2 * (1 + (n0 - 1) * rho) ** 2 / (n0 * (n0 - 1) * (k - 1)),
                                            rel=1e-12)
    assert (est["var_icc"].to_numpy() >= per_trial["var_icc"].to_numpy() * (1 - 1e-4)).all()
    np.testing.assert_allclose(est["logit_icc"], per_trial["yi"], rtol=1e-4)
    np.testing.assert_allclose(est["var_logit_icc"], logit_icc(est["icc"], est["var_icc"])[1], rtol=1e-12)
    # the pooling scale: Fisher's z, atanh(icc) with the delta-method variance
    np.testing.assert_allclose(est["yi"], np.arctanh(est["icc"]), rtol=1e-12)
    # vi: Donner's variance at the trials' mean ICC (weights that do not depend on the trial's own estimate)
    rho = est["icc"].mean()
    common = 2 * (1 - rho) ** 2 * (1 + (est["n0"] - 1) * rho) ** 2 / (est["n0"] * (est["n0"] - 1) * (est["n_therapists"] - 1))
    np.testing.assert_allclose(est["vi"], common / (1 - rho**2) ** 2, rtol=1e-12)
    # a singular trial keeps a variance of its neighbours' size on Fisher's z (not 10^4 as on the logit scale)
    assert est["vi"].max() / est["vi"].min() < 5 and est["var_logit_icc"].max() > 1e3
    # each cluster's profile interval brackets its estimate; singular clusters keep an interval from 0
    assert (est["icc_ci_low"] <= est["icc"]).all() and (est["icc"] < est["icc_ci_high"]).all()
    assert (est.loc[est["icc"] == 0, "icc_ci_low"] == 0).all()


def test_donner_and_logit_formulas_reproduce_reference(per_trial):
    # given R's icc, n, k the formulas must reproduce R's var_icc, yi and vi to rounding
    v = donner_var_icc(per_trial["icc"], per_trial["n"], per_trial["k"])
    np.testing.assert_allclose(v, per_trial["var_icc"], rtol=1e-8)
    yi, vi = logit_icc(per_trial["icc"], per_trial["var_icc"])
    np.testing.assert_allclose(yi, per_trial["yi"], rtol=1e-8)
    np.testing.assert_allclose(vi, per_trial["vi"], rtol=1e-8)


@pytest.mark.parametrize("method", ["DL", "REML"])
def test_pool_reproduces_metafor(per_trial, trials_ref, method):
    # metafor::rma(yi, vi, data = per_trial, method = "DL")  (and method = "REML"):
    #   coef(), $se, $ci.lb, $ci.ub, $tau2  -> pooled_logit_icc
    expected = trials_ref["pooled_logit_icc"][method][0]
    out = pool(per_trial["yi"], per_trial["vi"], method, scale="logit")
    assert out["estimate"] == pytest.approx(expected["estimate"], rel=1e-6)
    assert out["se"] == pytest.approx(expected["se"], rel=1e-6)
    assert out["ci_low"] == pytest.approx(expected["ci.lb"], rel=1e-6)
    assert out["ci_high"] == pytest.approx(expected["ci.ub"], rel=1e-6)
    assert out["z"] == pytest.approx(expected["zval"], rel=1e-6)
    assert out["tau2"] == trials_ref["pooled_logit_icc"][f"tau2_{method}"]  # 0: truncated
    assert out["icc"]["estimate"] == pytest.approx(1 / (1 + math.exp(-expected["estimate"])), rel=1e-6)


def test_study_table_from_published_iccs_reproduces_metafor(per_trial, trials_ref):
    """A meta-analyst with only (icc, n, k) per study gets metafor's pooled result (Donner variances)."""
    table = per_trial.rename(columns={"trial": "study", "n": "n_patients", "k": "n_therapists"})[
        ["study", "icc", "n_patients", "n_therapists"]
    ]
    out = pool_study_table(table, "DL", scale="logit")
    expected = trials_ref["pooled_logit_icc"]["DL"][0]  # metafor::rma(yi, vi, method = "DL")
    assert out["estimate"] == pytest.approx(expected["estimate"], rel=1e-6)
    assert out["se"] == pytest.approx(expected["se"], rel=1e-6)
    studies = pd.DataFrame(out["studies"])
    np.testing.assert_allclose(studies["var_icc"], per_trial["var_icc"], rtol=1e-8)
    assert studies["weight_percent"].sum() == pytest.approx(100.0)


def test_dl_i2_and_prediction_interval_by_hand():
    # Four studies, equal variances 0.04 (w = 25), y = 0, .2, .4, .6:
    #   mu_FE = 0.3, Q = 25 * (.09 + .01 + .01 + .09) = 5, df = 3
    #   tau2_DL = (Q - df) / (sum w - sum w^2 / sum w) = 2 / (100 - 25) = 0.0266667
    #   s2 = df * sum w / ((sum w)^2 - sum w^2) = 300 / 7500 = 0.04;  I2 = tau2 / (tau2 + s2) = 40% = (Q-df)/Q
    #   w* = 1 / (0.04 + 0.0266667) = 15 each -> se = sqrt(1/60) = 0.1290994
    #   PI = 0.3 -/+ 1.959964 * sqrt(1/60 + 2/75) = 0.3 -/+ 0.4079990
    out = pool([0.0, 0.2, 0.4, 0.6], [0.04] * 4, "DL", scale="logit")
    assert out["Q"] == pytest.approx(5.0)
    assert out["tau2"] == pytest.approx(2 / 75)
    assert out["I2"] == pytest.approx(40.0)
    assert out["estimate"] == pytest.approx(0.3)
    assert out["se"] == pytest.approx(0.1290994, rel=1e-6)
    assert out["pi_low"] == pytest.approx(0.3 - 0.4079990, rel=1e-6)
    assert out["pi_high"] == pytest.approx(0.3 + 0.4079990, rel=1e-6)
    # Higgins et al. (2009) t-based interval: t_{0.975, 2} = 4.302653
    out_t = pool([0.0, 0.2, 0.4, 0.6], [0.04] * 4, "DL", prediction="t")
    assert out_t["pi_high"] == pytest.approx(0.3 + 4.302653 * math.sqrt(1 / 60 + 2 / 75), rel=1e-6)
    # back-transformation to the ICC scale
    assert out["icc"]["pi_high"] == pytest.approx(1 / (1 + math.exp(-(0.3 + 0.4079990))), rel=1e-6)


def test_dl_unequal_variances_by_hand():
    y = np.array([-3.1, -3.9, -2.6, -3.4, -4.4])
    v = np.array([0.10, 0.30, 0.05, 0.20, 0.50])
    w = 1 / v
    mu = (w * y).sum() / w.sum()
    q = (w * (y - mu) ** 2).sum()
    tau2 = max(0.0, (q - 4) / (w.sum() - (w**2).sum() / w.sum()))
    ws = 1 / (v + tau2)
    out = pool(y, v, "DL")
    assert tau2 > 0
    assert out["tau2"] == pytest.approx(tau2, rel=1e-10)
    assert out["estimate"] == pytest.approx((ws * y).sum() / ws.sum(), rel=1e-10)
    assert out["se"] == pytest.approx(math.sqrt(1 / ws.sum()), rel=1e-10)
    assert out["I2"] == pytest.approx(100 * (q - 4) / q, rel=1e-8)


def test_paule_mandel_by_hand():
    # Paule-Mandel: tau2 solves the generalised Q equation sum w_i(tau2) (y_i - mu(tau2))^2 = k - 1
    y = np.array([-3.1, -3.9, -2.6, -3.4, -4.4])
    v = np.array([0.10, 0.30, 0.05, 0.20, 0.50])

    def gen_q(t2):
        w = 1 / (v + t2)
        mu = (w * y).sum() / w.sum()
        return (w * (y - mu) ** 2).sum() - (len(y) - 1)

    tau2 = optimize.brentq(gen_q, 0.0, 10.0, xtol=1e-14)
    out = pool(y, v, "PM")
    assert out["tau2"] == pytest.approx(tau2, rel=1e-5)
    w = 1 / (v + tau2)
    assert out["estimate"] == pytest.approx((w * y).sum() / w.sum(), rel=1e-6)
    assert out["se"] == pytest.approx(math.sqrt(1 / w.sum()), rel=1e-5)


def test_reml_tau2_solves_the_reml_score_equation():
    # REML estimating equation (Viechtbauer 2005): sum w^2 ((y-mu)^2 - v) = tau2-free form;
    # equivalently tau2 = sum w^2 ((y - mu)^2 - v) / sum w^2 + 1 / sum w at the fixed point
    y = np.array([-3.1, -3.9, -2.6, -3.4, -4.4])
    v = np.array([0.10, 0.30, 0.05, 0.20, 0.50])
    out = pool(y, v, "REML")
    t2 = out["tau2"]
    w = 1 / (v + t2)
    mu = (w * y).sum() / w.sum()
    fixed_point = (w**2 * ((y - mu) ** 2 - v)).sum() / (w**2).sum() + 1 / w.sum()
    assert t2 > 0 and t2 == pytest.approx(fixed_point, rel=1e-5)


def test_study_table_uses_given_variances_and_checks_rows():
    table = pd.DataFrame({
        "study": ["A", "B", "C"],
        "icc": [0.05, 0.02, 0.08],
        "n_patients": [400, 900, 250],
        "n_therapists": [20, 45, 12],
        "var_icc": [0.0004, np.nan, 0.001],
    })
    out = pool_study_table(table, "PM", scale="logit")
    studies = pd.DataFrame(out["studies"])
    assert studies.loc[0, "var_icc"] == 0.0004 and studies.loc[2, "var_icc"] == 0.001
    assert studies.loc[1, "var_icc"] == pytest.approx(donner_var_icc(0.02, 900, 45))
    yi, vi = logit_icc(studies["icc"], studies["var_icc"])
    direct = pool(yi, vi, "PM", scale="logit")
    assert out["estimate"] == pytest.approx(direct["estimate"]) and out["tau2"] == pytest.approx(direct["tau2"])
    bad = table.assign(icc=[0.05, 1.2, 0.08])
    with pytest.raises(InputError, match=r"row 2 \(study 'B'\), column 'icc'") as err:
        pool_study_table(bad, source="published.csv")
    assert "\n" not in str(err.value) and "published.csv" in str(err.value)
    with pytest.raises(InputError, match=r"row 1 \(study 'A'\): no variance"):
        pool_study_table(table.drop(columns=["n_therapists", "var_icc"]))
    with pytest.raises(ModelError):
        pool([0.1], [0.2])


def test_per_cluster_arm_columns(per_trial):
    df = pd.read_csv(REF_DIR / "therapy_feedback.csv")
    df = df.assign(site=np.where(df["therapist_id"].str[-1].astype(int) % 2 == 0, "even", "odd"))
    est = per_cluster_estimates(df, "phq9_post", ["phq9_pre", "feedback"], therapist="therapist_id",
                                cluster="site", arm="feedback", feedback_level=1)
    assert {"icc_control", "icc_feedback", "icc_ratio"} <= set(est.columns)
    ok = est["icc_control"] > 0
    np.testing.assert_allclose(est.loc[ok, "icc_ratio"], est.loc[ok, "icc_feedback"] / est.loc[ok, "icc_control"])


def test_per_cluster_arm_iccs_with_a_covariate_constant_in_one_cluster():
    """A covariate constant within one cluster (e.g. every patient of a service has the same
    referral route) is left out of that cluster's arm model as it is of its ICC, so the arm-specific
    ICCs are estimated there, and equal the fit without the covariate."""
    from therapist_effects.models.arm import ArmVarianceModel

    rng = np.random.default_rng(11)
    rows = []
    for c in range(2):
        for t in range(12):
            u = rng.normal(scale=0.4, size=2)
            for _ in range(25):
                fb = int(rng.integers(0, 2))
                rows.append({"cluster": f"s{c}", "therapist": f"s{c}t{t}", "arm": fb,
                             "route": 1.0 if c == 0 else float(rng.integers(0, 2)),
                             "y": u[fb] + rng.normal()})
    df = pd.DataFrame(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = per_cluster_estimates(df, "y", ["route"], therapist="therapist", cluster="cluster", arm="arm")
        alone = ArmVarianceModel.from_frame(df[df["cluster"] == "s0"], "y", [], therapist="therapist",
                                            arm="arm").fit().icc_point()
    row = out.set_index("cluster").loc["s0"]
    assert np.isfinite(row["icc_control"]) and np.isfinite(row["icc_feedback"])
    assert row["icc_control"] == pytest.approx(alone[0], rel=1e-8)
    assert row["icc_feedback"] == pytest.approx(alone[1], rel=1e-8)
    assert np.isfinite(out.set_index("cluster").loc["s1", "icc_control"])
