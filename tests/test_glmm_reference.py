"""Random-intercept logistic GLMM (glmm.py) against independent results.

* R lme4 1.1-31 ``glmer`` fits stored in tests/reference/lme4_reference.json (Laplace, nAGQ = 10);
* statsmodels ``Logit`` for the GLM limit s_u^2 -> 0 (and the boundary / singular case);
* brute-force numerical integration (scipy.integrate.quad) of each therapist's likelihood for AGQ;
* per-therapist scalar optimisation (scipy.optimize.minimize_scalar) for the conditional modes.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import integrate, optimize, stats
from scipy.special import expit

import therapist_effects.models.glmm as glmm
from therapist_effects.exceptions import (
    ConvergenceWarning,
    ModelError,
    SingularFitWarning,
)
from therapist_effects.models.glmm import LogisticRandomInterceptModel
from refdata import REFERENCE_DIR

REF_DIR = REFERENCE_DIR
REF_JSON = REF_DIR / "lme4_reference.json"

FORMULA_TERMS = ["phq9_pre", "feedback"]

# Expected values, copied from lme4_reference.json so that each sits beside the R call that gave
# it (R 4.2.2, lme4 1.1-31). The test also reads the JSON and checks the two agree.
LME4 = {
    # glmer(recovered ~ phq9_pre + feedback + (1 | therapist_id), data = therapy_feedback,
    #       family = binomial, nAGQ = 1)
    ("therapy_feedback", "logit_laplace"): {
        "fixed": {"(Intercept)": 0.5794440842, "phq9_pre": -0.02738637483, "feedback": 0.171012894},
        "variance": 0.03814374725,
        "logLik": -1415.707105,
    },
    # glmer(recovered ~ phq9_pre + feedback + (1 | therapist_id), data = therapy_feedback,
    #       family = binomial, nAGQ = 10)
    ("therapy_feedback", "logit_agq10"): {
        "fixed": {"(Intercept)": 0.5795244267, "phq9_pre": -0.02738841838, "feedback": 0.1710918574},
        "variance": 0.03904291649,
        "logLik": -1415.681979,
    },
    # glmer(recovered ~ phq9_pre + feedback + (1 | therapist_id), data = therapy_trials,
    #       family = binomial, nAGQ = 1)
    ("therapy_trials", "logit_laplace"): {
        "fixed": {"(Intercept)": 0.5517824519, "phq9_pre": -0.04000529971, "feedback": 0.221049293},
        "variance": 0.02373068288,
        "logLik": -2473.85888,
    },
    # glmer(recovered ~ phq9_pre + feedback + (1 | therapist_id), data = therapy_trials,
    #       family = binomial, nAGQ = 10)
    ("therapy_trials", "logit_agq10"): {
        "fixed": {"(Intercept)": 0.5519267599, "phq9_pre": -0.04001351225, "feedback": 0.221095209},
        "variance": 0.02440478476,
        "logLik": -2473.836757,
    },
}
CASES = list(LME4)


def _method(key: str) -> dict:
    return {"method": "laplace"} if key == "logit_laplace" else {"method": "agq", "n_quad": 10}


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REF_JSON.read_text())


_DATA: dict[str, pd.DataFrame] = {}
_FITS: dict[tuple[str, str], object] = {}


def _data(name: str) -> pd.DataFrame:
    if name not in _DATA:
        _DATA[name] = pd.read_csv(REF_DIR / f"{name}.csv")
    return _DATA[name]


def _model(dataset: str, key: str) -> LogisticRandomInterceptModel:
    return LogisticRandomInterceptModel.from_frame(
        _data(dataset), "recovered", FORMULA_TERMS, therapist="therapist_id", **_method(key)
    )


def _fit(dataset: str, key: str):
    if (dataset, key) not in _FITS:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # these fits must be clean: no convergence/singular warning
            _FITS[(dataset, key)] = _model(dataset, key).fit()
    return _FITS[(dataset, key)]


# ----------------------------------------------------------------------------- lme4 reference
@pytest.mark.parametrize("dataset,key", CASES)
def test_expected_values_match_reference_json(reference, dataset, key):
    entry = reference[dataset][key]
    exp = LME4[(dataset, key)]
    assert entry["fixed"] == pytest.approx(exp["fixed"], rel=1e-9)
    assert entry["variance"]["therapist_id:(Intercept)"] == pytest.approx(exp["variance"], rel=1e-9)
    assert entry["logLik"] == pytest.approx(exp["logLik"], rel=1e-9)


@pytest.mark.parametrize("dataset,key", CASES)
def test_loglik_is_lme4_quantity(dataset, key):
    """At lme4's own estimates our Laplace/AGQ log-likelihood equals lme4's logLik (constants
    included): the two approximate the same integral in the same way."""
    exp = LME4[(dataset, key)]
    m = _model(dataset, key)
    b = np.array([exp["fixed"][n] for n in m.exog_names])
    ll = m.loglik(b, math.sqrt(exp["variance"]))
    # lme4's logLik is stored to 10 significant digits
    assert ll == pytest.approx(exp["logLik"], rel=1e-8, abs=1e-5)


@pytest.mark.parametrize("dataset,key", CASES)
def test_fit_reproduces_glmer(dataset, key):
    exp = LME4[(dataset, key)]
    res = _fit(dataset, key)
    assert res.converged and not res.singular
    assert res.method == ("Laplace" if key == "logit_laplace" else "AGQ10")
    for name, value in exp["fixed"].items():
        assert res.fe_params[name] == pytest.approx(value, rel=1e-3), name
    assert res.vcomp["therapist"] == pytest.approx(exp["variance"], rel=1e-3)
    assert res.params["therapist"] == res.vcomp["therapist"]
    assert res.loglik == pytest.approx(exp["logLik"], rel=1e-3)
    # the optimum is at least as high as lme4's (both maximise the same function)
    assert res.loglik >= exp["logLik"] - 1e-5
    assert res.icc() == pytest.approx(exp["variance"] / (exp["variance"] + math.pi**2 / 3), rel=1e-3)


def test_agq_and_laplace_differ_as_in_lme4():
    """AGQ10 - Laplace differences in the therapist variance have lme4's sign and size."""
    for dataset in ("therapy_feedback", "therapy_trials"):
        d_ours = _fit(dataset, "logit_agq10").vcomp["therapist"] - _fit(dataset, "logit_laplace").vcomp["therapist"]
        d_lme4 = LME4[(dataset, "logit_agq10")]["variance"] - LME4[(dataset, "logit_laplace")]["variance"]
        assert d_ours == pytest.approx(d_lme4, rel=0.1, abs=2e-5)


def test_analytic_gradient_matches_finite_differences():
    for key in ("logit_laplace", "logit_agq10"):
        m = _model("therapy_feedback", key)
        theta = np.array([0.5, -0.03, 0.2, 0.4])
        grad = m._evaluate(theta[:3], theta[3], warm=False).grad
        num = np.empty(4)
        for i in range(4):
            h = np.zeros(4)
            h[i] = 1e-5
            up, dn = theta + h, theta - h
            num[i] = (m.loglik(up[:3], up[3]) - m.loglik(dn[:3], dn[3])) / 2e-5
        np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- GLM limit
def test_glm_limit_matches_statsmodels_logit():
    m = _model("therapy_trials", "logit_laplace")
    logit = sm.Logit(m.y, m.X).fit(disp=0, method="newton", tol=1e-12)
    # at s_u = 0 the marginal likelihood is the logistic likelihood, exactly
    for b in (logit.params, logit.params + np.array([0.1, -0.01, 0.05])):
        assert m.loglik(b, 0.0) == pytest.approx(logit.model.loglike(b), rel=1e-12)
    # continuity as s_u -> 0
    assert m.loglik(logit.params, 1e-6) == pytest.approx(logit.llf, rel=1e-10)
    # the no-therapist model used by the LRT is the logistic regression
    res = _fit("therapy_trials", "logit_laplace")
    assert res.loglik_glm == pytest.approx(logit.llf, rel=1e-9)
    t = res.lrt()
    assert t["statistic"] == pytest.approx(2 * (res.loglik - logit.llf), rel=1e-6)
    assert t["p_value"] == pytest.approx(0.5 * stats.chi2.sf(t["statistic"], 1), rel=1e-9)
    assert t["df"] == 1


def _null_data(seed: int):
    """30 therapists x 10 patients with no therapist effect (truth s_u^2 = 0)."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(30), 10)
    x = rng.normal(0, 1, g.size)
    X = np.column_stack([np.ones(g.size), x])
    y = (rng.random(g.size) < expit(-0.2 + 0.5 * x)).astype(float)
    return y, X, g


def test_singular_fit_falls_back_to_glm():
    # seed 3: the ML estimate of s_u is on the boundary (the LRT statistic is 0), checked below
    y, X, g = _null_data(3)
    m = LogisticRandomInterceptModel(y, X, g, exog_names=["(Intercept)", "x"])
    with pytest.warns(SingularFitWarning):
        res = m.fit()
    logit = sm.Logit(y, X).fit(disp=0, method="newton", tol=1e-12)
    assert res.singular and res.vcomp["therapist"] == 0.0 and res.icc() == 0.0
    np.testing.assert_allclose(res.fe_params.to_numpy(), logit.params, rtol=1e-6)
    np.testing.assert_allclose(res.bse.to_numpy()[:2], logit.bse, rtol=1e-3)
    assert res.loglik == pytest.approx(logit.llf, rel=1e-10)
    assert res.lrt()["statistic"] == 0.0 and res.lrt()["p_value"] == 1.0
    # the likelihood really does not increase away from s_u = 0 (checked on a grid, b re-fitted)
    for s in (0.05, 0.2, 0.5):
        best = optimize.minimize(lambda b: -m.loglik(b, s), logit.params, method="Nelder-Mead",
                                 options={"xatol": 1e-8, "fatol": 1e-10}).fun
        assert -best <= res.loglik + 1e-8
    c = res.to_contract()
    assert c["singular"] is True
    assert any("SingularFitWarning" in w for w in c["warnings"])
    assert c["variance_components"]["therapist"]["ci_low"] == 0.0


# ----------------------------------------------------------------------------- AGQ vs integration
def test_agq_matches_brute_force_integration():
    """With a large therapist variance (s_u = 2) Laplace is visibly off; AGQ with 25 nodes equals
    the marginal likelihood integrated numerically per therapist."""
    rng = np.random.default_rng(11)
    G, n = 8, 12
    g = np.repeat(np.arange(G), n)
    x = rng.normal(size=g.size)
    X = np.column_stack([np.ones(g.size), x])
    b, s = np.array([0.3, 0.8]), 2.0
    y = (rng.random(g.size) < expit(X @ b + s * rng.normal(size=G)[g])).astype(float)

    exact = 0.0
    for j in range(G):
        yj, ej = y[g == j], X[g == j] @ b

        def integrand(v, yj=yj, ej=ej):
            eta = ej + s * v
            return math.exp(np.sum(yj * eta - np.logaddexp(0, eta))) * stats.norm.pdf(v)

        val, _ = integrate.quad(integrand, -np.inf, np.inf, epsabs=0, epsrel=1e-12, limit=200)
        exact += math.log(val)

    agq25 = LogisticRandomInterceptModel(y, X, g, method="agq", n_quad=25).loglik(b, s)
    agq10 = LogisticRandomInterceptModel(y, X, g, method="agq", n_quad=10).loglik(b, s)
    lap = LogisticRandomInterceptModel(y, X, g, method="laplace").loglik(b, s)
    assert agq25 == pytest.approx(exact, abs=1e-7)
    assert abs(agq10 - exact) < 1e-3
    assert abs(lap - exact) > 1e-2  # the check is sensitive: Laplace is not exact here


# ----------------------------------------------------------------------------- therapists
def test_therapist_effects_are_conditional_modes():
    res = _fit("therapy_feedback", "logit_laplace")
    m = res.model
    te = res.therapist_effects()
    df = _data("therapy_feedback")
    obs = df.groupby(df["therapist_id"].astype(str))["recovered"].agg(["mean", "size"])
    assert list(te["therapist"]) == list(obs.index)
    np.testing.assert_allclose(te["raw_mean"], obs["mean"], rtol=1e-12)
    np.testing.assert_array_equal(te["caseload"], obs["size"])

    b, s2 = res.fe_params.to_numpy(), res.vcomp["therapist"]
    eta0 = m.X @ b
    for j in (0, 7, 31, 59):
        yj, ej = m.y[m.g == j], eta0[m.g == j]

        def neg_post(u, yj=yj, ej=ej):  # -log p(y_j | u) p(u), u on the log-odds scale
            eta = ej + u
            return -np.sum(yj * eta - np.logaddexp(0, eta)) + u * u / (2 * s2)

        u_hat = optimize.minimize_scalar(neg_post, bounds=(-3, 3), method="bounded",
                                         options={"xatol": 1e-10}).x
        assert te.loc[j, "effect"] == pytest.approx(u_hat, abs=1e-7)
        h = 1e-4
        curv = (neg_post(u_hat + h) - 2 * neg_post(u_hat) + neg_post(u_hat - h)) / h**2
        assert te.loc[j, "effect_se"] == pytest.approx(1 / math.sqrt(curv), rel=1e-4)
        xbar = m.X.mean(axis=0)
        assert te.loc[j, "adjusted_mean"] == pytest.approx(expit(xbar @ b + u_hat), rel=1e-6)
    z = stats.norm.ppf(0.975)
    np.testing.assert_allclose(te["ci_low"], te["effect"] - z * te["effect_se"])
    np.testing.assert_allclose(te["ci_high"], te["effect"] + z * te["effect_se"])


def test_therapist_classification_labels():
    rng = np.random.default_rng(5)
    G, n = 40, 60
    g = np.repeat(np.arange(G), n)
    u = np.where(np.arange(G) < 3, 2.0, np.where(np.arange(G) >= G - 3, -2.0, 0.0))
    y = (rng.random(g.size) < expit(u[g])).astype(float)
    res = LogisticRandomInterceptModel(y, np.ones((g.size, 1)), g, exog_names=["(Intercept)"]).fit()
    good = res.therapist_effects(higher_is_better=True)
    bad = res.therapist_effects(higher_is_better=False)
    neutral = res.therapist_effects(higher_is_better=None)
    labels = np.array([str(i) for i in range(G)])
    top = good["therapist"].isin(labels[:3])
    bottom = good["therapist"].isin(labels[-3:])
    assert (good.loc[top, "classification"] == "better than average").all()
    assert (good.loc[bottom, "classification"] == "worse than average").all()
    assert (bad.loc[top, "classification"] == "worse than average").all()
    assert (neutral.loc[bottom, "classification"] == "below average").all()
    ns = good["classification"] == "not distinguishable from average"
    assert ((good.loc[ns, "ci_low"] <= 0) & (good.loc[ns, "ci_high"] >= 0)).all()
    assert ns.sum() >= G - 10


# ----------------------------------------------------------------------------- intervals
def test_profile_interval_ends_are_at_chi2_quantile():
    res = _fit("therapy_feedback", "logit_laplace")
    m = res.model
    ci = res.conf_int(method="profile")
    q = stats.chi2.ppf(0.95, 1)
    b_hat = res.fe_params.to_numpy()

    def profile_s(s):  # independent optimiser (Nelder-Mead) over b at fixed s_u
        r = optimize.minimize(lambda b: -m.loglik(b, s), b_hat, method="Nelder-Mead",
                              options={"xatol": 1e-9, "fatol": 1e-11, "maxiter": 4000})
        return -r.fun

    hi = math.sqrt(ci.loc["therapist", "upper"])
    assert 2 * (res.loglik - profile_s(hi)) == pytest.approx(q, abs=2e-3)
    # the LRT statistic is below the chi2_1 quantile here, so the lower end is the boundary 0
    assert res.lrt()["statistic"] < q and ci.loc["therapist", "lower"] == 0.0
    assert ci.loc["therapist", "lower"] <= res.vcomp["therapist"] <= ci.loc["therapist", "upper"]
    # fixed effects: profile close to Wald for a well-determined logistic coefficient
    wald = res.conf_int(method="wald")
    for name in res.exog_names:
        width = wald.loc[name, "upper"] - wald.loc[name, "lower"]
        assert ci.loc[name, "lower"] == pytest.approx(wald.loc[name, "lower"], abs=0.03 * width)
        assert ci.loc[name, "upper"] == pytest.approx(wald.loc[name, "upper"], abs=0.03 * width)
    lo, hi_icc = res.icc_interval(method="profile")
    s2_hi = ci.loc["therapist", "upper"]
    assert hi_icc == pytest.approx(s2_hi / (s2_hi + math.pi**2 / 3), rel=1e-12) and lo == 0.0


def test_bootstrap_icc_interval_is_reproducible():
    res = _fit("therapy_trials", "logit_laplace")
    a = res.icc_interval(method="bootstrap", n_boot=30, seed=7)
    res._boot_cache.clear()
    b = res.icc_interval(method="bootstrap", n_boot=30, seed=7)
    assert a == b
    assert 0.0 <= a[0] <= a[1] < 0.1


# ----------------------------------------------------------------------------- contract
def test_to_contract_shape_and_values():
    res = _fit("therapy_feedback", "logit_agq10")
    c = res.to_contract()
    json.dumps(c, allow_nan=False)  # plain JSON values, NaN -> None
    assert set(c) == {
        "family", "method", "fixed_effects", "variance_components", "icc", "loglik", "converged",
        "singular", "lrt", "n_patients", "n_therapists", "n_clusters", "warnings",
    }
    assert c["family"] == "binomial" and c["method"] == "AGQ10"
    assert list(c["fixed_effects"]) == ["(Intercept)", "phq9_pre", "feedback"]
    for v in c["fixed_effects"].values():
        assert set(v) == {"estimate", "se", "ci_low", "ci_high"}
        assert v["ci_low"] < v["estimate"] < v["ci_high"] and v["se"] > 0
    vc = c["variance_components"]
    assert vc["therapist"]["estimate"] == pytest.approx(LME4[("therapy_feedback", "logit_agq10")]["variance"], rel=1e-3)
    assert vc["residual"] == {"estimate": math.pi**2 / 3, "ci_low": None, "ci_high": None}
    assert set(c["icc"]) == {"estimate", "ci_low", "ci_high", "ci_method", "scale"}
    assert c["icc"]["scale"] == "latent" and c["icc"]["ci_method"] == "profile"
    assert c["icc"]["estimate"] == pytest.approx(res.icc())
    assert set(c["lrt"]) == {"statistic", "df", "p_value"}
    assert c["n_patients"] == 2070 and c["n_therapists"] == 60 and c["n_clusters"] is None
    assert c["converged"] is True and c["singular"] is False and c["warnings"] == []
    assert isinstance(res.summary(), str) and "AGQ10" in res.summary()


# ----------------------------------------------------------------------------- errors, warnings
def test_input_errors_are_one_line():
    df = pd.DataFrame({"t": ["a", "a", "b", "b"], "y": [0, 2, 1, 0], "x": [1.0, 2.0, 3.0, 4.0]})
    with pytest.raises(ModelError) as e:
        LogisticRandomInterceptModel.from_frame(df, "y", ["x"], therapist="t")
    assert "\n" not in str(e.value) and "0/1" in str(e.value)
    assert "'y'" in str(e.value) and "row 1 has value 2" in str(e.value)
    with pytest.raises(ModelError, match="therapist column 'therapist'"):
        LogisticRandomInterceptModel.from_frame(df.assign(y=[0, 1, 1, 0]), "y", ["x"])
    with pytest.raises(ModelError, match="method"):
        LogisticRandomInterceptModel(np.array([0, 1, 1, 0]), np.ones((4, 1)), df["t"], method="pql")
    with pytest.raises(ModelError, match="at least 2 therapists"):
        LogisticRandomInterceptModel(np.array([0, 1, 1, 0]), np.ones((4, 1)), ["a"] * 4)


def test_nonconvergence_warns(monkeypatch):
    y, X, g = _null_data(1)
    monkeypatch.setattr(glmm, "_NEWTON_MAXIT", 1)  # conditional modes cannot converge in 1 step
    m = LogisticRandomInterceptModel(y, X, g)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = m.fit()
    assert any(issubclass(w.category, ConvergenceWarning) for w in rec)
    assert not res.converged
