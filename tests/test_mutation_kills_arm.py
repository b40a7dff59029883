"""Tests that kill mutants of arm.py and arm_inference.py found by ``MUTATION_SAMPLE=... tools/mutation.sh
arm|arm_inference``.

Expected values are independent of the code under test. With therapists seen in one arm only, separate
residual variances and uncorrelated arm effects, the (restricted) likelihood of the arm model factorises
into one balanced one-way ANOVA per arm, whose estimates have closed forms (Searle, Casella & McCulloch
1992, sec. 3.7, 4.7); other values come from dense-matrix Gaussian likelihoods in numpy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats

from test_mutation_kills_reml import _dense_loglik
from test_surviving_mutants import _balanced
from therapist_effects.exceptions import ModelError
from therapist_effects.models.arm import ArmVarianceModel, two_arms

# per arm: therapists, patients per therapist, exact ANOVA mean squares (between, within)
ARMS = [(8, 5, 12.0, 3.0), (9, 5, 4.0, 2.5)]


@pytest.fixture(scope="module")
def data():
    ys, ts, arms = [], [], []
    for a, (G, m, msb, msw) in enumerate(ARMS):
        ys.append(10.0 - 3.0 * a + _balanced(G, m, msb, msw, seed=4 + a)[0])
        ts.append(np.repeat([f"a{a}t{i}" for i in range(G)], m))
        arms.append(np.full(G * m, a))
    y, t, arm = np.concatenate(ys), np.concatenate(ts), np.concatenate(arms)
    X = np.column_stack([np.ones(len(y)), arm])
    return y, X, t, arm


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
        assert dev == pytest.approx(eng.deviance(np.diag(g), np.ones(2), True, method), rel=1e-12)
        h = 1e-5
        fd = [(eng.deviance(np.diag(g + h * e), np.ones(2), True, method)
               - eng.deviance(np.diag(g - h * e), np.ones(2), True, method)) / (2 * h) for e in np.eye(2)]
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


@pytest.mark.parametrize("arm_residual, cluster, names", [
    (True, False, ["residual[0]", "residual[1]", "therapist[1]", "correlation", "icc[1]", "icc_ratio"]),
    (False, True, ["residual", "cluster", "therapist[0]", "icc[0]"]),
])
def test_profile_limits_are_roots_of_the_dense_ml_profile(crossed, arm_residual, cluster, names):
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
    for name in names:
        lo, hi = res.profile_interval(name)
        assert np.isfinite(lo) and np.isfinite(hi)
        for end in (lo, hi):
            if end in (0.0, 1.0, -1.0):  # an edge of the parameter space (checked elsewhere)
                continue
            cons = {"type": "eq", "fun": lambda u, end=end, name=name: TARGETS[name](*_unpack(u, arm_residual, cluster))
                    - end}
            u = u_hat
            for _ in range(3):  # SLSQP restarted from its own answer (it stops early on this problem)
                u = optimize.minimize(dev, u, method="SLSQP", options={"ftol": 1e-13, "maxiter": 1000},
                                      constraints=cons).x
            assert abs(cons["fun"](u)) < 1e-7
            assert dev(u) - dmin == pytest.approx(Q95, abs=1e-3), (name, end)


@pytest.mark.parametrize("arm_residual, cluster", [(False, False), (True, True)])
def test_equal_variance_lrt_of_correlated_models_against_the_dense_likelihood(crossed, arm_residual, cluster):
    """ML fits: the statistic is the dense ML deviance minimised with one common therapist variance
    (correlation, residual(s) and cluster variance free) minus the fitted deviance."""
    y, X, t, arm, cl = crossed
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
    """to_contract with exact profile limits: each entry holds the limits of profile_interval under the
    contract's field names; conf_int's level reaches lme4's profile; icc_by_arm names the roles."""
    y, X, t, arm, _ = crossed
    df = pd.DataFrame({"y": y, "therapist": t, "arm": arm})
    res = ArmVarianceModel.from_frame(df, "y", correlated=True, arm_residual=True).fit()
    entry = res.to_contract(interval="profile_exact")
    for name in ("therapist[0]", "residual[1]"):
        lo, hi = res.profile_interval(name)
        assert entry["variance_components"][name] == {"estimate": res.vcomp[name], "ci_low": lo, "ci_high": hi}
    assert "cov(therapist)" not in entry["variance_components"]
    lo, hi = res.profile_interval("correlation")
    assert entry["correlation"] == {"estimate": res.correlation, "ci_low": lo, "ci_high": hi}
    lo, hi = res.profile_interval("icc[1]")
    assert entry["icc_by_arm"]["1"] == {"estimate": res.icc_point()[1], "ci_low": lo, "ci_high": hi,
                                        "ci_method": "profile_exact"}
    assert list(res.icc_by_arm(method="profile_exact")["role"]) == ["control", "feedback"]
    ci90 = res.conf_int(0.90)
    assert tuple(ci90.loc["therapist[0]"]) == res.lme4_profile_interval("therapist[0]", 0.90)
    assert ci90.loc["therapist[0]", "upper"] < res.conf_int(0.95).loc["therapist[0]", "upper"]


def test_therapist_effects_refused_with_a_random_cluster_level(crossed):
    y, X, t, arm, cl = crossed
    res = ArmVarianceModel(y, X, t, arm, cluster=cl, cluster_random=True).fit()
    with pytest.raises(ModelError, match="^therapist_effects\\(\\) is not available with cluster_random=True"):
        res.therapist_effects()
