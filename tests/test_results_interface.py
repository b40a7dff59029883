"""The shared results interface (engine/results.py) and the model registry (engine/registry.py).

AIC / BIC of every engine against lme4 1.1-31: ``tests/reference/aic_bic.json`` written by
``tests/reference/aic_bic.R`` (``AIC(fit)``, ``BIC(fit)``, ``attr(logLik(fit), "df")``; REML fits
use the REML criterion, as lme4 does).
"""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest

from refdata import REFERENCE_DIR
from therapist_effects.models.arm import ArmVarianceModel
from therapist_effects.engine.registry import REGISTRY, lookup, model_class
from therapist_effects.engine.results import ModelResults
from therapist_effects.exceptions import ModelError
from therapist_effects.models.glmm import LogisticRandomInterceptModel
from therapist_effects.models.reml import NestedModel, RandomInterceptModel

REF = json.loads((REFERENCE_DIR / "aic_bic.json").read_text())
FB = pd.read_csv(REFERENCE_DIR / "therapy_feedback.csv")
TR = pd.read_csv(REFERENCE_DIR / "therapy_trials.csv")
COV = ["phq9_pre", "feedback"]


def _fits():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            # lmer(phq9_post ~ phq9_pre + feedback + (1 | therapist_id), REML = TRUE / FALSE)
            "ri_REML": RandomInterceptModel.from_frame(FB, "phq9_post", COV, therapist="therapist_id").fit(),
            "ri_ML": RandomInterceptModel.from_frame(FB, "phq9_post", COV, therapist="therapist_id",
                                                     method="ML").fit(),
            # lmer(phq9_post ~ phq9_pre + feedback + (1 | trial_id/therapist_id), REML = TRUE)
            "nested_REML": NestedModel.from_frame(TR, "phq9_post", COV, therapist="therapist_id",
                                                  cluster="trial_id").fit(),
            # lmer(... + (0 + control | therapist_id) + (0 + feedback | therapist_id), REML = TRUE)
            "arm_REML": ArmVarianceModel.from_frame(FB, "phq9_post", COV, therapist="therapist_id",
                                                    arm="feedback").fit(),
            # glmer(recovered ~ phq9_pre + feedback + (1 | therapist_id), binomial)  (Laplace)
            "logit_laplace": LogisticRandomInterceptModel.from_frame(FB, "recovered", COV, therapist="therapist_id",
                                                                     method="laplace").fit(),
        }


@pytest.fixture(scope="module")
def fits():
    return _fits()


@pytest.mark.parametrize("key", ["ri_REML", "ri_ML", "nested_REML", "arm_REML", "logit_laplace"])
def test_aic_bic_as_lme4(fits, key):
    res, ref = fits[key], REF[key]
    assert isinstance(res, ModelResults)
    assert res.df_model == ref["df"]
    assert res.nobs == ref["nobs"]
    assert res.llf == pytest.approx(ref["logLik"], rel=1e-6)
    assert res.aic == pytest.approx(ref["AIC"], rel=1e-6)
    assert res.bic == pytest.approx(ref["BIC"], rel=1e-6)


def test_contract_entries_carry_aic_bic(fits):
    for key in ("ri_REML", "nested_REML", "arm_REML"):
        c = fits[key].to_contract()
        assert c["aic"] == pytest.approx(REF[key]["AIC"], rel=1e-6)
        assert c["bic"] == pytest.approx(REF[key]["BIC"], rel=1e-6)


def test_registry_maps_every_type_to_its_class():
    assert model_class("random_intercept") is RandomInterceptModel
    assert model_class("nested") is NestedModel
    assert model_class("arm_variance") is ArmVarianceModel
    assert model_class("random_intercept", "binomial") is LogisticRandomInterceptModel
    assert model_class("random_slope").__name__ == "RandomSlopeModel"
    assert lookup("nested", engine="bayes") is REGISTRY["bayes"]
    with pytest.raises(ModelError, match="no engine"):
        lookup("growth_curve")


def test_one_bootstrap_seed_rule_and_failure_count():
    """engine.inference.parametric_bootstrap: seed=None is seed 0; refits that raise or do not
    converge are counted and NaN, and percentile intervals leave them out."""
    import numpy as np

    from therapist_effects.engine.inference import parametric_bootstrap

    def simulate(rng):
        return rng.normal(size=5)

    def refit(x):
        if x[0] > 1.0:
            raise np.linalg.LinAlgError("singular")
        return {"m": float(x.mean()), "converged": x[1] < 1.5, "flag": x[2] > 0}

    a = parametric_bootstrap(simulate, refit, 200, None, ["m"], flags=("flag",))
    b = parametric_bootstrap(simulate, refit, 200, 0, ["m"], flags=("flag",))
    pd.testing.assert_frame_equal(a.draws, b.draws)
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=5) for _ in range(200)]
    failed = sum(x[0] > 1.0 or x[1] >= 1.5 for x in xs)
    assert a.n_failed == failed > 0 and int(a.draws["m"].isna().sum()) == failed
    ok = [x.mean() for x in xs if not (x[0] > 1.0 or x[1] >= 1.5)]
    assert a.interval("m", 0.9) == pytest.approx(tuple(np.quantile(ok, [0.05, 0.95])))


# ------------------------------------------------------------------ one API for every results class
# Every results class (Gaussian engines, random slopes, both GLMMs, Bayes) answers the same calls
# with the same types and defaults. The values are checked against quantities computed here from
# the fit's own variance components (an ICC is a variance share), not against themselves.

import inspect
import math

import numpy as np

from therapist_effects.engine.results import CONF_INT_COLUMNS, ICC, ICC_COLUMNS, Summary
from therapist_effects.models.glmm_arm import LogisticArmVarianceModel
from therapist_effects.models.slopes import RandomSlopeModel

LATENT = math.pi**2 / 3
THERAPIST_COLUMNS = {"therapist", "caseload", "effect", "effect_se", "ci_low", "ci_high", "classification"}


def _icc_by_hand(key, res) -> dict:
    """The ICC(s) each model defines, from its variance components."""
    vc = res.vcomp
    if key in ("ri_REML", "ri_ML", "nested_REML"):
        tot = sum(vc.values())
        out = {"icc": vc["therapist"] / tot}
        if "cluster" in vc:
            out["icc_cluster"] = vc["cluster"] / tot
        return out
    if key == "logit_laplace":
        return {"icc": vc["therapist"] / (vc["therapist"] + LATENT)}
    if key == "arm_REML":  # one residual: v_a / (v_a + s2)
        return {f"icc[{lv}]": vc[f"therapist[{lv}]"] / (vc[f"therapist[{lv}]"] + vc["residual"])
                for lv in res.model.arm_levels}
    if key == "logit_arm":
        return {f"icc[{lv}]": vc[f"therapist[{lv}]"] / (vc[f"therapist[{lv}]"] + LATENT)
                for lv in res.model.arm_levels}
    if key == "slope_REML":  # var at slope 0 and 1 from the random-effects covariance
        c = res.cov_re.to_numpy()
        s = res.model.slope_name
        v1 = c[0, 0] + 2 * c[0, 1] + c[1, 1]
        return {f"icc[{s}=0]": c[0, 0] / (c[0, 0] + vc["residual"]), f"icc[{s}=1]": v1 / (v1 + vc["residual"])}
    if key == "bayes":  # posterior median of the draws' variance share
        post = res.idata.posterior
        d = (post["var_therapist"] / (post["var_therapist"] + post["var_residual"])).values.ravel()
        return {"icc": float(np.median(d))}
    raise KeyError(key)


@pytest.fixture(scope="module")
def every_fit(fits):
    from therapist_effects.models.bayes import BayesConfig, BayesModel

    out = dict(fits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # lmer(phq9_post ~ phq9_pre + feedback + (1 + feedback | therapist_id))
        out["slope_REML"] = RandomSlopeModel.from_frame(FB, "phq9_post", ["phq9_pre"], therapist="therapist_id",
                                                        arm="feedback").fit()
        # glmer(recovered ~ phq9_pre + feedback + (0 + control | t) + (0 + feedback | t), binomial)
        out["logit_arm"] = LogisticArmVarianceModel.from_frame(FB, "recovered", ["phq9_pre"], therapist="therapist_id",
                                                               arm="feedback").fit()
        small = FB[FB["therapist_id"].isin(sorted(FB["therapist_id"].unique())[:20])]
        out["bayes"] = BayesModel("random_intercept", small, "phq9_post", ["phq9_pre", "feedback"],
                                  therapist="therapist_id",
                                  config=BayesConfig(chains=2, draws=200, tune=200, seed=3)).fit()
    return out


KEYS = ["ri_REML", "ri_ML", "nested_REML", "arm_REML", "slope_REML", "logit_laplace", "logit_arm", "bayes"]


def test_every_results_class_has_the_same_signatures(every_fit):
    classes = {type(every_fit[k]) for k in KEYS}
    assert len(classes) == 6  # reml (RI and nested share MixedResults), arm, slopes, glmm, glmm_arm, bayes
    for cls in classes:
        assert issubclass(cls, ModelResults)
        icc = list(inspect.signature(cls.icc).parameters.values())
        assert [p.name for p in icc[1:3]] == ["level", "method"], cls
        assert icc[1].default is None and icc[2].default is None, cls
        ci = list(inspect.signature(cls.conf_int).parameters.values())
        assert [p.name for p in ci[1:3]] == ["level", "method"], cls
        assert ci[1].default == 0.95, cls
        te_ = list(inspect.signature(cls.therapist_effects).parameters.values())
        assert [p.name for p in te_[1:3]] == ["level", "higher_is_better"], cls
        assert te_[1].default == 0.95, cls
        assert callable(cls.summary) and callable(cls.to_contract)


@pytest.mark.parametrize("key", KEYS)
def test_same_types_for_every_results_class(every_fit, key):
    res = every_fit[key]
    assert isinstance(res.params, pd.Series) and isinstance(res.bse, pd.Series)
    fe = list(res.fe_params.index)
    v = res.vcov
    assert isinstance(v, pd.DataFrame) and list(v.index) == fe == list(v.columns)
    np.testing.assert_allclose(np.sqrt(np.diag(v.to_numpy())), res.bse[fe].to_numpy(), rtol=1e-10)
    for ic in (res.llf, res.aic, res.bic):
        assert ic is None or isinstance(ic, float)
    assert (res.llf is None) == (key == "bayes")
    # icc(): one type; estimates equal the variance shares; no interval without a level
    icc = res.icc()
    assert type(icc) is ICC and list(icc.table.columns[:4]) == ICC_COLUMNS
    expected = _icc_by_hand(key, res)
    assert list(icc.table.index) == list(expected)
    for name, val in expected.items():
        assert icc[name] == pytest.approx(val, rel=1e-9)
    assert icc.table["ci_low"].isna().all() and icc.table["ci_method"].isna().all()
    if "icc" in expected:
        assert float(icc) == pytest.approx(expected["icc"], rel=1e-9)
    else:  # one ICC per arm: no single number
        assert math.isnan(float(icc))
    # conf_int(): the same columns everywhere, default method = the class's default interval
    ci = res.conf_int()
    assert list(ci.columns) == CONF_INT_COLUMNS
    assert set(fe) <= set(ci.index)
    assert (ci.loc[fe, "lower"] < res.fe_params[fe]).all() and (res.fe_params[fe] < ci.loc[fe, "upper"]).all()
    # therapist_effects(): the shared columns, effect inside its interval
    t = res.therapist_effects()
    assert THERAPIST_COLUMNS <= set(t.columns)
    data = TR if key == "nested_REML" else FB
    assert set(t["therapist"]) <= set(data["therapist_id"]) and len(set(t["therapist"])) == res.n_therapists
    assert ((t["ci_low"] <= t["effect"]) & (t["effect"] <= t["ci_high"])).all()
    # summary(): a Summary, i.e. printable text built from tables
    s = res.summary()
    assert isinstance(s, Summary) and isinstance(s, str) and s.title in s
    assert any("ICC" in name for name in s.tables) and "<table" in s.as_html()
    for name in fe:
        assert name in s


@pytest.mark.parametrize("key", KEYS)
def test_icc_with_level_carries_the_class_intervals(every_fit, key):
    res = every_fit[key]
    kw = {"method": "bootstrap", "n_boot": 40, "seed": 1} if key == "slope_REML" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        icc = res.icc(0.95, **kw)
    t = icc.table
    assert (t["ci_method"] == kw.get("method", res.default_interval)).all()
    assert ((t["ci_low"] <= t["estimate"]) & (t["estimate"] <= t["ci_high"])).all()
    # the same numbers as the class's own interval methods
    if key in ("ri_REML", "ri_ML", "nested_REML"):
        assert icc.interval("icc") == res.icc_interval(0.95)
        if key == "nested_REML":
            assert icc.interval("icc_cluster") == res.icc_interval(0.95, which="cluster")
    elif key == "logit_laplace":
        assert icc.interval("icc") == res.icc_interval(0.95)
    elif key in ("arm_REML", "logit_arm"):
        by_arm = res.icc_by_arm(0.95)
        for lv in res.model.arm_levels:
            assert icc.interval(f"icc[{lv}]") == (by_arm.loc[lv, "ci_low"], by_arm.loc[lv, "ci_high"])
    elif key == "slope_REML":
        bt = res.bootstrap(40, 1).draws
        s = res.model.slope_name
        assert icc.interval(f"icc[{s}=0]") == pytest.approx(tuple(np.nanquantile(bt["icc0"], [0.025, 0.975])))
    elif key == "bayes":
        import arviz as az

        post = res.idata.posterior
        d = (post["var_therapist"] / (post["var_therapist"] + post["var_residual"])).values.ravel()
        assert icc.interval("icc") == pytest.approx(tuple(az.hdi(d, hdi_prob=0.95)))


def test_bayes_therapist_table_is_therapist_effects(every_fit):
    res = every_fit["bayes"]
    pd.testing.assert_frame_equal(res.therapist_effects(), res.therapist_table())


def test_interval_methods_not_offered_are_refused(every_fit):
    with pytest.raises(ModelError, match="hdi"):
        every_fit["bayes"].conf_int(method="profile")
    with pytest.raises(ModelError, match="profile"):
        every_fit["logit_arm"].conf_int(method="bootstrap")
    with pytest.raises(ModelError, match="bootstrap"):
        every_fit["slope_REML"].icc(0.95)


# ------------------------------------------------------------------ one set of defaults
# Every results class takes the same defaults for the interval level, method, bootstrap size and
# seed, on every method that has them; seed=None is seed 0 in every bootstrap.

from therapist_effects.models.arm import ArmVarianceResults
from therapist_effects.models.bayes import BayesResults
from therapist_effects.engine.inference import DEFAULT_LEVEL, DEFAULT_N_BOOT
from therapist_effects.engine.results import DEFAULT_INTERVAL
from therapist_effects.models.glmm import LogisticMixedResults
from therapist_effects.models.glmm_arm import LogisticArmVarianceResults
from therapist_effects.models.glmm_slope import LogisticRandomSlopeResults
from therapist_effects.models.reml import MixedResults
from therapist_effects.models.slopes import RandomSlopeResults

RESULTS_CLASSES = [MixedResults, ArmVarianceResults, RandomSlopeResults, LogisticMixedResults,
                   LogisticArmVarianceResults, LogisticRandomSlopeResults, BayesResults]


@pytest.mark.parametrize("cls", RESULTS_CLASSES, ids=lambda c: c.__name__)
def test_one_set_of_defaults_in_every_results_class(cls):
    """``level`` defaults to DEFAULT_LEVEL (None on icc(): no interval unless asked), ``n_boot`` to
    DEFAULT_N_BOOT, ``seed`` to None, ``conf_int``'s method to the class's default interval (None
    meaning it), ``to_contract``'s interval to DEFAULT_INTERVAL, on every public method (and the
    bootstrap) that takes them."""
    checked = 0
    for name, fn in inspect.getmembers(cls, inspect.isfunction):
        if name.startswith("_") and name != "_bootstrap":
            continue
        params = inspect.signature(fn).parameters
        for pname, default in (("n_boot", DEFAULT_N_BOOT), ("seed", None)):
            if pname in params and name != "_bootstrap":
                assert params[pname].default == default, (cls.__name__, name, pname)
                checked += 1
        if "level" in params:
            want = None if name == "icc" else DEFAULT_LEVEL
            assert params["level"].default == want, (cls.__name__, name)
            checked += 1
    ci = inspect.signature(cls.conf_int).parameters["method"].default
    assert ci in (None, cls.default_interval), cls.__name__
    tc = inspect.signature(cls.to_contract).parameters
    assert "interval" not in tc or tc["interval"].default == DEFAULT_INTERVAL, cls.__name__
    assert cls.default_n_boot == DEFAULT_N_BOOT and cls.default_level == DEFAULT_LEVEL
    assert checked >= 3, cls.__name__


def _bootstrap_draws(res, n_boot, seed):
    """The replicates of each engine's parametric bootstrap (as an array, NaN for failed refits)."""
    if isinstance(res, MixedResults):
        return res.bootstrap(n_boot, seed)["therapist"].to_numpy()
    if isinstance(res, RandomSlopeResults):
        return res.bootstrap(n_boot, seed).draws["therapist"].to_numpy()
    if isinstance(res, ArmVarianceResults):
        return res._bootstrap(n_boot, seed)["therapist[0]"].to_numpy()
    return res._bootstrap(n_boot, seed)  # LogisticMixedResults: the therapist variances


@pytest.mark.parametrize("key", ["ri_REML", "nested_REML", "arm_REML", "slope_REML", "logit_laplace"])
def test_seed_none_is_seed_zero_in_every_bootstrap(every_fit, key):
    """Every engine's bootstrap goes through engine.inference.parametric_bootstrap: seed=None gives
    the replicates of seed 0, another seed others; the replicates scatter around the fitted
    therapist variance (not a constant, not a stub)."""
    res = every_fit[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b, c = (_bootstrap_draws(res, 12, s) for s in (None, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[np.isfinite(a) & np.isfinite(c)], c[np.isfinite(a) & np.isfinite(c)])
    ok = a[np.isfinite(a)]
    assert ok.size >= 8 and np.std(ok) > 0
    est = res.vcomp["therapist[0]" if key == "arm_REML" else "therapist"]
    assert ok.min() < 3 * est and ok.max() > est / 3


def test_arm_bootstrap_counts_failed_refits(every_fit, monkeypatch):
    """A refit that fails (here: every third optimisation raises) is a NaN row, counted in a
    warning of the fit, and left out of the percentile interval."""
    res = every_fit["arm_REML"]
    model = res.model
    calls = {"n": 0}
    optimise = type(model)._optimise

    def flaky(self, method, start=None):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise np.linalg.LinAlgError("refit failed")
        return optimise(self, method, start)

    monkeypatch.setattr(type(model), "_optimise", flaky)
    monkeypatch.setattr(res, "warnings", list(res.warnings))  # the shared fit keeps its own list
    res._boot_cache.clear()
    with pytest.warns(Warning, match="4 of 12 bootstrap refits failed"):
        draws = res._bootstrap(12, 5)
    assert int(draws["therapist[0]"].isna().sum()) == 4
    with pytest.warns(Warning, match="4 of 12 bootstrap refits gave no therapist"):
        lo, hi = res._boot_interval("therapist[0]", 0.9, 12, 5)
    ok = draws["therapist[0]"].dropna().to_numpy()
    assert (lo, hi) == pytest.approx(tuple(np.quantile(ok, [0.05, 0.95])))
    res._boot_cache.clear()
