"""Binomial random slope (therapist_effects.models.glmm_slope): ``(1 + feedback | therapist)``, logit link.

Reference values: tests/reference/glmer_slope.R -> glmer_slope.json (R 4.2.2, lme4 1.1-31):
``glmer(recovered ~ phq9_pre + feedback + (1 + feedback | therapist_id), family = binomial, nAGQ = 1)``
on therapy_feedback.csv (a singular fit: correlation -1) and therapy_trials.csv (interior), and the
independent-arm model of tests/reference/glmer_arm.R -> glmer_arm.json. The 2-D quadrature is checked
against brute-force integration on a dense grid.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

from refdata import REFERENCE_DIR
from therapist_effects.config import load_config
from therapist_effects.engine.inference import chi2_cut
from therapist_effects.engine.registry import model_class
from therapist_effects.engine.results import ModelResults
from therapist_effects.exceptions import SingularFitWarning, TherapistEffectsWarning
from therapist_effects.models.glmm_arm import LogisticArmVarianceModel
from therapist_effects.models.glmm_slope import LogisticRandomSlopeModel, LogisticRandomSlopeResults, _theta_from_arms
from therapist_effects.models.fitting import fit_model

REF = json.loads((REFERENCE_DIR / "glmer_slope.json").read_text())
ARM_REF = json.loads((REFERENCE_DIR / "glmer_arm.json").read_text())
C = math.pi**2 / 3

_FITS: dict = {}


def _data(ds):
    return pd.read_csv(REFERENCE_DIR / f"{ds}.csv")


def _fit(ds) -> LogisticRandomSlopeResults:
    if ds not in _FITS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TherapistEffectsWarning)
            _FITS[ds] = LogisticRandomSlopeModel.from_frame(
                _data(ds), "recovered", ["phq9_pre"], therapist="therapist_id", arm="feedback").fit()
    return _FITS[ds]


def test_registered_and_on_the_shared_results_class():
    assert model_class("random_slope", "binomial") is LogisticRandomSlopeModel
    assert issubclass(LogisticRandomSlopeResults, ModelResults)


@pytest.mark.parametrize("ds", ["therapy_feedback", "therapy_trials"])
def test_matches_glmer_laplace(ds):
    """Every value from glmer_slope.json (glmer(..., nAGQ = 1): fixef, vcov, VarCorr, logLik, AIC, BIC)."""
    ref, res = REF[ds], _fit(ds)
    assert res.n_obs == ref["n"] and res.n_therapists == ref["n_therapists"]
    # logLik(m): ours is no lower than glmer's (both maximise the same Laplace likelihood)
    assert res.loglik >= ref["logLik"] - 1e-6
    assert res.loglik == pytest.approx(ref["logLik"], abs=1e-3)
    for nm, v in ref["fixed"].items():  # fixef(m)
        assert res.fe_params[nm] == pytest.approx(v, rel=1e-3, abs=1e-4)
    for nm, v in ref["fixed_se"].items():  # sqrt(diag(vcov(m))): finite-difference Hessians on both sides
        assert res.bse[nm] == pytest.approx(v, rel=5e-3)
    # VarCorr(m): variances within glmer's tolerance 1e-3 relative
    assert res.vcomp["therapist"] == pytest.approx(ref["variance"]["therapist"], rel=1e-3)
    assert res.vcomp["therapist_slope"] == pytest.approx(ref["variance"]["therapist_slope"], rel=1e-3)
    assert res.cov_re.iloc[0, 1] == pytest.approx(ref["variance"]["covariance"], rel=1e-3)
    assert res.correlation == pytest.approx(ref["correlation"], abs=1e-3)
    # AIC(m), BIC(m): 3 fixed effects + 3 covariance parameters
    assert res.df_model == ref["df"] == 6
    assert res.aic == pytest.approx(ref["AIC"], abs=2e-3)
    assert res.bic == pytest.approx(ref["BIC"], abs=2e-3)
    assert res.singular == ref["singular"]
    assert res.converged


@pytest.mark.parametrize("ds", ["therapy_feedback", "therapy_trials"])
def test_per_arm_latent_iccs_match_glmer(ds):
    """ICC_a = v_a / (v_a + pi^2/3) with v_control = var(intercept), v_feedback = var(intercept) +
    2 cov + var(slope) of VarCorr(m) (glmer_slope.R); the ratio and the reduction from them."""
    ref, res = REF[ds]["icc"], _fit(ds)
    icc = res.icc_point()
    va = REF[ds]["variance_by_arm"]
    assert res.variance_by_arm()[0] == pytest.approx(va["control"], rel=1e-3)
    # the feedback variance is a difference of nearly equal terms on the singular data: absolute tolerance
    assert res.variance_by_arm()[1] == pytest.approx(va["feedback"], rel=1e-3, abs=2e-4)
    assert icc[0] == pytest.approx(ref["control"], rel=1e-3)
    assert icc[1] == pytest.approx(ref["feedback"], rel=1e-3, abs=2e-5)
    assert res.ratio_point() == pytest.approx(ref["ratio"], rel=1e-3, abs=5e-4)


def test_singular_fit_is_reported_loudly():
    """therapy_feedback: isSingular(m) is TRUE with theta[3] = 0 (correlation exactly -1)."""
    with pytest.warns(SingularFitWarning, match="correlation is -1"):
        res = LogisticRandomSlopeModel.from_frame(_data("therapy_feedback"), "recovered", ["phq9_pre"],
                                                  therapist="therapist_id", arm="feedback").fit()
    assert res.singular and res.theta[2] == 0.0 and res.correlation == -1.0
    assert REF["therapy_feedback"]["theta"][2] == 0.0  # getME(m, "theta")[3]
    assert any("SingularFitWarning" in w for w in res.to_contract()["warnings"])


def test_laplace_equals_glmer_arm_model_at_zero_arm_correlation():
    """With the two arm effects uncorrelated the 2-D Laplace integral factorises into the 1-D ones of
    the independent-arm model: the log-likelihood at glmer_arm.R's estimates is glmer's logLik of
    (0 + c0 | therapist_id) + (0 + c1 | therapist_id) (glmer_arm.json, nAGQ = 1)."""
    ref = ARM_REF["therapy_feedback"]["laplace"]
    m = LogisticRandomSlopeModel.from_frame(_data("therapy_feedback"), "recovered", ["phq9_pre"],
                                            therapist="therapist_id", arm="feedback")
    b = np.array([ref["fixed"][k] for k in m.exog_names])
    s = np.sqrt([ref["variance"]["c0"], ref["variance"]["c1"]])
    assert m.loglik(b, _theta_from_arms(s[0], s[1], 0.0)) == pytest.approx(ref["logLik"], abs=1e-6)
    # and the AGQ product grid equals the arm model's 1-D quadrature there
    for k in (3, 10):
        m2 = LogisticRandomSlopeModel.from_frame(_data("therapy_feedback"), "recovered", ["phq9_pre"],
                                                 therapist="therapist_id", arm="feedback", method="agq", n_quad=k)
        a2 = LogisticArmVarianceModel.from_frame(_data("therapy_feedback"), "recovered", ["phq9_pre"],
                                                 therapist="therapist_id", arm="feedback", method="agq", n_quad=k)
        assert m2.loglik(b, _theta_from_arms(0.4, 0.3, 0.0)) == pytest.approx(a2.loglik(b, [0.4, 0.3]), abs=1e-9)


@pytest.mark.parametrize("slope", ["arm", "continuous"])
def test_agq_converges_to_brute_force_integral(slope):
    """Correlated effects: the AGQ log-likelihood with many nodes equals the integral over a dense
    2-D grid (trapezoid on [-9, 9]^2, independent of the mode and curvature); Laplace does not.
    Both for a 0/1 arm slope and for a continuous slope variable (``slope: <column>``)."""
    rng = np.random.default_rng(11)
    G, n = 6, 25
    t = np.repeat(np.arange(G), n)
    z = rng.integers(0, 2, G * n).astype(float) if slope == "arm" else rng.normal(0, 0.7, G * n)
    x = rng.normal(size=G * n)
    X = np.column_stack([np.ones(G * n), x, z])
    b = np.array([0.3, 0.8, -0.5])
    theta = np.array([1.2, -0.7, 0.6])
    L = np.array([[theta[0], 0.0], [theta[1], theta[2]]])
    u = rng.normal(size=(G, 2)) @ L.T
    y = (rng.random(G * n) < expit(X @ b + u[t, 0] + z * u[t, 1])).astype(float)
    grid = np.linspace(-9, 9, 721)
    V0, V1 = np.meshgrid(grid, grid, indexing="ij")
    dv = grid[1] - grid[0]
    total = 0.0
    for j in range(G):
        k = t == j
        eta = (X[k] @ b)[:, None, None] + (theta[0] + z[k] * theta[1])[:, None, None] * V0 \
            + (z[k] * theta[2])[:, None, None] * V1
        logp = (y[k][:, None, None] * eta - np.logaddexp(0, eta)).sum(0) - 0.5 * (V0**2 + V1**2) - math.log(2 * math.pi)
        top = logp.max()
        total += top + math.log(np.exp(logp - top).sum() * dv * dv)
    agq = LogisticRandomSlopeModel(y, X, t, z, method="agq", n_quad=20).loglik(b, theta)
    lap = LogisticRandomSlopeModel(y, X, t, z).loglik(b, theta)
    assert agq == pytest.approx(total, abs=1e-6)
    assert abs(lap - total) > 1e-3


def test_recovers_simulated_truth():
    """Recovery on simulated data (200 therapists x 40 patients, known Sigma): the estimates lie
    within 3 (profile-interval-free, Monte Carlo) standard errors of the truth."""
    rng = np.random.default_rng(2026)
    G, n = 200, 40
    t = np.repeat(np.arange(G), n)
    z = np.tile(np.repeat([0.0, 1.0], n // 2), G)
    x = rng.normal(size=G * n)
    X = np.column_stack([np.ones(G * n), x, z])
    b = np.array([-0.2, 0.5, 0.3])
    s0, s1, rho = 0.6, 0.4, -0.5
    S = np.array([[s0**2, rho * s0 * s1], [rho * s0 * s1, s1**2]])
    u = rng.multivariate_normal([0, 0], S, size=G)
    y = (rng.random(G * n) < expit(X @ b + u[t, 0] + z * u[t, 1])).astype(float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TherapistEffectsWarning)
        res = LogisticRandomSlopeModel(y, X, t, z, exog_names=["(Intercept)", "x", "feedback"]).fit()
    assert res.converged and not res.singular
    assert np.all(np.abs(res.fe_params.to_numpy() - b) < 3 * res.bse.to_numpy())
    assert res.vcomp["therapist"] == pytest.approx(s0**2, abs=0.12)
    assert res.vcomp["therapist_slope"] == pytest.approx(s1**2, abs=0.12)
    assert res.correlation == pytest.approx(rho, abs=0.35)
    lo, hi = res.interval("therapist")
    assert lo < s0**2 < hi


def test_contract_entry_keys():
    """The gaussian random_slope keys, plus the arm model's per-arm ICCs, ratio and reduction."""
    e = _fit("therapy_trials").to_contract()
    assert e["family"] == "binomial" and e["type"] == "random_slope" and e["slope"] == "feedback"
    assert set(e["variance_components"]) == {"therapist", "therapist_slope", "residual"}
    assert e["variance_components"]["residual"]["estimate"] == pytest.approx(C)
    assert set(e["icc_by_arm"]) == {"0", "1"}
    assert set(e["correlation"]) >= {"estimate", "ci_low", "ci_high"}
    for k in ("icc_ratio", "icc_reduction", "aic", "bic", "loglik", "converged", "singular"):
        assert k in e
    red, ratio = e["icc_reduction"], e["icc_ratio"]
    assert red["estimate"] == pytest.approx(1 - ratio["estimate"])
    assert e["icc_by_arm"]["0"]["ci_low"] <= e["icc_by_arm"]["0"]["estimate"] <= e["icc_by_arm"]["0"]["ci_high"]
    assert ratio["ci_low"] <= ratio["estimate"]
    # the control ICC's interval is the intercept variance's interval mapped (the same parameter)
    lo, hi = e["variance_components"]["therapist"]["ci_low"], e["variance_components"]["therapist"]["ci_high"]
    assert e["icc_by_arm"]["0"]["ci_high"] == pytest.approx(hi / (hi + C))
    assert e["icc_by_arm"]["0"]["ci_low"] == pytest.approx(lo / (lo + C))


def test_fit_model_from_config():
    """The config entry {type: random_slope, family: binomial} goes through the registry."""
    d = _data("therapy_feedback")
    patients = d.rename(columns={"patient_id": "patient", "therapist_id": "therapist", "phq9_post": "end",
                                 "phq9_pre": "baseline", "feedback": "arm"})
    dataset = {"path": "x.csv", "layout": "patient",
               "columns": {"patient": "patient_id", "therapist": "therapist_id", "outcome": "phq9_post",
                           "baseline": "phq9_pre", "arm": "feedback"}}
    cfg = load_config({"datasets": {"d": dataset},
                       "models": [{"id": "rs_rec", "type": "random_slope", "family": "binomial",
                                   "outcome": "recovered"}]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TherapistEffectsWarning)
        entry, table, narrowing = fit_model(patients, cfg["models"][0], cfg["datasets"]["d"], cfg)
    ref = REF["therapy_feedback"]
    assert entry["method"] == "Laplace"
    assert entry["formula"] == "recovered ~ phq9_pre + feedback + (1 + feedback | therapist_id)"
    assert entry["variance_components"]["therapist_slope"]["estimate"] == pytest.approx(
        ref["variance"]["therapist_slope"], rel=1e-3)
    assert entry["aic"] == pytest.approx(ref["AIC"], abs=2e-3)
    assert narrowing is not None and len(narrowing) == ref["n_therapists"]


def test_workflow_writes_the_binomial_random_slope_entry(tmp_path):
    """snakemake with {id: rs_rec, type: random_slope, family: binomial, outcome: recovered} on
    therapy_feedback.csv: the entry validates against the estimates schema and carries glmer's values."""
    from test_workflow import _own_data_run

    est = _own_data_run(
        tmp_path, "fb",
        {"path": str(REFERENCE_DIR / "therapy_feedback.csv"), "layout": "patient",
         "columns": {"patient": "patient_id", "therapist": "therapist_id", "outcome": "phq9_post",
                     "baseline": "phq9_pre", "arm": "feedback"}},
        models=[{"id": "rs_rec", "type": "random_slope", "family": "binomial", "outcome": "recovered"}],
    )
    e = est["models"]["rs_rec"]
    ref = REF["therapy_feedback"]
    assert e["type"] == "random_slope" and e["family"] == "binomial" and e["outcome"] == "recovered"
    assert set(e["variance_components"]) == {"therapist", "therapist_slope", "residual"}
    # VarCorr(glmer(recovered ~ phq9_pre + feedback + (1 + feedback | therapist_id), binomial))
    assert e["variance_components"]["therapist"]["estimate"] == pytest.approx(ref["variance"]["therapist"], rel=1e-3)
    assert e["correlation"]["estimate"] == pytest.approx(ref["correlation"], abs=1e-3)
    assert e["singular"] is True and e["loglik"] >= ref["logLik"] - 1e-6
    assert set(e["icc_by_arm"]) == {"0", "1"} and "icc_ratio" in e and "icc_reduction" in e
    assert e["aic"] == pytest.approx(ref["AIC"], abs=2e-3) and e["bic"] == pytest.approx(ref["BIC"], abs=2e-3)


@pytest.mark.parametrize("ds", ["therapy_feedback", "therapy_trials"])
def test_profile_intervals_match_glmer_confint(ds):
    """confint(m, parm = "theta_", method = "profile") (glmer_slope.R). The intercept SD is compared
    with the profile of the same parameter in the arm parameterisation, sd_c0 of
    (0 + c0 + c1 | therapist_id): on the singular therapy_feedback fit lme4's profile in the slope
    parameterisation puts the lower end at 0.1835, its arm-parameterisation profile at 0.1858 (ours
    0.1858); both are given in the JSON."""
    ref, arm, res = REF[ds]["profile_ci"], REF[ds]["arm_parameterisation"]["profile_ci"], _fit(ds)
    lo, hi = np.sqrt(res.interval("therapist"))
    assert lo == pytest.approx(arm["sd_c0"][0], rel=1e-3, abs=1e-4)
    assert hi == pytest.approx(arm["sd_c0"][1], rel=1e-3)
    assert hi == pytest.approx(ref["sd_intercept"][1], rel=1e-3)
    lo, hi = np.sqrt(res.interval("therapist_slope"))
    assert lo == pytest.approx(ref["sd_slope"][0], rel=2e-3, abs=1e-4)
    assert hi == pytest.approx(ref["sd_slope"][1], rel=1e-3)


@pytest.mark.parametrize("ds", ["therapy_feedback", "therapy_trials"])
def test_per_arm_icc_intervals_match_glmer_arm_parameterisation(ds):
    """The per-arm variances are the SDs^2 of glmer(recovered ~ phq9_pre + feedback +
    (0 + c0 + c1 | therapist_id), binomial) (glmer_slope.R, the same model); their confint() profile
    intervals mapped by v / (v + pi^2/3) are the per-arm ICC intervals."""
    arm, res = REF[ds]["arm_parameterisation"], _fit(ds)
    assert res.loglik >= arm["logLik"] - 1e-6
    assert res.variance_by_arm()[0] == pytest.approx(arm["variance"]["c0"], rel=1e-3)
    assert res.variance_by_arm()[1] == pytest.approx(arm["variance"]["c1"], rel=1e-3)
    icc = res.icc_by_arm()
    for a, key in ((0, "sd_c0"), (1, "sd_c1")):
        lo, hi = (x * x / (x * x + C) for x in arm["profile_ci"][key])
        row = icc.iloc[a]
        assert row["ci_low"] == pytest.approx(lo, rel=2e-3, abs=1e-5)
        assert row["ci_high"] == pytest.approx(hi, rel=2e-3)


@pytest.mark.parametrize("ds", ["therapy_feedback", "therapy_trials"])
def test_correlation_profile_matches_the_uncorrelated_glmer(ds):
    """The correlation's profile log-likelihood at 0 is glmer's logLik of (1 + feedback || therapist_id)
    (glmer_slope.R): on therapy_feedback the deviance there is 5.46 > 3.84, so 0 is outside the
    interval (lme4's confint reports [-1, 1] for this singular fit, which its own uncorrelated fit
    contradicts); on therapy_trials it is 1.48 and the interval is glmer's [-1, 1]."""
    unc, res = REF[ds]["uncorrelated"], _fit(ds)
    assert res._profile_ll("rho", 0.0) == pytest.approx(unc["logLik"], abs=1e-4)
    lo, hi = res.interval("correlation")
    dev0 = 2 * (res.loglik - unc["logLik"])
    assert (lo < 0.0 < hi) == (dev0 < chi2_cut(0.95))
    if ds == "therapy_trials":
        assert (lo, hi) == pytest.approx(tuple(REF[ds]["profile_ci"]["correlation"]), abs=2e-3)
    else:
        assert lo == -1.0 and -1.0 < hi < 0.0
        # the upper end is where the profile deviance reaches qchisq(0.95, 1)
        assert 2 * (res.loglik - res._profile_ll("rho", hi)) == pytest.approx(chi2_cut(0.95), abs=1e-3)


def test_agq_fit_maximises_the_quadrature_likelihood_and_converges_in_nodes():
    """method agq (no glmer counterpart: glmer refuses nAGQ > 1 here): the AGQ fit's log-likelihood is
    at least the AGQ log-likelihood at glmer's Laplace estimates, and 5 and 7 nodes per dimension give
    the same estimates (the quadrature has converged)."""
    d = _data("therapy_trials")
    fits = {}
    for k in (5, 7):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TherapistEffectsWarning)
            fits[k] = LogisticRandomSlopeModel.from_frame(d, "recovered", ["phq9_pre"], therapist="therapist_id",
                                                          arm="feedback", method="agq", n_quad=k).fit()
    ref = REF["therapy_trials"]
    m = fits[7].model
    b = np.array([ref["fixed"][k] for k in m.exog_names])
    assert fits[7].loglik >= m.loglik(b, ref["theta"]) - 1e-8
    assert fits[7].loglik - m.loglik(b, ref["theta"]) > 1e-3  # AGQ moves the optimum away from Laplace's
    assert fits[5].loglik == pytest.approx(fits[7].loglik, abs=1e-5)
    for nm in ("therapist", "therapist_slope"):
        assert fits[5].vcomp[nm] == pytest.approx(fits[7].vcomp[nm], rel=1e-3)
    assert fits[7].method == "AGQ7" and fits[7].converged


@pytest.mark.parametrize("ds", ["therapy_feedback", "therapy_trials"])
def test_icc_ratio_profile_at_one_is_the_equal_variance_glmer(ds):
    """The ICC ratio's profile log-likelihood at 1 (equal per-arm variances, free correlation) is
    glmer's logLik of (1 | therapist_id) + (0 + k | therapist_id), k = 1 - 2 feedback
    (glmer_slope_ratio.R -> glmer_slope_ratio.json); 1 lies in the ratio's interval exactly when that
    deviance is below qchisq(0.95, 1) (therapy_feedback: 4.87, excluded; therapy_trials: 0.04)."""
    ref = json.loads((REFERENCE_DIR / "glmer_slope_ratio.json").read_text())[ds]
    res = _fit(ds)
    assert res._profile_ll("ratio", 1.0) == pytest.approx(ref["logLik"], abs=1e-4)
    r = res.icc_ratio()
    assert r["ci_low"] <= r["estimate"] <= r["ci_high"]
    dev1 = 2 * (res.loglik - ref["logLik"])
    assert (r["ci_low"] <= 1.0 <= r["ci_high"]) == (dev1 < chi2_cut(0.95))
    if math.isfinite(r["ci_high"]):
        assert 2 * (res.loglik - res._profile_ll("ratio", r["ci_high"])) == pytest.approx(chi2_cut(0.95), abs=1e-3)
    else:  # the control ICC's interval reaches 0: the ratio is unbounded above
        assert res.interval("therapist")[0] == 0.0
    red = res.icc_reduction()
    assert (red["ci_low"], red["ci_high"]) == (1 - r["ci_high"], 1 - r["ci_low"])
