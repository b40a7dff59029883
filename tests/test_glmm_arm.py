"""Binomial arm-variance model (glmm_arm.py) against independent results.

* R lme4 1.1-31 ``glmer`` (Laplace) fits from tests/reference/glmer_arm.R -> glmer_arm.json;
* glmer nAGQ = 10 on the common-variance model (a scalar random effect, where glmer allows AGQ) for the
  quadrature of the arm model at s_control = s_feedback;
* a brute-force Nelder-Mead profile of the ICC ratio (no analytic gradient);
* recovery of known variances on simulated data.
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
from therapist_effects.config import load_config
from therapist_effects.exceptions import ConfigError, SingularFitWarning
from therapist_effects.models.glmm_arm import LogisticArmVarianceModel
from therapist_effects.models.fitting import fit_model

REF = json.loads((REFERENCE_DIR / "glmer_arm.json").read_text())
C = math.pi**2 / 3

# Expected values copied from glmer_arm.json beside the R call that produced them (R 4.2.2, lme4 1.1-31);
# test_copied_values_match_json checks that the two agree.
GLMER = {
    # glmer(recovered ~ phq9_pre + feedback + (0 + c0 | therapist_id) + (0 + c1 | therapist_id),
    #       family = binomial, data = therapy_feedback, nAGQ = 1)       (c0 = 1 - feedback, c1 = feedback)
    # variance_ci: confint(m, parm = "theta_", method = "profile")^2
    "therapy_feedback": {
        "fixed": {"(Intercept)": 0.589615797906636, "phq9_pre": -0.0277745447382577, "feedback": 0.159615833711498},
        "fixed_se": {"(Intercept)": 0.182907109209291, "phq9_pre": 0.0100845454483972, "feedback": 0.103239229781445},
        "variance": {"c0": 0.15194320393454, "c1": 0.0},
        "variance_ci": {"c0": [0.0328220346031463, 0.355420967600001], "c1": [0.0, 0.0754283961182588]},
        "logLik": -1413.12918490058,
        # 2 * (logLik(m) - logLik(glmer(recovered ~ phq9_pre + feedback + (1 | therapist_id:feedback))))
        "lrt": 4.89011841998718,
    },
    # the same call with data = therapy_trials
    "therapy_trials": {
        "fixed": {"(Intercept)": 0.558389288039017, "phq9_pre": -0.0405086116606839, "feedback": 0.222396491543633},
        "fixed_se": {"(Intercept)": 0.134379486128631, "phq9_pre": 0.00778450040554881, "feedback": 0.0735782595582218},
        "variance": {"c0": 0.0545137918757368, "c1": 0.0422702476114093},
        "variance_ci": {"c0": [0.0, 0.156271656991275], "c1": [0.0, 0.143265028838681]},
        "logLik": -2472.93803930904,
        "lrt": 0.0423912797004959,
    },
}


def _data(ds):
    return pd.read_csv(REFERENCE_DIR / f"{ds}.csv")


_FITS: dict = {}


def _fit(ds, method="laplace"):
    key = (ds, method)
    if key not in _FITS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SingularFitWarning)
            m = LogisticArmVarianceModel.from_frame(_data(ds), "recovered", ["phq9_pre"], therapist="therapist_id",
                                                    arm="feedback", method=method, n_quad=10)
            _FITS[key] = m.fit()
    return _FITS[key]


@pytest.mark.parametrize("ds", ["therapy_feedback", "therapy_trials"])
def test_copied_values_match_json(ds):
    lap = REF[ds]["laplace"]
    exp = GLMER[ds]
    assert lap["fixed"] == exp["fixed"] and lap["fixed_se"] == exp["fixed_se"]
    assert lap["variance"] == exp["variance"] and lap["variance_ci"] == exp["variance_ci"]
    assert lap["logLik"] == exp["logLik"] and REF[ds]["equal_variances"]["lrt"]["statistic"] == exp["lrt"]


@pytest.mark.parametrize("ds", ["therapy_feedback", "therapy_trials"])
def test_laplace_matches_glmer(ds):
    res = _fit(ds)
    exp = GLMER[ds]
    # variances within glmer's own tolerance (1e-3 relative; exactly 0 where glmer is at the boundary)
    for a, key in enumerate(("c0", "c1")):
        got = res.vcomp[f"therapist[{a}]"]
        if exp["variance"][key] == 0.0:
            assert got == 0.0
        else:
            assert got == pytest.approx(exp["variance"][key], rel=1e-3)
    # the maximised Laplace log-likelihood is no lower than glmer's
    assert res.loglik >= exp["logLik"] - 1e-7
    assert res.loglik == pytest.approx(exp["logLik"], abs=1e-3)
    for nm, v in exp["fixed"].items():
        assert res.fe_params[nm] == pytest.approx(v, rel=1e-3, abs=1e-5)
        assert res.bse[nm] == pytest.approx(exp["fixed_se"][nm], rel=2e-3)
    assert res.singular == (0.0 in exp["variance"].values())


@pytest.mark.parametrize("ds", ["therapy_feedback", "therapy_trials"])
def test_profile_variance_intervals_match_glmer(ds):
    res = _fit(ds)
    for a, key in enumerate(("c0", "c1")):
        lo, hi = res.variance_interval(a)
        exp_lo, exp_hi = GLMER[ds]["variance_ci"][key]
        assert lo == pytest.approx(exp_lo, rel=1e-3, abs=1e-6)
        assert hi == pytest.approx(exp_hi, rel=1e-3)


@pytest.mark.parametrize("ds", ["therapy_feedback", "therapy_trials"])
def test_lrt_equal_variances_matches_glmer(ds):
    t = _fit(ds).lrt_equal_variances()
    assert t["statistic"] == pytest.approx(GLMER[ds]["lrt"], abs=1e-4)
    assert t["p_value"] == pytest.approx(stats.chi2.sf(GLMER[ds]["lrt"], 1), abs=1e-4)


@pytest.mark.parametrize("ds", ["therapy_feedback", "therapy_trials"])
def test_icc_by_arm_is_latent_share(ds):
    res = _fit(ds)
    icc = res.icc_by_arm()
    for a, key in enumerate(("c0", "c1")):
        v = GLMER[ds]["variance"][key]
        assert icc.iloc[a]["estimate"] == pytest.approx(v / (v + C), rel=1e-3, abs=1e-9)
        lo, hi = GLMER[ds]["variance_ci"][key]
        assert icc.iloc[a]["ci_high"] == pytest.approx(hi / (hi + C), rel=1e-3)


def _brute_profile_ratio(res, r):
    """max over (b, s0) of the log-likelihood with ICC_feedback = r ICC_control, by Nelder-Mead."""
    m = res.model
    p = m.k_fe

    def negll(z):
        b, s0 = z[:p], z[p]
        i1 = r * s0 * s0 / (s0 * s0 + C)
        if i1 >= 1:
            return 1e10
        return -m.loglik(b, [s0, math.sqrt(C * i1 / (1 - i1))])

    best = None
    for s0 in (res.s[0] if res.s[0] > 0 else 0.3, 0.6):
        z0 = np.concatenate([res.fe_params.to_numpy(), [s0]])
        out = optimize.minimize(negll, z0, method="Nelder-Mead",
                                options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 20000, "maxfev": 20000})
        if best is None or out.fun < best:
            best = out.fun
    return -best


def test_icc_ratio_profile_interval_by_brute_force():
    res = _fit("therapy_feedback")  # ratio estimate 0 (feedback variance at 0)
    ratio = res.icc_ratio()
    assert ratio["estimate"] == 0.0 and ratio["ci_low"] == 0.0
    hi = ratio["ci_high"]
    q = stats.chi2.ppf(0.95, 1)
    assert 2 * (res.loglik - _brute_profile_ratio(res, hi)) == pytest.approx(q, abs=2e-3)
    assert 2 * (res.loglik - _brute_profile_ratio(res, 0.9 * hi)) < q
    red = res.icc_reduction()
    assert red["ci_low"] == pytest.approx(1 - hi) and red["ci_high"] == 1.0


def test_icc_ratio_unbounded_when_control_icc_may_be_zero():
    res = _fit("therapy_trials")
    # glmer's profile interval of the control SD reaches 0: the ratio's upper limit is infinite
    assert GLMER["therapy_trials"]["variance_ci"]["c0"][0] == 0.0
    ratio = res.icc_ratio()
    assert ratio["estimate"] == pytest.approx(0.778253779911797, rel=2e-3)
    assert ratio["ci_low"] == 0.0 and math.isinf(ratio["ci_high"])


@pytest.mark.parametrize("ds", ["therapy_feedback", "therapy_trials"])
def test_agq_loglik_matches_glmer_nagq10_at_equal_variances(ds):
    # glmer(recovered ~ phq9_pre + feedback + (1 | therapist_id:feedback), family = binomial, nAGQ = 10):
    # the arm model with s_control = s_feedback is this model, so its AGQ10 log-likelihood at glmer's
    # estimates is glmer's logLik
    ref = REF[ds]["equal_variances_agq10"]
    m = _fit(ds, "agq").model
    b = np.array([ref["fixed"][nm] for nm in m.exog_names])
    s = math.sqrt(ref["variance"])
    assert m.loglik(b, [s, s]) == pytest.approx(ref["logLik"], abs=1e-5)
    # the AGQ fit with two variances is at least as good
    assert _fit(ds, "agq").loglik >= ref["logLik"] - 1e-6


def test_recovers_known_variances():
    rng = np.random.default_rng(20261129)
    T, n_per = 300, 24
    s2 = np.array([0.6, 0.15])
    therapist = np.repeat(np.arange(T), n_per)
    arm = np.tile(np.repeat([0, 1], n_per // 2), T)
    x = rng.normal(size=T * n_per)
    u = rng.normal(size=(T, 2)) * np.sqrt(s2)
    y = (rng.random(T * n_per) < expit(-0.3 + 0.5 * x + 0.2 * arm + u[therapist, arm])).astype(float)
    df = pd.DataFrame({"y": y, "x": x, "t": therapist.astype(str), "arm": arm})
    res = LogisticArmVarianceModel.from_frame(df, "y", ["x"], therapist="t", arm="arm", method="agq", n_quad=7).fit()
    for a in range(2):
        lo, hi = res.variance_interval(a)
        assert lo < s2[a] < hi
    assert res.fe_params["x"] == pytest.approx(0.5, abs=0.08)
    true_ratio = (s2[1] / (s2[1] + C)) / (s2[0] / (s2[0] + C))
    r = res.icc_ratio()
    assert r["ci_low"] < true_ratio < r["ci_high"] < 1.0
    tab = res.therapist_effects()
    assert len(tab) == 2 * T and set(tab["arm"]) == {"0", "1"}
    # conditional modes track the simulated effects
    eff = tab.pivot(index="therapist", columns="arm", values="effect").loc[[str(i) for i in range(T)]]
    assert np.corrcoef(eff["0"], u[:, 0])[0, 1] > 0.6


def _dataset():
    return {"path": "x.csv", "layout": "patient",
            "columns": {"patient": "patient_id", "therapist": "therapist_id", "outcome": "phq9_post",
                        "baseline": "phq9_pre", "arm": "feedback"}}


def test_fit_model_gives_the_arm_contract_keys():
    d = _data("therapy_feedback")
    patients = d.rename(columns={"patient_id": "patient", "therapist_id": "therapist", "phq9_post": "end",
                                 "phq9_pre": "baseline", "feedback": "arm"})
    cfg = load_config({"datasets": {"d": _dataset()},
                       "models": [{"id": "armb", "type": "arm_variance", "family": "binomial",
                                   "outcome": "recovered", "method": "laplace"}]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SingularFitWarning)
        entry, table, _ = fit_model(patients, cfg["models"][0], cfg["datasets"]["d"], cfg)
    assert entry["family"] == "binomial" and entry["singular"] is True
    assert set(entry["variance_components"]) == {"therapist[0]", "therapist[1]", "residual"}
    assert entry["variance_components"]["therapist[0]"]["estimate"] == pytest.approx(0.15194320393454, rel=1e-3)
    assert set(entry["icc_by_arm"]) == {"0", "1"}
    for key in ("icc_ratio", "icc_reduction"):
        assert {"estimate", "ci_low", "ci_high", "ci_method"} <= set(entry[key])
    assert entry["icc_reduction"]["estimate"] == 1.0
    assert any("SingularFitWarning" in w for w in entry["warnings"])
    assert entry["formula"].endswith("diag(0 + factor(feedback) | therapist_id)")
    assert len(table) == 120 and set(table["arm"]) == {"0", "1"}


@pytest.mark.parametrize("extra, key", [({"correlated": True}, "correlated"), ({"arm_residual": True}, "arm_residual")])
def test_config_refuses_unsupported_binomial_arm_options(extra, key):
    with pytest.raises(ConfigError, match=rf"models\[0\]\.{key}"):
        load_config({"datasets": {"d": _dataset()},
                     "models": [{"id": "a", "type": "arm_variance", "family": "binomial", "outcome": "recovered",
                                 **extra}]}, source="cfg.yaml")


@pytest.mark.slow
def test_profile_interval_coverage_simulation():
    """200 simulated trials (120 therapists x 2 arms x 10 patients, Laplace): the profile intervals of
    both arm variances and of the ICC ratio cover the truth in 90-99% of replicates (nominal 95%;
    binomial standard error of the coverage about 1.5 points)."""
    rng = np.random.default_rng(20261129)
    T, n_arm = 120, 10
    s2 = np.array([0.8, 0.3])
    ratio = (s2[1] / (s2[1] + C)) / (s2[0] / (s2[0] + C))
    therapist = np.repeat(np.arange(T), 2 * n_arm)
    arm = np.tile(np.repeat([0, 1], n_arm), T)
    hits = np.zeros(3)
    reps = 200
    for _ in range(reps):
        x = rng.normal(size=T * 2 * n_arm)
        u = rng.normal(size=(T, 2)) * np.sqrt(s2)
        y = (rng.random(x.size) < expit(0.2 + 0.4 * x + 0.3 * arm + u[therapist, arm])).astype(float)
        df = pd.DataFrame({"y": y, "x": x, "t": therapist, "arm": arm})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = LogisticArmVarianceModel.from_frame(df, "y", ["x"], therapist="t", arm="arm").fit()
            for a in range(2):
                lo, hi = res.variance_interval(a)
                hits[a] += lo <= s2[a] <= hi
            r = res.icc_ratio()
            hits[2] += r["ci_low"] <= ratio <= r["ci_high"]
    coverage = hits / reps
    print(f"coverage: variance control {coverage[0]:.3f}, variance feedback {coverage[1]:.3f}, ratio {coverage[2]:.3f}")
    assert np.all((coverage >= 0.90) & (coverage <= 0.99)), coverage
