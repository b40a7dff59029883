"""The exact REML/ML engine against R's lme4 1.1-31 (``tests/reference``) and statsmodels.

Every expected number is read from ``lme4_reference.json``; the R call that produced it is written
beside each case below. Tolerances are those of the reference's README: point estimates,
standard errors and log-likelihoods 1e-4 relative (the same optimum), profile intervals 1e-3
relative (lme4 interpolates its profile with a spline, we root-find exactly).
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from scipy import stats

from therapist_effects.exceptions import ModelError, SingularFitWarning, StatisticalWarning
from therapist_effects.models.reml import NestedModel, RandomInterceptModel
from refdata import REFERENCE_DIR

REF = REFERENCE_DIR

RTOL = 1e-4
CI_RTOL = 1e-3


@pytest.fixture(scope="module")
def ref() -> dict:
    return json.loads((REF / "lme4_reference.json").read_text())


@pytest.fixture(scope="module")
def data() -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(REF / f"{name}.csv")
            for name in ("exam", "dyestuff", "therapy_feedback", "therapy_trials")}


# (dataset, key, outcome, covariates, therapist column, method) and the R call behind the values
CASES = [
    # lmer(normexam ~ 1 + (1 | school), data = Exam, REML = FALSE); confint(fit, method = "profile")
    ("exam", "null_ML", "normexam", [], "school", "ML"),
    # lmer(normexam ~ 1 + (1 | school), data = Exam, REML = TRUE); confint(fit, method = "profile")
    ("exam", "null_REML", "normexam", [], "school", "REML"),
    # lmer(normexam ~ standLRT + (1 | school), data = Exam, REML = TRUE); confint(fit, method = "profile")
    ("exam", "lrt_REML", "normexam", ["standLRT"], "school", "REML"),
    # lmer(normexam ~ standLRT + (1 | school), data = Exam, REML = FALSE); confint(fit, method = "profile")
    ("exam", "lrt_ML", "normexam", ["standLRT"], "school", "ML"),
    # lmer(Yield ~ 1 + (1 | Batch), data = Dyestuff, REML = TRUE); confint(fit, method = "profile")
    ("dyestuff", "null_REML", "Yield", [], "Batch", "REML"),
    # lmer(phq9_post ~ phq9_pre + feedback + (1 | therapist_id), data = therapy_feedback, REML = TRUE)
    ("therapy_feedback", "ri_REML", "phq9_post", ["phq9_pre", "feedback"], "therapist_id", "REML"),
    # lmer(phq9_post ~ phq9_pre + feedback + (1 | therapist_id), data = therapy_feedback, REML = FALSE)
    ("therapy_feedback", "ri_ML", "phq9_post", ["phq9_pre", "feedback"], "therapist_id", "ML"),
    # lmer(phq9_post ~ phq9_pre + feedback + (1 | therapist_id), data = therapy_trials, REML = TRUE)
    ("therapy_trials", "ri_REML", "phq9_post", ["phq9_pre", "feedback"], "therapist_id", "REML"),
    # lmer(phq9_post ~ phq9_pre + feedback + (1 | therapist_id), data = therapy_trials, REML = FALSE)
    ("therapy_trials", "ri_ML", "phq9_post", ["phq9_pre", "feedback"], "therapist_id", "ML"),
    # lmer(phq9_post ~ phq9_pre + feedback + trial_id + (1 | therapist_id), data = therapy_trials,
    #      REML = TRUE)   (trial_id a factor: treatment-coded, trial_idS01 ... trial_idS05)
    ("therapy_trials", "trialfixed_REML", "phq9_post", ["phq9_pre", "feedback", "trial_id"],
     "therapist_id", "REML"),
]


def _fixed_se(entry: dict) -> list[float]:
    se = entry["fixed_se"]
    return list(se.values()) if isinstance(se, dict) else list(se)


@pytest.fixture(scope="module")
def fits(data) -> dict:
    out = {}
    for ds, key, outcome, cov, group, method in CASES:
        model = RandomInterceptModel.from_frame(data[ds], outcome, cov, therapist=group, method=method)
        out[(ds, key)] = model.fit()
    return out


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_point_estimates_match_lme4(case, ref, fits):
    ds, key = case[0], case[1]
    exp = ref[ds][key]
    res = fits[(ds, key)]
    assert res.method == ("REML" if exp["REML"] else "ML")
    assert res.n_obs == exp["n"]
    assert list(res.fe_params.index) == list(exp["fixed"])  # R-style names, e.g. trial_idS01
    np.testing.assert_allclose(res.fe_params.to_numpy(), list(exp["fixed"].values()), rtol=RTOL)
    np.testing.assert_allclose(res.bse.to_numpy(), _fixed_se(exp), rtol=RTOL)
    t_var, resid_var = exp["variance"].values()  # "<group>:(Intercept)", "Residual"
    assert res.vcomp["therapist"] == pytest.approx(t_var, rel=RTOL)
    assert res.vcomp["residual"] == pytest.approx(resid_var, rel=RTOL)
    assert res.loglik == pytest.approx(exp["logLik"], rel=RTOL)
    assert res.singular == exp["singular"]
    assert res.converged


@pytest.mark.parametrize("case", [c for c in CASES if c[1] not in ("ri_ML", "trialfixed_REML")],
                         ids=[f"{c[0]}-{c[1]}" for c in CASES if c[1] not in ("ri_ML", "trialfixed_REML")])
def test_profile_intervals_match_lme4(case, ref, fits):
    ds, key = case[0], case[1]
    exp = ref[ds][key]
    ci = fits[(ds, key)].conf_int(level=0.95, method="profile")
    (sd_key, t_ci), (_, sigma_ci) = exp["variance_ci"].items()  # stored squared (variances)
    assert sd_key.startswith("sd_(Intercept)")
    np.testing.assert_allclose(ci.loc["therapist"].to_numpy(), t_ci, rtol=CI_RTOL)
    np.testing.assert_allclose(ci.loc["residual"].to_numpy(), sigma_ci, rtol=CI_RTOL)
    for name, bounds in exp["fixed_ci"].items():
        np.testing.assert_allclose(ci.loc[name].to_numpy(), bounds, rtol=CI_RTOL)


def test_profile_of_reml_fit_uses_ml_deviance_as_lme4(ref, fits):
    """lme4's profile() refits REML fits by ML, so REML and ML fits share their intervals
    (the reference's exam null_REML / null_ML variance_ci are identical); so do ours."""
    for reml_key, ml_key in (("null_REML", "null_ML"), ("lrt_REML", "lrt_ML")):
        np.testing.assert_allclose(list(ref["exam"][reml_key]["variance_ci"].values()),
                                   list(ref["exam"][ml_key]["variance_ci"].values()), rtol=1e-8)
        a = fits[("exam", reml_key)].conf_int()
        b = fits[("exam", ml_key)].conf_int()
        np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-7)
        # ... while the point estimates differ (REML vs ML)
        assert fits[("exam", reml_key)].vcomp["therapist"] != pytest.approx(
            fits[("exam", ml_key)].vcomp["therapist"], rel=1e-3)


def test_profile_end_points_are_deviance_roots(fits):
    """Self-consistency of the root-finding: at each end the ML deviance, profiled over the
    other parameters, exceeds its minimum by exactly qchisq(.95, 1)."""
    res = fits[("therapy_feedback", "ri_REML")]
    ci = res.conf_int()
    eng, ml = res._eng, res._ml()
    q = stats.chi2.ppf(0.95, 1)
    for bound in ci.loc["residual"]:
        sigma = math.sqrt(bound)
        prof = min(eng.crit([s / sigma], False, sigma2=sigma * sigma) for s in np.linspace(0.0, 3.0, 3001))
        assert prof - ml["dmin"] == pytest.approx(q, abs=2e-3)  # grid minimum: slightly above


def test_nested_matches_lme4(ref, data):
    # lmer(phq9_post ~ phq9_pre + feedback + (1 | trial_id/therapist_id), data = therapy_trials,
    #      REML = TRUE)
    exp = ref["therapy_trials"]["nested_REML"]
    res = NestedModel.from_frame(data["therapy_trials"], "phq9_post", ["phq9_pre", "feedback"],
                                 therapist="therapist_id", cluster="trial_id").fit()
    assert (res.n_obs, res.n_therapists, res.n_clusters) == (3597, 120, 6)
    np.testing.assert_allclose(res.fe_params.to_numpy(), list(exp["fixed"].values()), rtol=RTOL)
    np.testing.assert_allclose(res.bse.to_numpy(), _fixed_se(exp), rtol=RTOL)
    v = exp["variance"]
    assert res.vcomp["therapist"] == pytest.approx(v["therapist_id:trial_id:(Intercept)"], rel=RTOL)
    assert res.vcomp["residual"] == pytest.approx(v["Residual"], rel=RTOL)
    assert res.loglik == pytest.approx(exp["logLik"], rel=RTOL)
    # The REML surface is very flat in the cluster variance (6 trials): lme4's bobyqa stops
    # 1e-3 (relative) away from the optimum. Our optimum is at least as good: the criterion at
    # lme4's estimates is higher than ours.
    assert res.vcomp["cluster"] == pytest.approx(v["trial_id:(Intercept)"], rel=2e-3)
    s2 = v["Residual"]
    crit_lme4 = res._eng.crit(np.sqrt([v["therapist_id:trial_id:(Intercept)"] / s2,
                                       v["trial_id:(Intercept)"] / s2]), True)
    assert -2.0 * res.loglik <= crit_lme4 + 1e-9
    assert res.icc() == pytest.approx(
        v["therapist_id:trial_id:(Intercept)"] / sum(v.values()), rel=2e-4)


def test_nested_reduces_to_random_intercept_when_cluster_variance_is_zero(data):
    """With g_c fixed at 0 the nested criterion is the random-intercept one (Woodbury check)."""
    df = data["therapy_trials"]
    ri = RandomInterceptModel.from_frame(df, "phq9_post", ["phq9_pre"], therapist="therapist_id")
    ne = NestedModel.from_frame(df, "phq9_post", ["phq9_pre"], therapist="therapist_id",
                                cluster="trial_id")
    for g in (0.0, 0.01, 0.3):
        th = math.sqrt(g)
        assert ne._engine.crit([th, 0.0], True) == pytest.approx(ri._engine.crit([th], True), rel=1e-12)


def test_nested_criterion_against_dense_likelihood(data):
    """The Woodbury/sufficient-statistic REML criterion equals the dense-matrix formula on a
    subset (two trials), at arbitrary variance ratios."""
    df = data["therapy_trials"]
    df = df[df["trial_id"].isin(["S00", "S01"])].reset_index(drop=True)
    m = NestedModel.from_frame(df, "phq9_post", ["phq9_pre", "feedback"],
                               therapist="therapist_id", cluster="trial_id")
    y, X = m.endog, m.exog
    n, p = X.shape
    Zt = (m.codes[:, None] == np.arange(m.n_therapists)).astype(float)
    Zc = (m.cluster_codes[:, None] == np.arange(m.n_clusters)).astype(float)
    for gt, gc in ((0.02, 0.003), (0.5, 1.0)):
        V = np.eye(n) + gt * Zt @ Zt.T + gc * Zc @ Zc.T  # V / s2
        Vi = np.linalg.inv(V)
        XtViX = X.T @ Vi @ X
        b = np.linalg.solve(XtViX, X.T @ Vi @ y)
        r = (y - X @ b) @ Vi @ (y - X @ b)
        dense = ((n - p) * (1 + math.log(2 * math.pi * r / (n - p))) + np.linalg.slogdet(V)[1]
                 + np.linalg.slogdet(XtViX)[1])
        assert m._engine.crit(np.sqrt([gt, gc]), True) == pytest.approx(dense, rel=1e-10)


def test_statsmodels_mixedlm_cross_check(data):
    """Same model by statsmodels MixedLM (a different algorithm): REML estimates agree."""
    df = data["therapy_feedback"]
    res = RandomInterceptModel.from_frame(df, "phq9_post", ["phq9_pre", "feedback"],
                                          therapist="therapist_id").fit()
    # statsmodels' default optimiser chain (bfgs, then lbfgs); lbfgs alone stalls at 0 here
    sm_fit = smf.mixedlm("phq9_post ~ phq9_pre + feedback", df, groups=df["therapist_id"]).fit(
        reml=True)
    np.testing.assert_allclose(res.fe_params.to_numpy(), sm_fit.fe_params.to_numpy(), rtol=1e-4)
    # (no SE comparison: statsmodels' bse_fe come from the Hessian of all parameters, lme4's
    #  vcov, compared above, is s2 (X'V^-1X)^-1)
    assert res.vcomp["therapist"] == pytest.approx(float(sm_fit.cov_re.iloc[0, 0]), rel=1e-4)
    assert res.vcomp["residual"] == pytest.approx(sm_fit.scale, rel=1e-4)
    assert res.loglik == pytest.approx(sm_fit.llf, rel=1e-6)


def test_lrt_against_lme4_and_ordinary_regression(ref, data, fits):
    """LRT of therapist variance = 0: the null model is ordinary regression, whose log-likelihood
    statsmodels OLS gives (ML); the REML one is the textbook closed form
    -1/2 [(n-p) log(2 pi s^2) + log|X'X| + (n-p)], s^2 = RSS/(n-p) (R: logLik(lm(...), REML = TRUE))."""
    exam = data["exam"]
    X = sm.add_constant(exam[["standLRT"]].to_numpy())
    ols = sm.OLS(exam["normexam"].to_numpy(), X).fit()
    # ML: 2 * (logLik(lmer(normexam ~ standLRT + (1 | school), Exam, REML = FALSE)) - logLik(lm))
    stat_ml = 2.0 * (ref["exam"]["lrt_ML"]["logLik"] - ols.llf)
    lrt = fits[("exam", "lrt_ML")].lrt()
    assert lrt["statistic"] == pytest.approx(stat_ml, rel=1e-4)
    assert lrt["p_value"] == pytest.approx(0.5 * stats.chi2.sf(stat_ml, 1), rel=1e-3, abs=0)
    assert lrt["df"] == 1.0
    n, p = X.shape
    s2 = ols.ssr / (n - p)
    reml0 = -0.5 * ((n - p) * math.log(2 * math.pi * s2) + np.linalg.slogdet(X.T @ X)[1] + (n - p))
    stat_reml = 2.0 * (ref["exam"]["lrt_REML"]["logLik"] - reml0)
    assert fits[("exam", "lrt_REML")].lrt()["statistic"] == pytest.approx(stat_reml, rel=1e-4)


def _singular_data(seed: int = 11) -> pd.DataFrame:
    """Therapists whose mean outcomes are identical: the therapist variance estimate is 0."""
    rng = np.random.default_rng(seed)
    t = np.repeat(np.arange(20), 15)
    x = rng.normal(size=t.size)
    e = rng.normal(size=t.size)
    e -= pd.Series(e).groupby(t).transform("mean").to_numpy()  # no between-therapist spread
    return pd.DataFrame({"therapist": t.astype(str), "x": x, "y": 1.0 + e})


def test_singular_fit_is_exact_flagged_and_equals_ordinary_regression():
    df = _singular_data()
    with pytest.warns(SingularFitWarning):
        res = RandomInterceptModel.from_frame(df, "y", ["x"], method="ML").fit()
    assert res.singular and res.vcomp["therapist"] == 0.0
    assert any("singular" in w for w in res.warnings)
    ols = sm.OLS(df["y"].to_numpy(), sm.add_constant(df["x"].to_numpy())).fit()
    np.testing.assert_allclose(res.fe_params.to_numpy(), ols.params, rtol=1e-10)
    assert res.loglik == pytest.approx(ols.llf, rel=1e-12)
    assert res.vcomp["residual"] == pytest.approx(ols.ssr / len(df), rel=1e-12)
    # singular fits keep an interval: lower end 0, upper end positive
    lo, hi = res.icc_interval()
    assert lo == 0.0 and 0.0 < hi < 0.2
    ci = res.conf_int()
    assert ci.loc["therapist", "lower"] == 0.0 and ci.loc["therapist", "upper"] > 0.0
    lrt = res.lrt()
    assert lrt["statistic"] == 0.0 and lrt["p_value"] == 1.0
    contract = res.to_contract()
    assert contract["singular"] is True and contract["warnings"]


def test_contract_entry_is_plain_json_and_complete(data):
    df = data["therapy_trials"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a regular fit warns about nothing
        res = NestedModel.from_frame(df, "phq9_post", ["phq9_pre", "feedback"],
                                     therapist="therapist_id", cluster="trial_id").fit()
    c = res.to_contract()
    assert json.loads(json.dumps(c, allow_nan=False)) == c
    assert set(c) == {"family", "method", "fixed_effects", "variance_components", "icc",
                      "icc_cluster", "loglik", "aic", "bic", "converged", "singular", "lrt", "n_patients",
                      "n_therapists", "n_clusters", "warnings"}
    assert c["family"] == "gaussian" and c["method"] == "REML"
    assert set(c["variance_components"]) == {"therapist", "cluster", "residual"}
    for name, fe in c["fixed_effects"].items():
        assert set(fe) == {"estimate", "se", "ci_low", "ci_high"}
        assert fe["ci_low"] < fe["estimate"] < fe["ci_high"]
    for vc in c["variance_components"].values():
        assert vc["ci_low"] <= vc["estimate"] <= vc["ci_high"]
    icc = c["icc"]
    assert icc["ci_low"] < icc["estimate"] < icc["ci_high"] and icc["ci_method"] == "profile"
    assert c["icc_cluster"]["ci_low"] <= c["icc_cluster"]["estimate"] <= c["icc_cluster"]["ci_high"]
    assert (c["n_patients"], c["n_therapists"], c["n_clusters"]) == (3597, 120, 6)
    assert c["lrt"]["p_value"] < 0.01  # the simulated therapist variance is clearly there
    assert isinstance(c["converged"], bool) and isinstance(c["loglik"], float)


def test_user_errors_are_one_line(data):
    df = data["dyestuff"]
    with pytest.raises(ModelError, match="method"):
        RandomInterceptModel.from_frame(df, "Yield", therapist="Batch", method="OLS")
    with pytest.raises(ModelError, match="therapist column 'therapist'"):
        RandomInterceptModel.from_frame(df, "Yield")
    with pytest.raises(ModelError, match="at least 2 therapists"):
        RandomInterceptModel(df["Yield"], np.ones(len(df)), np.zeros(len(df)))
    with pytest.raises(ModelError, match="smaller than the number of patients"):
        RandomInterceptModel(df["Yield"], np.ones(len(df)), np.arange(len(df)))
    with pytest.raises(ModelError, match="at least 2 clusters"):
        NestedModel(df["Yield"], np.ones(len(df)), df["Batch"], np.zeros(len(df)))
    for err in (ModelError,):
        try:
            RandomInterceptModel.from_frame(df, "Yield", therapist="Batch", method="x")
        except err as e:
            assert "\n" not in str(e)


# -- robustness and plumbing (no R value involved) ------------------------------------------------
def test_no_within_therapist_variation_is_flagged_as_not_converged():
    """Outcomes (almost) constant within therapists: the variance ratio runs off to the upper
    end of the search (ICC -> 1), which must be reported, not hidden."""
    from therapist_effects.exceptions import ConvergenceWarning

    rng = np.random.default_rng(1)
    t = np.repeat(np.arange(10), 5)
    y = rng.normal(size=10)[t] + 1e-5 * rng.normal(size=t.size)
    with pytest.warns(ConvergenceWarning):
        res = RandomInterceptModel(y, np.ones(t.size), t).fit()
    assert not res.converged
    with pytest.warns(StatisticalWarning, match="upper end reported as 1"):
        contract = res.to_contract(interval="wald")  # the ICC profile never falls off: upper 1
    assert contract["converged"] is False and contract["icc"]["ci_high"] == 1.0
    assert any("converge" in w for w in res.warnings)


def test_group_codes_identical_to_design_group_codes():
    """The engine's fast therapist coding (strings made of distinct labels only) gives exactly
    design.group_codes' codes and labels (sorted as strings: "10" before "9")."""
    from therapist_effects.models.design import group_codes
    from therapist_effects.models.reml import _group_codes

    rng = np.random.default_rng(4)
    for labels in (rng.integers(0, 120, size=500), np.array([f"T{k}" for k in rng.integers(0, 50, 300)]),
                   np.array([1, "1", 2.0, "x"], dtype=object)):
        codes, labs = _group_codes(labels, "therapist")
        codes2, labs2 = group_codes(labels)
        np.testing.assert_array_equal(codes, codes2)
        assert list(labs) == list(labs2)


def test_bootstrap_contract_is_seeded_and_percentile_based():
    rng = np.random.default_rng(8)
    t = np.repeat(np.arange(30), 20)
    y = 0.4 * rng.normal(size=30)[t] + rng.normal(size=t.size)
    res = RandomInterceptModel(y, np.ones(t.size), t).fit()
    c1 = res.to_contract(interval="bootstrap", n_boot=200, seed=3)
    c2 = RandomInterceptModel(y, np.ones(t.size), t).fit().to_contract(
        interval="bootstrap", n_boot=200, seed=3)
    assert c1 == c2 and c1["icc"]["ci_method"] == "bootstrap"
    bt = res.bootstrap(200, 3)
    lo, hi = np.quantile(bt["therapist"], [0.025, 0.975])
    assert c1["variance_components"]["therapist"]["ci_low"] == pytest.approx(lo)
    assert c1["variance_components"]["therapist"]["ci_high"] == pytest.approx(hi)


def test_nested_icc_profile_end_points_are_deviance_roots(data):
    """Nested ICC interval: at each end the REML criterion, minimised over the cluster ratio
    with the ICC held fixed (brute-force grid here), exceeds its minimum by qchisq(.95, 1)."""
    res = NestedModel.from_frame(data["therapy_trials"], "phq9_post", ["phq9_pre", "feedback"],
                                 therapist="therapist_id", cluster="trial_id").fit()
    q = stats.chi2.ppf(0.95, 1)
    cmin = -2.0 * res.loglik
    for icc in res.icc_interval():
        k = icc / (1.0 - icc)  # g_t / (1 + g_c)
        gcs = np.linspace(0.0, 0.02, 2001)
        prof = min(res._eng.crit(np.sqrt([k * (1 + gc), gc]), True) for gc in gcs)
        assert prof - cmin == pytest.approx(q, abs=1e-3)
