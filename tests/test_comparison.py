"""Model comparison (comparison.py): AIC/BIC as lme4's AIC()/BIC(), LRTs as lme4's anova().

Reference values: tests/reference/comparison.R -> comparison.json (R 4.2.2, lme4 1.1-31); the
boundary-corrected p-values are the 50:50 chi-square mixtures worked from anova()'s statistic.
"""

from __future__ import annotations

import json
import math
import warnings

import pandas as pd
import pytest
from scipy import stats

from refdata import REFERENCE_DIR
from therapist_effects.models.comparison import (
    add_to_estimates,
    information_criteria,
    lrt,
    model_comparison,
    n_params_of,
    nesting,
)
from therapist_effects.config import load_config
from therapist_effects.exceptions import TherapistEffectsWarning
from therapist_effects.models.fitting import fit_model

REF = json.loads((REFERENCE_DIR / "comparison.json").read_text())
CRIT = REF["criteria"]

# AIC()/BIC() of lme4 fits, copied from comparison.json beside the R calls (checked against the JSON below).
LME4_IC = {
    # lmer(phq9_post ~ phq9_pre + feedback + (1 | therapist_id), therapy_feedback, REML = TRUE)
    ("therapy_feedback", "ri_REML"): (12567.8362663082, 12596.0127857395),
    # the same, REML = FALSE
    ("therapy_feedback", "ri_ML"): (12559.2688713845, 12587.4453908158),
    # lmer(phq9_post ~ phq9_pre + (1 | therapist_id), therapy_feedback, REML = FALSE)
    ("therapy_feedback", "ri_noarm_ML"): (12572.629167478, 12595.170383023),
    # lmer(phq9_post ~ phq9_pre + feedback + (0 + control | therapist_id) + (0 + feedback | therapist_id))
    ("therapy_feedback", "arm_REML"): (12549.1668143266, 12582.9786376442),
    # lmer(phq9_post ~ phq9_pre + feedback + (0 + control + feedback | therapist_id), therapy_feedback)
    ("therapy_feedback", "arm_corr_REML"): (12550.7838151206, 12590.2309423244),
    # lmer(phq9_post ~ phq9_pre + feedback + (1 + feedback | therapist_id), therapy_feedback)
    ("therapy_feedback", "slope_REML"): (12550.7838151724, 12590.2309423763),
    # glmer(recovered ~ phq9_pre + feedback + (1 | therapist_id), therapy_feedback, binomial, nAGQ = 1)
    ("therapy_feedback", "logit_laplace"): (2839.41420961238, 2861.95542515742),
    # the same, nAGQ = 10
    ("therapy_feedback", "logit_agq10"): (2839.36395717285, 2861.90517271788),
    # lmer(phq9_post ~ phq9_pre + feedback + (1 | therapist_id), therapy_trials)
    ("therapy_trials", "ri_REML"): (22039.4677905301, 22070.4070677486),
    # lmer(phq9_post ~ phq9_pre + feedback + (1 | trial_id/therapist_id), therapy_trials)
    ("therapy_trials", "nested_REML"): (22040.4075352817, 22077.5346679439),
    # lmer(phq9_post ~ phq9_pre + feedback + trial_id + (1 | therapist_id), therapy_trials)
    ("therapy_trials", "trialfixed_REML"): (22042.7679669756, 22104.6465214125),
}

# our model configs for the lme4 fits above
CONFIGS = {
    "ri_REML": {"type": "random_intercept"},
    "ri_ML": {"type": "random_intercept", "method": "ML"},
    "ri_noarm_ML": {"type": "random_intercept", "method": "ML", "covariates": ["phq9_pre"]},
    "ri_noarm_REML": {"type": "random_intercept", "covariates": ["phq9_pre"]},
    "arm_REML": {"type": "arm_variance"},
    "arm_corr_REML": {"type": "arm_variance", "correlated": True},
    "slope_REML": {"type": "random_slope"},
    "logit_laplace": {"type": "random_intercept", "family": "binomial", "outcome": "recovered", "method": "laplace"},
    "logit_agq10": {"type": "random_intercept", "family": "binomial", "outcome": "recovered", "method": "agq"},
    "nested_REML": {"type": "nested"},
    "trialfixed_REML": {"type": "random_intercept", "covariates": ["phq9_pre", "feedback", "trial_id"]},
}


def _setup(ds):
    d = pd.read_csv(REFERENCE_DIR / f"{ds}.csv")
    patients = d.rename(columns={"patient_id": "patient", "therapist_id": "therapist", "phq9_post": "end",
                                 "phq9_pre": "baseline", "feedback": "arm", "trial_id": "cluster"})
    dataset = {"path": "x.csv", "layout": "patient",
               "columns": {"patient": "patient_id", "therapist": "therapist_id", "outcome": "phq9_post",
                           "baseline": "phq9_pre", "arm": "feedback", "cluster": "trial_id"}}
    return patients, dataset


_ENTRIES: dict = {}


def _entries(ds, ids):
    patients, dataset = _setup(ds)
    models = [{"id": i, **CONFIGS[i], "interval": "wald"} for i in ids]
    cfg = load_config({"datasets": {"d": dataset}, "models": models})
    out = {}
    for m in cfg["models"]:
        key = (ds, m["id"])
        if key not in _ENTRIES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TherapistEffectsWarning)
                _ENTRIES[key] = fit_model(patients, m, cfg["datasets"]["d"], cfg)[0]
        out[m["id"]] = json.loads(json.dumps(_ENTRIES[key]))
    return cfg["models"], out, patients, dataset


def test_copied_values_match_json():
    for (ds, name), (aic, bic) in LME4_IC.items():
        assert (CRIT[ds][name]["AIC"], CRIT[ds][name]["BIC"]) == (aic, bic)


@pytest.mark.parametrize("key", list(LME4_IC))
def test_information_criteria_formula_reproduces_lme4(key):
    ds, name = key
    r = CRIT[ds][name]
    ic = information_criteria(r["logLik"], r["df"], r["nobs"])
    assert ic["aic"] == pytest.approx(LME4_IC[key][0], rel=1e-12)
    assert ic["bic"] == pytest.approx(LME4_IC[key][1], rel=1e-12)


@pytest.mark.parametrize("key", list(LME4_IC))
def test_models_aic_bic_match_lme4(key):
    ds, name = key
    models, entries, patients, dataset = _entries(ds, [name])
    est = {"models": entries}
    add_to_estimates(est, models, patients, dataset)
    e = est["models"][name]
    assert n_params_of(e) == CRIT[ds][name]["df"]
    # the engines reach lme4's optimum: AIC/BIC within 2e-3 (absolute) of lme4's
    assert e["aic"] == pytest.approx(LME4_IC[key][0], abs=2e-3)
    assert e["bic"] == pytest.approx(LME4_IC[key][1], abs=2e-3)
    row = est["model_comparison"]["models"][0]
    assert row["criterion"] == ("REML" if CRIT[ds][name]["REML"] else "ML")
    assert row["aic"] == e["aic"] and row["n_obs"] == CRIT[ds][name]["nobs"]


def _test_row(table, small, big):
    rows = [t for t in table["tests"] if t["model_0"] == small and t["model_1"] == big]
    assert len(rows) == 1, table["tests"]
    return rows[0]


def test_lrt_arm_correlation_reml_matches_anova():
    models, entries, patients, dataset = _entries("therapy_feedback", ["ri_REML", "arm_REML", "arm_corr_REML"])
    table = model_comparison(models, entries)
    t = _test_row(table, "arm_REML", "arm_corr_REML")
    ref = REF["lrt"]["arm_vs_arm_corr_REML"]  # anova(arm_REML, arm_corr_REML, refit = FALSE)
    assert t["criterion"] == "REML" and not t["refit_ml"]
    assert t["statistic"] == pytest.approx(ref["statistic"], abs=2e-3)
    assert t["df"] == ref["df"] == 1 and t["null_distribution"] == "chi2_1"
    assert t["p_value"] == pytest.approx(ref["p_value_chisq"], rel=2e-3)
    # (1 | therapist) shares a therapist's effect across arms, the diagonal arm model does not: not nested
    pairs = {(x["model_0"], x["model_1"]) for x in table["tests"]}
    assert pairs == {("arm_REML", "arm_corr_REML")}


def test_lrt_cluster_variance_uses_boundary_mixture():
    models, entries, patients, dataset = _entries("therapy_trials", ["ri_REML", "nested_REML"])
    t = _test_row(model_comparison(models, entries), "ri_REML", "nested_REML")
    ref = REF["lrt"]["nested_vs_ri_REML"]  # anova(ri_REML, nested_REML, refit = FALSE): chi2_1 p-value
    assert t["statistic"] == pytest.approx(ref["statistic"], abs=2e-3)
    assert t["null_distribution"] == "0.5 chi2_0 + 0.5 chi2_1"
    # 0.5 chi2_0 + 0.5 chi2_1: half of anova's naive p-value
    assert t["p_value"] == pytest.approx(0.5 * ref["p_value_chisq"], rel=2e-3)


def test_lrt_random_slope_uses_chi2_1_2_mixture():
    models, entries, patients, dataset = _entries("therapy_feedback", ["ri_REML", "slope_REML"])
    t = _test_row(model_comparison(models, entries), "ri_REML", "slope_REML")
    ref = REF["lrt"]["slope_vs_ri_REML"]  # anova(ri_REML, slope_REML, refit = FALSE)
    assert t["statistic"] == pytest.approx(ref["statistic"], abs=2e-3)
    assert t["df"] == 2 and t["null_distribution"] == "0.5 chi2_1 + 0.5 chi2_2"
    s = t["statistic"]
    assert t["p_value"] == pytest.approx(0.5 * stats.chi2.sf(s, 1) + 0.5 * stats.chi2.sf(s, 2), rel=1e-12)


def test_lrt_fixed_effect_refits_by_ml():
    models, entries, patients, dataset = _entries("therapy_feedback", ["ri_noarm_REML", "ri_REML"])
    table = model_comparison(models, entries, refit_ml=None)
    assert table["tests"] == []  # REML fits with different fixed effects: no test without ML refits
    est = {"models": entries}
    add_to_estimates(est, models, patients, dataset)
    t = _test_row(est["model_comparison"], "ri_noarm_REML", "ri_REML")
    ref = REF["lrt"]["arm_fixed_effect_ML"]  # anova(ri_REML, lmer(phq9_post ~ phq9_pre + (1|therapist_id))): ML refit
    assert t["refit_ml"] and t["criterion"] == "ML"
    assert t["statistic"] == pytest.approx(ref["statistic"], abs=1e-3)
    assert t["df"] == 1 and t["p_value"] == pytest.approx(ref["p_value_chisq"], rel=1e-3)
    # the ML log-likelihoods are lme4's
    assert t["loglik_1"] == pytest.approx(CRIT["therapy_feedback"]["ri_ML"]["logLik"], abs=1e-4)
    assert t["loglik_0"] == pytest.approx(CRIT["therapy_feedback"]["ri_noarm_ML"]["logLik"], abs=1e-4)


def test_nesting_rules():
    e = {"outcome": "y", "family": "gaussian", "n_patients": 10, "fixed_effects": {"(Intercept)": {}, "x": {}}}
    ri, arm = ({"id": "ri", "type": "random_intercept"}, e), ({"id": "a", "type": "arm_variance"}, e)
    assert nesting(ri, arm) is None and nesting(arm, ri) is None
    assert nesting(ri, ({"id": "n", "type": "nested"}, e))["boundary"]
    other = ({"id": "b", "type": "random_intercept"}, {**e, "outcome": "z"})
    assert nesting(ri, other) is None  # different outcomes are never nested
    corr = ({"id": "c", "type": "arm_variance", "correlated": True}, e)
    assert nesting(ri, corr) is None  # equal variances and correlation 1: not a recognised relation
    assert nesting(arm, corr)["what"] == "correlation of the arm effects"
    assert nesting(ri, ri) is None
    b = {**e, "family": "binomial", "method": "Laplace"}
    lap = ({"id": "l", "type": "random_intercept", "covariates": ["x"]}, b)
    small = ({"id": "s", "type": "random_intercept"}, {**b, "fixed_effects": {"(Intercept)": {}}})
    assert nesting(small, lap)["df_random"] == 0
    assert nesting(small, ({"id": "q", "type": "random_intercept"}, {**b, "method": "AGQ10"})) is None


def test_lrt_mixture_p_values_by_hand():
    # statistic 2.706 = chi2_1 0.90 quantile: p = 0.5 * 0.10 for one boundary variance
    q = stats.chi2.ppf(0.9, 1)
    t = lrt(-10.0, -10.0 + q / 2, 0, 1, True)
    assert t["p_value"] == pytest.approx(0.05, rel=1e-9)
    assert lrt(-10.0, -10.0, 0, 1, True)["p_value"] == 1.0  # statistic 0: p = 0.5 * 1 + 0.5 * 1
    assert lrt(-10.0, -9.0, 1, 0, False)["p_value"] == pytest.approx(stats.chi2.sf(2.0, 1))
    assert lrt(-10.0, -11.0, 1, 0, False)["statistic"] == 0.0


def test_failed_ml_refit_leaves_the_test_out():
    models, entries, patients, dataset = _entries("therapy_feedback", ["ri_noarm_REML", "ri_REML"])

    def broken(model):
        from therapist_effects.exceptions import ModelError

        raise ModelError("no convergence")

    assert model_comparison(models, entries, refit_ml=broken)["tests"] == []


def test_bayesian_entries_get_null_criteria():
    bayes = {"type": "random_intercept", "engine": "bayes", "method": "bayes", "loglik": None, "n_patients": 10,
             "fixed_effects": {"(Intercept)": {}}, "variance_components": {"therapist": {}, "residual": {}}}
    est = {"models": {"b": bayes}}
    add_to_estimates(est, [{"id": "b", "type": "random_intercept", "engine": "bayes"}], None, {})
    assert est["models"]["b"]["aic"] is None and est["models"]["b"]["bic"] is None
    assert est["model_comparison"] == {"models": [], "tests": []}


def test_information_criteria_refuses_nonsense():
    assert information_criteria(float("nan"), 3, 10) == {"aic": None, "bic": None}
    with pytest.raises(ValueError):
        information_criteria(-1.0, 3, 0)
    assert information_criteria(-1.0, 3, 10)["bic"] == pytest.approx(2.0 + 3 * math.log(10))
