"""The simulator: determinism, structure, and recovery of its known truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf

from therapist_effects.simulate import (
    PracticeSimulation,
    inject_data_errors,
    simulate_practice,
    simulate_random_intercept,
)


def test_deterministic_given_seed():
    a, _ = simulate_practice(seed=11, n_services=2, therapists_per_service=5)
    b, _ = simulate_practice(seed=11, n_services=2, therapists_per_service=5)
    c, _ = simulate_practice(seed=12, n_services=2, therapists_per_service=5)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_structure_of_session_export():
    s, truth = simulate_practice(seed=3)
    lab = PracticeSimulation().labels
    assert s[lab["score"]].between(0, 27).all()  # floor and ceiling of PHQ-9
    per_patient = s.groupby(lab["patient"])
    assert (per_patient[lab["therapist"]].nunique() == 1).all()  # nested in one therapist
    assert (per_patient[lab["arm"]].nunique() == 1).all()
    caseload = s.groupby(lab["therapist"])[lab["patient"]].nunique()
    assert caseload.std() > 0.4 * caseload.mean()  # unbalanced caseloads
    # missed sessions leave gaps in the session numbers
    gaps = per_patient[lab["occasion"]].agg(lambda x: x.max() - x.min() + 1 - x.size)
    assert (gaps > 0).mean() > 0.2
    assert set(s[lab["ending"]]) == {"completed", "dropout"}
    assert s[lab["service"]].nunique() == 4
    assert 0.0 < truth["icc_feedback"] < truth["icc_control"]


def test_injected_errors_are_present():
    s, _ = simulate_practice(seed=5, n_services=2, therapists_per_service=5)
    e = inject_data_errors(s, seed=5)
    lab = PracticeSimulation().labels
    assert len(e) == len(s) + 1
    assert (e[lab["score"]] == 99.0).sum() == 1
    assert (e[lab["score"]] == "n/a").sum() == 1
    assert e[lab["therapist"]].isna().sum() == 1
    assert (e[lab["date"]] == "2099-01-01").sum() == 1
    assert (e.groupby(lab["patient"])[lab["therapist"]].nunique() > 1).sum() >= 1


def test_random_intercept_truth_is_recovered_by_statsmodels():
    # 200 therapists x 40 patients with ICC .10: MixedLM's REML estimate is within 3 standard errors.
    df = simulate_random_intercept(200, 40, 0.10, seed=7)
    fit = smf.mixedlm("y ~ x", df, groups=df["therapist"]).fit(reml=True)
    tau2 = float(fit.cov_re.iloc[0, 0])
    icc = tau2 / (tau2 + fit.scale)
    # large-sample SE of the ICC (Donner 1986): about 0.014 here
    assert abs(icc - 0.10) < 0.045
    assert abs(fit.params["x"] - 0.5) < 0.05


def test_practice_simulation_recovers_latent_model():
    """With no dropout, no rounding noise and no floor effects, the end score follows the latent model."""
    s, truth = simulate_practice(
        seed=9, dropout_hazard=1e-9, baseline_mean=20, therapists_per_service=40, mean_caseload=30,
        therapist_var=(2.0, 2.0), service_var=0.0, instrument_max=100.0, instrument_min=-100.0,
    )
    lab = PracticeSimulation().labels
    last = s.sort_values([lab["patient"], lab["occasion"]]).groupby(lab["patient"]).agg(
        end=(lab["score"], "last"), base=(lab["score"], "first"), t=(lab["therapist"], "first"),
        fb=(lab["arm"], "first"),
    )
    fit = smf.mixedlm("end ~ base + fb", last, groups=last["t"]).fit(reml=True)
    # b_baseline 0.55 and b_feedback -0.9 are recovered within ~3 SE
    assert abs(fit.params["base"] - truth["b_baseline"]) < 3 * fit.bse["base"]
    assert abs(fit.params["fb"] - truth["b_feedback"]) < 3 * fit.bse["fb"]
    assert np.isfinite(fit.scale)


def test_committed_demo_data_regenerates_byte_for_byte(tmp_path):
    """data/demo_sessions.csv is what `python -m therapist_effects simulate-demo` writes."""
    from pathlib import Path

    from therapist_effects.cli import main

    repo = Path(__file__).resolve().parents[1]
    out, truth = tmp_path / "demo.csv", tmp_path / "truth.json"
    assert main(["simulate-demo", "--out", str(out), "--truth", str(truth)]) == 0
    assert out.read_bytes() == (repo / "data" / "demo_sessions.csv").read_bytes()
    assert truth.read_bytes() == (repo / "data" / "demo_truth.json").read_bytes()
