"""The random-intercept logistic GLMM (glmm.py) against independent truth (issue 16: tests that kill
the surviving mutants).

* R lme4 1.1-31 on ``tests/reference/glmer_ri.csv`` (554 patients, 30 therapists, a clearly positive
  therapist variance), written by ``tests/reference/glmer_ri.R`` into ``glmer_ri.json``: estimates,
  SEs, profile intervals at two levels (the variance's lower end is interior), Wald intervals,
  conditional modes and SDs, the GLM log-likelihood;
* closed forms: the ICC transformation, the boundary-mixture LRT p-value, AIC/BIC, a data set whose
  therapists' rates are identical (ML therapist variance 0) and whose profile is computed here by an
  independent optimiser;
* simulation with known truth for the parametric bootstrap.

Fits are module-scoped fixtures (never module-level caches), so that a mutation run re-fits.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats
from scipy.special import expit

from refdata import REFERENCE_DIR
from therapist_effects.exceptions import ModelError, SingularFitWarning
from therapist_effects.models.glmm import (LATENT_RESIDUAL_VARIANCE, LogisticRandomInterceptModel, best_start,
                                           binary_inputs, block_modes, check_quadrature)

LATENT = math.pi**2 / 3
Z95 = stats.norm.ppf(0.975)
# absolute tolerance of the fixed effects' profile ends against lme4: AGQ agrees to ~1e-5; lme4's
# Laplace profile ends are off by up to 7e-4 (the 80% intercept interval: the deviance at lme4's end
# is 1.6501 for the cut-off 1.6424; at ours 1.6424, test_profile_ends_are_where_the_deviance...)
CI_ABS = {"laplace": 1e-3, "agq10": 2e-5}
METHODS = {"laplace": {}, "agq10": {"method": "agq", "n_quad": 10}}


def icc_of(v):
    return v / (v + LATENT)


@pytest.fixture(scope="module")
def ref() -> dict:
    return json.loads((REFERENCE_DIR / "glmer_ri.json").read_text())


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    return pd.read_csv(REFERENCE_DIR / "glmer_ri.csv")


@pytest.fixture(scope="module", params=["laplace", "agq10"])
def case(request, data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean fit: no convergence or singular warning
        res = LogisticRandomInterceptModel.from_frame(data, "y", ["x"], therapist="therapist",
                                                      **METHODS[request.param]).fit()
    return request.param, res


# ----------------------------------------------------------------------------------- lme4 glmer
def test_fit_matches_glmer(case, ref):
    key, res = case
    e = ref[key]
    assert res.converged is True and res.singular is False
    assert res.method == {"laplace": "Laplace", "agq10": "AGQ10"}[key]
    assert list(res.params.index) == ["(Intercept)", "x", "therapist"]
    np.testing.assert_allclose(res.fe_params.to_numpy(), [e["fixed"]["(Intercept)"], e["fixed"]["x"]], rtol=2e-6)
    np.testing.assert_allclose(res.bse.to_numpy()[:2], [e["fixed_se"]["(Intercept)"], e["fixed_se"]["x"]],
                               rtol=1e-5)
    assert res.vcomp["therapist"] == pytest.approx(e["variance"], rel=1e-6)
    assert res.params["therapist"] == res.vcomp["therapist"] == res.s_u**2
    assert res.loglik == pytest.approx(e["logLik"], abs=1e-6)
    assert (res.n_obs, res.n_therapists, res.nobs) == (554, 30, 554)
    # lme4's df of logLik: 2 fixed effects and the therapist SD
    assert res.df_model == 3
    assert res.aic == pytest.approx(-2 * e["logLik"] + 6, abs=1e-5)
    assert res.bic == pytest.approx(-2 * e["logLik"] + 3 * math.log(554), abs=1e-5)


def test_loglik_glm_and_lrt(case, ref):
    key, res = case
    assert res.loglik_glm == pytest.approx(ref["glm"]["logLik"], abs=1e-8)
    t = res.lrt()
    stat = 2 * (ref[key]["logLik"] - ref["glm"]["logLik"])
    assert t["statistic"] == pytest.approx(stat, abs=1e-5)
    # the 50:50 mixture of chi2_0 and chi2_1: half the chi2_1 tail, exactly (no absolute slack)
    assert t["p_value"] == pytest.approx(0.5 * stats.chi2.sf(t["statistic"], 1), rel=1e-12, abs=0)
    assert t["df"] == 1 and t["loglik_glm"] == res.loglik_glm
    assert t["null_distribution"] == "0.5 chi2_0 + 0.5 chi2_1"
    info = res.summary().info
    assert info["ICC scale"] == "latent (pi^2/3)"
    assert info["LRT chi2 (no therapists)"] == t["statistic"]
    assert info["LRT p (0.5chi2_0+0.5chi2_1)"] == t["p_value"]
    assert info["method"] == res.method and info["log-likelihood"] == res.loglik
    assert res.summary().title == f"Random-intercept logistic model (patients in therapists), {res.method}"


@pytest.mark.parametrize("level", [0.95, 0.80])
def test_profile_intervals_match_glmer(case, ref, level):
    key, res = case
    e = ref[key][f"profile_{round(level * 100)}"]
    ci = res.conf_int(level, method="profile")
    assert list(ci.columns) == ["lower", "upper"] and list(ci.index) == ["(Intercept)", "x", "therapist"]
    for name in ("(Intercept)", "x"):
        np.testing.assert_allclose(ci.loc[name].to_numpy(), e["fixed"][name], atol=CI_ABS[key], rtol=0)
    # the therapist variance: an interior lower end (the LRT is far above the cut-off)
    np.testing.assert_allclose(ci.loc["therapist"].to_numpy(), e["variance"], rtol=5e-5)
    # the ICC interval is the variance interval through the ICC transformation
    lo, hi = res.icc_interval(level, method="profile")
    assert (lo, hi) == pytest.approx((icc_of(e["variance"][0]), icc_of(e["variance"][1])), rel=5e-5)
    assert (lo, hi) == (icc_of(ci.loc["therapist", "lower"]), icc_of(ci.loc["therapist", "upper"]))
    tab = res.icc(level)
    assert tab.interval() == (lo, hi) and tab.loc["icc", "ci_method"] == "profile"
    assert float(tab) == pytest.approx(icc_of(ref[key]["variance"]), rel=1e-6)


def test_profile_ends_are_where_the_deviance_reaches_the_cut_off(case, data):
    """At each end of the 95% variance and the 80% intercept interval, the profile deviance (the other
    parameters re-optimised by an independent optimiser) equals the chi2_1 quantile."""
    key, res = case
    m = LogisticRandomInterceptModel.from_frame(data, "y", ["x"], **METHODS[key])
    b_hat = res.fe_params.to_numpy()
    for v in res.conf_int(method="profile").loc["therapist"]:
        best = optimize.minimize(lambda b: -m.loglik(b, math.sqrt(v)), b_hat, method="BFGS", options={"gtol": 1e-8})
        assert 2 * (res.loglik + best.fun) == pytest.approx(stats.chi2.ppf(0.95, 1), abs=1e-4)
    for b0 in res.conf_int(0.8, method="profile").loc["(Intercept)"]:
        best = optimize.minimize(lambda z: -m.loglik([b0, z[0]], z[1]), [b_hat[1], res.s_u], method="BFGS",
                                 options={"gtol": 1e-8})
        assert 2 * (res.loglik + best.fun) == pytest.approx(stats.chi2.ppf(0.8, 1), abs=1e-4)



def test_profile_search_steps_first_to_the_wald_ends(case, monkeypatch):
    """The profile search of each parameter starts at the Wald ends (the first step reaches them: the
    profile is close to quadratic there): b +- z se(b) for the fixed effects; for s_u the SD's Wald
    end from the variance's SE by the delta method, se(s) = se(s^2) / (2 s), upwards, and the edge
    s = 0 first downwards. The ends are those of the 90% interval (not cached by other tests)."""
    key, res = case
    seen = []
    profile_ll = res._profile_ll
    monkeypatch.setattr(res, "_profile_ll", lambda j, x: seen.append((j, x)) or profile_ll(j, x))
    z = stats.norm.ppf(0.95)
    for j, name in enumerate(["(Intercept)", "x", "therapist"]):
        seen.clear()
        res._profile_interval(j, 0.9)
        est, se = res.theta[j], res.bse[name]
        if name == "therapist":
            se = se / (2 * est)
        down = [x for i, x in seen if i == j and x < est]
        up = [x for i, x in seen if i == j and x > est]
        assert down[0] == (0.0 if name == "therapist" else pytest.approx(est - z * se, rel=1e-12))
        assert up[0] == pytest.approx(est + z * se, rel=1e-12)


def test_best_start_keeps_the_first_start_unless_a_later_one_is_higher_by_more_than_1e_8():
    """Starts are tried in order until one converges; a later start replaces the best only when its
    log-likelihood is higher by more than 1e-8 (converged or not)."""
    def fit_from(table):
        return lambda start: table[start]

    first, worse, higher, tie = ("a", -10.0, False, ""), ("b", -12.0, True, ""), ("c", -9.0, True, ""), \
        ("d", -10.0 + 5e-9, True, "")
    assert best_start(fit_from({1: first, 2: worse}), (1, 2)) is first
    assert best_start(fit_from({1: first, 2: higher}), (1, 2)) is higher
    assert best_start(fit_from({1: first, 2: tie}), (1, 2)) is first
    assert best_start(fit_from({1: higher, 2: first}), (1, 2)) is higher  # converged: 2 is not tried

def test_wald_intervals(case, ref, data):
    key, res = case
    ci = res.conf_int(method="wald")
    for name in ("(Intercept)", "x"):
        np.testing.assert_allclose(ci.loc[name].to_numpy(), ref[key]["wald_95"][name], rtol=2e-5)
    # the variance: the Wald interval of s_u (SE by the delta method from the SE of s_u^2) squared;
    # SE of s_u^2 checked against the inverse of a finite-difference Hessian of the log-likelihood
    m = LogisticRandomInterceptModel.from_frame(data, "y", ["x"], **METHODS[key])
    th = np.r_[res.fe_params.to_numpy(), res.s_u]
    h = 1e-4
    hess = np.empty((3, 3))
    for i in range(3):
        for j in range(3):
            ei, ej = np.eye(3)[i] * h, np.eye(3)[j] * h

            def ll(t):
                return m.loglik(t[:2], t[2])

            hess[i, j] = (ll(th + ei + ej) - ll(th + ei - ej) - ll(th - ei + ej) + ll(th - ei - ej)) / (4 * h * h)
    se_s = math.sqrt(np.linalg.inv(-hess)[2, 2])
    assert res.bse["therapist"] == pytest.approx(2 * res.s_u * se_s, rel=1e-4)
    assert tuple(ci.loc["therapist"]) == pytest.approx(((res.s_u - Z95 * se_s) ** 2, (res.s_u + Z95 * se_s) ** 2),
                                                       rel=1e-4)
    ci80 = res.conf_int(0.8, method="wald")
    z80 = stats.norm.ppf(0.9)
    fe, se = res.fe_params["x"], res.bse["x"]
    assert tuple(ci80.loc["x"]) == pytest.approx((fe - z80 * se, fe + z80 * se), rel=1e-12)


def test_wald_variance_lower_end_is_truncated_at_zero(case):
    _, res = case
    ci = res.conf_int(0.99999999, method="wald")  # z = 5.7: s_u - z se_s < 0
    assert ci.loc["therapist", "lower"] == 0.0 and ci.loc["therapist", "upper"] > res.vcomp["therapist"]


def test_interval_method_errors(case):
    _, res = case
    with pytest.raises(ModelError, match="^conf_int method must be 'wald' or 'profile', got 'boot'$"):
        res.conf_int(method="boot")
    with pytest.raises(ModelError, match="^icc_interval method must be 'profile' or 'bootstrap', got 'wald'$"):
        res.icc_interval(method="wald")
    with pytest.raises(ModelError, match="^interval must be 'profile' or 'bootstrap', got 'wald'$"):
        res.to_contract(interval="wald")


def test_therapist_effects_match_glmer_ranef(case, ref):
    key, res = case
    e = ref[key]["ranef"]
    for level in (0.95, 0.8):
        te = res.therapist_effects(level)
        assert list(te["therapist"]) == e["therapist"]
        np.testing.assert_allclose(te["effect"], e["effect"], atol=1e-6)
        np.testing.assert_allclose(te["effect_se"], e["effect_sd"], rtol=1e-6)
        z = stats.norm.ppf(0.5 + level / 2)
        np.testing.assert_allclose(te["ci_low"], np.array(e["effect"]) - z * np.array(e["effect_sd"]), atol=1e-5)
        np.testing.assert_allclose(te["ci_high"], np.array(e["effect"]) + z * np.array(e["effect_sd"]), atol=1e-5)


def test_therapist_table_rates_and_classification(case, data):
    _, res = case
    te = res.therapist_effects()
    assert list(te.columns) == ["therapist", "caseload", "raw_mean", "adjusted_mean", "effect", "effect_se",
                                "ci_low", "ci_high", "classification"]
    obs = data.groupby("therapist")["y"].agg(["mean", "size"])
    np.testing.assert_array_equal(te["caseload"], obs["size"])
    np.testing.assert_allclose(te["raw_mean"], obs["mean"], rtol=1e-14)
    b = res.fe_params.to_numpy()
    np.testing.assert_allclose(te["adjusted_mean"], expit(b[0] + b[1] * data["x"].mean() + te["effect"]),
                               rtol=1e-12)
    up, down = te["ci_low"] > 0, te["ci_high"] < 0
    assert up.sum() >= 2 and down.sum() >= 1  # this data set has distinguishable therapists
    assert (te.loc[up, "classification"] == "better than average").all()
    assert (te.loc[down, "classification"] == "worse than average").all()
    assert (res.therapist_effects(higher_is_better=False).loc[up, "classification"] == "worse than average").all()
    assert (res.therapist_effects(higher_is_better=None).loc[down, "classification"] == "below average").all()


def test_contract_with_profile_intervals(case, ref):
    key, res = case
    c = res.to_contract()
    e = ref[key]
    assert c["family"] == "binomial" and c["method"] == res.method
    vc = c["variance_components"]["therapist"]
    assert vc["estimate"] == pytest.approx(e["variance"], rel=1e-6)
    assert (vc["ci_low"], vc["ci_high"]) == pytest.approx(tuple(e["profile_95"]["variance"]), rel=5e-5)
    icc = c["icc"]
    assert icc["estimate"] == pytest.approx(icc_of(e["variance"]), rel=1e-6)
    assert (icc["ci_low"], icc["ci_high"]) == (icc_of(vc["ci_low"]), icc_of(vc["ci_high"]))
    assert icc["ci_method"] == "profile" and icc["scale"] == "latent"
    assert c["variance_components"]["residual"] == {"estimate": LATENT, "ci_low": None, "ci_high": None}
    assert LATENT_RESIDUAL_VARIANCE == LATENT
    for name in ("(Intercept)", "x"):
        fe = c["fixed_effects"][name]
        assert fe["estimate"] == pytest.approx(e["fixed"][name], rel=2e-6)
        assert fe["se"] == pytest.approx(e["fixed_se"][name], rel=1e-5)
        assert (fe["ci_low"], fe["ci_high"]) == pytest.approx(tuple(e["wald_95"][name]), rel=2e-5)
    assert c["lrt"] == {k: res.lrt()[k] for k in ("statistic", "df", "p_value")}
    assert c["loglik"] == res.loglik and c["converged"] is True and c["singular"] is False
    assert (c["n_patients"], c["n_therapists"], c["n_clusters"]) == (554, 30, None)
    assert c["warnings"] == []


# ------------------------------------------------------------------------- a singular data set
@pytest.fixture(scope="module")
def singular():
    """12 therapists x 10 patients, 4 recovered each: the therapists' rates are identical, so the ML
    therapist variance is 0 and the fit is the logistic regression (intercept logit(0.4))."""
    g = np.repeat(np.arange(12), 10)
    y = np.tile([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], 12).astype(float)
    m = LogisticRandomInterceptModel(y, np.ones((120, 1)), [f"t{j}" for j in g], exog_names=["(Intercept)"])
    with pytest.warns(SingularFitWarning, match="therapist variance estimated at 0"):
        res = m.fit()
    return m, res


def _profile_sd(m, s):
    """Profile log-likelihood at therapist SD s: the intercept re-optimised (independent optimiser)."""
    return -optimize.minimize_scalar(lambda b: -m.loglik([b], s), bounds=(-3, 3), method="bounded",
                                     options={"xatol": 1e-12}).fun


def test_singular_fit_is_the_logistic_regression(singular):
    m, res = singular
    assert res.singular is True and res.converged is True
    assert res.vcomp["therapist"] == 0.0 and res.s_u == 0.0 and float(res.icc()) == 0.0
    assert res.fe_params["(Intercept)"] == pytest.approx(math.log(0.4 / 0.6), abs=1e-7)
    # binomial SE of the logit of a proportion: 1 / sqrt(n p (1 - p))
    assert res.bse["(Intercept)"] == pytest.approx(1 / math.sqrt(120 * 0.4 * 0.6), rel=1e-5)
    assert math.isnan(res.bse["therapist"])
    ll = 120 * (0.4 * math.log(0.4) + 0.6 * math.log(0.6))
    assert res.loglik == pytest.approx(ll, rel=1e-12) and res.loglik_glm == pytest.approx(ll, rel=1e-12)
    assert res.lrt()["statistic"] == 0.0 and res.lrt()["p_value"] == 1.0
    assert any("SingularFitWarning" in w for w in res.warnings_list)
    wald = res.conf_int(method="wald")
    assert wald.loc["therapist"].isna().all()
    assert tuple(wald.loc["(Intercept)"]) == pytest.approx(
        (math.log(2 / 3) - Z95 * res.bse.iloc[0], math.log(2 / 3) + Z95 * res.bse.iloc[0]), rel=1e-12)


def test_singular_profile_interval_has_an_exact_zero_and_the_profile_root(singular):
    m, res = singular
    ci = res.conf_int(method="profile")
    assert ci.loc["therapist", "lower"] == 0.0
    hi = math.sqrt(ci.loc["therapist", "upper"])
    assert 2 * (res.loglik - _profile_sd(m, hi)) == pytest.approx(stats.chi2.ppf(0.95, 1), abs=1e-4)
    lo80, hi80 = res.conf_int(0.8, method="profile").loc["therapist"]
    assert lo80 == 0.0 and 2 * (res.loglik - _profile_sd(m, math.sqrt(hi80))) == pytest.approx(
        stats.chi2.ppf(0.8, 1), abs=1e-4)
    # the intercept's profile re-optimises the therapist SD (started off the stationary point 0)
    for b0 in ci.loc["(Intercept)"]:
        best = optimize.minimize_scalar(lambda s: -m.loglik([b0], s), bounds=(0.0, 3.0), method="bounded",
                                        options={"xatol": 1e-10}).fun
        assert 2 * (res.loglik + best) == pytest.approx(stats.chi2.ppf(0.95, 1), abs=1e-4)
    c = res.to_contract()
    assert c["singular"] is True and c["variance_components"]["therapist"]["ci_low"] == 0.0
    assert c["variance_components"]["therapist"]["ci_high"] == pytest.approx(hi * hi, rel=1e-12)
    assert c["icc"]["ci_low"] == 0.0 and c["icc"]["ci_high"] == pytest.approx(icc_of(hi * hi), rel=1e-12)
    assert c["lrt"] == {"statistic": 0.0, "df": 1, "p_value": 1.0}
    assert any(w.startswith("SingularFitWarning: ") for w in c["warnings"])


def test_weak_interior_estimate_lrt_and_exact_zero_profile_end():
    """12 therapists x 10 patients, 4 recovered each except 1, 7, 1, 7 for the last four: a small
    positive therapist variance whose LRT statistic (0.34) is below 1 and below the cut-off."""
    g = np.repeat(np.arange(12), 10)
    y = np.concatenate([[1.0] * k + [0.0] * (10 - k) for k in [4] * 8 + [1, 7, 1, 7]])
    m = LogisticRandomInterceptModel(y, np.ones((120, 1)), g, exog_names=["(Intercept)"])
    res = m.fit()
    assert not res.singular and 0.05 < res.vcomp["therapist"] < 0.2
    ll_glm = 120 * (0.4 * math.log(0.4) + 0.6 * math.log(0.6))  # 48 of 120 recovered
    assert res.loglik_glm == pytest.approx(ll_glm, rel=1e-12)
    t = res.lrt()
    assert 0.0 < t["statistic"] < 1.0
    assert t["statistic"] == pytest.approx(2 * (res.loglik - ll_glm), rel=1e-9)
    assert t["p_value"] == pytest.approx(0.5 * stats.chi2.sf(t["statistic"], 1), rel=1e-12, abs=0)
    lo, hi = res.conf_int(method="profile").loc["therapist"]
    assert lo == 0.0 and hi > res.vcomp["therapist"]
    assert 2 * (res.loglik - _profile_sd(m, math.sqrt(hi))) == pytest.approx(stats.chi2.ppf(0.95, 1), abs=1e-4)


# --------------------------------------------------------------------------- bootstrap (truth)
@pytest.fixture(scope="module")
def strong():
    """Simulated: 16 therapists x 30 patients, therapist SD 2 on the logit scale (variance 4)."""
    rng = np.random.default_rng(42)
    g = np.repeat(np.arange(16), 30)
    y = (rng.random(g.size) < expit(0.2 + 2.0 * rng.standard_normal(16)[g])).astype(float)
    res = LogisticRandomInterceptModel(y, np.ones((g.size, 1)), g, exog_names=["(Intercept)"]).fit()
    return res


def test_parametric_bootstrap_recovers_the_sampling_distribution(strong):
    res = strong
    assert 1.5 < res.vcomp["therapist"] < 9.0  # recovery of the true variance 4
    c = res.to_contract(interval="bootstrap", n_boot=40, seed=5)
    vlo, vhi = c["variance_components"]["therapist"]["ci_low"], c["variance_components"]["therapist"]["ci_high"]
    s2 = res.vcomp["therapist"]
    # the bootstrap distribution of the variance sits around the estimate, about as wide as the
    # profile interval (on the log scale)
    plo, phi = res.conf_int(method="profile").loc["therapist"]
    assert 0.25 * s2 < vlo < s2 < vhi < 4.0 * s2
    assert abs(math.log(vhi / vlo) - math.log(phi / plo)) < 0.8
    assert c["icc"]["ci_method"] == "bootstrap"
    assert (c["icc"]["ci_low"], c["icc"]["ci_high"]) == pytest.approx((icc_of(vlo), icc_of(vhi)), rel=1e-12)
    lo, hi = res.icc_interval(0.95, method="bootstrap", n_boot=40, seed=5)
    assert (lo, hi) == pytest.approx((icc_of(vlo), icc_of(vhi)), rel=1e-12)
    lo80, hi80 = res.icc_interval(0.8, method="bootstrap", n_boot=40, seed=5)
    assert lo < lo80 < hi80 < hi
    tab = res.icc(0.8, "bootstrap", n_boot=40, seed=5)
    assert tab.interval() == (lo80, hi80) and tab.loc["icc", "ci_method"] == "bootstrap"


def test_bootstrap_seed_rule(strong):
    res = strong
    a = res.icc_interval(method="bootstrap", n_boot=12, seed=None)
    assert a == res.icc_interval(method="bootstrap", n_boot=12, seed=0)
    assert a != res.icc_interval(method="bootstrap", n_boot=12, seed=1)
    assert res.to_contract(interval="bootstrap", n_boot=12)["icc"]["ci_low"] == a[0]


def test_bootstrap_with_too_few_successful_refits(singular):
    _, res = singular
    with pytest.raises(ModelError, match="^bootstrap failed: only [0-9] of 9 refits succeeded$"):
        res.icc_interval(method="bootstrap", n_boot=9, seed=0)
    c = res.to_contract(interval="bootstrap", n_boot=9, seed=0)
    assert c["variance_components"]["therapist"]["ci_low"] is None and c["icc"]["ci_high"] is None


# ------------------------------------------------------------------------------- input checks
def test_check_quadrature():
    assert check_quadrature("Laplace", 0) == ("laplace", 1)  # n_quad ignored for Laplace
    assert check_quadrature("AGQ", 5.0) == ("agq", 5)
    assert isinstance(check_quadrature("agq", np.int64(3))[1], int)
    assert check_quadrature("agq", 1) == ("agq", 1)
    for bad in (0, -2, 2.5):
        with pytest.raises(ModelError, match=f"^n_quad must be a positive integer, got {bad!r}$"):
            check_quadrature("agq", bad)
    with pytest.raises(ModelError, match="^method must be 'laplace' or 'agq', got 'pql'$"):
        check_quadrature("PQL", 3)


def test_agq_label_and_one_node_is_laplace(data):
    b, s = np.array([-0.3, 0.8]), 1.1
    lap = LogisticRandomInterceptModel.from_frame(data, "y", ["x"])
    agq1 = LogisticRandomInterceptModel.from_frame(data, "y", ["x"], method="agq", n_quad=1)
    assert agq1.loglik(b, s) == lap.loglik(b, s)
    agq5 = LogisticRandomInterceptModel.from_frame(data, "y", ["x"], method="agq", n_quad=5)
    assert agq5.n_quad == 5 and agq5._label() == "AGQ5" and lap._label() == "Laplace"


def test_from_frame_errors_name_the_column_and_rows():
    df = pd.DataFrame({"therapist": ["a", "a", None, "b"], "y": [0, 1, 1, 0], "x": [1.0, 2.0, 3.0, 4.0]})
    with pytest.raises(ModelError, match="^1 rows have no therapist in column 'therapist'; drop them before fitting$"):
        LogisticRandomInterceptModel.from_frame(df, "y", ["x"])
    with pytest.raises(ModelError, match="^therapist column 'tid' is not a column of the patient table$"):
        LogisticRandomInterceptModel.from_frame(df, "y", ["x"], therapist="tid")
    ok = LogisticRandomInterceptModel.from_frame(df.dropna().assign(t=["a", "b", "b"]), "y", ["x"], therapist="t",
                                                 method="agq", n_quad=3)
    assert (ok.method, ok.n_quad, ok.exog_names, ok.n_obs, ok.n_therapists) == ("agq", 3, ["(Intercept)", "x"], 3, 2)


_Y4, _G4 = np.array([0.0, 1.0, 1.0, 0.0]), np.array(["a", "a", "b", "b"])


@pytest.mark.parametrize("args,kw,message", [
    ((_Y4, np.ones((3, 1)), _G4), {},
     "endog has 4 rows but exog has 3, therapist has 4: every array needs one row per patient"),
    ((_Y4, np.ones((4, 1)), _G4[:3]), {},
     "endog has 4 rows but exog has 4, therapist has 3: every array needs one row per patient"),
    ((np.array([]), np.ones((0, 1)), np.array([])), {}, "no patients to fit: the outcome has no rows"),
    ((np.array([0.0, np.nan, 1.0, 0.0]), np.ones((4, 1)), _G4), {},
     "outcome, covariates contain missing/non-finite values; drop them first"),
    ((_Y4, np.array([[1.0], [np.inf], [1.0], [1.0]]), _G4), {},
     "outcome, covariates contain missing/non-finite values; drop them first"),
    ((np.array([0.0, None, 1.0, 0.0], dtype=object), np.ones((4, 1)), _G4), {},
     "outcome, covariates contain missing/non-finite values; drop them first"),
    ((_Y4, np.array([[1.0], [1.0], [None], [1.0]], dtype=object), _G4), {},
     "outcome, covariates contain missing/non-finite values; drop them first"),
    ((_Y4, np.ones((4, 1)), np.array(["a", None, "b", "b"], dtype=object)), {},
     "therapist is missing for some patients; drop them first"),
    ((np.array([0.0, 1.0, 0.5, 0.0]), np.ones((4, 1)), _G4), {},
     "binary outcome expected (0/1): patient at position 2 has value 0.5"),
    ((np.ones(4), np.ones((4, 1)), _G4), {}, "outcome has no variation: every patient has value 1"),
    ((np.zeros(4) + np.eye(4)[0], np.ones((4, 1)), _G4), {"exog_names": ["a", "b"]},
     "exog_names has 2 names for 1 columns of exog"),
    ((_Y4, np.column_stack([np.ones(4), 2 * np.ones(4)]), _G4), {},
     "fixed-effects design ['x0', 'x1'] is rank deficient"),
    ((_Y4, np.ones((4, 1)), np.array(["a"] * 4)), {}, "at least 2 therapists are needed, got 1"),
])
def test_model_input_errors_are_one_line(args, kw, message):
    with pytest.raises(ModelError) as e:
        LogisticRandomInterceptModel(*args, **kw)
    assert str(e.value) == message



def test_binary_inputs_check_a_numeric_slope_variable_like_the_design():
    """The numbers of a slope variable (``numeric``, given as a list) are floats with one entry per patient;
    a missing one (None) is the one-line missing-value error that names them."""
    y, X, names = binary_inputs(_Y4, np.ones((4, 1)), None, {"therapist": _G4}, {"slope": [0, 1, 2, 3]})
    assert names == ["x0"] and y.dtype == X.dtype == np.float64
    with pytest.raises(ModelError) as e:
        binary_inputs(_Y4, np.ones((4, 1)), None, {"therapist": _G4}, {"slope": [0.0, None, 2.0, 3.0]})
    assert str(e.value) == "outcome, covariates or slope contain missing/non-finite values; drop them first"
    with pytest.raises(ModelError) as e:
        binary_inputs(_Y4, np.ones((4, 1)), None, {"therapist": _G4}, {"slope": [0.0, 1.0]})
    assert str(e.value) == ("endog has 4 rows but exog has 4, therapist has 4, slope has 2: every array needs"
                            " one row per patient")


def test_glm_start_is_the_logistic_regression_maximum(data):
    """The start values (IRLS without therapist effects) are the maximum likelihood logistic regression:
    its score X'(y - mu) vanishes there, and a derivative-free optimiser of that likelihood agrees."""
    m = LogisticRandomInterceptModel.from_frame(data, "y", ["x"], therapist="therapist")
    b = m._glm_start()
    np.testing.assert_allclose(m.X.T @ (m.y - expit(m.X @ b)), 0.0, atol=1e-8)
    best = optimize.minimize(lambda c: -np.sum(m.y * (m.X @ c) - np.logaddexp(0, m.X @ c)), np.zeros(2),
                             method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12})
    np.testing.assert_allclose(b, best.x, atol=1e-6)

def test_model_accepts_a_vector_design_and_dataframe_names():
    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.array([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    g = np.array(["b", "b", "a", "a", "c", "c"])
    m = LogisticRandomInterceptModel(y, x, g)
    assert m.X.shape == (6, 1) and m.exog_names == ["x0"] and m.k_fe == 1
    assert list(m.therapist_labels) == ["a", "b", "c"] and list(m.counts) == [2, 2, 2]
    np.testing.assert_array_equal(m.X[:, 0], [2.0, 3.0, 0.0, 1.0, 4.0, 5.0])  # sorted by therapist
    np.testing.assert_array_equal(m.order, [2, 3, 0, 1, 4, 5])  # row i of the sorted data is input row order[i]
    m = LogisticRandomInterceptModel(y, pd.DataFrame({"one": np.ones(6), "dose": x}), g)
    assert m.exog_names == ["one", "dose"] and m.method == "laplace" and m.n_quad == 1


def test_nonconvergence_message(monkeypatch, data):
    import therapist_effects.models.glmm as glmm

    monkeypatch.setattr(glmm, "_NEWTON_MAXIT", 1)  # the conditional modes cannot converge in 1 step
    m = LogisticRandomInterceptModel.from_frame(data, "y", ["x"], method="agq", n_quad=3)
    # the optimiser's own message (scipy's L-BFGS-B: "CONVERGENCE: ..." or "ABNORMAL...") in brackets
    with pytest.warns(glmm.ConvergenceWarning, match=r"^AGQ3: optimiser did not converge \([A-Z]{4,}.*\); estimates"
                      r" may not be at the maximum$"):
        res = m.fit()
    assert res.converged is False
    assert res.warnings_list[0].startswith("ConvergenceWarning: AGQ3: optimiser did not converge (")
    assert res.to_contract()["converged"] is False


def test_from_frame_defaults(data):
    assert LogisticRandomInterceptModel.from_frame(data, "y", ["x"], method="agq").n_quad == 10  # lme4 nAGQ = 10
    assert LogisticRandomInterceptModel(data["y"], np.ones((len(data), 1)), data["therapist"], method="agq").n_quad == 10
    lap = LogisticRandomInterceptModel.from_frame(data, "y")
    assert (lap.method, lap.n_quad, lap.exog_names) == ("laplace", 1, ["(Intercept)"])


def test_information_that_cannot_be_inverted_gives_nan_not_an_error():
    import therapist_effects.models.glmm as glmm

    out = glmm._safe_inv(np.zeros((2, 2)))
    assert out.shape == (2, 2) and out.dtype == np.float64 and np.isnan(out).all()
    np.testing.assert_allclose(glmm._safe_inv(np.array([[2.0, 0.0], [0.0, 4.0]])), [[0.5, 0.0], [0.0, 0.25]])


def test_model_without_fixed_effects():
    """logit P(y_ij = 1) = u_j (no intercept): the no-therapist model has probability 1/2, and the
    therapist variance maximises the (validated) marginal likelihood, checked by a scalar optimiser."""
    g = np.repeat(np.arange(12), 10)
    y = np.concatenate([[1.0] * k + [0.0] * (10 - k) for k in [4] * 8 + [1, 7, 1, 7]])
    m = LogisticRandomInterceptModel(y, np.ones((120, 0)), g)
    res = m.fit()
    assert res.converged and not res.singular and list(res.fe_params.index) == []
    assert res.loglik_glm == pytest.approx(120 * math.log(0.5), rel=1e-12)
    best = optimize.minimize_scalar(lambda s: -m.loglik([], s), bounds=(0.0, 5.0), method="bounded",
                                    options={"xatol": 1e-10})
    assert res.vcomp["therapist"] == pytest.approx(best.x**2, rel=1e-6)
    assert res.loglik == pytest.approx(-best.fun, abs=1e-9)
    lo, hi = res.conf_int(method="profile").loc["therapist"]
    assert lo == 0.0  # LRT 1.71 < 3.84
    assert 2 * (res.loglik - m.loglik([], math.sqrt(hi))) == pytest.approx(stats.chi2.ppf(0.95, 1), abs=1e-6)


def test_block_modes_with_one_sd_per_block():
    """The arm-variance engines' case: a random-effect SD per block (0 for one block). Each block's mode
    maximises h_j(v) = sum_i log p(y_i | eta0_i + s_j v) - v^2/2 (checked by a scalar optimiser)."""
    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(5), [3, 8, 1, 12, 6])
    eta0 = rng.normal(0, 0.5, g.size)
    y = (rng.random(g.size) < 0.5).astype(float)
    s = np.array([0.5, 3.0, 8.0, 0.0, 1.5])
    starts = np.r_[0, np.cumsum(np.bincount(g))[:-1]]
    v, mu, ok = block_modes(y, g, lambda a: np.add.reduceat(a, starts, axis=0), eta0, s, np.full(5, 0.3))
    assert ok and v[3] == 0.0
    for j in range(5):
        yj, ej = y[g == j], eta0[g == j]
        r = optimize.minimize_scalar(
            lambda t, yj=yj, ej=ej, sj=s[j]: -(np.sum(yj * (ej + sj * t) - np.logaddexp(0, ej + sj * t)) - t * t / 2),
            bounds=(-10, 10), method="bounded", options={"xatol": 1e-12})
        assert v[j] == pytest.approx(r.x, abs=1e-7)
    np.testing.assert_allclose(mu, expit(eta0 + s[g] * v[g]), rtol=1e-14)



@pytest.mark.parametrize(("s", "v0"), [(10.0, 10.0), (3.0, 3.0), (3.0, -40.0), (1.0, 6.0)])
def test_block_modes_converge_from_a_start_far_out_in_a_tail(s, v0):
    """A warm start far out in a tail (the mode of an earlier, smaller SD), where the curvature vanishes:
    plain Newton steps (or steps that only decrease |h'|) jump between the two tails for ever. With one
    recovered and one not recovered patient at eta0 = 0, h(v) is even, so the mode is exactly 0; a second
    block, with two of three recovered, is checked against a scalar optimiser."""
    y = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
    g = np.array([0, 0, 1, 1, 1])
    eta0 = np.array([0.0, 0.0, 0.3, -0.2, 0.1])
    v, mu, ok = block_modes(y, g, lambda a: np.add.reduceat(a, np.array([0, 2]), axis=0), eta0, s, np.full(2, v0))
    assert ok
    assert v[0] == pytest.approx(0.0, abs=1e-9)
    r = optimize.minimize_scalar(lambda t: -(np.sum(y[2:] * (eta0[2:] + s * t) - np.logaddexp(0, eta0[2:] + s * t))
                                             - t * t / 2), bounds=(-10, 10), method="bounded", options={"xatol": 1e-12})
    assert v[1] == pytest.approx(r.x, abs=1e-7)
    np.testing.assert_allclose(mu, expit(eta0 + s * v[g]), rtol=1e-14)

def test_agq2_fit_is_the_maximum_of_its_likelihood(data):
    """Two nodes (the analytic gradient's node weights matter): the fit is clean and its maximum is
    that of an independent derivative-free optimiser of the same likelihood."""
    m = LogisticRandomInterceptModel.from_frame(data, "y", ["x"], method="agq", n_quad=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = m.fit()
    best = optimize.minimize(lambda t: -m.loglik(t[:2], t[2]), [-0.3, 0.8, 1.1], method="Nelder-Mead",
                             options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 2000})
    assert res.loglik >= -best.fun - 1e-8
    np.testing.assert_allclose(np.r_[res.fe_params, res.s_u], np.r_[best.x[:2], abs(best.x[2])], atol=2e-4)


def test_singular_model_without_fixed_effects_is_converged():
    g = np.repeat(np.arange(12), 10)
    y = np.tile([1.0] * 5 + [0.0] * 5, 12)  # every therapist 5 of 10: P = 1/2, no therapist variance
    with pytest.warns(SingularFitWarning):
        res = LogisticRandomInterceptModel(y, np.ones((120, 0)), g).fit()
    assert res.singular is True and res.converged is True
    assert res.loglik == pytest.approx(120 * math.log(0.5), rel=1e-12)


def test_an_optimiser_stopped_early_is_reported_not_converged(monkeypatch, data):
    """L-BFGS-B capped at 3 iterations stops with a (whitened) gradient of ~0.3: not the maximum."""
    import therapist_effects.models.glmm as glmm

    minimize = glmm.optimize.minimize

    def capped(*args, **kwargs):
        return minimize(*args, **{**kwargs, "options": {**kwargs["options"], "maxiter": 3}})

    monkeypatch.setattr(glmm.optimize, "minimize", capped)
    with pytest.warns(glmm.ConvergenceWarning, match="optimiser did not converge"):
        res = LogisticRandomInterceptModel.from_frame(data, "y", ["x"]).fit()
    assert res.converged is False


def test_agq_fit_of_singular_data_starts_off_the_boundary():
    """AGQ after a singular Laplace stage: the AGQ stage starts from s = 0.1 with the GLM metric and
    returns to the boundary (the rates are identical): the logistic regression, flagged singular."""
    g = np.repeat(np.arange(12), 10)
    y = np.tile([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], 12).astype(float)
    with pytest.warns(SingularFitWarning):
        res = LogisticRandomInterceptModel(y, np.ones((120, 1)), g, method="agq", n_quad=5).fit()
    assert res.singular and res.converged and res.method == "AGQ5" and res.vcomp["therapist"] == 0.0
    assert res.fe_params.iloc[0] == pytest.approx(math.log(0.4 / 0.6), abs=1e-7)
