"""models.fit_model: the config -> engine mapping, for paths the end-to-end runs do not take."""

from __future__ import annotations

import warnings

import pytest

from therapist_effects.config import load_config
from therapist_effects.exceptions import SamplerWarning
from therapist_effects.models.fitting import fit_model
from therapist_effects.simulate import simulate_random_intercept


def test_bayes_prior_sensitivity_reuses_the_reported_fit():
    df = simulate_random_intercept(30, 20, 0.10, seed=3).rename(columns={"y": "end", "x": "baseline"})
    dataset = {"path": "x.csv", "layout": "patient",
               "columns": {"patient": "patient", "therapist": "therapist", "outcome": "end", "baseline": "baseline"}}
    cfg = load_config({
        "datasets": {"d": dataset},
        "models": [{"id": "b", "type": "random_intercept", "engine": "bayes", "prior_sensitivity": True}],
        "bayes": {"chains": 2, "draws": 300, "tune": 300, "sensitivity_priors": {"sigma_therapist": {"dist": "halfnormal", "sigma": 0.1}}},
    })
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SamplerWarning)  # 2 x 300 draws: ESS may fall below 400
        entry, table, _ = fit_model(df, cfg["models"][0], cfg["datasets"]["d"], cfg)
    sens = entry["prior_sensitivity"]
    # the base ICC of the sensitivity analysis is the reported posterior's, not a second fit's
    assert sens["icc"]["base"]["icc"]["median"] == pytest.approx(entry["icc"]["median"], rel=1e-12)
    assert "icc" in sens["change"]
    assert len(table) == 30 and "sampling_seconds" not in entry["diagnostics"]
