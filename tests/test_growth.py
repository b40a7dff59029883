"""The growth model (sessions in patients in therapists) against lme4, and its not-on-track flags.

Reference numbers come from ``tests/reference/growth.json``, written by ``tests/reference/growth.R``:
``lmer(score ~ lt + (1 + lt | therapist) + (1 + lt | therapist:patient), REML = TRUE / FALSE)`` on

- ``growth_demo.csv``: the demo's sessions after the package's exclusions (exported by
  ``recovery.growth_frame``; ``test_demo_reference_data_is_the_package_frame`` checks that it still is);
- ``growth_singular.csv``: ``simulate_growth(30, 15, cov_T=((0.5, 0), (0, 0)), seed=1)``, no
  therapist slope variance, a singular fit in lme4 (``isSingular(fit, tol = 1e-4)`` TRUE).

Each fit has lme4's ``default`` result and a ``refined`` one (refitted by nlminb from the default's
theta with tolerances at machine precision). Variances agree with the refined fit within 1e-4
relative; our log-likelihood is no lower than either lme4 fit's.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from therapist_effects.exceptions import SingularFitWarning
from therapist_effects.models.growth import GrowthModel, session_time, simulate_growth
from therapist_effects.models.recovery import (early_flag_validation, growth_frame, not_on_track, recovery_curves,
                                        severity_bands)
from refdata import REFERENCE_DIR

RTOL = 1e-4


@pytest.fixture(scope="module")
def ref() -> dict:
    return json.loads((REFERENCE_DIR / "growth.json").read_text())


def _read(name: str) -> pd.DataFrame:
    return pd.read_csv(REFERENCE_DIR / name, dtype={"patient": str, "therapist": str})


CASES = [  # (key in growth.json, data, method); R: fit_one(<data>, REML = <method == "REML">)
    ("demo_REML", "growth_demo.csv", "REML"),
    ("demo_ML", "growth_demo.csv", "ML"),
    ("singular_REML", "growth_singular.csv", "REML"),
]


@pytest.fixture(scope="module")
def fits() -> dict:
    out = {}
    for key, path, method in CASES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = GrowthModel.from_frame(_read(path), "score", "lt", method=method).fit()
        out[key] = (res, [w.category for w in caught])
    return out


@pytest.mark.parametrize("key", [c[0] for c in CASES])
def test_variances_match_lme4(fits, ref, key):
    res, _ = fits[key]
    r = ref[key]["refined"]  # as.data.frame(VarCorr(fit))$vcov of the refined fit
    vc = res.variance_components()
    for name, expected in r["variance_components"].items():
        assert vc[name] == pytest.approx(expected, rel=RTOL), name
    # as.data.frame(VarCorr(fit))$sdcor of the covariance rows
    corr = res.correlations()
    assert corr["therapist~therapist_slope"] == pytest.approx(r["correlations"]["therapist"], abs=1e-4)
    assert corr["patient~patient_slope"] == pytest.approx(r["correlations"]["patient"], abs=1e-4)
    # fixef(fit), sqrt(diag(vcov(fit)))
    for name, expected in r["fixed_effects"].items():
        assert res.fe_params[name] == pytest.approx(expected, rel=1e-5), name
        assert res.bse[name] == pytest.approx(r["se"][name], rel=RTOL), name


@pytest.mark.parametrize("key", [c[0] for c in CASES])
def test_loglik_no_lower_than_lme4(fits, ref, key):
    res, _ = fits[key]
    # as.numeric(logLik(fit)) of lme4's default fit and of the refined fit; REMLcrit / deviance
    assert res.loglik >= ref[key]["default"]["loglik"]
    assert res.loglik >= ref[key]["refined"]["loglik"] - 1e-9
    assert res.criterion_value == pytest.approx(ref[key]["refined"]["criterion"], rel=1e-12, abs=1e-7)
    assert res.converged


def test_criterion_is_lme4s_at_lme4s_theta(ref):
    """The criterion as a function of theta equals lme4's devfun (REMLcrit at lme4's theta)."""
    r = ref["demo_REML"]["default"]
    th = r["theta"]  # getME(fit, "theta"): patient block first in lme4's order
    theta = np.array([th["therapist.(Intercept)"], th["therapist.lt.(Intercept)"], th["therapist.lt"],
                      th["therapist:patient.(Intercept)"], th["therapist:patient.lt.(Intercept)"],
                      th["therapist:patient.lt"]])
    m = GrowthModel.from_frame(_read("growth_demo.csv"), "score", "lt")
    assert m.criterion(theta) == pytest.approx(r["criterion"], rel=1e-11)


@pytest.mark.parametrize("key", [c[0] for c in CASES])
def test_singular_flag_as_lme4(fits, ref, key):
    res, cats = fits[key]
    assert res.singular == ref[key]["default"]["singular"] == ref[key]["refined"]["singular"]
    assert (SingularFitWarning in cats) == res.singular


def test_singular_fit_is_exactly_on_the_boundary(fits):
    res, _ = fits["singular_REML"]
    assert res.theta[2] == 0.0  # the therapist slope's own diagonal of L_T
    assert abs(res.correlations()["therapist~therapist_slope"]) == pytest.approx(1.0)


def test_slope_share_profile_interval(fits):
    """The profile interval's ends are where the profiled criterion rises by chi2(1, 0.95); the
    share is inside; recomputing the profiled criterion at the ends reproduces the rise."""
    res, _ = fits["demo_REML"]
    lo, hi = res.profile_interval("slope_share")
    share = res.slope_share()
    vc = res.variance_components()
    assert share == pytest.approx(vc["therapist_slope"] / (vc["therapist_slope"] + vc["patient_slope"]))
    assert 0.0 <= lo < share < hi <= 1.0
    prof, _, _ = res._profile_fn("slope_share")
    q = 3.841458820694124  # qchisq(0.95, 1)
    assert prof(hi) - res.criterion_value == pytest.approx(q, abs=2e-3)
    if lo > 0:
        assert prof(lo) - res.criterion_value == pytest.approx(q, abs=2e-3)


def test_demo_reference_data_is_the_package_frame(tmp_path):
    """growth_demo.csv is what growth_frame gives on the demo after ingest and outcome derivation."""
    from therapist_effects.config import load_config
    from therapist_effects.pipeline import ingest_step, outcomes_step

    root = REFERENCE_DIR.parents[1]
    cfg = load_config(root / "config" / "config.yaml")
    ds = dict(cfg["datasets"]["demo"], path=str(root / "data" / "demo_sessions.csv"))
    t = tmp_path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ingest_step(ds["path"], ds, cfg, t / "rows.parquet", t / "ir.csv", t / "is.json")
        outcomes_step(t / "rows.parquet", t / "ir.csv", t / "is.json", ds, cfg, t / "p.parquet", t / "p.csv",
                      t / "r.csv", t / "a.json")
    f = growth_frame(pd.read_parquet(t / "rows.parquet"), pd.read_parquet(t / "p.parquet"), time="log")
    csv = _read("growth_demo.csv")
    assert list(f["patient"]) == list(csv["patient"])
    assert list(f["therapist"]) == list(csv["therapist"])
    assert np.array_equal(f["session"].to_numpy(), csv["session"].to_numpy())
    assert np.array_equal(f["score"].to_numpy(), csv["score"].to_numpy())
    assert np.allclose(f["log_session"], csv["lt"], rtol=0, atol=1e-14)


def test_session_time_kinds():
    occ = pd.Series(pd.to_datetime(["2024-01-01", "2024-01-15", "2024-01-08", "2024-03-01"]))
    pat = pd.Series(["a", "a", "a", "b"])
    s, t = session_time(occ, pat, "weeks")
    assert list(s) == [1, 3, 2, 1]
    assert list(t) == [0, 2, 1, 0]
    s, t = session_time(occ, pat, "log")
    assert np.allclose(t, np.log([1, 3, 2, 1]))
    s, t = session_time(pd.Series([1, 2, 5]), pd.Series(["a", "a", "a"]), "session")
    assert list(t) == [1, 2, 5]
    with pytest.raises(Exception, match="weeks needs session dates"):
        session_time(pd.Series([1, 2, 5]), pd.Series(["a", "a", "a"]), "weeks")


def test_conditional_expectation_by_hand():
    """expected = mu_s + c_s1 / v_11 (y_1 - mu_1) with the model's marginal moments, worked out by
    hand for one patient from the fitted covariance matrices."""
    d = simulate_growth(20, 10, seed=3)
    res = GrowthModel.from_frame(d, "score", "lt").fit()
    frame = d.rename(columns={"lt": "lt"}).head(6).copy()
    frame = frame[frame["patient"] == frame["patient"].iloc[0]]
    track = not_on_track(res, frame, band_level=0.8)
    b = res.fe_params.to_numpy()
    Z = np.column_stack([np.ones(len(frame)), frame["lt"].to_numpy()])
    V = Z @ (res.cov_T + res.cov_P) @ Z.T + res.sigma2 * np.eye(len(frame))
    mu = Z @ b
    y = frame["score"].to_numpy()
    exp = mu + V[:, 0] / V[0, 0] * (y[0] - mu[0])
    sd = np.sqrt(np.diag(V) - V[:, 0] ** 2 / V[0, 0])
    assert np.allclose(track["expected"], exp)
    assert np.allclose(track["upper"], exp + 1.2815515655446004 * sd)  # qnorm(0.9)
    assert track["flag"].iloc[0] == 0
    assert list(track["flag"]) == [0] + list((y[1:] > (exp + 1.2815515655446004 * sd)[1:]).astype(int))


def test_flags_catch_deteriorating_patients():
    """Simulated data with 8% of patients deteriorating (scores rising, 3 points per log session,
    against a mean fall of 3): cross-validated over held-out patients, the early flag (by session 4)
    catches >= 80% of them and flags <= 25% of the improving patients."""
    d = simulate_growth(60, 25, deteriorate=0.08, seed=11)
    truth = d.groupby("patient")["deteriorating"].first().astype(float)
    assert 0.06 < truth.mean() < 0.10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = early_flag_validation(d, truth, lambda f: GrowthModel.from_frame(f, "score", "lt").fit(),
                                  folds=5, seed=1, early_session=4)
    assert v["n_poor"] > 60
    assert v["sensitivity"]["estimate"] >= 0.80
    assert 1.0 - v["specificity"]["estimate"] <= 0.25


def test_recovery_curves_by_band():
    d = simulate_growth(30, 15, seed=5)
    res = GrowthModel.from_frame(d, "score", "lt").fit()
    track = not_on_track(res, d)
    curves = recovery_curves(track)
    assert curves["band"].nunique() == 4
    # expected curves fall with the fitted mean slope and are ordered by intake band at session 1
    first = curves[curves["session"] == 1].reset_index(drop=True)
    assert first["expected"].is_monotonic_increasing
    # at session 1 the expectation is the intake itself, observed = expected
    assert np.allclose(first["expected"], first["observed"])
    later = curves[curves["session"] == 6]
    assert (later["upper"] > later["expected"]).all()
    # observed means follow the expected within a few points (the model is the truth here)
    assert np.max(np.abs(curves["observed"] - curves["expected"])) < 2.5
    bands = severity_bands(pd.Series([1, 2, 3, 4, 5, 6, 7, 8.0]), 4)
    assert bands.nunique() == 4 and bands.iloc[0] == "intake 1-2"


def test_arm_specific_slopes_match_lme4(ref):
    """Arm-specific therapist slope variances: lme4's
    lmer(score ~ lt + feedback + lt:feedback + (1 + ltc + ltf | therapist) + (1 + lt | therapist:patient))
    with ltc = lt (1 - feedback), ltf = lt feedback, on the demo's sessions (growth.R: fit_arm)."""
    r = ref["demo_arm_REML"]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        res = GrowthModel.from_frame(_read("growth_demo.csv"), "score", "lt", arm="feedback", feedback_level=1,
                                     arm_slopes=True).fit()
    vc = res.variance_components()
    for name, expected in r["refined"]["variance_components"].items():
        assert vc[name] == pytest.approx(expected, rel=RTOL), name
    for name, expected in r["refined"]["fixed_effects"].items():
        assert res.fe_params[name] == pytest.approx(expected, rel=1e-5), name
    assert res.loglik >= r["default"]["loglik"]
    assert res.loglik >= r["refined"]["loglik"] - 1e-9
    assert res.singular == r["refined"]["singular"]  # isSingular(refined fit, tol = 1e-4): TRUE, rank-deficient 3 x 3 block


def test_therapist_effects_match_lme4_ranef(fits, ref):
    """Conditional modes and conditional SDs of the therapists' intercept and slope effects:
    ranef(fit, condVar = TRUE)$therapist and sqrt(attr(., "postVar")) of the refined demo REML fit."""
    res, _ = fits["demo_REML"]
    r = ref["demo_REML"]["refined"]["ranef_therapist"]
    t = res.therapist_effects().set_index("therapist").loc[r["therapist"]]
    scale = max(np.abs(r["slope"]))
    assert np.allclose(t["intercept_effect"], r["intercept"], rtol=0, atol=1e-4 * scale)
    assert np.allclose(t["effect"], r["slope"], rtol=0, atol=1e-4 * scale)
    assert np.allclose(t["intercept_se"], r["intercept_sd"], rtol=1e-3)
    assert np.allclose(t["effect_se"], r["slope_sd"], rtol=1e-3)
