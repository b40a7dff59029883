"""Tests of the Bayesian therapist-effects engine (``therapist_effects.models.bayes``).

Expected values come from R (lme4 1.1-31 / glmmTMB 1.1.5, R 4.2.2) via
``tests/reference/lme4_reference.json``; the R call that produced each is written beside it. With
weakly-informative priors and 60+ therapists the posterior median of a variance is close to the
REML estimate, and the REML profile-likelihood interval is the natural frequentist yardstick for
the therapist variance.

Compiling a model with nutpie (numba) takes ~20-30 s, sampling a sufficient-statistics model ~1-2 s;
the fits below are therefore shared (module-scoped fixtures) and reused with other sampler settings
or priors. Default run: about 2 minutes on 2 cores; the nested and binomial fits are marked ``slow``
(about 2 more minutes):

    cd /work/main && /work/venv/bin/python -m pytest tests/test_bayes.py -q -m "not slow"   # ~2 min
    cd /work/main && /work/venv/bin/python -m pytest tests/test_bayes.py -q -m slow         # the slow ones

(pyproject's addopts do not deselect ``slow``; without ``-m`` all of them run.)
"""

from __future__ import annotations

import json
from dataclasses import replace
import math
import warnings

import arviz as az
import numpy as np
import pandas as pd
import pytest
from scipy.special import gammaln

from therapist_effects.models import bayes
from therapist_effects.models.bayes import (
    BayesConfig,
    BayesModel,
    build_model,
    fit_bayes,
    hdi,
    model_priors,
    prior_sensitivity,
)
from therapist_effects.exceptions import ConfigError, ModelError, SamplerWarning
from refdata import REFERENCE_DIR

REF_DIR = REFERENCE_DIR

CFG = BayesConfig(chains=4, draws=1000, tune=1000, seed=20240917)


def _ref() -> dict:
    return json.loads((REF_DIR / "lme4_reference.json").read_text())


# --------------------------------------------------------------------------------------------
# shared fits


@pytest.fixture(scope="module")
def feedback_df() -> pd.DataFrame:
    return pd.read_csv(REF_DIR / "therapy_feedback.csv")


@pytest.fixture(scope="module")
def feedback_model(feedback_df) -> BayesModel:
    """phq9_post ~ phq9_pre + feedback + (1 | therapist_id), compiled once; non-centred therapist
    effects (the default for this model is the marginal parameterisation, checked against it below)."""
    return BayesModel(
        "random_intercept", feedback_df, "phq9_post", ["phq9_pre", "feedback"], therapist="therapist_id",
        config=replace(CFG, parameterization="noncentred"),
    )


@pytest.fixture(scope="module")
def feedback_fit(feedback_model):
    return feedback_model.fit()


@pytest.fixture(scope="module")
def exam_fit():
    exam = pd.read_csv(REF_DIR / "exam.csv")
    return fit_bayes("random_intercept", exam, "normexam", ["standLRT"], therapist="school", config=CFG)


# --------------------------------------------------------------------------------------------
# agreement with R (lme4 REML)


def test_feedback_random_intercept_agrees_with_lme4_reml(feedback_fit):
    ref = _ref()["therapy_feedback"]["ri_REML"]
    # R: lmer(phq9_post ~ phq9_pre + feedback + (1 | therapist_id), data = therapy_feedback, REML = TRUE)
    #    VarCorr(...): Residual 24.61118871, therapist_id 0.8629748692
    #    confint(..., method = "profile"), squared (variance scale, as stored in the JSON): therapist_id
    #    [0.3837170976, 1.566537317]
    assert ref["variance"]["Residual"] == pytest.approx(24.61118871)
    p = feedback_fit.params
    assert p["var(residual)"] == pytest.approx(ref["variance"]["Residual"], rel=0.02)
    lo, hi = ref["variance_ci"]["sd_(Intercept)|therapist_id"]
    assert lo < ref["variance"]["therapist_id:(Intercept)"] < hi  # the stored interval is on the variance scale
    assert lo < p["var(therapist)"] < hi
    # fixed effects: posterior median within a quarter of the REML standard error of the REML estimate
    # R: fixef(...) = (-0.6254500886, 0.546641317, -0.8630113718); SE (0.4446, 0.0246, 0.2196)
    for name, est in ref["fixed"].items():
        assert abs(p[name] - est) < 0.25 * ref["fixed_se"][name], name
    d = feedback_fit.diagnostics
    assert not feedback_fit.failed and feedback_fit.advice is None
    assert d["max_rhat"] <= 1.01 and d["min_ess_bulk"] >= 400 and d["min_ess_tail"] >= 400 and d["divergences"] == 0


def test_exam_random_intercept_agrees_with_lme4_reml(exam_fit):
    ref = _ref()["exam"]["lrt_REML"]
    # R: lmer(normexam ~ standLRT + (1 | school), data = mlmRev::Exam, REML = TRUE)
    #    VarCorr: Residual 0.5658653102, school 0.09383898839
    #    confint(..., method = "profile"), squared (variance scale): school [0.06291682971, 0.1387983508]
    assert ref["variance"]["Residual"] == pytest.approx(0.5658653102)
    p = exam_fit.params
    assert p["var(residual)"] == pytest.approx(ref["variance"]["Residual"], rel=0.02)
    lo, hi = ref["variance_ci"]["sd_(Intercept)|school"]
    assert lo < ref["variance"]["school:(Intercept)"] < hi  # the stored interval is on the variance scale
    assert lo < p["var(therapist)"] < hi
    for name, est in ref["fixed"].items():
        assert abs(p[name] - est) < 0.25 * ref["fixed_se"][name], name
    assert not exam_fit.failed, exam_fit.diagnostics


# --------------------------------------------------------------------------------------------
# reproducibility and diagnostics


def test_same_config_and_data_give_identical_draws(feedback_model, feedback_df):
    cfg = BayesConfig(chains=2, draws=200, tune=200, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SamplerWarning)
        a = feedback_model.fit(config=cfg)
        b = feedback_model.fit(feedback_df.copy(), config=cfg)
        c = feedback_model.fit(config=BayesConfig(chains=2, draws=200, tune=200, seed=12))
    for var in ("beta_std", "sigma_std", "sd_therapist_std", "z_therapist"):
        np.testing.assert_array_equal(a.idata.posterior[var].values, b.idata.posterior[var].values)
    assert not np.array_equal(a.idata.posterior["z_therapist"].values, c.idata.posterior["z_therapist"].values)


def test_too_few_draws_fail_diagnostics_with_warning_and_advice(feedback_model):
    with pytest.warns(SamplerWarning, match="diagnostics failed"):
        res = feedback_model.fit(config=BayesConfig(chains=2, draws=15, tune=15, seed=3))
    assert res.failed
    assert "raise draws / tune" in res.advice
    assert res.diagnostics["min_ess_bulk"] < bayes.ESS_MIN
    contract = res.to_contract()
    assert contract["converged"] is False and contract["diagnostics"]["failed"] is True
    assert contract["diagnostics"]["advice"] == res.advice and contract["warnings"]
    assert "FAILED" in res.summary()


def test_diagnose_counts_divergences_and_rhat():
    """diagnose() on hand-made draws: two chains stuck in different places -> R-hat >> 1; divergences counted."""
    rng = np.random.default_rng(5)
    post = {"a": np.stack([rng.normal(0, 1, 1000), rng.normal(5, 1, 1000)])}
    idata = az.from_dict(posterior=post, sample_stats={"diverging": np.zeros((2, 1000), bool)})
    d = bayes.diagnose(idata, ["a"])
    assert d["max_rhat"] > 1.5 and d["failed"] and "R-hat" in d["advice"] and d["divergences"] == 0
    post = {"a": rng.normal(0, 1, (4, 1000))}
    div = np.zeros((4, 1000), bool)
    div[1, 10] = div[2, 500] = True
    d = bayes.diagnose(az.from_dict(posterior=post, sample_stats={"diverging": div}), ["a"])
    assert d["max_rhat"] < 1.01 and d["min_ess_bulk"] > 2000
    assert d["divergences"] == 2 and d["failed"] and "target_accept" in d["advice"]


# --------------------------------------------------------------------------------------------
# therapist table, ICC, contract


def test_therapist_table_ranks_and_quartile_probabilities(feedback_fit, feedback_df):
    t = feedback_fit.therapist_table()
    cols = [
        "therapist", "caseload", "effect_mean", "effect_median", "effect_hdi_low", "effect_hdi_high",
        "rank_median", "rank_low", "rank_high", "p_bottom_quartile", "p_top_quartile",
        # the columns shared with the likelihood engines' therapist tables
        "effect", "effect_se", "ci_low", "ci_high", "classification",
    ]
    assert list(t.columns) == cols
    assert (t["effect"] == t["effect_median"]).all() and (t["ci_low"] == t["effect_hdi_low"]).all()
    inside = (t["ci_low"] <= 0) & (t["ci_high"] >= 0)
    assert (t.loc[inside, "classification"] == "not distinguishable from average").all()
    assert (t.loc[t["ci_low"] > 0, "classification"] == "above average").all()
    K = feedback_df["therapist_id"].nunique()
    assert len(t) == K and t["caseload"].sum() == len(feedback_df)
    assert (t["caseload"].to_numpy() == feedback_df.groupby("therapist_id").size().sort_index().to_numpy()).all()
    assert ((t["rank_low"] <= t["rank_median"]) & (t["rank_median"] <= t["rank_high"])).all()
    assert t["rank_low"].min() >= 1 and t["rank_high"].max() <= K
    assert ((t["effect_hdi_low"] <= t["effect_median"]) & (t["effect_median"] <= t["effect_hdi_high"])).all()
    # In every draw exactly floor(K / 4) therapists are in the top (and bottom) quarter.
    assert t["p_top_quartile"].sum() == pytest.approx(math.floor(K / 4), abs=1e-9)
    assert t["p_bottom_quartile"].sum() == pytest.approx(math.floor(K / 4), abs=1e-9)
    # rank 1 = largest effect by default: the therapist with the largest posterior mean ranks near the top
    best = t["effect_mean"].idxmax()
    assert t.loc[best, "rank_median"] <= 3 and t.loc[best, "p_top_quartile"] > 0.5
    assert t["effect_mean"].corr(t["rank_median"], method="spearman") < -0.95
    # lower is better (PHQ-9): ranks reverse exactly
    low = feedback_fit.therapist_table(higher_is_better=False)
    np.testing.assert_allclose(low["p_top_quartile"], t["p_bottom_quartile"])
    np.testing.assert_allclose(low["rank_median"], K + 1 - t["rank_median"])


def test_therapist_effects_match_hand_computed_blups(feedback_fit, feedback_df):
    """Posterior means of the therapist effects ~ the BLUPs computed by hand from the lme4 REML fit:
    u_t = n_t s2_t / (n_t s2_t + s2) * mean_t(y - X b)."""
    ref = _ref()["therapy_feedback"]["ri_REML"]
    b = ref["fixed"]
    s2_t, s2 = ref["variance"]["therapist_id:(Intercept)"], ref["variance"]["Residual"]
    r = feedback_df["phq9_post"] - b["(Intercept)"] - b["phq9_pre"] * feedback_df["phq9_pre"] - b["feedback"] * feedback_df["feedback"]
    g = r.groupby(feedback_df["therapist_id"].astype(str))
    n_t, mean_t = g.size(), g.mean()
    blup = (n_t * s2_t / (n_t * s2_t + s2) * mean_t).sort_index()
    t = feedback_fit.therapist_table().set_index("therapist")
    assert np.corrcoef(blup.to_numpy(), t.loc[blup.index, "effect_mean"].to_numpy())[0, 1] > 0.99
    assert np.max(np.abs(blup.to_numpy() - t.loc[blup.index, "effect_mean"].to_numpy())) < 0.1 * math.sqrt(s2_t) + 0.05


def test_icc_is_variance_share_of_draws(feedback_fit):
    post = feedback_fit.idata.posterior
    icc_draws = (post["var_therapist"] / (post["var_therapist"] + post["var_residual"])).values.ravel()
    row = feedback_fit.icc(0.95).loc["icc"]
    assert row["median"] == pytest.approx(np.median(icc_draws))
    lo, hi = az.hdi(icc_draws, hdi_prob=0.95)
    assert row["ci_low"] == pytest.approx(lo) and row["ci_high"] == pytest.approx(hi)


def test_contract_structure_and_plain_json(feedback_fit, feedback_df):
    c = feedback_fit.to_contract()
    json.dumps(c, allow_nan=False)
    assert c["method"] == "bayes" and c["family"] == "gaussian" and c["singular"] is False
    assert c["converged"] is True and c["sampler"] == "nutpie"
    assert c["n_patients"] == len(feedback_df) and c["n_therapists"] == 60 and c["n_clusters"] is None
    assert set(c["fixed_effects"]) == {"(Intercept)", "phq9_pre", "feedback"}
    fixed = feedback_fit.idata.posterior["fixed"].sel(term="phq9_pre").values.ravel()
    fe = c["fixed_effects"]["phq9_pre"]
    assert fe["estimate"] == pytest.approx(np.median(fixed)) and fe["se"] == pytest.approx(np.std(fixed, ddof=1))
    assert fe["ci_low"] < fe["estimate"] < fe["ci_high"]
    for key in ("therapist", "residual"):
        assert set(c["variance_components"][key]) == {"estimate", "mean", "median", "ci_low", "ci_high"}
    assert c["icc"]["ci_method"] == "hdi" and 0 < c["icc"]["ci_low"] < c["icc"]["estimate"] < c["icc"]["ci_high"] < 1
    assert set(c["diagnostics"]) >= {"max_rhat", "min_ess_bulk", "min_ess_tail", "divergences", "failed", "advice"}
    # the priors actually used: defaults scaled to the outcome's SD
    sd_y = feedback_df["phq9_post"].std()
    assert c["priors"]["intercept"] == {"dist": "normal", "mu": pytest.approx(feedback_df["phq9_post"].mean()), "sigma": pytest.approx(2.5 * sd_y)}
    assert c["priors"]["slopes"]["phq9_pre"]["sigma"] == pytest.approx(2.5 * sd_y / feedback_df["phq9_pre"].std())
    assert c["priors"]["sigma_therapist"] == {"dist": "halfstudentt", "nu": 3.0, "sigma": pytest.approx(sd_y)}
    assert "var(therapist)" in feedback_fit.summary()


def test_to_netcdf_roundtrip(feedback_fit, tmp_path):
    path = tmp_path / "ri.nc"
    feedback_fit.to_netcdf(path)
    back = az.from_netcdf(path)
    np.testing.assert_array_equal(back.posterior["icc"].values, feedback_fit.idata.posterior["icc"].values)


def test_hdi_matches_arviz():
    rng = np.random.default_rng(2)
    draws = np.column_stack([rng.gamma(2.0, 1.0, 4000), rng.normal(size=4000), rng.beta(0.5, 5, 4000)])
    lo, hi = hdi(draws, 0.9)
    for j in range(draws.shape[1]):
        np.testing.assert_allclose([lo[j], hi[j]], az.hdi(draws[:, j], hdi_prob=0.9))


# --------------------------------------------------------------------------------------------
# the likelihood on sufficient statistics equals the per-patient likelihood


def _small_practice(seed: int = 1, n: int = 240) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "therapist": rng.integers(0, 12, n).astype(str), "site": rng.integers(0, 3, n).astype(str),
        "x": rng.normal(size=n), "sex": rng.choice(["F", "M"], n), "arm": rng.integers(0, 2, n),
    })
    df["y"] = 3.0 + 2.0 * df["x"] + rng.normal(size=n)
    df["r"] = (rng.random(n) < 1 / (1 + np.exp(-0.5 * df["x"]))).astype(float)
    df["k"] = rng.integers(0, 3, n).astype(float)  # few covariate patterns for the binomial counts
    return df


@pytest.mark.parametrize("model_type, kw", [
    ("random_intercept", {}), ("nested", {"cluster": "site"}), ("arm_variance", {"arm": "arm"}),
])
def test_sufficient_statistics_logp_equals_per_patient_logp(model_type, kw):
    df = _small_practice()
    prep = bayes._prepare(model_type, df, "y", ["x", "sex"], family="gaussian", therapist="therapist",
                          cluster=kw.get("cluster"), arm=kw.get("arm"), feedback_level=None)
    priors = bayes.resolve_priors(prep, None)
    f_suff = build_model(prep, priors).compile_logp(mode="FAST_COMPILE")
    model_pp = build_model(prep, priors, per_patient=True)
    f_pp = model_pp.compile_logp(mode="FAST_COMPILE")
    rng = np.random.default_rng(7)
    for _ in range(4):
        point = {k: rng.normal(size=np.shape(v)) for k, v in model_pp.initial_point().items()}
        assert f_suff(point) == pytest.approx(f_pp(point), rel=1e-10, abs=1e-8)


def test_binomial_counts_logp_equals_bernoulli_logp_up_to_binomial_coefficients():
    df = _small_practice()
    prep = bayes._prepare("random_intercept", df, "r", ["k", "sex"], family="binomial", therapist="therapist",
                          cluster=None, arm=None, feedback_level=None)
    counts = bayes.binomial_counts(prep)
    assert len(counts["trials"]) < len(df) and counts["trials"].sum() == len(df) and counts["successes"].sum() == df["r"].sum()
    priors = bayes.resolve_priors(prep, None)
    f_agg = build_model(prep, priors).compile_logp(mode="FAST_COMPILE")
    model_pp = build_model(prep, priors, per_patient=True)
    f_pp = model_pp.compile_logp(mode="FAST_COMPILE")
    n, s = counts["trials"], counts["successes"]
    log_choose = float(np.sum(gammaln(n + 1) - gammaln(s + 1) - gammaln(n - s + 1)))
    rng = np.random.default_rng(8)
    for _ in range(3):
        point = {k: rng.normal(size=np.shape(v)) for k, v in model_pp.initial_point().items()}
        assert f_agg(point) - f_pp(point) == pytest.approx(log_choose, rel=1e-10)


@pytest.mark.parametrize("model_type, kw", [("random_intercept", {}), ("arm_variance", {"arm": "arm"})])
def test_marginal_loglik_equals_multivariate_normal_density(model_type, kw):
    """The collapsed likelihood (therapist effects integrated out) on sufficient statistics equals the
    multivariate normal density of the patients' outcomes, y ~ N(X b, sigma^2 I + sd_b^2 [same block])."""
    from scipy.stats import multivariate_normal

    df = _small_practice(seed=3, n=80)
    prep = bayes._prepare(model_type, df, "y", ["x"], family="gaussian", therapist="therapist", cluster=None,
                          arm=kw.get("arm"), feedback_level=None)
    model = build_model(prep, bayes.resolve_priors(prep, None), parameterization="marginal")
    f = model.compile_logp(vars=[model["loglik"]], jacobian=False, mode="FAST_COMPILE")
    rng = np.random.default_rng(9)
    same = prep.block[:, None] == prep.block[None, :]
    for _ in range(3):
        point = {k: rng.normal(size=np.shape(v)) for k, v in model.initial_point().items()}
        beta, sigma = point["beta_std"], np.exp(point["sigma_std_log__"])
        sd = np.atleast_1d(np.exp(point["sd_therapist_std_log__"]))
        sd_patient = sd[prep.arm_of_block[prep.block]] if model_type == "arm_variance" else np.full(prep.n, sd[0])
        cov = sigma**2 * np.eye(prep.n) + same * np.outer(sd_patient, sd_patient)
        expected = multivariate_normal(prep.Xs @ beta, cov).logpdf(prep.ys)
        assert f(point) == pytest.approx(expected, rel=1e-10)


def test_marginal_parameterization_gives_the_same_posterior(feedback_fit, feedback_df):
    cfg = BayesConfig(chains=4, draws=1000, tune=1000, seed=20240917, parameterization="marginal")
    m = BayesModel("random_intercept", feedback_df, "phq9_post", ["phq9_pre", "feedback"], therapist="therapist_id", config=cfg)
    a, b = m.fit(), m.fit()
    assert "z_therapist" not in a.idata.posterior and not a.failed, a.diagnostics
    np.testing.assert_array_equal(a.idata.posterior["therapist_effect"].values, b.idata.posterior["therapist_effect"].values)
    nc = feedback_fit._param_draws()
    for name in nc.columns:  # posterior medians agree within Monte Carlo error
        assert abs(a.params[name] - feedback_fit.params[name]) < 0.15 * nc[name].std(), name
    ta, tn = a.therapist_table(), feedback_fit.therapist_table()
    assert np.max(np.abs(ta["effect_mean"] - tn["effect_mean"])) < 0.1
    assert np.max(np.abs(ta["p_top_quartile"] - tn["p_top_quartile"])) < 0.08


# --------------------------------------------------------------------------------------------
# priors and input errors


def test_prior_overrides_are_validated_and_used():
    df = _small_practice()
    p = model_priors("random_intercept", df, "y", ["x"], priors={
        "sigma_therapist": {"dist": "halfnormal", "sigma": 0.5}, "slopes": {"x": {"dist": "normal", "mu": 1, "sigma": 2}},
    })
    assert p["sigma_therapist"] == {"dist": "halfnormal", "sigma": 0.5}
    assert p["slopes"]["x"] == {"dist": "normal", "mu": 1.0, "sigma": 2.0}
    assert p["sigma_residual"]["dist"] == "halfstudentt"  # untouched default
    with pytest.raises(ConfigError, match="unknown key 'sigma_thrapist'"):
        model_priors("random_intercept", df, "y", ["x"], priors={"sigma_thrapist": {"dist": "halfnormal", "sigma": 1}})
    with pytest.raises(ConfigError, match="sigma_therapist: dist 'normal'"):
        model_priors("random_intercept", df, "y", ["x"], priors={"sigma_therapist": {"dist": "normal", "mu": 0, "sigma": 1}})
    with pytest.raises(ConfigError, match=r"sigma_residual.sigma: expected a positive"):
        model_priors("random_intercept", df, "y", ["x"], priors={"sigma_residual": {"dist": "halfnormal", "sigma": -1}})
    with pytest.raises(ConfigError, match="'z' is not a fixed effect"):
        model_priors("random_intercept", df, "y", ["x"], priors={"slopes": {"z": {"dist": "normal", "mu": 0, "sigma": 1}}})


def test_input_errors_are_one_line_model_errors():
    df = _small_practice()
    with pytest.raises(ModelError, match="needs the cluster column"):
        model_priors("nested", df, "y", ["x"])
    with pytest.raises(ModelError, match="binomial outcome 'y' must be 0/1"):
        model_priors("random_intercept", df, "y", ["x"], family="binomial")
    bad = df.copy()
    bad.loc[3, "therapist"] = None
    with pytest.raises(ModelError, match="missing 'therapist'"):
        model_priors("random_intercept", bad, "y", ["x"])
    with pytest.raises(ModelError, match="not one of"):
        model_priors("random_slope", df, "y", ["x"])
    with pytest.raises(ModelError, match="feedback_level 7 is not a level"):
        model_priors("arm_variance", df, "y", ["x"], arm="arm", feedback_level=7)


# --------------------------------------------------------------------------------------------
# arm-specific variances, nested, binomial (one fit each)


def test_arm_variance_agrees_with_lme4(feedback_df):
    ref = _ref()["therapy_feedback"]["arm_REML"]
    res = fit_bayes("arm_variance", feedback_df, "phq9_post", ["phq9_pre"], therapist="therapist_id",
                    arm="feedback", config=CFG)
    assert not res.failed, res.diagnostics
    p = res.params
    # R: lmer(phq9_post ~ phq9_pre + feedback + (0 + control | therapist_id) + (0 + feedback | therapist_id),
    #         REML = TRUE) with control = 1 - feedback: Residual 23.96613272, control 2.350000288,
    #         feedback 0.6810181182; profile CIs squared to variances (as stored in the JSON):
    #         control [1.220530204, 4.014215247], feedback [0.07382000275, 1.580780813]
    assert p["var(residual)"] == pytest.approx(ref["variance"]["Residual"], rel=0.02)
    lo, hi = ref["variance_ci"]["sd_control|therapist_id"]
    assert lo < p["var(therapist[0])"] < hi
    lo, hi = ref["variance_ci"]["sd_feedback|therapist_id"]
    assert lo < p["var(therapist[1])"] < hi
    c = res.to_contract()
    json.dumps(c, allow_nan=False)
    assert set(c["variance_components"]) == {"therapist[0]", "therapist[1]", "residual"}
    assert set(c["icc_by_arm"]) == {"0", "1"} and c["feedback_level"] == "1"
    post = res.idata.posterior
    icc0, icc1 = post["icc_arm"].sel(arm="0").values.ravel(), post["icc_arm"].sel(arm="1").values.ravel()
    assert c["p_icc_feedback_lt_control"] == pytest.approx(np.mean(icc1 < icc0))
    assert c["icc_ratio"]["median"] == pytest.approx(np.median(icc1 / icc0))
    assert c["icc_reduction"]["median"] == pytest.approx(1 - np.median(icc1 / icc0))
    # REML: feedback ICC 0.681 / (0.681 + 23.97) is well below control 2.35 / (2.35 + 23.97)
    assert c["p_icc_feedback_lt_control"] > 0.9
    t = res.therapist_table()
    assert set(t["arm"]) == {"0", "1"} and t["caseload"].sum() == len(feedback_df)
    for arm, k in t.groupby("arm").size().items():
        assert t.loc[t["arm"] == arm, "p_top_quartile"].sum() == pytest.approx(math.floor(k / 4))


@pytest.mark.slow
def test_nested_agrees_with_lme4():
    """Slow (~1 min: one more compilation). Six trials make a funnel at sigma_cluster = 0: with the
    default target_accept 0.9 a few divergences appear, 0.99 samples it cleanly."""
    trials = pd.read_csv(REF_DIR / "therapy_trials.csv")
    ref = _ref()["therapy_trials"]["nested_REML"]
    res = fit_bayes("nested", trials, "phq9_post", ["phq9_pre", "feedback"], therapist="therapist_id",
                    cluster="trial_id", config=BayesConfig(chains=4, draws=1000, tune=1000, target_accept=0.99))
    assert not res.failed, res.diagnostics
    p, ci = res.params, res.conf_int()
    # R: lmer(phq9_post ~ phq9_pre + feedback + (1 | trial_id/therapist_id), data = therapy_trials, REML = TRUE)
    #    VarCorr: Residual 26.31745758, therapist_id:trial_id 0.4235489072, trial_id 0.05726135832
    assert p["var(residual)"] == pytest.approx(ref["variance"]["Residual"], rel=0.02)
    v_t = ref["variance"]["therapist_id:trial_id:(Intercept)"]
    assert ci.loc["var(therapist)", "lower"] < v_t < ci.loc["var(therapist)", "upper"]
    v_c = ref["variance"]["trial_id:(Intercept)"]
    assert ci.loc["var(cluster)", "lower"] < v_c < ci.loc["var(cluster)", "upper"]
    c = res.to_contract()
    assert c["n_clusters"] == 6 and set(c["variance_components"]) == {"therapist", "cluster", "residual"}
    assert "icc_cluster" in c and c["icc"]["estimate"] < 0.1


@pytest.mark.slow
def test_binomial_random_intercept_agrees_with_glmer_agq(feedback_df):
    """Slow (~1 min: one more compilation)."""
    ref = _ref()["therapy_feedback"]["logit_agq10"]
    res = fit_bayes("random_intercept", feedback_df, "recovered", ["phq9_pre", "feedback"], family="binomial",
                    therapist="therapist_id", config=CFG)
    assert not res.failed, res.diagnostics
    p, ci = res.params, res.conf_int()
    # R: glmer(recovered ~ phq9_pre + feedback + (1 | therapist_id), family = binomial, nAGQ = 10)
    #    fixef: (0.5795244267, -0.02738841838, 0.1710918574); therapist variance 0.03904291649
    for name, est in ref["fixed"].items():
        assert ci.loc[name, "lower"] < est < ci.loc[name, "upper"]
        assert p[name] == pytest.approx(est, abs=0.05)
    v = ref["variance"]["therapist_id:(Intercept)"]
    assert ci.loc["var(therapist)", "lower"] < v < ci.loc["var(therapist)", "upper"]
    c = res.to_contract()
    assert c["icc"]["scale"] == "latent"
    assert c["variance_components"]["residual"]["estimate"] == pytest.approx(math.pi**2 / 3)


def test_prior_sensitivity_reports_both_iccs(feedback_model, feedback_fit, feedback_df):
    # same family as the default (HalfStudentT(3, sd_y = 5.3)), five times tighter: no recompilation
    alt = {"sigma_therapist": {"dist": "halfstudentt", "nu": 3, "sigma": 1.0}}
    out = prior_sensitivity("random_intercept", feedback_df, "phq9_post", ["phq9_pre", "feedback"],
                            therapist="therapist_id", alt_priors=alt, config=CFG, base=feedback_fit)
    json.dumps(out, allow_nan=False)
    assert out["priors"]["alt"]["sigma_therapist"] == {"dist": "halfstudentt", "nu": 3.0, "sigma": 1.0}
    assert out["priors"]["base"]["sigma_therapist"]["sigma"] == pytest.approx(feedback_df["phq9_post"].std())
    assert out["failed"] == {"base": False, "alt": False}
    base, new = out["icc"]["base"]["icc"]["median"], out["icc"]["alt"]["icc"]["median"]
    assert out["change"]["icc"] == pytest.approx(new - base)
    # 60 therapists: a tighter prior on the therapist SD moves the ICC only a little, and downwards
    assert -0.3 < out["relative_change"]["icc"] < 0.05


@pytest.mark.slow
def test_pymc_sampler_is_reproducible_and_agrees_with_nutpie():
    """Slow (~1-2 min): PyMC's own NUTS (the fallback where nutpie is missing) on a small simulated
    practice (40 therapists x 15 patients, true therapist variance 0.25, residual 1): same seed ->
    identical draws, and the same posterior as nutpie within Monte Carlo error."""
    rng = np.random.default_rng(21)
    th = np.repeat(np.arange(40), 15)
    x = rng.normal(size=th.size)
    df = pd.DataFrame({"therapist": th.astype(str), "x": x,
                       "y": 1.0 + 0.5 * x + rng.normal(0, 0.5, 40)[th] + rng.normal(0, 1.0, th.size)})
    cfg = dict(chains=2, draws=1000, tune=1000, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SamplerWarning)
        m = BayesModel("random_intercept", df, "y", ["x"], config=BayesConfig(**cfg, sampler="pymc"))
        a, b = m.fit(), m.fit()
        n = fit_bayes("random_intercept", df, "y", ["x"], config=BayesConfig(**cfg, sampler="nutpie"))
    assert a.sampler == "pymc" and n.sampler == "nutpie"
    np.testing.assert_array_equal(a.idata.posterior["therapist_effect"].values, b.idata.posterior["therapist_effect"].values)
    for name in ("x", "var(therapist)", "var(residual)"):
        sd = float(np.std(a._param_draws()[name]))
        assert abs(a.params[name] - n.params[name]) < 0.25 * sd, name
