"""Random-effects pooling against metafor 3.8-1 (tests/reference/metafor.R -> metafor.json), Donner's
unbalanced-n0 variance by hand, and metafor-style study tables (column mapping, intervals, yi/vi, arms)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from refdata import REFERENCE_DIR
from therapist_effects.exceptions import InputError, StatisticalWarning
from therapist_effects.meta import (
    donner_n0,
    donner_var_icc,
    leave_one_out,
    pool,
    pool_study_table,
    study_table,
    to_scale,
    var_from_ci,
)

METAFOR = json.loads((REFERENCE_DIR / "metafor.json").read_text())
FITS = METAFOR["fits"]
#: our names -> metafor's (coef(fit), fit$se, fit$ci.lb, fit$ci.ub, fit$tau2, fit$I2, fit$QE,
#: predict(fit)$pi.lb, predict(fit)$pi.ub)
FIELDS = {"estimate": "estimate", "se": "se", "ci_low": "ci.lb", "ci_high": "ci.ub", "tau2": "tau2", "I2": "I2",
          "Q": "QE", "pi_low": "pi.lb", "pi_high": "pi.ub"}


def _id(f):
    return f"{f['set']}-{f['method']}-{f['test']}"


@pytest.mark.parametrize("fit", FITS, ids=_id)
def test_pool_matches_metafor(fit):
    # R: rma(yi, vi, method = fit$method, test = fit$test, control = list(threshold = 1e-10, tol = 1e-10));
    #    predict(); weights()   (tests/reference/metafor.R)
    s = METAFOR["sets"][fit["set"]]
    out = pool(s["yi"], s["vi"], fit["method"], test=fit["test"], scale=None)
    for ours, theirs in FIELDS.items():
        assert out[ours] == pytest.approx(fit[theirs], rel=1e-6, abs=1e-9), ours
    np.testing.assert_allclose(out["weights"], fit["weights"], rtol=1e-6)
    # metafor with its default convergence control: same to its own stopping tolerance (tau2 change < 1e-5;
    # PM's uniroot at tol 1.2e-4)
    d = fit["default_control"]
    assert out["estimate"] == pytest.approx(d["estimate"], abs=1e-4)
    assert out["tau2"] == pytest.approx(d["tau2"], abs=1e-4)


@pytest.mark.parametrize("fit", [f for f in FITS if "leave1out" in f], ids=_id)
def test_leave_one_out_matches_metafor(fit):
    # R: leave1out(rma(yi, vi, method = fit$method))
    s = METAFOR["sets"][fit["set"]]
    table = leave_one_out(s["yi"], s["vi"], fit["method"], scale=None)
    ref = fit["leave1out"]
    for ours, theirs in (("estimate", "estimate"), ("se", "se"), ("ci_low", "ci.lb"), ("ci_high", "ci.ub"),
                         ("tau2", "tau2"), ("I2", "I2")):
        np.testing.assert_allclose(table[ours], ref[theirs], rtol=1e-6, atol=1e-8, err_msg=ours)


def test_reference_sets_cover_truncation_and_knha():
    # the reference must exercise what the issue names: tau2 truncated at 0, a near-zero study, and
    # Knapp-Hartung's unscaled s^2 < 1 (its se below the Wald se) as well as tau2 > 0
    by = {_id(f): f for f in FITS}
    assert by["homogeneous-REML-z"]["tau2"] == 0 and by["trials_logit-PM-z"]["tau2"] == 0
    assert by["near_zero-REML-z"]["tau2"] > 0 and min(METAFOR["sets"]["near_zero"]["yi"]) <= 0.001
    assert by["homogeneous-REML-knha"]["se"] < by["homogeneous-REML-z"]["se"]


def test_knapp_hartung_by_hand():
    # y = 0, .2, .4, .6 with v = .04: DL tau2 = 2/75, w* = 15, mu = .3, se_z = sqrt(1/60);
    # s^2 = sum w* (y - mu)^2 / (k - 1) = 15 * .2 / 3 = 1  ->  se_knha = se_z;  t_{.975, 3} = 3.182446
    out = pool([0.0, 0.2, 0.4, 0.6], [0.04] * 4, "DL", test="knha", scale=None)
    assert out["se"] == pytest.approx(math.sqrt(1 / 60), rel=1e-12)
    assert out["ci_high"] == pytest.approx(0.3 + 3.182446305 * math.sqrt(1 / 60), rel=1e-9)
    assert out["pi_high"] == pytest.approx(0.3 + 3.182446305 * math.sqrt(1 / 60 + 2 / 75), rel=1e-9)
    assert out["p_value"] == pytest.approx(2 * stats.t.sf(0.3 / math.sqrt(1 / 60), 3), rel=1e-12)


def test_donner_unbalanced_n0_by_hand():
    # caseloads 2, 3, 5: N = 10, sum n^2 = 38, n0 = (10 - 3.8) / 2 = 3.1 (N / k = 3.333)
    assert donner_n0([2, 3, 5]) == pytest.approx(3.1, rel=1e-15)
    # ICC .2, k = 3: var = 2 (.8)^2 (1 + 2.1 * .2)^2 / (3.1 * 2.1 * 2) = 2 * .64 * 2.0164 / 13.02
    assert donner_var_icc(0.2, 10, 3, caseloads=[2, 3, 5]) == pytest.approx(2 * 0.64 * 1.42**2 / 13.02, rel=1e-12)
    # balanced caseloads: n0 = N / k, the same as without caseloads
    assert donner_var_icc(0.05, 100, 5, caseloads=[20] * 5) == pytest.approx(donner_var_icc(0.05, 100, 5), rel=1e-12)
    # caseloads from 1 to 2000: the mean caseload understates the variance several-fold
    loads = np.r_[np.ones(19), 2000.0]
    n0 = (loads.sum() - (loads**2).sum() / loads.sum()) / 19
    assert donner_n0(loads) == pytest.approx(n0) and n0 < 2
    assert donner_var_icc(0.05, loads.sum(), 20, caseloads=loads) > 100 * donner_var_icc(0.05, loads.sum(), 20)


def test_study_table_column_mapping_and_inputs():
    raw = pd.DataFrame({
        "Study": ["A", "B", "C", "D"],
        "ICC": [0.05, 0.02, 0.08, np.nan],
        "Lower": [np.nan, 0.004, np.nan, np.nan],
        "Upper": [np.nan, 0.06, np.nan, np.nan],
        "N": [400, 900, 250, np.nan],
        "therapists": [20, 45, 12, np.nan],
        "yi": [np.nan, np.nan, np.nan, 0.03],
        "vi": [np.nan, np.nan, np.nan, 0.0004],
    })
    cols = {"study": "Study", "icc": "ICC", "ci_low": "Lower", "ci_high": "Upper", "n_patients": "N",
            "n_therapists": "therapists"}
    t = study_table(raw, columns=cols, scale="fisher_z")
    assert list(t["input"]) == ["donner", "ci", "donner", "yi/vi"]
    # row B: vi back-computed from the interval on Fisher's z: ((atanh .06 - atanh .004) / (2 * 1.959964))^2
    assert t.at[1, "vi"] == pytest.approx(((math.atanh(0.06) - math.atanh(0.004)) / (2 * 1.959963985)) ** 2, rel=1e-8)
    # row A: Donner with n0 = N / k = 20: 2 (.95)^2 (1 + 19 * .05)^2 / (20 * 19 * 19)
    assert t.at[0, "var_icc"] == pytest.approx(2 * 0.95**2 * 1.95**2 / (20 * 19 * 19), rel=1e-12)
    assert t.at[0, "yi"] == pytest.approx(math.atanh(0.05)) and t.at[3, "icc"] == pytest.approx(math.tanh(0.03))
    # the Donner rows' vi on Fisher's z: at the common ICC (.05 + .08) / 2 = .065; A: n0 = 20, k = 20
    assert t.at[0, "vi"] == pytest.approx(2 * 0.935**2 * (1 + 19 * 0.065) ** 2 / (20 * 19 * 19) / (1 - 0.065**2) ** 2,
                                          rel=1e-12)
    assert t.at[3, "vi"] == 0.0004  # given yi/vi rows are left as they are
    out = pool_study_table(raw, "REML", test="knha", columns=cols)
    direct = pool(t["yi"], t["vi"], "REML", test="knha")  # vi as study_table gave them
    assert out["estimate"] == direct["estimate"] and out["icc"]["estimate"] == pytest.approx(math.tanh(direct["estimate"]))
    studies = pd.DataFrame(out["studies"])
    w = 1 / (t["vi"] + direct["tau2"])
    np.testing.assert_allclose(studies["weight_percent"], 100 * w / w.sum(), rtol=1e-12)
    assert len(out["leave_one_out"]) == 4
    # logit scale: a lower limit of 0 uses the upper half of the interval
    v = var_from_ci(0.01, 0.0, 0.05, "logit")
    assert v == pytest.approx(((math.log(0.05 / 0.95) - math.log(0.01 / 0.99)) / 1.959963985) ** 2, rel=1e-8)


def test_study_table_errors_name_file_row_and_column():
    raw = pd.DataFrame({"Study": ["A", "B"], "ICC": [0.05, "n/a"], "N": [100, 200], "k": [10, 12]})
    with pytest.raises(InputError, match=r"^pub\.csv: row 2 \(study 'B'\), column 'ICC': expected a number") as e:
        study_table(raw, columns={"study": "Study", "icc": "ICC", "n_patients": "N", "n_therapists": "k"},
                    source="pub.csv")
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"meta\.columns\.icc: column 'Icc' is not in the table"):
        study_table(raw, columns={"study": "Study", "icc": "Icc"}, source="pub.csv")
    with pytest.raises(InputError, match=r"meta\.columns: unknown role"):
        study_table(raw, columns={"trial": "Study"}, source="pub.csv")


def test_arm_table_pooled_ratio_on_the_log_scale_by_hand():
    # three trials, one row per arm: ICC_c, ICC_f and Donner variances given
    t = pd.DataFrame({
        "study": ["T1", "T1", "T2", "T2", "T3", "T3", "T4", "T4"],
        "arm": ["control", "feedback"] * 4,
        "icc": [0.020, 0.015, 0.012, 0.010, 0.030, 0.020, 0.015, 0.0],
        "var_icc": [4e-5, 3e-5, 2e-5, 2e-5, 6e-5, 4e-5, 3e-5, 2e-5],
    })
    with pytest.warns(StatisticalWarning, match=r"\['T4'\]"):
        out = pool_study_table(t, "DL", scale="fisher_z")
    arms = out["arms"]
    assert arms["levels"] == {"control": "control", "feedback": "feedback"}
    yi = np.log([0.015 / 0.020, 0.010 / 0.012, 0.020 / 0.030])
    vi = np.array([3e-5 / 0.015**2 + 4e-5 / 0.020**2, 2e-5 / 0.010**2 + 2e-5 / 0.012**2,
                   4e-5 / 0.020**2 + 6e-5 / 0.030**2])
    ref = pool(yi, vi, "DL", scale=None)
    assert arms["ratio"]["estimate"] == pytest.approx(ref["estimate"], rel=1e-12)
    assert arms["ratio"]["ratio"]["estimate"] == pytest.approx(math.exp(ref["estimate"]), rel=1e-12)
    assert arms["reduction"]["estimate"] == pytest.approx(1 - math.exp(ref["estimate"]), rel=1e-12)
    assert arms["reduction"]["ci_low"] == pytest.approx(1 - math.exp(ref["ci_high"]), rel=1e-12)
    # per-arm pooled ICCs: the control rows alone, on Fisher's z
    c = t[t["arm"] == "control"]
    yc, vc = to_scale(c["icc"], c["var_icc"], "fisher_z")
    assert arms["control"]["icc"]["estimate"] == pytest.approx(math.tanh(pool(yc, vc, "DL")["estimate"]), rel=1e-12)
    assert arms["feedback"]["k"] == 4  # the singular feedback arm keeps its weight in the per-arm pooling
    # no rows without an arm: the overall pooling takes every row
    assert out["k"] == 8


def test_knha_interval_coverage_small_k():
    # Knapp-Hartung keeps nominal coverage with few studies where the Wald interval does not
    # (true mu = 0.1, tau2 = 0.02, 5 studies with vi in [.005, .05]); 2000 seeded replicates
    rng = np.random.default_rng(12)
    hits = {"z": 0, "knha": 0}
    reps = 2000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(reps):
            v = rng.uniform(0.005, 0.05, 5)
            y = 0.1 + rng.normal(0, math.sqrt(0.02), 5) + rng.normal(0, np.sqrt(v))
            for test in hits:
                o = pool(y, v, "REML", test=test, scale=None)
                hits[test] += o["ci_low"] <= 0.1 <= o["ci_high"]
    cover = {k: h / reps for k, h in hits.items()}
    assert cover["knha"] > cover["z"]
    assert abs(cover["knha"] - 0.95) < 0.02  # binomial se at 2000 reps: 0.005


def test_meta_report_step_with_a_mapped_arm_table(tmp_path):
    """The workflow's meta step on a meta-analyst's table: own column names (meta.columns), published
    intervals, arm rows; REML with Knapp-Hartung; pooled.json as the contract names it."""
    from therapist_effects.pipeline import meta_report_step

    raw = pd.DataFrame({
        "Trial": ["A", "B", "C", "A", "A", "B", "B", "C", "C"],
        "Arm": ["", "", "", "TAU", "FB", "TAU", "FB", "TAU", "FB"],
        "ICC": [0.03, 0.012, 0.05, 0.035, 0.025, 0.015, 0.010, 0.06, 0.045],
        "Lower": [0.01, 0.0, 0.02, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan],
        "Upper": [0.07, 0.05, 0.10, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan],
        "N": [np.nan, np.nan, np.nan, 300, 310, 500, 480, 200, 210],
        "k": [np.nan, np.nan, np.nan, 20, 20, 30, 30, 15, 15],
    })
    path = tmp_path / "published.csv"
    raw.to_csv(path, index=False)
    cols = {"study": "Trial", "arm": "Arm", "icc": "ICC", "ci_low": "Lower", "ci_high": "Upper", "n_patients": "N",
            "n_therapists": "k"}
    cfg = {"meta": {"method": "REML", "test": "knha", "scale": "fisher_z", "columns": cols, "feedback_level": "FB"},
           "intervals": {"level": 0.95}}
    out = tmp_path / "meta" / "report.html"
    meta_report_step([], [], str(path), cfg, str(out), out_json=str(tmp_path / "pooled.json"),
                     out_csv=str(tmp_path / "studies.csv"))
    pooled = json.loads((tmp_path / "pooled.json").read_text())
    assert (pooled["method"], pooled["test"], pooled["scale"], pooled["n_studies"]) == ("REML", "knha", "fisher_z", 3)
    # the overall rows (no arm): vi from the published intervals on Fisher's z, pooled by REML + knha
    z = 1.959963985
    yi = np.arctanh([0.03, 0.012, 0.05])
    vi = ((np.arctanh([0.07, 0.05, 0.10]) - np.arctanh([0.01, 0.0, 0.02])) / (2 * z)) ** 2
    ref = pool(yi, vi, "REML", test="knha")
    for key in ("estimate", "se", "ci_low", "ci_high", "tau2", "I2", "pi_low", "pi_high"):
        assert pooled["pooled"][key] == pytest.approx(ref[key], rel=1e-8, abs=1e-12), key
    assert pooled["pooled"]["icc"]["estimate"] == pytest.approx(math.tanh(ref["estimate"]), rel=1e-8)
    # arms: meta.feedback_level names the feedback label (the default rule would take TAU, the second
    # label in sorted order)
    assert pooled["arms"]["levels"] == {"control": "TAU", "feedback": "FB"}
    # ratio per trial: ICC_FB / ICC_TAU with Donner variances (n0 = N / k) of each arm row
    assert [s["icc_ratio"] for s in pooled["arms"]["ratio"]["studies"]] == pytest.approx([0.025 / 0.035, 0.010 / 0.015,
                                                                                          0.045 / 0.06])
    assert pooled["arms"]["control"]["k"] == 3 and "ratio" in pooled["arms"]
    assert len(pooled["leave_one_out"]) == 3
    assert "Leave-one-out" in out.read_text()
    # identical effects: Knapp-Hartung's s^2 is 0, so is its se; no statistic rather than a crash
    same = pool([0.1, 0.1], [0.01, 0.02], "DL", test="knha")
    assert same["se"] == 0 and math.isnan(same["z"])
