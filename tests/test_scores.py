"""Several instruments per session row (columns.scores) and the NHS Talking Therapies paired outcomes.

Every expected value below is worked by hand from the published definitions (NHS England, NHS Talking
Therapies for anxiety and depression Manual 2023; NHS Digital IAPT metric definitions):
caseness = PHQ-9 >= 10 or GAD-7 >= 8; reliable change PHQ-9 6, GAD-7 4 points (">= threshold").
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from therapist_effects.config import load_config
from therapist_effects.exceptions import ConfigError, DataWarning
from therapist_effects.io.ingest import ingest_frame
from therapist_effects.io.instruments import get_instrument
from therapist_effects.models.fitting import extra_columns, model_frame
from therapist_effects.io.outcomes import derive_patient_outcomes
from therapist_effects.io.scores import paired_outcomes

NAN = math.nan


def one(p0, p1, g0, g1, n=2):
    out = paired_outcomes([p0], [p1], [g0], [g1], [n])
    return {k: float(v[0]) for k, v in out.items()}


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b


# (PHQ-9 first, last, GAD-7 first, last) -> caseness at start, recovered, reliable improvement,
# reliable deterioration, reliable recovery; each line worked by hand.
CASES = [
    # caseness cut-offs exactly: PHQ-9 10 is a case, 9 is not; GAD-7 8 is a case, 7 is not
    ((10, 9, 0, 0), (1, 1, 0, 0, 0)),      # PHQ-9 10 -> 9: case -> below both: recovered; fall 1 < 6
    ((9, 9, 7, 7), (0, NAN, 0, 0, NAN)),    # 9 and 7: not a case at the start: recovery undefined
    ((0, 0, 8, 7), (1, 1, 0, 0, 0)),        # GAD-7 8 -> 7: case -> not; fall 1 < 4
    ((10, 10, 0, 0), (1, 0, 0, 0, 0)),      # still PHQ-9 10 at the end: not recovered
    ((9, 9, 8, 8), (1, 0, 0, 0, 0)),        # still GAD-7 8 at the end: not recovered
    ((12, 9, 7, 8), (1, 0, 0, 0, 0)),       # PHQ-9 recovered but GAD-7 reached 8: caseness at the end
    # reliable-change thresholds exactly: PHQ-9 fall 6 reliable, 5 not; GAD-7 fall 4 reliable, 3 not
    ((15, 9, 5, 5), (1, 1, 1, 0, 1)),       # fall 6 -> reliable improvement; ends below both: reliable recovery
    ((15, 10, 5, 5), (1, 0, 0, 0, 0)),      # fall 5: not reliable, still a case
    ((14, 9, 5, 5), (1, 1, 0, 0, 0)),       # fall 5 to 9: recovered but not reliably: no reliable recovery
    ((5, 5, 11, 7), (1, 1, 1, 0, 1)),       # GAD-7 fall 4
    ((5, 5, 10, 7), (1, 1, 0, 0, 0)),       # GAD-7 fall 3
    ((3, 9, 2, 2), (0, NAN, 0, 1, NAN)),    # PHQ-9 rise 6: reliable deterioration
    ((3, 8, 2, 2), (0, NAN, 0, 0, NAN)),    # PHQ-9 rise 5: none
    ((3, 3, 2, 6), (0, NAN, 0, 1, NAN)),    # GAD-7 rise 4: reliable deterioration
    ((3, 3, 2, 5), (0, NAN, 0, 0, NAN)),    # GAD-7 rise 3: none
    # mixed: one measure reliably better, the other reliably worse -> neither improvement nor deterioration
    ((18, 12, 2, 6), (1, 0, 0, 0, 0)),      # PHQ-9 -6, GAD-7 +4
    ((5, 11, 12, 8), (1, 0, 0, 0, 0)),      # PHQ-9 +6 (ends a case), GAD-7 -4
    ((16, 4, 3, 7), (1, 1, 0, 0, 0)),       # PHQ-9 -12, GAD-7 +4 to 7: recovered (below both) yet no reliable improvement
    # both better / both worse
    ((20, 4, 15, 3), (1, 1, 1, 0, 1)),
    ((4, 20, 3, 15), (0, NAN, 0, 1, NAN)),
    # one reliably better, the other unchanged within reliable change
    ((16, 10, 9, 11), (1, 0, 1, 0, 0)),     # PHQ-9 -6, GAD-7 +2: reliable improvement, still a case
]


@pytest.mark.parametrize("scores,expected", CASES)
def test_paired_definitions_at_every_boundary(scores, expected):
    got = one(*scores)
    names = ("caseness_baseline", "recovered", "reliable_improvement", "reliable_deterioration", "reliable_recovery")
    for name, want in zip(names, expected, strict=True):
        assert same(got[name], float(want)), (scores, name, got[name], want)


def test_not_finished_treatment_gives_no_outcomes():
    got = one(15, 5, 12, 3, n=1)  # one scored session: not a finished course of treatment
    assert got["finished_treatment"] == 0.0
    for k in ("recovered", "reliable_improvement", "reliable_deterioration", "reliable_recovery"):
        assert math.isnan(got[k])
    assert got["caseness_baseline"] == 1.0  # caseness is still defined at the first measurement


def test_missing_score_makes_outcomes_undefined():
    got = one(15, 5, NAN, 3)
    assert all(math.isnan(got[k]) for k in ("recovered", "reliable_improvement", "caseness_baseline"))


def _export():
    # referral r1: PHQ-9 15 -> 9, GAD-7 9 -> 7 (3 sessions: middle values ignored) -> recovered, reliable recovery
    # r2: PHQ-9 18 -> 12, GAD-7 2 -> 6 (mixed) ; r3: row 9 has GAD-7 missing, row 10 out of range ;
    # r4: a single session -> rejected (fewer than 2 measured sessions)
    return pd.DataFrame({
        "referral": ["r1", "r1", "r1", "r2", "r2", "r3", "r3", "r3", "r3", "r4"],
        "clinician": ["c1"] * 5 + ["c2"] * 5,
        "appt_date": ["2024-01-10", "2024-01-17", "2024-02-01", "2024-03-01", "2024-04-01",
                      "2024-01-01", "2024-02-01", "2024-03-01", "2024-04-01", "2024-05-01"],
        "phq9": ["15", "20", "9", "18", "12", "11", "4", "3", "3", "14"],
        "gad7": ["9", "1", "7", "2", "6", "8", "3", "", "22", "10"],
    })


SPEC = {"layout": "session", "export_date": "2024-12-31",
        "columns": {"patient": "referral", "therapist": "clinician", "occasion": "appt_date",
                    "scores": {"PHQ-9": "phq9", "GAD-7": "gad7"}}}


def _ingest(spec=SPEC):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = ingest_frame(_export(), spec, source="export.csv")
    return res, w


def test_ingest_multi_score_rows_and_rejects():
    res, w = _ingest()
    assert res.rows_read == 10 and len(res.rows) + len(res.rejects) == 10
    rej = res.rejects.set_index("row")
    # file rows: header is row 1, so the DataFrame's row 7 (r3, 3rd) is row 9
    assert rej.loc[9, "reason"] == "missing value" and rej.loc[9, "column"] == "gad7"
    assert rej.loc[10, "reason"] == "out of range (GAD-7: 0-21)" and rej.loc[10, "value"] == "22"
    assert list(res.rows.columns[:5]) == ["row", "patient", "therapist", "occasion", "score"]
    msgs = [str(x.message) for x in w if issubclass(x.category, DataWarning)]
    assert any("2 of 10 rows rejected" in m for m in msgs)


def test_patient_table_has_per_instrument_columns_and_paired_outcomes():
    res, _ = _ingest()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        pt, rej = derive_patient_outcomes(res.rows, SPEC)
    assert list(rej["row"]) == [11]  # r4's single session
    pt = pt.set_index("patient")
    for c in ("phq9", "gad7"):
        for s in ("baseline", "end", "change", "caseness_baseline", "reliable_improvement", "reliable_deterioration"):
            assert f"{c}_{s}" in pt.columns
    r1, r2, r3 = pt.loc["r1"], pt.loc["r2"], pt.loc["r3"]
    # r1: first and last sessions (not the 20 / 1 of the middle one)
    assert (r1.phq9_baseline, r1.phq9_end, r1.gad7_baseline, r1.gad7_end) == (15, 9, 9, 7)
    assert (r1.phq9_change, r1.gad7_change) == (6, 2)
    assert (r1.recovered, r1.reliable_improvement, r1.reliable_recovery) == (1, 1, 1)
    # r2 mixed: PHQ-9 -6 (reliably better), GAD-7 +4 (reliably worse)
    assert (r2.phq9_reliable_improvement, r2.gad7_reliable_deterioration) == (1, 1)
    assert (r2.reliable_improvement, r2.reliable_deterioration, r2.recovered) == (0, 0, 0)
    # r3: rows 7 and 8 remain: PHQ-9 11 -> 4, GAD-7 8 -> 3: recovered; PHQ-9 fall 7 reliable
    assert (r3.baseline, r3.end, r3.recovered, r3.reliable_recovery) == (11, 4, 1, 1)
    # the primary instrument is the continuous outcome: baseline / end are the PHQ-9 scores
    assert (pt["baseline"] == pt["phq9_baseline"]).all() and (pt["end"] == pt["phq9_end"]).all()
    assert "gad7" not in pt.columns


def test_primary_gad7_makes_gad7_the_outcome():
    spec = dict(SPEC, primary="GAD-7")
    res, _ = _ingest(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        pt, _ = derive_patient_outcomes(res.rows, spec)
    pt = pt.set_index("patient")
    assert (pt["end"] == pt["gad7_end"]).all() and pt.loc["r1", "change"] == 2
    assert pt.loc["r2", "reliable_improvement"] == 0  # the paired rule does not depend on the primary


def _cfg(extra=None, models=None):
    ds = {"path": "x.csv", "layout": "session",
          "columns": {"patient": "referral", "therapist": "clinician", "occasion": "appt_date",
                      "scores": {"PHQ-9": "phq9", "GAD-7": "gad7"}}}
    ds.update(extra or {})
    cfg = {"datasets": {"svc": ds}}
    if models is not None:
        cfg["models"] = models
    return load_config(cfg, source="my.yaml")


def test_config_resolves_primary_and_is_idempotent():
    cfg = _cfg()
    ds = cfg["datasets"]["svc"]
    assert ds["primary"] == "PHQ-9" and ds["instrument"] == "PHQ-9" and ds["columns"]["score"] == "phq9"
    again = load_config({"datasets": cfg["datasets"]}, source="my.yaml")  # loading a loaded config again
    assert again["datasets"]["svc"]["columns"]["score"] == "phq9"
    assert _cfg({"primary": "GAD-7"})["datasets"]["svc"]["columns"]["score"] == "gad7"


@pytest.mark.parametrize("extra,needle", [
    ({"primary": "CORE-10"}, "my.yaml: datasets.svc.primary: 'CORE-10' is not one of columns.scores"),
    ({"layout": "patient"}, "datasets.svc.columns.scores: several instruments per row need layout: session"),
    ({"instrument": "GAD-7"}, "give either scores (and primary) or score + instrument"),
])
def test_config_errors_are_one_line(extra, needle):
    with pytest.raises(ConfigError) as exc:
        _cfg(extra)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_instrument_in_scores_is_a_config_error():
    with pytest.raises(ConfigError, match=r"datasets\.svc\.columns\.scores\.XYZ: instrument: unknown"):
        load_config({"datasets": {"svc": {"path": "x.csv", "layout": "session", "columns": {
            "patient": "p", "therapist": "t", "occasion": "o", "scores": {"XYZ": "x"}}}}}, source="my.yaml")


def test_secondary_end_score_as_model_outcome():
    cfg = _cfg(models=[{"id": "g", "type": "random_intercept", "outcome": "gad7_end"}])
    ds = cfg["datasets"]["svc"]
    assert extra_columns(cfg, ds) == []  # a derived per-instrument column, not a file column
    res, _ = _ingest()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        pt, _ = derive_patient_outcomes(res.rows, SPEC)
    mf = model_frame(pt, cfg["models"][0], ds)
    assert mf.outcome == "gad7_end" and mf.covariates == ["gad7_baseline"]
    assert np.allclose(mf.df["gad7_end"], [7, 6, 3])


def test_registry_cites_the_paired_definitions():
    for name in ("PHQ-9", "GAD-7"):
        src = get_instrument(name).source
        assert "NHS" in src and "metric definitions" in src
