"""Tests that fail on the mutants a manual mutation audit found surviving (issue 16).

Each test names the mutation it kills. They go through the public interfaces (model classes,
``fit``, ``lrt``, ``icc_interval``, ``conf_int``, ``diagnose``, ``service_report``, ``pool``) so that
they survive a rewrite of the engines behind them. Every expected value is independent of the
code under test: an R result from ``tests/reference/lme4_reference.json`` (R call written beside
it), a closed form worked by hand, or a distribution from scipy.
"""

from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats

from refdata import REFERENCE_DIR
from therapist_effects.models.arm import ArmVarianceModel
from therapist_effects.exceptions import SingularFitWarning
from therapist_effects.meta import pool
from therapist_effects.models.reml import RandomInterceptModel


@pytest.fixture(scope="module")
def ref():
    return json.loads((REFERENCE_DIR / "lme4_reference.json").read_text())


def _balanced(G: int, n: int, msb: float, msw: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced one-way data (G therapists x n patients, intercept only) whose ANOVA mean squares
    are exactly ``msb`` (between) and ``msw`` (within). The REML estimate of the therapist variance
    is then the ANOVA estimate ``(msb - msw) / n`` when that is positive (Searle, Casella & McCulloch
    1992, sec. 4.7), the residual variance ``msw``."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((G, n))
    e -= e.mean(axis=1, keepdims=True)
    e *= math.sqrt(msw * G * (n - 1) / np.sum(e**2))
    m = rng.standard_normal(G)
    m -= m.mean()
    m *= math.sqrt(msb * (G - 1) / (n * np.sum(m**2)))
    y = (10.0 + m[:, None] + e).ravel()
    t = np.repeat([f"T{i:03d}" for i in range(G)], n)
    return y, t


# ----------------------------------------------------------------------------------------------
# mutant: random-intercept LRT p-value no longer halved (boundary mixture dropped)
def test_random_intercept_lrt_p_value_is_half_the_chi2_tail_dyestuff(ref):
    """Dyestuff, REML: a moderate statistic (about 6.4), so halving or not is a factor 2 in p,
    checked with abs=0.

    R: fm <- lmer(Yield ~ 1 + (1 | Batch), Dyestuff, REML = TRUE); logLik(fm) = -159.8271384;
    the null model is lm(Yield ~ 1), whose REML log-likelihood is the closed form
    -1/2 [(n-1) log(2 pi s^2) + log(n) + (n-1)] with s^2 = var(Yield)
    (R: logLik(lm(Yield ~ 1, Dyestuff), REML = TRUE)). p = 0.5 * pchisq(stat, 1, lower = FALSE)
    (Self & Liang 1987: 50:50 mixture of chi2_0 and chi2_1)."""
    d = pd.read_csv(REFERENCE_DIR / "dyestuff.csv")
    y = d["Yield"].to_numpy(float)
    n = len(y)
    s2 = float(np.var(y, ddof=1))
    reml0 = -0.5 * ((n - 1) * math.log(2 * math.pi * s2) + math.log(n) + (n - 1))
    stat = 2.0 * (ref["dyestuff"]["null_REML"]["logLik"] - reml0)
    assert 3.0 < stat < 10.0  # moderate: the p-value is far from 0 and 1
    res = RandomInterceptModel(y, np.ones((n, 1)), d["Batch"]).fit()
    lrt = res.lrt()
    assert lrt["statistic"] == pytest.approx(stat, rel=1e-6, abs=0)
    assert lrt["p_value"] == pytest.approx(0.5 * stats.chi2.sf(stat, 1), rel=1e-5, abs=0)
    # and the p-value is exactly the mixture tail of the reported statistic
    assert lrt["p_value"] == pytest.approx(0.5 * stats.chi2.sf(lrt["statistic"], 1), rel=1e-12, abs=0)


def test_random_intercept_lrt_ml_matches_lme4_and_ols(ref):
    """Dyestuff, ML: R logLik(lmer(Yield ~ 1 + (1 | Batch), Dyestuff, REML = FALSE)) is not in the
    reference file, so the null is ordinary regression's ML log-likelihood (closed form,
    R: logLik(lm(Yield ~ 1, Dyestuff))) and the statistic is checked through the boundary identity
    p = 0.5 * pchisq(stat, 1, lower = FALSE) with abs=0."""
    d = pd.read_csv(REFERENCE_DIR / "dyestuff.csv")
    y = d["Yield"].to_numpy(float)
    n = len(y)
    res = RandomInterceptModel(y, np.ones((n, 1)), d["Batch"], method="ML").fit()
    ll0 = -0.5 * n * (math.log(2 * math.pi * np.var(y)) + 1.0)
    stat = 2.0 * (res.loglik - ll0)
    lrt = res.lrt()
    assert 3.0 < lrt["statistic"] < 10.0
    assert lrt["statistic"] == pytest.approx(stat, rel=1e-8, abs=0)
    assert lrt["p_value"] == pytest.approx(0.5 * stats.chi2.sf(stat, 1), rel=1e-8, abs=0)


def test_random_intercept_lrt_p_is_one_at_the_boundary():
    """A singular fit (between mean square below the within one): statistic 0, p = 1."""
    y, t = _balanced(20, 10, msb=0.5, msw=1.0, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SingularFitWarning)
        res = RandomInterceptModel(y, np.ones((len(y), 1)), t).fit()
    assert res.vcomp["therapist"] == 0.0
    assert res.lrt()["statistic"] == 0.0 and res.lrt()["p_value"] == 1.0


# ----------------------------------------------------------------------------------------------
# mutant: arm equal-variance LRT p-value halved (the null value is interior: no mixture)
def test_arm_equal_variance_lrt_p_is_the_full_chi2_tail():
    """therapy_feedback: statistic about 5.1 (checked against statsmodels in test_arm_reference);
    the null s2_control = s2_feedback is interior, so p = pchisq(stat, 1, lower = FALSE), not half."""
    df = pd.read_csv(REFERENCE_DIR / "therapy_feedback.csv")
    res = ArmVarianceModel.from_frame(df, "phq9_post", ["phq9_pre", "feedback"], therapist="therapist_id",
                                      arm="feedback").fit()
    lrt = res.lrt_equal_variances()
    assert 3.0 < lrt["statistic"] < 10.0
    assert lrt["p_value"] == pytest.approx(stats.chi2.sf(lrt["statistic"], 1), rel=1e-12, abs=0)
    assert 0.01 < lrt["p_value"] < 0.05  # 5.09 lies between the 95% and 99% chi2_1 quantiles


# ----------------------------------------------------------------------------------------------
# mutants: lme4 singular tolerance 1e-4 -> 1e-2; boundary tolerance of the global minimiser 1e-9 -> 1e-2
def test_near_boundary_fit_is_not_singular_and_matches_anova():
    """theta = sd_therapist / sigma = 3e-3: above lme4's isSingular tolerance (1e-4), so not
    singular, and the REML optimum is interior (it beats g = 0 by about 1e-6 in -2 logLik, far
    above rounding noise), with the ANOVA value (msb - msw) / n."""
    G, n, msw = 100, 20, 1.0
    theta = 3e-3
    msb = msw * (1.0 + n * theta**2)
    y, t = _balanced(G, n, msb=msb, msw=msw, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SingularFitWarning)  # a singular flag here is a failure
        res = RandomInterceptModel(y, np.ones((len(y), 1)), t).fit()
    assert not res.singular
    assert res.vcomp["therapist"] > 0.0
    assert res.vcomp["therapist"] == pytest.approx((msb - msw) / n, rel=0.05)
    assert res.vcomp["residual"] == pytest.approx(msw, rel=1e-6)
    assert math.sqrt(res.vcomp["therapist"] / res.vcomp["residual"]) == pytest.approx(theta, rel=0.03)
    assert res.lrt()["statistic"] > 0.0


def test_theta_below_lme4_tolerance_is_singular():
    """theta = 3e-5 (< 1e-4): flagged singular, with a typed warning, as lme4's isSingular()."""
    G, n = 100, 20
    theta = 3e-5
    y, t = _balanced(G, n, msb=1.0 + n * theta**2, msw=1.0, seed=6)
    with pytest.warns(SingularFitWarning):
        res = RandomInterceptModel(y, np.ones((len(y), 1)), t).fit()
    assert res.singular


# ----------------------------------------------------------------------------------------------
# mutant: profile lower end of an interior estimate no longer exactly 0 when the profile stays
# below the cut-off
def test_profile_lower_end_is_exactly_zero_for_a_weak_interior_estimate():
    """msb = 1.3 msw with 20 therapists of 10: the estimate is interior (0.03 > 0) but the
    restricted likelihood at 0 is within chi2_1(0.95)/2 of the maximum (the LRT statistic is below
    3.84), so the profile interval of the ICC starts at exactly 0 (as lme4's confint gives 0 for
    the SD)."""
    y, t = _balanced(20, 10, msb=1.3, msw=1.0, seed=8)
    res = RandomInterceptModel(y, np.ones((len(y), 1)), t).fit()
    assert res.vcomp["therapist"] == pytest.approx((1.3 - 1.0) / 10, rel=1e-4)
    assert not res.singular
    stat = res.lrt()["statistic"]
    assert 0.0 < stat < stats.chi2.ppf(0.95, 1)
    lo, hi = res.icc_interval(0.95)
    assert lo == 0.0
    assert hi > res.icc()
    ci = res.conf_int(0.95)
    assert ci.loc["therapist", "lower"] == 0.0
    assert ci.loc["therapist", "upper"] > res.vcomp["therapist"]


def test_profile_lower_end_is_positive_when_the_profile_crosses_the_cut_off():
    """The counterpart: msb = 3 msw, statistic far above 3.84, so the lower end is the interior
    root where the REML deviance rises by chi2_1(0.95), checked by re-evaluating the LRT-like
    difference through a model fitted to the same data (the ICC's lower end k/(1+k) has
    deviance excess equal to the quantile)."""
    y, t = _balanced(20, 10, msb=3.0, msw=1.0, seed=9)
    res = RandomInterceptModel(y, np.ones((len(y), 1)), t).fit()
    assert res.lrt()["statistic"] > 10
    lo, hi = res.icc_interval(0.95)
    assert 0.0 < lo < res.icc() < hi < 1.0


# ----------------------------------------------------------------------------------------------
# mutant: PyMC prior scale x10 in the model while the reported prior is unchanged
def _bayes_data(seed: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    G, n = 12, 15
    t = np.repeat(np.arange(G), n)
    x = rng.normal(12.0, 4.0, G * n)
    arm = np.tile(np.r_[np.zeros(n // 2), np.ones(n - n // 2)], G)
    y = 3.0 + 0.5 * x - 1.0 * arm + rng.normal(0, 1.5, G)[t] + rng.normal(0, 5.0, G * n)
    return pd.DataFrame({"therapist": [f"T{i}" for i in t], "x": x, "arm": arm.astype(int), "y": y,
                         "cluster": [f"C{i % 3}" for i in t]})


def _halfstudentt_logpdf(x, nu, sigma):
    return math.log(2.0) + stats.t.logpdf(x, nu, scale=sigma)


@pytest.mark.parametrize(("model_type", "parameterization", "extra"), [
    ("random_intercept", "marginal", {}),
    ("random_intercept", "noncentred", {}),
    ("arm_variance", "marginal", {"arm": "arm"}),
    ("nested", "noncentred", {"cluster": "cluster"}),
])
def test_model_prior_density_is_the_reported_prior(model_type, parameterization, extra):
    """The log-density the PyMC model gives each SD and coefficient equals that of the prior the
    results report (data scale), transformed to the model's standardised scale by hand:
    sd_std = sd / sd(y) (Jacobian log sd(y)), beta_std_j = beta_j * sd(x_j) / sd(y)."""
    import pymc as pm

    from therapist_effects.models.bayes import BayesConfig, BayesModel

    df = _bayes_data()
    covs = ("x",) if model_type != "arm_variance" else ("x",)
    bm = BayesModel(model_type, df, "y", covs, config=BayesConfig(sampler="pymc", parameterization=parameterization),
                    **extra)
    pri = bm.priors
    sy = float(df["y"].std(ddof=1))
    model = bm.model
    # SDs: a halfstudentt(nu, sigma) on the data scale by default
    for key, rv in (("sigma_therapist", "sd_therapist_std"), ("sigma_residual", "sigma_std"),
                    ("sigma_cluster", "sd_cluster_std")):
        if key not in pri:
            continue
        spec = pri[key]
        assert spec["dist"] == "halfstudentt"
        var = model[rv]
        shape = tuple(int(s) for s in var.shape.eval())
        for sd_data in (0.3 * sy, 1.0 * sy, 4.0 * sy):
            x = sd_data / sy
            val = np.full(shape, x)
            got = float(np.sum(pm.logp(var, val).eval()))
            want = (_halfstudentt_logpdf(sd_data, spec["nu"], spec["sigma"]) + math.log(sy)) * max(1, int(np.prod(shape)))
            assert got == pytest.approx(want, rel=1e-6), (key, sd_data)
    # fixed effects: normal(mu, sigma) on the data scale
    names = bm.prep.names
    sx = {"x": float(df["x"].std(ddof=1)), "arm": float(df["arm"].std(ddof=1))}
    beta = model["beta_std"]
    specs = [pri["intercept"]] + [pri["slopes"][nm] for nm in names[1:]]
    # evaluate at each coefficient's prior mean + 1 prior SD (data scale), intercept at its mean
    vals_std, want = [], 0.0
    for j, (nm, sp) in enumerate(zip(names, specs, strict=True)):
        b = sp["mu"] + sp["sigma"]
        if j == 0:
            # the intercept is centred at the means of y and x: its standardised prior is
            # normal((mu - ybar) / sy, sigma / sy); the test fixes the other coefficients at 0 offset
            bs = (b - float(df["y"].mean())) / sy
            want += stats.norm.logpdf(b, sp["mu"], sp["sigma"]) + math.log(sy)
        else:
            bs = b * sx[nm] / sy
            want += stats.norm.logpdf(b, sp["mu"], sp["sigma"]) + math.log(sy / sx[nm])
        vals_std.append(bs)
    got = float(np.sum(pm.logp(beta, np.array(vals_std)).eval()))
    assert got == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# mutant: R-hat threshold 1.01 -> 1.1
def test_diagnose_flags_rhat_between_1_02_and_1_05():
    """Four chains of iid normal draws whose means are shifted by -0.3 .. +0.3: split R-hat about
    1.03 (Vehtari et al. 2021's threshold is 1.01), which diagnose() must name in its advice."""
    import arviz as az

    from therapist_effects.models import bayes

    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 4000)) + np.array([-1.5, -0.5, 0.5, 1.5])[:, None] * 0.2
    idata = az.from_dict(posterior={"a": x}, sample_stats={"diverging": np.zeros((4, 4000), bool)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = bayes.diagnose(idata, ["a"])
        rhat = float(az.rhat(idata)["a"])
    assert 1.02 < d["max_rhat"] < 1.05
    assert d["max_rhat"] == pytest.approx(rhat, rel=1e-12)
    assert d["failed"]
    assert re.search(r"max R-hat 1\.0[2-5]\d* > 1\.01", d["advice"])
    # chains that agree: R-hat below 1.01 is not named
    y = rng.standard_normal((4, 4000))
    d2 = bayes.diagnose(az.from_dict(posterior={"a": y}, sample_stats={"diverging": np.zeros((4, 4000), bool)}),
                        ["a"])
    assert d2["max_rhat"] < 1.01 and not d2["failed"]


# ----------------------------------------------------------------------------------------------
# mutant: the service funnel stops leaving out therapists whose point would reveal a suppressed count
def test_funnel_leaves_out_a_therapist_whose_point_reveals_a_small_count(tmp_path, monkeypatch):
    """Three listed therapists (caseload >= 10): one with 3 of 20 recovered (numerator suppressed),
    one with 16 of 20 (complement 4 suppressed), one with 10 of 20 (shown). Only the last is plotted;
    the note counts the two left out."""
    from therapist_effects.report import service as service_mod
    from therapist_effects.report import service_report

    recovered = {"TA": (3, 20), "TB": (16, 20), "TC": (10, 20), "TD": (0, 20)}
    rows = []
    for t, (k, n) in recovered.items():
        rows += [{"patient": f"{t}-{j}", "therapist": t, "recovered": float(j < k),
                  "reliable_improvement": float(j < k)} for j in range(n)]
    patients = pd.DataFrame(rows)
    therapists = pd.DataFrame({"model": "ri", "therapist": list(recovered), "caseload": 20,
                               "adjusted_mean": 0.0, "effect": 0.0, "ci_low": -1.0, "ci_high": 1.0,
                               "classification": "not distinguishable from average"})
    est = {"dataset": "svc", "models": {"ri": {"type": "random_intercept", "family": "gaussian",
                                               "outcome": "end", "converged": True, "singular": False}}}
    captured = {}
    real = service_mod.figures.control_funnel

    def spy(n, value, *args, **kw):
        if kw.get("percent"):  # the recovery-rate funnel (the other one plots adjusted outcomes)
            captured["n"], captured["rate"] = list(np.asarray(n)), list(np.asarray(value))
        return real(n, value, *args, **kw)

    monkeypatch.setattr(service_mod.figures, "control_funnel", spy)
    out = service_report(est, patients, therapists, tmp_path / "s.html", pseudonymise=False)
    # plotted: TC (10 of 20) and TD (0 of 20: zero is not disclosive)
    assert sorted(captured["rate"]) == [0.0, 0.5]
    html = re.sub(r"<[^>]+>", "", out.read_text())  # the text a reader sees
    assert "2 listed therapists are not plotted because their point would reveal a count below 8" in html
    assert "3 of 20" not in html and "16 of 20" not in html and "10 of 20" in html


# ----------------------------------------------------------------------------------------------
# mutant: PM I^2 formula replaced by DL's
def test_paule_mandel_i2_by_hand():
    """Higgins & Thompson's I^2 as metafor computes it for any tau^2 estimator:
    I^2 = 100 tau2 / (tau2 + s2), s2 = (k-1) sum w / ((sum w)^2 - sum w^2), w = 1/v.
    With the PM tau^2 (root of the generalised Q equation) it differs from DL's (Q - df)/Q."""
    y = np.array([-3.1, -3.9, -2.6, -3.4, -4.4])
    v = np.array([0.10, 0.30, 0.05, 0.20, 0.50])
    k = len(y)

    def gen_q(t2):
        w = 1 / (v + t2)
        mu = (w * y).sum() / w.sum()
        return (w * (y - mu) ** 2).sum() - (k - 1)

    tau2 = optimize.brentq(gen_q, 0.0, 10.0, xtol=1e-14)
    w = 1 / v
    s2 = (k - 1) * w.sum() / (w.sum() ** 2 - (w**2).sum())
    i2 = 100 * tau2 / (tau2 + s2)
    mu_fe = (w * y).sum() / w.sum()
    q = (w * (y - mu_fe) ** 2).sum()
    assert abs(i2 - 100 * (q - (k - 1)) / q) > 0.4  # the two formulas differ here by 0.48 points
    out = pool(y, v, "PM")
    assert out["I2"] == pytest.approx(i2, rel=1e-5)
    assert out["Q"] == pytest.approx(q, rel=1e-10)
    # REML: the same I^2 formula with its own tau^2
    out_r = pool(y, v, "REML")
    assert out_r["I2"] == pytest.approx(100 * out_r["tau2"] / (out_r["tau2"] + s2), rel=1e-10)


# ----------------------------------------------------------------------------------------------
# issue 17: benchmarks/bench_bayes.py crashed because "auto" chose "marginal" for a per-patient model
def test_auto_parameterization_of_a_per_patient_model_is_noncentred():
    """The marginal likelihood is written on sufficient statistics only; "auto" must not pick it for a
    per-patient model (it did, and build_model raised ModelError)."""
    from therapist_effects.models.bayes import BayesConfig, BayesModel

    df = _bayes_data()
    per = BayesModel("random_intercept", df, "y", ("x",), config=BayesConfig(sampler="pymc"), per_patient=True)
    assert per.config.parameterization == "noncentred"
    assert "z_therapist" in per.model.named_vars and "y" in per.model.observed_RVs[0].name
    ss = BayesModel("random_intercept", df, "y", ("x",), config=BayesConfig(sampler="pymc"))
    assert ss.config.parameterization == "marginal" and "z_therapist" not in ss.model.named_vars


# ----------------------------------------------------------------------------------------------
# profile-interval ends against the closed-form restricted likelihood of a balanced design
@pytest.mark.parametrize(("msb", "seed"), [(1.3, 8), (3.0, 9), (1.0 + 20 * 9e-6, 5)])
def test_icc_profile_ends_match_the_closed_form_reml_profile(msb, seed):
    """Balanced one-way design, intercept only (G therapists x n patients): with sigma^2 profiled
    out, -2 REML logLik = (G-1) log(1 + n g) + (N-1) log(r(g) / (N-1)) + const,
    r(g) = SSW + SSB / (1 + n g), g = s2_t / s2 (Searle, Casella & McCulloch 1992, ch. 6). The ICC
    interval ends are where this rises by chi2_1(0.95) = 3.8415 above its minimum, ICC = g / (1 + g);
    the lower end is 0 when the rise at g = 0 stays below it. Solved here by brentq, independently
    of the package. Covers ends far (> 100x) from the estimate (the near-boundary case)."""
    G = 100 if msb < 1.01 else 20
    n = 20 if msb < 1.01 else 10
    y, t = _balanced(G, n, msb=msb, msw=1.0, seed=seed)
    N = G * n
    ssw, ssb = 1.0 * G * (n - 1), msb * (G - 1)

    def dev(g):
        return (G - 1) * math.log1p(n * g) + (N - 1) * math.log((ssw + ssb / (1 + n * g)) / (N - 1))

    ghat = max((msb - 1.0) / n, 0.0)
    q = stats.chi2.ppf(0.95, 1)
    hi = optimize.brentq(lambda g: dev(g) - dev(ghat) - q, ghat, 100.0, xtol=1e-15, rtol=1e-13)
    lo = 0.0 if dev(0.0) - dev(ghat) < q else optimize.brentq(lambda g: dev(g) - dev(ghat) - q, 0.0, ghat,
                                                             xtol=1e-15, rtol=1e-13)
    res = RandomInterceptModel(y, np.ones((N, 1)), t).fit()
    got_lo, got_hi = res.icc_interval(0.95)
    assert got_hi == pytest.approx(hi / (1 + hi), rel=1e-6)
    if lo == 0.0:
        assert got_lo == 0.0
    else:
        assert got_lo == pytest.approx(lo / (1 + lo), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# parametric bootstrap (mutmut survivors in MixedResults.bootstrap): its distribution against the
# exact sampling distribution of the balanced one-way ANOVA estimators
def test_parametric_bootstrap_reproduces_the_anova_sampling_distribution():
    """Balanced design, fitted s2_t = 0.2, s2 = 1 (G = 30, n = 10). Data simulated from the fit and
    refitted: the REML estimates are the ANOVA ones, MSW ~ s2 chi2_{N-G}/(N-G) and
    MSB ~ (s2 + n s2_t) chi2_{G-1}/(G-1) independently, so the bootstrap residual variance has mean
    s2 and SD s2 sqrt(2/(N-G)), the therapist variance (MSB - MSW)/n mean s2_t and SD
    sqrt(2 (s2 + n s2_t)^2/(G-1) + 2 s2^2/(N-G)) / n (truncation at 0 has probability < 1e-5 here).
    400 replicates: means within 4 Monte-Carlo SEs, SDs within 15%."""
    G, n, s2t, s2 = 30, 10, 0.2, 1.0
    N = G * n
    y, t = _balanced(G, n, msb=s2 + n * s2t, msw=s2, seed=12)
    res = RandomInterceptModel(y, np.ones((N, 1)), t).fit()
    assert res.vcomp["therapist"] == pytest.approx(s2t, rel=1e-6)
    B = 400
    bt = res.bootstrap(B, seed=3)
    assert len(bt) == B and bt["converged"].all() and not bt["singular"].any()
    sd_e = s2 * math.sqrt(2 / (N - G))
    sd_t = math.sqrt(2 * (s2 + n * s2t) ** 2 / (G - 1) + 2 * s2**2 / (N - G)) / n
    assert abs(bt["residual"].mean() - s2) < 4 * sd_e / math.sqrt(B)
    assert abs(bt["therapist"].mean() - s2t) < 4 * sd_t / math.sqrt(B)
    assert bt["residual"].std() == pytest.approx(sd_e, rel=0.15)
    assert bt["therapist"].std() == pytest.approx(sd_t, rel=0.15)
    assert abs(bt["(Intercept)"].mean() - 10.0) < 4 * math.sqrt((s2 + n * s2t) / N / B)
    np.testing.assert_allclose(bt["icc"], bt["therapist"] / (bt["therapist"] + bt["residual"]), rtol=1e-10)
    # seeded: seed=None means 0; another seed gives other draws; n_boot must be >= 1
    pd.testing.assert_frame_equal(res.bootstrap(5, None), res.bootstrap(5, 0))
    assert not res.bootstrap(5, 1)["therapist"].equals(res.bootstrap(5, 0)["therapist"])
    assert len(res.bootstrap(1, 0)) == 1
    from therapist_effects.exceptions import ModelError

    with pytest.raises(ModelError, match="^n_boot must be a positive integer, got 0$"):
        res.bootstrap(0, 0)
    lo, hi = res.icc_interval(method="bootstrap", n_boot=B, seed=3)
    np.testing.assert_allclose((lo, hi), np.quantile(bt["icc"], [0.025, 0.975]), rtol=1e-12)
