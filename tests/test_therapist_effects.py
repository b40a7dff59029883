"""Empirical-Bayes therapist effects: BLUPs, conditional SDs, adjusted means, classification.

Checked against (a) the dense-matrix closed forms lme4 implements (``ranef`` = D Z' V^-1 (y - Xb),
``condVar`` = diagonal of (Z'Z / s2 + D^-1)^-1, both at the estimates), (b) statsmodels MixedLM's
``random_effects`` / ``random_effects_cov`` on the same data, (c) pandas group means.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats

from therapist_effects.models.reml import NestedModel, RandomInterceptModel
from refdata import REFERENCE_DIR

REF = REFERENCE_DIR


@pytest.fixture(scope="module")
def feedback() -> pd.DataFrame:
    return pd.read_csv(REF / "therapy_feedback.csv")


@pytest.fixture(scope="module")
def ri_fit(feedback):
    return RandomInterceptModel.from_frame(feedback, "phq9_post", ["phq9_pre", "feedback"],
                                           therapist="therapist_id").fit()


def test_blup_and_condvar_equal_dense_closed_forms(ri_fit):
    res, m = ri_fit, ri_fit.model
    te = res.therapist_effects()
    s2_t, s2 = res.vcomp["therapist"], res.vcomp["residual"]
    resid = m.endog - m.exog @ res.fe_params.to_numpy()
    for i in range(m.n_therapists):
        idx = m.codes == i
        n_i = idx.sum()
        V = s2 * np.eye(n_i) + s2_t * np.ones((n_i, n_i))
        blup = s2_t * np.ones(n_i) @ np.linalg.solve(V, resid[idx])  # D Z' V^-1 (y - Xb)
        cvar = 1.0 / (n_i / s2 + 1.0 / s2_t)                       # (Z'Z/s2 + D^-1)^-1
        assert te["effect"].iloc[i] == pytest.approx(blup, rel=1e-9, abs=1e-12)
        assert te["effect_se"].iloc[i] == pytest.approx(np.sqrt(cvar), rel=1e-9)


def test_blups_match_statsmodels_random_effects(feedback, ri_fit):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm_fit = smf.mixedlm("phq9_post ~ phq9_pre + feedback", feedback,
                             groups=feedback["therapist_id"]).fit(reml=True)
    te = ri_fit.therapist_effects().set_index("therapist")
    sm_eff = pd.Series({k: float(v.iloc[0]) for k, v in sm_fit.random_effects.items()})
    sm_var = pd.Series({k: float(v.iloc[0, 0]) for k, v in sm_fit.random_effects_cov.items()})
    # statsmodels' optimum agrees with lme4's to ~1e-5 relative, hence the tolerances
    np.testing.assert_allclose(te.loc[sm_eff.index, "effect"], sm_eff, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(te.loc[sm_var.index, "effect_se"] ** 2, sm_var, rtol=1e-4)


def test_caseload_raw_and_adjusted_means(feedback, ri_fit):
    te = ri_fit.therapist_effects().set_index("therapist")
    g = feedback.groupby("therapist_id")
    assert te["caseload"].to_dict() == g.size().to_dict()
    np.testing.assert_allclose(te.loc[g.size().index, "raw_mean"], g["phq9_post"].mean(), rtol=1e-12)
    b = ri_fit.fe_params
    fitted = b["(Intercept)"] + b["phq9_pre"] * feedback["phq9_pre"] + b["feedback"] * feedback["feedback"]
    mean_resid = (feedback["phq9_post"] - fitted).groupby(feedback["therapist_id"]).mean()
    np.testing.assert_allclose(te.loc[mean_resid.index, "adjusted_mean"],
                               fitted.mean() + mean_resid, rtol=1e-10)
    assert list(te.columns) == ["caseload", "raw_mean", "adjusted_mean", "effect", "effect_se",
                                "ci_low", "ci_high", "classification"]


def _spread_out_data(seed: int = 5) -> pd.DataFrame:
    """Therapists with large true differences (ICC .3), so that some intervals exclude zero."""
    rng = np.random.default_rng(seed)
    t = np.repeat(np.arange(40), 25)
    y = 10.0 + rng.normal(scale=np.sqrt(0.3), size=40)[t] + rng.normal(scale=np.sqrt(0.7), size=t.size)
    return pd.DataFrame({"therapist": [f"T{k:02d}" for k in t], "y": y})


def test_classification_rules():
    res = RandomInterceptModel.from_frame(_spread_out_data(), "y").fit()
    z = stats.norm.ppf(0.975)
    plain = res.therapist_effects()
    np.testing.assert_allclose(plain["ci_low"], plain["effect"] - z * plain["effect_se"])
    np.testing.assert_allclose(plain["ci_high"], plain["effect"] + z * plain["effect_se"])
    above, below = plain["ci_low"] > 0, plain["ci_high"] < 0
    assert above.any() and below.any() and (~above & ~below).any()
    assert (plain.loc[above, "classification"] == "above average").all()
    assert (plain.loc[below, "classification"] == "below average").all()
    assert (plain.loc[~above & ~below, "classification"] == "not distinguishable from average").all()
    hib = res.therapist_effects(higher_is_better=True)
    assert (hib.loc[above, "classification"] == "better than average").all()
    assert (hib.loc[below, "classification"] == "worse than average").all()
    lib = res.therapist_effects(higher_is_better=False)  # e.g. PHQ-9 end scores
    assert (lib.loc[above, "classification"] == "worse than average").all()
    assert (lib.loc[below, "classification"] == "better than average").all()
    # a wider interval classifies no more therapists
    wide = res.therapist_effects(level=0.999)
    assert (wide["classification"] != "not distinguishable from average").sum() <= (above | below).sum()


def test_singular_fit_gives_zero_effects_all_indistinguishable():
    rng = np.random.default_rng(2)
    t = np.repeat(np.arange(10), 12)
    e = rng.normal(size=t.size)
    e -= pd.Series(e).groupby(t).transform("mean").to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = RandomInterceptModel(e, np.ones(t.size), t).fit()
    te = res.therapist_effects()
    assert res.singular
    assert (te["effect"] == 0).all() and (te["effect_se"] == 0).all()
    assert (te["classification"] == "not distinguishable from average").all()


def test_nested_effects_equal_dense_joint_posterior():
    """Nested model: therapist BLUPs and conditional SDs from the joint posterior of
    (cluster effects, therapist effects) given y at the estimates, by dense algebra."""
    df = pd.read_csv(REF / "therapy_trials.csv")
    df = df[df["trial_id"].isin(["S00", "S01", "S02"])].reset_index(drop=True)
    res = NestedModel.from_frame(df, "phq9_post", ["phq9_pre"], therapist="therapist_id",
                                 cluster="trial_id").fit()
    m = res.model
    te = res.therapist_effects()
    assert list(te.columns[:2]) == ["therapist", "cluster"]
    Zt = (m.codes[:, None] == np.arange(m.n_therapists)).astype(float)
    Zc = (m.cluster_codes[:, None] == np.arange(m.n_clusters)).astype(float)
    Z = np.hstack([Zc, Zt])
    s2 = res.vcomp["residual"]
    Dinv = np.diag([1 / res.vcomp["cluster"]] * m.n_clusters + [1 / res.vcomp["therapist"]] * m.n_therapists)
    prec = Z.T @ Z / s2 + Dinv
    cov = np.linalg.inv(prec)
    resid = m.endog - m.exog @ res.fe_params.to_numpy()
    mean = cov @ Z.T @ resid / s2
    np.testing.assert_allclose(te["effect"], mean[m.n_clusters:], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(te["effect_se"], np.sqrt(np.diag(cov)[m.n_clusters:]), rtol=1e-8)
    # labels: each therapist unit belongs to the cluster its patients were seen in
    pairs = df.groupby(["trial_id", "therapist_id"]).size()
    assert set(zip(te["cluster"], te["therapist"])) == set(pairs.index)
