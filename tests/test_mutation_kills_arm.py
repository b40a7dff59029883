"""Tests that kill mutants of arm.py and arm_inference.py found by ``MUTATION_SAMPLE=... tools/mutation.sh
arm|arm_inference``.

Expected values are independent of the code under test. With therapists seen in one arm only, separate
residual variances and uncorrelated arm effects, the (restricted) likelihood of the arm model factorises
into one balanced one-way ANOVA per arm, whose estimates have closed forms (Searle, Casella & McCulloch
1992, sec. 3.7, 4.7); other values come from dense-matrix Gaussian likelihoods in numpy."""

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
from test_mutation_kills_reml import _dense_loglik
from test_surviving_mutants import _balanced
from therapist_effects.exceptions import ConvergenceWarning, ModelError, SingularFitWarning, StatisticalWarning
from therapist_effects.models.arm import ArmVarianceModel, two_arms
from therapist_effects.models.arm_inference import _r_backspline_predict

# per arm: therapists, patients per therapist, exact ANOVA mean squares (between, within)
ARMS = [(8, 5, 12.0, 3.0), (9, 5, 4.0, 2.5)]


@pytest.fixture(scope="module")
def data():
    y, t, arm, X = _two_anova_arms(ARMS)
    return y, X, t, arm


def _two_anova_arms(arms):
    """Therapists nested in two arms, each arm a balanced one-way layout with exact mean squares
    ``(therapists, patients each, between, within)``; arm means 10 and 7. Returns ``y, therapist, arm, X``."""
    ys, ts, a_ = [], [], []
    for a, (G, m, msb, msw) in enumerate(arms):
        ys.append(10.0 - 3.0 * a + _balanced(G, m, msb, msw, seed=4 + a)[0])
        ts.append(np.repeat([f"a{a}t{i}" for i in range(G)], m))
        a_.append(np.full(G * m, a))
    arm = np.concatenate(a_)
    return np.concatenate(ys), np.concatenate(ts), arm, np.column_stack([np.ones(len(arm)), arm])


def _tau2(G, m, msb, msw, method):
    return (msb - msw) / m if method == "REML" else ((1 - 1 / G) * msb - msw) / m


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_per_arm_variances_iccs_and_ratio_are_the_anova_closed_forms(data, method):
    y, X, t, arm = data
    res = ArmVarianceModel(y, X, t, arm, exog_names=["Intercept", "arm"], method=method, arm_residual=True).fit()
    icc = []
    for a, (G, m, msb, msw) in enumerate(ARMS):
        tau2 = _tau2(G, m, msb, msw, method)
        assert res.vcomp[f"therapist[{a}]"] == pytest.approx(tau2, rel=1e-4)
        assert res.vcomp[f"residual[{a}]"] == pytest.approx(msw, rel=1e-5)
        icc.append(tau2 / (tau2 + msw))
    np.testing.assert_allclose(res.icc_point(), icc, rtol=1e-4)
    assert res.ratio_point() == pytest.approx(icc[1] / icc[0], rel=1e-4)
    assert res.fe_params["arm"] == pytest.approx(-3.0, abs=1e-8)
    assert res.fe_params["Intercept"] == pytest.approx(20.0, abs=1e-8)
    # Var(arm mean) = (s2_a + m tau2_a) / (G_a m); the arm effect's variance is the sum over arms
    v = [(msw + m * _tau2(G, m, msb, msw, method)) / (G * m) for G, m, msb, msw in ARMS]
    assert res.bse["Intercept"] == pytest.approx(math.sqrt(v[0]), rel=1e-4)
    assert res.bse["arm"] == pytest.approx(math.sqrt(v[0] + v[1]), rel=1e-4)
    assert not res.singular and res.converged


def _dense_reml(y, X, t, arm, tau2, s2):
    """Restricted log-likelihood with therapist variance ``tau2[arm]`` and residual ``s2[arm]``."""
    V = np.diag(np.asarray(s2)[arm]) + (t[:, None] == t[None, :]) * np.asarray(tau2)[arm][:, None]
    return _dense_loglik(y, X, V, True)


def test_loglik_and_equal_variance_lrt_against_the_dense_likelihood(data):
    """logLik equals the dense restricted likelihood at the estimate; the LRT of equal therapist variances
    is twice the gap to the dense likelihood maximised with one common therapist variance (chi2_1 tail)."""
    y, X, t, arm = data
    res = ArmVarianceModel(y, X, t, arm, exog_names=["Intercept", "arm"], arm_residual=True).fit()
    v = res.vcomp
    full = _dense_reml(y, X, t, arm, [v["therapist[0]"], v["therapist[1]"]], [v["residual[0]"], v["residual[1]"]])
    assert res.loglik == pytest.approx(full, rel=1e-9)

    def neg(z):
        tau2, s0, s1 = np.exp(z)
        return -_dense_reml(y, X, t, arm, [tau2, tau2], [s0, s1])

    z0 = np.log([1.5, 3.0, 2.5])
    null = optimize.minimize(neg, z0, method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-11, "maxiter": 4000})
    stat = 2 * (full + null.fun)
    lrt = res.lrt_equal_variances()
    assert lrt["statistic"] == pytest.approx(stat, rel=1e-5)
    assert lrt["p_value"] == pytest.approx(stats.chi2.sf(stat, 1), rel=1e-4, abs=0)
    assert lrt["df"] == 1


def test_therapist_effects_are_the_per_arm_shrunken_means(data):
    """BLUP of therapist t in arm a: m tau2_a / (s2_a + m tau2_a) (mean_t - mean_a), conditional variance
    tau2_a s2_a / (s2_a + m tau2_a); raw and adjusted means are the therapist's mean (one covariate: arm)."""
    y, X, t, arm = data
    res = ArmVarianceModel(y, X, t, arm, exog_names=["Intercept", "arm"], arm_residual=True).fit()
    eff = res.therapist_effects(level=0.9, higher_is_better=True).set_index("therapist")
    z = stats.norm.ppf(0.95)
    for a, (G, m, msb, msw) in enumerate(ARMS):
        tau2 = _tau2(G, m, msb, msw, "REML")
        sel = arm == a
        labels = np.unique(t[sel])
        means = np.array([y[t == lab].mean() for lab in labels])
        rows = eff.loc[labels]
        assert (rows["arm"] == str(a)).all() and (rows["caseload"] == m).all()
        shrink = m * tau2 / (msw + m * tau2)
        np.testing.assert_allclose(rows["effect"], shrink * (means - y[sel].mean()), rtol=1e-4, atol=1e-9)
        se = math.sqrt(tau2 * msw / (msw + m * tau2))
        np.testing.assert_allclose(rows["effect_se"], se, rtol=1e-4)
        np.testing.assert_allclose(rows["ci_high"] - rows["effect"], z * rows["effect_se"], rtol=1e-12)
        np.testing.assert_allclose(rows["raw_mean"], means, rtol=1e-12)
        np.testing.assert_allclose(rows["adjusted_mean"], means, rtol=1e-10)
    assert len(eff) == sum(G for G, *_ in ARMS)  # cells without patients left out (uncorrelated model)


def test_grad_g_is_the_derivative_of_the_deviance(data):
    """The analytic gradient of the profiled deviance in the relative variances (diagonal G, r = 1)
    against central finite differences of the engine's deviance (REML and ML)."""
    y, X, t, arm = data
    eng = ArmVarianceModel(y, X, t, arm, exog_names=["Intercept", "arm"])._eng
    g = np.array([0.6, 0.3])
    for method in ("REML", "ML"):
        dev, grad = eng.grad_g(g, method)
        assert dev == pytest.approx(eng.deviance(np.diag(g), np.ones(2), method), rel=1e-12)
        h = 1e-5
        fd = [(eng.deviance(np.diag(g + h * e), np.ones(2), method)
               - eng.deviance(np.diag(g - h * e), np.ones(2), method)) / (2 * h) for e in np.eye(2)]
        np.testing.assert_allclose(grad, fd, rtol=1e-6)


@pytest.mark.parametrize("values, feedback, labels, control, fb_label", [
    ([0, 1, 1, 0], 1, ["0", "1", "1", "0"], "0", "1"),
    ([0.0, 1.0, 1.0], 1, ["0", "1", "1"], "0", "1"),
    ([True, False, True], True, ["1", "0", "1"], "0", "1"),
    (["b", "a", "b"], "a", ["b", "a", "b"], "b", "a"),
    ([2.5, 3.0, 2.5], 2.5, ["2.5", "3", "2.5"], "3", "2.5"),
    (np.array([1, 2, 2], dtype=np.int32), np.int64(2), ["1", "2", "2"], "1", "2"),
])
def test_arm_labels_and_levels(values, feedback, labels, control, fb_label):
    got, ctrl, fb = two_arms(values, feedback)
    assert list(got) == labels and ctrl == control and fb == fb_label


# -- profile limits against the dense ML deviance, profiled by a constrained optimiser (scipy SLSQP) --
Q95 = stats.chi2.ppf(0.95, 1)


@pytest.fixture(scope="module")
def crossed():
    """Therapists seeing patients in both arms (correlated effects), four clusters of therapists."""
    rng = np.random.default_rng(12)
    G, m = 12, 4
    t = np.repeat(np.arange(G), 2 * m)
    arm = np.tile(np.repeat([0, 1], m), G)
    cl = t % 4
    u = rng.multivariate_normal([0, 0], [[1.0, 0.3], [0.3, 0.6]], size=G)
    y = 5.0 - arm + u[t, arm] + np.array([-2.0, -0.5, 1.0, 2.5])[cl] + rng.normal(size=len(t)) * np.where(arm, 1.3, 1.0)
    return y, np.column_stack([np.ones(len(y)), arm]), t, arm, cl


def _dense_ml_dev(y, X, t, arm, cl, tau2, rho, s2, vc):
    same_t = t[:, None] == t[None, :]
    sd = np.sqrt(tau2)[arm]
    corr = np.where(arm[:, None] == arm[None, :], 1.0, rho)
    V = np.diag(np.asarray(s2)[arm]) + same_t * corr * np.outer(sd, sd) + vc * (cl[:, None] == cl[None, :])
    return -2.0 * _dense_loglik(y, X, V, False)


def _unpack(u, arm_residual, cluster):
    tau2 = np.exp(2 * u[:2])
    rho = math.tanh(u[2])
    s2 = np.exp(2 * u[3:5]) if arm_residual else np.exp(2 * np.array([u[3], u[3]]))
    vc = math.exp(2 * u[-1]) if cluster else 0.0
    return tau2, rho, s2, vc


TARGETS = {
    "therapist[0]": lambda tau2, rho, s2, vc: tau2[0],
    "therapist[1]": lambda tau2, rho, s2, vc: tau2[1],
    "residual[0]": lambda tau2, rho, s2, vc: s2[0],
    "residual[1]": lambda tau2, rho, s2, vc: s2[1],
    "residual": lambda tau2, rho, s2, vc: s2[0],
    "correlation": lambda tau2, rho, s2, vc: rho,
    "icc[0]": lambda tau2, rho, s2, vc: tau2[0] / (tau2[0] + s2[0] + vc),
    "icc[1]": lambda tau2, rho, s2, vc: tau2[1] / (tau2[1] + s2[1] + vc),
    "icc_ratio": lambda tau2, rho, s2, vc: (tau2[1] / (tau2[1] + s2[1] + vc)) / (tau2[0] / (tau2[0] + s2[0] + vc)),
    "cluster": lambda tau2, rho, s2, vc: vc,
}


DENSE_CASES = [(True, False, name) for name in ("residual[0]", "residual[1]", "therapist[1]", "correlation", "icc[1]",
                                                "icc_ratio")] + [
    (False, True, name) for name in ("residual", "cluster", "therapist[0]", "icc[0]", "icc_ratio")] + [
    (True, True, "cluster"), (False, True, "correlation")]


@pytest.mark.parametrize("arm_residual, cluster, name", DENSE_CASES)
def test_profile_limits_are_roots_of_the_dense_ml_profile(crossed, arm_residual, cluster, name):
    """Correlated arm effects (and a cluster level): each profile limit is where the dense ML deviance, minimised
    under the constraint target = limit, exceeds its minimum by qchisq(.95, 1)."""
    y, X, t, arm, cl = crossed
    kw = {"exog_names": ["Intercept", "arm"], "correlated": True, "arm_residual": arm_residual}
    if cluster:
        kw.update(cluster=cl, cluster_random=True)
    res = ArmVarianceModel(y, X, t, arm, **kw).fit()
    ml = ArmVarianceModel(y, X, t, arm, method="ML", **kw).fit()
    v = ml.vcomp
    s2 = [v["residual[0]"], v["residual[1]"]] if arm_residual else [v["residual"]]
    u_hat = np.r_[0.5 * np.log([v["therapist[0]"], v["therapist[1]"]]), math.atanh(ml.correlation), 0.5 * np.log(s2),
                  [0.5 * math.log(v["cluster"])] if cluster else []]

    def dev(u):
        return _dense_ml_dev(y, X, t, arm, cl, *_unpack(u, arm_residual, cluster))

    dmin = dev(u_hat)
    assert dmin == pytest.approx(-2 * ml.loglik, rel=1e-9)
    # the profile starts from the ML estimate of the target
    assert res._targets("ML")[name].estimate == pytest.approx(TARGETS[name](*_unpack(u_hat, arm_residual, cluster)),
                                                              rel=1e-5)
    lo, hi = res.profile_interval(name)
    assert np.isfinite(lo) and np.isfinite(hi)
    for end in (lo, hi):
        if end in (0.0, 1.0, -1.0):  # an edge of the parameter space (checked elsewhere)
            continue
        cons = {"type": "eq", "fun": lambda u, end=end: TARGETS[name](*_unpack(u, arm_residual, cluster)) - end}
        u = u_hat
        for _ in range(3):  # SLSQP restarted from its own answer (it stops early on this problem)
            u = optimize.minimize(dev, u, method="SLSQP", options={"ftol": 1e-13, "maxiter": 1000},
                                  constraints=cons).x
        assert abs(cons["fun"](u)) < 1e-7
        assert dev(u) - dmin == pytest.approx(Q95, abs=1e-3), (name, end)


@pytest.mark.parametrize("arm_residual, cluster, shrink", [(False, False, 1.0), (True, True, 1.0), (True, True, 0.2)])
def test_equal_variance_lrt_of_correlated_models_against_the_dense_likelihood(crossed, arm_residual, cluster, shrink):
    """ML fits: the statistic is the dense ML deviance minimised with one common therapist variance
    (correlation, residual(s) and cluster variance free) minus the fitted deviance. ``shrink`` scales the
    cluster effects (0.2: a cluster SD below the residual SD)."""
    y, X, t, arm, cl = crossed
    y = y - (1.0 - shrink) * np.array([-2.0, -0.5, 1.0, 2.5])[cl]
    kw = {"exog_names": ["Intercept", "arm"], "correlated": True, "arm_residual": arm_residual, "method": "ML"}
    if cluster:
        kw.update(cluster=cl, cluster_random=True)
    ml = ArmVarianceModel(y, X, t, arm, **kw).fit()

    def dev_null(w):  # w = (log tau, atanh rho, log s [, log s1] [, log sc])
        return _dense_ml_dev(y, X, t, arm, cl, *_unpack(np.r_[w[0], w], arm_residual, cluster))

    v = ml.vcomp
    s2 = [v["residual[0]"], v["residual[1]"]] if arm_residual else [v["residual"]]
    w = np.r_[0.25 * math.log(v["therapist[0]"] * v["therapist[1]"]), math.atanh(min(ml.correlation, 0.99)),
              0.5 * np.log(s2), [0.5 * math.log(v["cluster"])] if cluster else []]
    for _ in range(3):
        w = optimize.minimize(dev_null, w, method="Nelder-Mead",
                              options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000, "maxfev": 20000}).x
    stat = dev_null(w) + 2 * ml.loglik
    lrt = ml.lrt_equal_variances()
    assert lrt["statistic"] == pytest.approx(stat, abs=1e-5)
    assert lrt["p_value"] == pytest.approx(stats.chi2.sf(stat, 1), rel=1e-4, abs=0)


def test_contract_entry_carries_the_requested_intervals(crossed):
    """to_contract with bootstrap intervals (a few seeded replicates): each entry holds the interval that
    conf_int / icc_by_arm / icc_ratio give for the same seed, under the contract's field names; fixed effects
    get Wald intervals; the LRT is lrt_equal_variances'; icc_by_arm names the roles."""
    y, X, t, arm, _ = crossed
    df = pd.DataFrame({"y": y, "therapist": t, "arm": arm})
    res = ArmVarianceModel.from_frame(df, "y", correlated=True, arm_residual=True).fit()
    kw = {"method": "bootstrap", "n_boot": 6, "seed": 3}
    entry = res.to_contract(interval="bootstrap", n_boot=6, seed=3)
    ci = res.conf_int(0.95, **kw)
    for name in ("therapist[0]", "therapist[1]", "residual[0]", "residual[1]"):
        lo, hi = ci.loc[name]
        assert entry["variance_components"][name] == {"estimate": res.vcomp[name], "ci_low": lo, "ci_high": hi}
        assert lo < hi
    assert set(entry["variance_components"]) == {"therapist[0]", "therapist[1]", "residual[0]", "residual[1]"}
    lo, hi = ci.loc["correlation"]
    assert entry["correlation"] == {"estimate": res.correlation, "ci_low": lo, "ci_high": hi}
    icc = res.icc_by_arm(**kw)
    assert list(icc["role"]) == ["control", "feedback"] and list(icc["ci_method"]) == ["bootstrap"] * 2
    for lv in ("0", "1"):
        assert entry["icc_by_arm"][lv] == {"estimate": res.icc_point()[int(lv)], "ci_low": icc.loc[lv, "ci_low"],
                                           "ci_high": icc.loc[lv, "ci_high"], "ci_method": "bootstrap"}
    ratio = res.icc_ratio(**kw)
    assert entry["icc_ratio"] == ratio and ratio["estimate"] == res.ratio_point()
    assert entry["icc_reduction"] == {"estimate": 1 - ratio["estimate"], "ci_low": 1 - ratio["ci_high"],
                                      "ci_high": 1 - ratio["ci_low"], "ci_method": "bootstrap"}
    z = stats.norm.ppf(0.975)
    assert set(entry["fixed_effects"]) == set(res.fe_params.index) and len(res.fe_params) == 2
    for nm in res.fe_params.index:
        b, se = res.fe_params[nm], res.bse[nm]
        assert entry["fixed_effects"][nm] == pytest.approx({"estimate": b, "se": se, "ci_low": b - z * se,
                                                            "ci_high": b + z * se}, rel=1e-12)
    lrt = res.lrt_equal_variances()
    assert entry["lrt_equal_variances"] == {"statistic": lrt["statistic"], "df": 1, "p_value": lrt["p_value"]}
    assert entry["method"] == "REML" and entry["family"] == "gaussian" and entry["n_patients"] == len(y)
    assert entry["n_therapists"] == 12 and entry["feedback_level"] == "1" and entry["control_level"] == "0"


def test_conf_int_level_reaches_both_profile_methods(data):
    """conf_int at level .90: exact limits ('profile_exact') are the closed-form ANOVA roots at .90; lme4's
    spline-interpolated limits ('profile', the default) are close to them on this smooth profile."""
    y, X, t, arm = data
    res = ArmVarianceModel(y, X, t, arm, exog_names=["Intercept", "arm"]).fit()
    exact = res.conf_int(0.90, method="profile_exact")
    spline = res.conf_int(0.90)
    for name in ("therapist[0]", "residual"):
        want = _closed_limits(name, res._targets("ML")[name].estimate, "ML", False, level=0.90)
        assert tuple(exact.loc[name]) == pytest.approx(want, rel=1e-7)
        assert tuple(spline.loc[name]) == pytest.approx(want, rel=5e-3)
    icc = res.icc_by_arm(0.9, "profile_exact", deviance="REML")  # the restricted likelihood's profile
    want = _closed_limits("icc[0]", res._targets("REML")["icc[0]"].estimate, "REML", False, level=0.90)
    assert (icc.loc["0", "ci_low"], icc.loc["0", "ci_high"]) == pytest.approx(want, rel=1e-7)
    fe = exact.loc["arm"]
    z = stats.norm.ppf(0.95)
    assert tuple(fe) == pytest.approx((res.fe_params["arm"] - z * res.bse["arm"], res.fe_params["arm"] + z *
                                       res.bse["arm"]), rel=1e-12)


def test_therapist_effects_refused_with_a_random_cluster_level(crossed):
    y, X, t, arm, cl = crossed
    res = ArmVarianceModel(y, X, t, arm, cluster=cl, cluster_random=True).fit()
    with pytest.raises(ModelError, match="^therapist_effects\\(\\) is not available with cluster_random=True"):
        res.therapist_effects()


# -- profile limits against the closed-form profiles of the per-arm balanced one-way ANOVA --
# With X = [1, arm] and therapists in one arm each, the -2 log likelihood is a sum over arms of
#   G (m - 1) log s2 + SSW / s2 + k log w + SSB / w,   w = s2 + m tau2 >= s2,
# k = G (ML) or G - 1 (REML; the log-determinant of X'V^-1 X gives -log w per arm), up to constants.


def _arm_dev(arm_, tau2, s2, method):
    G, m, msb, msw = ARMS[arm_]
    k = G if method == "ML" else G - 1
    w = s2 + m * tau2
    return G * (m - 1) * math.log(s2) + G * (m - 1) * msw / s2 + k * math.log(w) + (G - 1) * msb / w


def _arm_dev_min_tau2(arm_, s2, method):
    """Minimum over tau2 >= 0 at a fixed residual variance: w = SSB / k, or s2 if that is smaller."""
    G, m, msb, _ = ARMS[arm_]
    k = G if method == "ML" else G - 1
    return _arm_dev(arm_, (max((G - 1) * msb / k, s2) - s2) / m, s2, method)


def _min_log(f):
    """Minimum of ``f`` over a positive scalar (a Brent search on its log, brackets checked)."""
    res = optimize.minimize_scalar(lambda v: f(math.exp(v)), bounds=(-8.0, 8.0), method="bounded",
                                   options={"xatol": 1e-11})
    assert -7.9 < res.x < 7.9
    return res.fun


def _icc_dev(arm_, c, s2, method):
    return _arm_dev(arm_, c * s2 / (1 - c), s2, method)


def _closed_profile(name, c, method, arm_residual):
    """The profiled -2 log likelihood at ``name = c`` (not yet minus the minimum)."""
    if name == "icc_ratio":  # icc_1 = c icc_0, one-dimensional in icc_0
        def inner(i0):
            if not arm_residual:  # one residual variance: s2 at its optimum in closed form given the ICCs
                w = [1 + ARMS[a][1] * i / (1 - i) for a, i in ((0, i0), (1, c * i0))]  # (s2 + m tau2) / s2
                k = [G if method == "ML" else G - 1 for G, *_ in ARMS]
                dfs = sum(G * (m - 1) + k[a] for a, (G, m, _, _) in enumerate(ARMS))
                s2 = sum(G * (m - 1) * msw + (G - 1) * msb / w[a] for a, (G, m, msb, msw) in enumerate(ARMS)) / dfs
                return sum(_icc_dev(a, i, s2, method) for a, i in ((0, i0), (1, c * i0)))
            return sum(_min_log(lambda s2, a=a, i=i: _icc_dev(a, i, s2, method)) for a, i in ((0, i0), (1, c * i0)))

        hi = min(1.0, 1.0 / c) * (1 - 1e-9)
        grid = np.linspace(hi * 1e-3, hi * (1 - 1e-6), 60)
        j = int(np.argmin([inner(v) for v in grid]))
        res = optimize.minimize_scalar(inner, bounds=(grid[max(j - 1, 0)], grid[min(j + 1, 59)]), method="bounded",
                                       options={"xatol": 1e-12})
        return res.fun
    base, _, lv = name.partition("[")
    a = int(lv[0]) if lv else None
    if arm_residual:  # the arms factorise: only arm a's factor moves
        if base == "therapist":
            return _min_log(lambda s2: _arm_dev(a, c, s2, method))
        if base == "residual":
            return _arm_dev_min_tau2(a, c, method)
        return _min_log(lambda s2: _icc_dev(a, c, s2, method))
    # one residual variance: the other arm's therapist variance at its optimum given s2
    if base == "residual":
        return sum(_arm_dev_min_tau2(b, c, method) for b in (0, 1))
    own = (lambda s2: _arm_dev(a, c, s2, method)) if base == "therapist" else (lambda s2: _icc_dev(a, c, s2, method))
    return _min_log(lambda s2: own(s2) + _arm_dev_min_tau2(1 - a, s2, method))


def _closed_limits(name, estimate, method, arm_residual, level=0.95):
    """Roots of profile - minimum = qchisq(level, 1) either side of the estimate (0 where the profile stays
    below the cut-off down to 0)."""
    q = stats.chi2.ppf(level, 1)
    dmin = _closed_profile(name, estimate, method, arm_residual)

    def excess(c):
        return _closed_profile(name, c, method, arm_residual) - dmin - q

    lo_edge = 1e-12 if name.startswith("residual") or name == "icc_ratio" else 0.0
    lo = 0.0 if excess(max(lo_edge, 1e-12)) < 0 else optimize.brentq(excess, max(lo_edge, 1e-12), estimate,
                                                                     xtol=1e-14, rtol=1e-12)
    top = estimate
    while True:
        top = min(2 * top, (1 + top) / 2) if name.startswith("icc[") else 2 * top
        if excess(top) > 0:
            break
    return lo, optimize.brentq(excess, estimate, top, xtol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("name, method, arm_residual", [
    ("therapist[0]", "ML", True), ("therapist[1]", "ML", True), ("residual[0]", "ML", True),
    ("residual[1]", "ML", True), ("icc[0]", "ML", True), ("icc[1]", "ML", True), ("icc_ratio", "ML", True),
    ("therapist[1]", "REML", True), ("residual", "ML", False), ("therapist[0]", "ML", False),
    ("icc[1]", "ML", False), ("icc_ratio", "ML", False),
])
def test_profile_limits_are_the_roots_of_the_closed_form_anova_profile(data, name, method, arm_residual):
    """profile_interval (deviance ML, or REML) against the likelihood-ratio roots of the closed-form profile."""
    y, X, t, arm = data
    res = ArmVarianceModel(y, X, t, arm, exog_names=["Intercept", "arm"], arm_residual=arm_residual).fit()
    lo, hi = res.profile_interval(name, deviance=method.lower())
    est = res._targets(method)[name].estimate
    want = _closed_limits(name, est, method, arm_residual)
    assert (lo, hi) == pytest.approx(want, rel=1e-7, abs=1e-12), name


# -- arm.py: bad input, the design, the parameter count, summary and icc() --
def _small():
    """Six therapists, each with two patients in each arm; cluster = therapist // 2."""
    t = np.repeat(np.arange(6), 4)
    arm = np.tile([0, 0, 1, 1], 6)
    y = np.sin(np.arange(24.0)) + t * 0.3
    return y, np.column_stack([np.ones(24), arm]), t, arm


@pytest.mark.parametrize("change, message", [
    ({"method": "REMLX"}, "method must be 'REML' or 'ML', got 'REMLX'"),
    ({"exog": np.ones((23, 2))}, "exog has 23 rows but endog has 24"),
    ({"therapist": np.arange(23)}, "therapist and arm must have one entry per patient"),
    ({"arm": np.zeros(23)}, "therapist and arm must have one entry per patient"),
    ({"endog": np.r_[np.nan, np.ones(23)]},
     "outcome or covariates contain missing or infinite values; drop them before fitting"),
    ({"exog": np.column_stack([np.ones(24), np.r_[np.inf, np.ones(23)]])},
     "outcome or covariates contain missing or infinite values; drop them before fitting"),
    ({"therapist": np.r_[None, np.arange(23)]},
     "therapist or arm contains missing values; drop those patients before fitting"),
    ({"arm": np.r_[None, np.tile([0, 0, 1, 1], 6)[1:]]},
     "therapist or arm contains missing values; drop those patients before fitting"),
    ({"arm": np.tile([0, 1, 2, 2], 6)}, "arm must have exactly two levels (control, feedback), found ['0', '1', '2']"),
    ({"feedback_level": 2}, "feedback_level '2' is not a level of arm (levels: ['0', '1'])"),
    ({"cluster_random": True}, "cluster_random=True needs the cluster (trial/service) of each patient"),
    ({"cluster_random": True, "cluster": np.repeat([0, 1], 12)},
     "a random cluster level needs at least three clusters, found 2"),
    ({"exog_names": ["a"]}, "exog_names has 1 names for 2 columns"),
    ({"exog": np.column_stack([np.ones(24), np.ones(24)]), "exog_names": ["a", "b"]},
     "fixed-effects design ['a', 'b'] is rank deficient"),
    ({"arm": np.r_[np.zeros(4), np.ones(20)]},
     "arm '0' has patients of fewer than two therapists; its therapist variance cannot be estimated"),
    ({"arm": np.r_[np.zeros(20), np.ones(4)]},
     "arm '1' has patients of fewer than two therapists; its therapist variance cannot be estimated"),
    ({"arm": np.r_[np.tile([0, 0, 1, 1], 2), np.tile([0, 0, 0, 0], 2), np.tile([1, 1, 1, 1], 2)], "correlated": True},
     "correlated=True needs at least three therapists who treat patients in both arms"),
])
def test_bad_input_is_refused_with_its_reason(change, message):
    y, X, t, arm = _small()
    kw = {"endog": y, "exog": X, "therapist": t, "arm": arm, **change}
    with pytest.raises(ModelError, match=f"^{re.escape(message)}$"):
        ArmVarianceModel(**kw)


def test_lower_case_method_and_three_mixed_therapists_are_accepted():
    y, X, t, arm = _small()
    m = ArmVarianceModel(y, X, t, np.r_[np.tile([0, 0, 1, 1], 3), np.tile([0, 0, 0, 0], 2), np.ones(4)], method="ml",
                         correlated=True)
    assert m.method == "ML" and m.exog_names == ["x0", "x1"] and m.n_clusters is None
    m = ArmVarianceModel(y, X[:, 1], t, arm, cluster=t // 2, cluster_random=True)  # one column, three clusters
    assert m._eng.p == 1 and m.n_clusters == 3 and list(m.therapist_labels) == [f"{c}:{i}" for i, c in
                                                                                enumerate(np.arange(6) // 2)]
    assert ArmVarianceModel(y, X, t, arm, cluster=t).n_clusters == 6


def test_from_frame_design_names_and_errors():
    """The arm indicator is named after a 0/1 arm column with feedback_level 1, else R-style; listed among the
    covariates it keeps its place; include_arm=False leaves it out; bad columns / missing values are refused."""
    y, X, t, arm = _small()
    df = pd.DataFrame({"y": y, "x": np.cos(np.arange(24.0)), "therapist": t, "arm": arm,
                       "cond": np.where(arm == 1, "ROM", "TAU")})
    m = ArmVarianceModel.from_frame(df, "y", ["x"])
    assert m.exog_names == ["(Intercept)", "x", "arm"] and m.outcome_name == "y" and m.arm_name == "arm"
    assert m.therapist_name == "therapist"
    np.testing.assert_array_equal(m._eng.X[:, 2], arm)
    assert ArmVarianceModel.from_frame(df, "y", ["arm", "x"]).exog_names == ["(Intercept)", "arm", "x"]
    assert ArmVarianceModel.from_frame(df, "y", ["x"], include_arm=False).exog_names == ["(Intercept)", "x"]
    m = ArmVarianceModel.from_frame(df, "y", ["x"], arm="cond", feedback_level="ROM")
    assert m.exog_names == ["(Intercept)", "x", "condROM"] and m.arm_levels == ["TAU", "ROM"]
    np.testing.assert_array_equal(m._eng.X[:, 2], arm)
    m = ArmVarianceModel.from_frame(df, "y", [], feedback_level=0)
    assert m.exog_names == ["(Intercept)", "arm0"] and m.arm_levels == ["1", "0"]
    np.testing.assert_array_equal(m._eng.X[:, 1], 1 - arm)
    with pytest.raises(ModelError, match=r"^column 'z' is not in the patient table \(columns: \['y', 'x', "):
        ArmVarianceModel.from_frame(df, "y", ["z"])
    with pytest.raises(ModelError, match=r"^column 'site' is not in the patient table"):
        ArmVarianceModel.from_frame(df, "y", [], cluster="site")
    bad = df.assign(x=np.r_[np.nan, np.ones(23)])
    with pytest.raises(ModelError, match=re.escape("1 rows have missing values in ['y', 'therapist', 'arm', 'x']; "
                                                   "drop them before fitting")):
        ArmVarianceModel.from_frame(bad, "y", ["x"])
    with pytest.raises(ModelError, match=re.escape("feedback_level '2' is not a level of 'arm' (levels: ['0', '1'])")):
        ArmVarianceModel.from_frame(df, "y", [], feedback_level=2)


@pytest.mark.parametrize("kw, k", [({}, 3), ({"arm_residual": True}, 4), ({"correlated": True}, 4),
                                   ({"correlated": True, "arm_residual": True, "cluster_random": True}, 6)])
def test_aic_and_bic_count_lme4s_parameters(crossed, kw, k):
    """lme4's df of logLik: the fixed effects, the covariance parameters and the residual scale."""
    y, X, t, arm, cl = crossed
    res = ArmVarianceModel(y, X, t, arm, cluster=cl, **kw).fit()
    assert res.aic == pytest.approx(-2 * res.loglik + 2 * (2 + k), rel=1e-12)
    assert res.bic == pytest.approx(-2 * res.loglik + math.log(96) * (2 + k), rel=1e-12)
    assert res.n_patients == 96 and res.n_therapists == 12


def test_summary_and_icc_report_the_arm_iccs(crossed):
    y, X, t, arm, _ = crossed
    res = ArmVarianceModel(y, X, t, arm, correlated=True, method="ML").fit()
    s = res.summary()
    assert s.title == "Arm-specific therapist variances (ML); control = 0, feedback = 1"
    assert s.info["correlation"] == res.correlation and -1 < res.correlation < 1
    assert s.info["ICC ratio (fb/ctrl)"] == res.ratio_point()
    assert s.info["ICC reduction"] == pytest.approx(1 - res.ratio_point(), rel=1e-15)
    v = res.vcomp
    c = v["cov(therapist)"] / math.sqrt(v["therapist[0]"] * v["therapist[1]"])
    assert res.correlation == pytest.approx(c, rel=1e-12)
    icc = res.icc()
    assert math.isnan(icc) and list(icc.table.index) == ["icc[0]", "icc[1]"]
    assert list(icc.table["role"]) == ["control", "feedback"]
    np.testing.assert_allclose(icc.table["estimate"], [v[f"therapist[{a}]"] / (v[f"therapist[{a}]"] + v["residual"])
                                                       for a in (0, 1)], rtol=1e-12)
    with_ci = res.icc(0.9, "bootstrap", n_boot=4, seed=2)
    by_arm = res.icc_by_arm(0.9, "bootstrap", n_boot=4, seed=2)
    assert list(with_ci.table["ci_low"]) == list(by_arm["ci_low"]) and list(with_ci.table["ci_method"]) == [
        "bootstrap"] * 2
    with pytest.raises(ModelError, match="^interval method must be 'profile', 'profile_exact' or 'bootstrap', got "
                                         "'wald'$"):
        res.icc_ratio(method="wald")


# -- lme4's spline inversion: R's predict(backSpline(interpSpline(x, y)), at) (tests/reference/backspline.R) --
BACKSPLINE = json.loads((REFERENCE_DIR / "backspline.json").read_text())


@pytest.mark.parametrize("case", ["increasing", "convex", "decreasing", "four"])
def test_backspline_matches_r(case):
    c = BACKSPLINE[case]
    want = np.array([np.nan if v is None else v for v in c["value"]], dtype=float)
    x, y = np.array(c["x"]), np.array(c["y"])
    for order in (slice(None), slice(None, None, -1)):  # the knots in any order
        got = _r_backspline_predict(x[order], y[order], c["at"])
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_backspline_falls_back_to_linear_interpolation():
    """Fewer than four points, or a profile with a flat step: the inverse of the broken line through the points
    (NaN outside the range of y); a profile that is not monotone gives NaN everywhere (lme4's confint.thpr)."""
    x, y = np.array([0.0, 1.0, 3.0]), np.array([-1.0, 0.5, 2.5])
    got = _r_backspline_predict(x[::-1], y[::-1], [-1.5, -1.0, 0.0, 1.5, 2.5, 3.0])
    np.testing.assert_allclose(got, [np.nan, 0.0, 2 / 3, 2.0, 3.0, np.nan], rtol=1e-14)
    x, y = np.arange(5.0), np.array([-2.0, -1.0, -1.0, 0.5, 1.5])
    np.testing.assert_allclose(_r_backspline_predict(x, y, [-3.0, -1.5, 1.0]), [np.nan, 0.5, 3.5], rtol=1e-14)
    x, y = np.arange(5.0), np.array([-0.2, 0.1, 0.05, 0.3, 0.4])  # not monotone (steps below 1)
    assert np.isnan(_r_backspline_predict(x, y, [0.0, 0.2])).all()


# -- the parametric bootstrap --
def test_bootstrap_replicates_follow_the_anova_sampling_distribution(data):
    """Data simulated from the per-arm ANOVA fit (therapist variance 1.8 and 0.3, residual 3 and 2.5): the
    replicates' residual variances average the fitted ones (msw is unbiased), the therapist variance of arm 0 its
    fitted value; each row's ICCs and ratio are its variances' (and the intervals the replicates' percentiles)."""
    y, X, t, arm = data
    res = ArmVarianceModel(y, X, t, arm, exog_names=["Intercept", "arm"], arm_residual=True).fit()
    draws = res._bootstrap(30, 5)
    assert len(draws) == 30 and draws.drop(columns="correlation").notna().all().all()
    assert draws["residual[0]"].mean() == pytest.approx(3.0, rel=0.2)
    assert draws["residual[1]"].mean() == pytest.approx(2.5, rel=0.2)
    assert draws["therapist[0]"].mean() == pytest.approx(1.8, rel=0.4)
    assert (draws["cluster"] == 0).all()
    both = (draws["therapist[0]"] > 0) & (draws["therapist[1]"] > 0)  # else no correlation
    assert 5 < both.sum() < 30 and (draws["correlation"][both] == 0).all()
    assert draws["correlation"][~both].isna().all()
    for a in (0, 1):
        tau2, s2 = draws[f"therapist[{a}]"], draws[f"residual[{a}]"]
        np.testing.assert_allclose(draws[f"icc[{a}]"], tau2 / (tau2 + s2), rtol=1e-9)
    np.testing.assert_allclose(draws["icc_ratio"], draws["icc[1]"] / draws["icc[0]"], rtol=1e-12)
    ci = res.conf_int(0.9, method="bootstrap", n_boot=30, seed=5)
    for name in ("therapist[0]", "therapist[1]", "residual[0]", "residual[1]"):
        assert tuple(ci.loc[name]) == pytest.approx(np.quantile(draws[name], [0.05, 0.95]), rel=1e-12)
    ratio = res.icc_ratio(0.8, "bootstrap", n_boot=30, seed=5)
    assert (ratio["ci_low"], ratio["ci_high"]) == pytest.approx(np.quantile(draws["icc_ratio"], [0.1, 0.9]), rel=1e-12)


def test_bootstrap_of_a_cluster_level_and_a_common_residual(crossed):
    """With a random cluster level the replicates draw cluster effects too: their cluster variances are of the
    order of the fitted one (4 clusters: a chi-square with 3 df spreads them over a factor of about 40)."""
    y, X, t, arm, cl = crossed
    res = ArmVarianceModel(y, X, t, arm, cluster=cl, cluster_random=True).fit()
    draws = res._bootstrap(8, 1)
    assert draws["cluster"].notna().all()
    assert 0.1 < draws["cluster"].median() / res.vcomp["cluster"] < 10
    np.testing.assert_allclose(draws["residual[0]"], draws["residual[1]"], rtol=1e-12)
    np.testing.assert_allclose(draws["icc[0]"], draws["therapist[0]"] / (draws["therapist[0]"] + draws["cluster"]
                                                                         + draws["residual[0]"]), rtol=1e-9)
    lo, hi = res.conf_int(method="bootstrap", n_boot=8, seed=1).loc["residual"]
    assert (lo, hi) == pytest.approx(np.quantile(draws["residual[0]"], [0.025, 0.975]), rel=1e-12)


def test_lme4_profile_of_a_variance_estimated_at_zero():
    """lme4's confint(fit, method = "profile") of the arm model on 8 therapists whose feedback-arm variance is
    estimated at 0 (tests/reference/arm_singular_profile.R): the lme4-style profile from the boundary."""
    ref = json.loads((REFERENCE_DIR / "arm_singular_profile.json").read_text())
    fb = pd.read_csv(REFERENCE_DIR / "therapy_feedback.csv")
    small = fb[fb["therapist_id"].isin(ref["therapists"])]
    with pytest.warns(SingularFitWarning):
        res = ArmVarianceModel.from_frame(small, "phq9_post", ["phq9_pre"], therapist="therapist_id",
                                          arm="feedback").fit()
    assert res.vcomp["therapist[1]"] == 0.0
    for name, key in (("therapist[0]", "control"), ("therapist[1]", "feedback"), ("residual", "Residual")):
        assert res.vcomp[name] == pytest.approx(ref["variance"][key], rel=1e-4, abs=1e-12)
        lo, hi = res.lme4_profile_interval(name)
        assert (lo, hi) == pytest.approx(ref["variance_ci"][key], rel=1e-3), name
    lo, hi = res.profile_interval("icc_ratio")  # feedback ICC 0: the ratio's estimate 0 is the lower limit
    assert lo == 0.0 and 0.0 < hi < math.inf


def test_correlated_therapist_effects_are_the_dense_blups(crossed):
    """Correlated arm effects: the BLUPs G Z' V^-1 (y - X b) and conditional variances G - G Z' V^-1 Z G (fixed
    effects known) from the dense covariance; therapist 0 has no feedback-arm patients, and its feedback-arm effect
    is still predicted (through the correlation), with caseload 0 and no means."""
    y, X, t, arm, _ = crossed
    keep = ~((t == 0) & (arm == 1))
    y, X, t, arm = y[keep], X[keep], t[keep], arm[keep]
    res = ArmVarianceModel(y, X, t, arm, correlated=True).fit()
    eff = res.therapist_effects(level=0.8).set_index(["therapist", "arm"])
    G = res.cov_re
    Z = np.zeros((len(y), 24))
    Z[np.arange(len(y)), 2 * t + arm] = 1.0
    Gf = np.kron(np.eye(12), G)
    V = res.vcomp["residual"] * np.eye(len(y)) + Z @ Gf @ Z.T
    ZGV = np.linalg.solve(V, Z @ Gf).T  # G Z' V^-1
    u = ZGV @ (y - X @ res.fe_params.to_numpy())
    cvar = np.diag(Gf - ZGV @ Z @ Gf)
    assert len(eff) == 24
    got = eff.loc[[(str(i), str(a)) for i in range(12) for a in (0, 1)]]  # (labels are strings)
    np.testing.assert_allclose(got["effect"], u, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got["effect_se"], np.sqrt(cvar), rtol=1e-6)
    z = stats.norm.ppf(0.9)
    np.testing.assert_allclose(got["ci_low"], u - z * np.sqrt(cvar), rtol=1e-6, atol=1e-9)
    empty = eff.loc[("0", "1")]
    assert empty["caseload"] == 0 and math.isnan(empty["raw_mean"]) and math.isnan(empty["adjusted_mean"])
    assert eff.loc[("0", "0"), "caseload"] == 4


def test_wald_request_falls_back_to_profile_intervals_with_a_warning(data):
    """to_contract(interval="wald"): variance components get lme4's profile intervals instead, and the fit's
    warnings say so; therapist_effects() gives 95% intervals by default."""
    y, X, t, arm = data
    res = ArmVarianceModel(y, X, t, arm, exog_names=["Intercept", "arm"]).fit()
    text = ("Wald intervals are not offered for variance components, ICCs or correlations; profile-likelihood "
            "intervals are reported instead")
    with pytest.warns(StatisticalWarning, match=f"^{re.escape(text)}$"):
        entry = res.to_contract(interval="wald")
    assert entry["warnings"] == [text] and entry["icc_ratio"]["ci_method"] == "profile"
    lo, hi = res.lme4_profile_interval("therapist[0]")
    assert entry["variance_components"]["therapist[0]"] == {"estimate": res.vcomp["therapist[0]"], "ci_low": lo,
                                                            "ci_high": hi}
    eff = res.therapist_effects()
    np.testing.assert_allclose(eff["ci_high"] - eff["effect"], stats.norm.ppf(0.975) * eff["effect_se"], rtol=1e-12)


@pytest.mark.parametrize("g", [[-1.0, -1.0], [np.inf, 1.0]])
def test_grad_g_outside_the_parameter_space_is_an_infinite_deviance_with_a_zero_gradient(data, g):
    """Relative variances that make ``X'H^-1 X`` indefinite (Cholesky fails) or the residual sum of squares
    undefined (NaN) give the deviance +inf and a zero gradient of the parameters' length, so that SLSQP
    steps back instead of failing on an array of the wrong shape."""
    y, X, t, arm = data
    eng = ArmVarianceModel(y, X, t, arm, exog_names=["Intercept", "arm"])._eng
    with np.errstate(all="ignore"):
        dev, grad = eng.grad_g(np.array(g), "REML")
    assert dev == np.inf
    assert grad.shape == (2,) and grad.dtype == float and not grad.any()


def _failing(real, which):
    """scipy.optimize.minimize that reports failure for the methods in ``which`` (the iterate unchanged);
    with ``"start"`` in ``which`` a failing method also returns its start, as if it had not moved."""
    def minimize(f, x0, *args, method=None, **kw):
        res = real(f, x0, *args, method=method, **kw)
        if method in which:
            res.success = False
            if "start" in which:
                res.x, res.fun = np.asarray(x0, dtype=float), f(np.asarray(x0, dtype=float))
        return res
    return minimize


@pytest.mark.parametrize("fail, converged", [
    ((), True), (("SLSQP",), True), (("Nelder-Mead",), True), (("SLSQP", "Nelder-Mead"), False),
])
def test_convergence_is_the_report_of_either_optimiser(data, monkeypatch, fail, converged):
    """A fit is converged when SLSQP or the Nelder-Mead polish reports success (the estimate is the
    ANOVA closed form either way); when both report failure the fit says so with a ConvergenceWarning."""
    y, X, t, arm = data
    monkeypatch.setattr(optimize, "minimize", _failing(optimize.minimize, fail))
    model = ArmVarianceModel(y, X, t, arm, exog_names=["Intercept", "arm"], arm_residual=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = model.fit()
    conv = [w for w in rec if issubclass(w.category, ConvergenceWarning)]
    assert res.converged is converged
    if converged:
        assert not conv
    else:
        assert [str(w.message) for w in conv] == ["optimiser did not report convergence (optimiser reported failure)"]
    for a, (G, m, msb, msw) in enumerate(ARMS):
        assert res.vcomp[f"therapist[{a}]"] == pytest.approx(_tau2(G, m, msb, msw, "REML"), rel=1e-4)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_analytic_gradient_alone_reaches_the_optimum(monkeypatch, method):
    """Uncorrelated arm effects with one residual variance use SLSQP with the analytic gradient and no
    polish: with the Nelder-Mead polish disabled (it returns its start) the fit is still converged and at
    the ANOVA closed forms (equal within-therapist mean squares in both arms, so one residual variance
    is each arm's own estimate)."""
    arms = [(8, 5, 12.0, 3.0), (9, 5, 4.0, 3.0)]
    y, t, arm, X = _two_anova_arms(arms)
    monkeypatch.setattr(optimize, "minimize", _failing(optimize.minimize, ("Nelder-Mead", "start")))
    res = ArmVarianceModel(y, X, t, arm, exog_names=["Intercept", "arm"], method=method).fit()
    assert res.converged
    assert res.vcomp["residual"] == pytest.approx(3.0, rel=1e-6)
    for a, (G, m, msb, msw) in enumerate(arms):
        assert res.vcomp[f"therapist[{a}]"] == pytest.approx(_tau2(G, m, msb, msw, method), rel=1e-6)


def test_ml_refit_for_the_profiles_ignores_runtime_warnings(data, monkeypatch):
    """The ML optimum behind ML profiles is computed with RuntimeWarnings (overflow at extreme trial values)
    silenced and other warnings untouched."""
    y, X, t, arm = data
    res = ArmVarianceModel(y, X, t, arm, exog_names=["Intercept", "arm"], arm_residual=True).fit()
    real = res.model._optimise

    def noisy(method, start=None):
        warnings.warn("overflow", RuntimeWarning)
        return real(method, start=start)

    monkeypatch.setattr(res.model, "_optimise", noisy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = res._optimum("ML")
    assert opt.method == "ML" and opt.converged
    G, m, msb, msw = ARMS[0]
    assert opt.G[0, 0] * opt.r[0] == pytest.approx(_tau2(G, m, msb, msw, "ML") / msw, rel=1e-4)


@pytest.mark.parametrize("call", ["conf_int", "icc_by_arm", "icc_ratio", "icc_reduction"])
def test_an_unknown_deviance_is_refused(data, call):
    """``deviance`` names the profiled likelihood, ML or REML (either case); anything else is an error,
    not a silent ML profile."""
    y, X, t, arm = data
    res = ArmVarianceModel(y, X, t, arm, exog_names=["Intercept", "arm"], arm_residual=True).fit()
    with pytest.raises(ModelError, match=r"^deviance must be 'ML' or 'REML', got 'reml2'$"):
        getattr(res, call)(0.9, "profile_exact", deviance="reml2")
    lo, hi = res.profile_interval(f"icc[{res.model.arm_levels[1]}]", 0.9, "reml")
    assert res.icc_by_arm(0.9, "profile_exact", deviance="reml").iloc[1][["ci_low", "ci_high"]].tolist() == [lo, hi]


def test_lme4_style_profile_of_the_cluster_variance(crossed):
    """``conf_int``'s default profile of a random cluster level is lme4's spline through the profile (ML
    deviance, its cut-off from all variance parameters); it agrees with the exact likelihood-ratio roots
    (checked against the dense ML profile above) to 1e-3 on these well-determined limits."""
    y, X, t, arm, cl = crossed
    res = ArmVarianceModel(y, X, t, arm, exog_names=["Intercept", "arm"], cluster=cl, cluster_random=True).fit()
    ci = res.conf_int(0.95)
    np.testing.assert_allclose(ci.loc["cluster"].to_numpy(), res.profile_interval("cluster", 0.95), rtol=1e-3)
    for name in ("cluster", "residual", "therapist[0]", "therapist[1]"):  # every variance row: lme4's method
        assert ci.loc[name].tolist() == list(res.lme4_profile_interval(name, 0.95)), name


def test_correlation_with_an_arm_sd_at_zero_is_undefined_without_a_runtime_warning(crossed):
    """A correlated fit whose control-arm SD is 0 (lme4's theta[0] = 0) has no correlation: NaN, reported
    without dividing 0 by 0."""
    from dataclasses import replace

    from therapist_effects.models.arm import ArmVarianceResults

    y, X, t, arm, _ = crossed
    res = ArmVarianceModel(y, X, t, arm, exog_names=["Intercept", "arm"], correlated=True).fit()
    x = res.opt.x.copy()
    x[0] = 0.0
    G, r = res.model._unpack(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", SingularFitWarning)
        zero = ArmVarianceResults(res.model, replace(res.opt, x=x, G=G, r=r))
    assert zero.vcomp["therapist[0]"] == 0.0 and zero.vcomp["therapist[1]"] > 0
    assert math.isnan(zero.correlation) and zero.singular


def test_singular_fit_warning_text():
    """An arm whose between-therapist mean square is below the within one has the ANOVA variance
    estimate 0 (REML and ML): a singular fit, said once with its consequence for the ICC ratio."""
    y, t, arm, X = _two_anova_arms([(8, 5, 12.0, 3.0), (9, 5, 2.0, 2.5)])
    with pytest.warns(SingularFitWarning) as rec:
        res = ArmVarianceModel(y, X, t, arm, exog_names=["Intercept", "arm"],
                               arm_residual=True).fit()
    assert [str(w.message) for w in rec if issubclass(w.category, SingularFitWarning)] == [
        "singular fit: a variance component (or the arm correlation) is estimated at the boundary; "
        "an ICC at 0 makes the ICC ratio 0 or undefined"]
    assert res.singular and res.vcomp["therapist[1]"] == 0.0 and res.ratio_point() == 0.0


def test_bootstrap_with_a_control_icc_at_zero_and_labelled_arms():
    """A control arm whose therapist variance is near 0 (ANOVA estimate 0.04): replicates with the control
    variance at 0 are successful refits whose ICC ratio is undefined (NaN), not failures; the percentile
    intervals of labelled rows (``therapist[FB]``, ``residual[TAU]``) are those of the arm's replicates."""
    y, t, arm, X = _two_anova_arms([(8, 5, 3.2, 3.0), (9, 5, 12.0, 2.5)])
    res = ArmVarianceModel(y, X, t, np.where(arm == 1, "FB", "TAU"),
                           exog_names=["Intercept", "arm"], feedback_level="FB", arm_residual=True).fit()
    assert res.vcomp["therapist[TAU]"] == pytest.approx(0.04, rel=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        draws = res._bootstrap(40, 3)
    at_zero = draws["therapist[0]"] == 0
    assert 0 < at_zero.sum() < 40
    assert draws["icc_ratio"][at_zero].isna().all() and draws["icc_ratio"][~at_zero].notna().all()
    assert draws.drop(columns=["icc_ratio", "correlation"]).notna().all().all()
    ci = res.conf_int(0.9, method="bootstrap", n_boot=40, seed=3)
    for name, col in (("therapist[FB]", "therapist[1]"), ("therapist[TAU]", "therapist[0]"),
                      ("residual[TAU]", "residual[0]"), ("residual[FB]", "residual[1]")):
        assert tuple(ci.loc[name]) == pytest.approx(np.quantile(draws[col], [0.05, 0.95]), rel=1e-12), name


def test_icc_ratio_with_a_control_icc_at_zero_is_undefined():
    """A control arm with the ANOVA therapist variance 0: the ratio ICC_feedback / ICC_control and its profile
    interval are undefined (NaN), reported without dividing by 0."""
    y, t, arm, X = _two_anova_arms([(8, 5, 2.0, 3.0), (9, 5, 12.0, 2.5)])
    with pytest.warns(SingularFitWarning):
        res = ArmVarianceModel(y, X, t, arm, exog_names=["Intercept", "arm"],
                               arm_residual=True).fit()
    assert res.vcomp["therapist[0]"] == 0.0 and res.vcomp["therapist[1]"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ratio = res.icc_ratio(0.9, "profile_exact")
        assert math.isnan(res._targets("ML")["icc_ratio"].estimate)
    assert all(math.isnan(ratio[k]) for k in ("estimate", "ci_low", "ci_high"))
