"""Tests that kill the mutants of ``outcomes.py`` that survived the earlier tests (issue 16).

The expected values are worked by hand from the module docstring's definitions (PHQ-9: caseness >= 10,
reliable change 6 points; dropout codes; the feedback coding) on small tables written here.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pandas as pd
import pytest

from therapist_effects.exceptions import ConfigError, DataWarning
from therapist_effects.io.ingest import REJECT_COLUMNS, ingest_frame
from therapist_effects.io.outcomes import derive_patient_outcomes, write_patient_outputs, write_rejects

SESSION = {"layout": "session", "instrument": "PHQ-9",
           "columns": {"patient": "pid", "therapist": "tid", "score": "phq9", "occasion": "session"}}
PATIENT = {"layout": "patient", "instrument": "PHQ-9",
           "columns": {"patient": "pid", "therapist": "tid", "outcome": "post", "baseline": "pre"}}


def _derive(table: pd.DataFrame, spec: dict, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return derive_patient_outcomes(ingest_frame(table, spec).rows, spec, *args)


def _row(patients: pd.DataFrame, pid: str) -> dict:
    return patients.set_index("patient").loc[pid].to_dict()


# ---- the session layout: therapist, cluster and arm come from the patient's rows -----------------------------------
def test_session_layout_carries_therapist_cluster_and_arm_and_codes_feedback():
    """Two patients of two therapists in two services; arm labels ROM < TAU, so TAU is the feedback level."""
    table = pd.DataFrame({"pid": ["A", "A", "B", "B"], "tid": ["T1", "T1", "T2", "T2"],
                          "svc": ["S1", "S1", "S2", "S2"], "grp": ["TAU", "TAU", "ROM", "ROM"],
                          "session": [1, 2, 1, 2], "phq9": [18, 9, 12, 14]})
    spec = {**SESSION, "columns": {**SESSION["columns"], "cluster": "svc", "arm": "grp"}}
    patients, rejects = _derive(table, spec)
    assert list(patients.columns[:6]) == ["patient", "therapist", "cluster", "arm", "feedback", "baseline"]
    assert patients[["patient", "therapist", "cluster", "arm", "feedback"]].values.tolist() == [
        ["A", "T1", "S1", "TAU", 1.0], ["B", "T2", "S2", "ROM", 0.0]]
    assert rejects.empty


def test_patient_layout_without_arm_has_no_feedback_and_with_a_string_instrument_uses_it():
    """An instrument given by name wins over the spec's: GAD-7 (caseness >= 8) instead of PHQ-9 (>= 10)
    makes a baseline of 9 a case."""
    table = pd.DataFrame({"pid": ["A"], "tid": ["T1"], "pre": [9], "post": [3]})
    spec = {**PATIENT, "instrument": None}
    patients, _ = _derive(table, spec, "GAD-7")
    assert patients.loc[0, "caseness_baseline"] == 1.0 and patients.loc[0, "recovered"] == 1.0
    patients, _ = _derive(table, PATIENT)
    assert patients.loc[0, "caseness_baseline"] == 0.0 and math.isnan(patients.loc[0, "recovered"])


# ---- the rejects of this step --------------------------------------------------------------------------------------
def test_rejects_table_has_exactly_the_reject_columns_with_integer_rows():
    table = pd.DataFrame({"pid": ["A", "A", "B"], "tid": ["T1"] * 3, "session": [1, 2, 1], "phq9": [18, 9, 12]})
    _, rejects = _derive(table, SESSION)
    assert list(rejects.columns) == list(REJECT_COLUMNS) and rejects["row"].dtype == "int64"
    assert rejects.index.tolist() == [0]
    _, none = _derive(table.iloc[:2], SESSION)
    assert none.empty and list(none.columns) == list(REJECT_COLUMNS) and none["row"].dtype == "int64"
    assert [str(none[c].dtype) for c in REJECT_COLUMNS[1:]] == ["object"] * 4


def test_too_few_sessions_rejects_that_patients_rows_when_the_file_is_not_in_patient_order():
    """File rows 2 (Z, one session), 3-4 (A's sessions 2 and 1): Z is rejected, not one of A's rows;
    numeric patient IDs are written as in the file."""
    table = pd.DataFrame({"pid": [9, 1, 1], "tid": ["T1"] * 3, "session": [1, 2, 1], "phq9": [12, 9, 18]})
    patients, rejects = _derive(table, SESSION)
    assert rejects[["row", "patient", "column", "value"]].values.tolist() == [[2, "9", "phq9", "12"]]
    assert patients["patient"].tolist() == ["1"] and (patients.loc[0, "baseline"], patients.loc[0, "end"]) == (18, 9)


def test_canonical_rows_without_column_names_reject_under_the_canonical_score_column():
    table = pd.DataFrame({"pid": ["A", "B", "B"], "tid": ["T1"] * 3, "session": [1, 1, 2], "phq9": [12, 18, 9]})
    rows = ingest_frame(table, SESSION).rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        _, rejects = derive_patient_outcomes(rows, {"layout": "session", "instrument": "PHQ-9"})
    assert rejects["column"].tolist() == ["score"]


# ---- the patient layout: dropout and covariates --------------------------------------------------------------------
def test_patient_layout_dropout_with_the_default_codes_and_covariates():
    """Default dropout codes: dropout, dropped out, unilateral (case and blanks ignored); another ending is 0,
    none is NaN. Covariates are carried as they are."""
    table = pd.DataFrame({"pid": list("ABCDE"), "tid": ["T1"] * 5, "pre": [15] * 5, "post": [8] * 5,
                          "end_reason": ["Dropout", " dropped   OUT", "UNILATERAL", "completed", None],
                          "age": [30, 41, 52, 63, 74]})
    spec = {**PATIENT, "columns": {**PATIENT["columns"], "ending": "end_reason", "covariates": ["age"]}}
    patients, _ = _derive(table, spec)
    assert patients["dropout"].tolist()[:4] == [1.0, 1.0, 1.0, 0.0] and math.isnan(patients["dropout"].iloc[4])
    assert patients["age"].tolist() == [30, 41, 52, 63, 74]


def test_session_layout_dropout_with_the_default_codes():
    table = pd.DataFrame({"pid": ["A", "A", "B", "B"], "tid": ["T1"] * 4, "session": [1, 2, 1, 2],
                          "phq9": [18, 9, 12, 14], "end_reason": [None, "dropout", None, "completed"]})
    spec = {**SESSION, "columns": {**SESSION["columns"], "ending": "end_reason"}}
    patients, _ = _derive(table, spec)
    assert patients["dropout"].tolist() == [1.0, 0.0]


# ---- the feedback coding: a 0/1 arm is its own code -----------------------------------------------------------------
def test_a_zero_one_arm_with_only_zeros_is_coded_by_its_value_without_a_warning():
    """Module docstring: numeric levels within {0, 1} give the arm value itself (no single-level fallback)."""
    table = pd.DataFrame({"pid": ["A", "B"], "tid": ["T1", "T2"], "post": [5, 6], "arm": [0, 0]})
    spec = {"layout": "patient", "columns": {"patient": "pid", "therapist": "tid", "outcome": "post", "arm": "arm"}}
    rows = ingest_frame(table, spec).rows
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        patients, _ = derive_patient_outcomes(rows, spec)
    assert patients["feedback"].tolist() == [0.0, 0.0]


# ---- writing ------------------------------------------------------------------------------------------------------
def test_patient_csv_writes_dates_as_iso_days(tmp_path):
    patients = pd.DataFrame({"patient": ["A"], "first_occasion": [pd.Timestamp("2023-01-04")]})
    write_patient_outputs(patients, tmp_path / "p.parquet", tmp_path / "p.csv")
    assert (tmp_path / "p.csv").read_bytes() == b"patient,first_occasion\r\nA,2023-01-04\r\n"


def test_write_rejects_creates_folders_and_sorts_by_row(tmp_path):
    rejects = pd.DataFrame({"row": [7, 3], "patient": ["B", "A"], "column": ["phq9", "phq9"], "value": ["", "x"],
                            "reason": ["missing value", "not a number"]})
    path = tmp_path / "a" / "b" / "rejects.csv"
    write_rejects(rejects, path)
    assert path.read_bytes() == (b"row,patient,column,value,reason\r\n3,A,phq9,x,not a number\r\n"
                                 b"7,B,phq9,,missing value\r\n")


# ---- second round (issue 16, after outcomes.py was renumbered): messages, options and dtypes -----------------------
def test_rejects_warning_names_the_dataset_counts_patients_and_lists_the_reasons():
    """Session layout, min_sessions 2, covariate ``age`` given as a single string: Z has one session (1 row
    rejected), B has no age on any row (2 rows rejected, value left empty), A is kept with age 30 from its first
    row that has one. 3 rows of 2 patients; the two reasons sorted and joined by '; '."""
    table = pd.DataFrame({"pid": ["A", "A", "B", "B", "Z"], "tid": ["T1"] * 5, "session": [1, 2, 1, 2, 1],
                          "phq9": [18, 9, 12, 14, 10], "age": [None, 30, None, None, 44]})
    spec = {**SESSION, "name": "demo", "columns": {**SESSION["columns"], "covariates": "age"}}
    rows = ingest_frame(table, spec).rows
    with pytest.warns(DataWarning) as caught:
        patients, rejects = derive_patient_outcomes(rows, spec)
    assert [str(w.message) for w in caught] == [
        "datasets.demo: 3 rows of 2 patient(s) rejected while deriving patient outcomes (fewer than 2 measured "
        "sessions: no end-of-treatment score; missing value (no age on any row of the patient))"]
    # stacklevel: the warning points past outcomes.py, at the caller (under mutmut a trampoline frame sits between)
    assert Path(caught[0].filename).name != "outcomes.py"
    assert rejects.values.tolist() == [
        [4, "B", "age", "", "missing value (no age on any row of the patient)"],
        [5, "B", "age", "", "missing value (no age on any row of the patient)"],
        [6, "Z", "phq9", "10", "fewer than 2 measured sessions: no end-of-treatment score"]]
    assert list(patients.columns) == [
        "patient", "therapist", "baseline", "end", "n_sessions", "first_occasion", "last_occasion", "change",
        "caseness_baseline", "reliable_improvement", "reliable_deterioration", "clinically_significant",
        "recovered", "reliable_recovery", "age"]
    assert patients[["patient", "age"]].values.tolist() == [["A", 30.0]]


def test_configured_dropout_codes_replace_the_defaults():
    """``dropout_codes`` (a list, or one code as a string) replaces the default list: 'dropout' is then an ordinary
    ending (0), the configured code matches regardless of case and blanks (1)."""
    table = pd.DataFrame({"pid": list("ABC"), "tid": ["T1"] * 3, "pre": [15] * 3, "post": [8] * 3,
                          "end_reason": ["Lost to  FOLLOW-UP", "dropout", None]})
    for codes in (["lost to follow-up"], "lost to follow-up"):
        spec = {**PATIENT, "dropout_codes": codes, "columns": {**PATIENT["columns"], "ending": "end_reason"}}
        patients, _ = _derive(table, spec)
        dropout = patients["dropout"]
        assert dropout.dtype == "float64" and dropout.tolist()[:2] == [1.0, 0.0] and math.isnan(dropout.iloc[2])


def test_id_columns_are_plain_objects_and_outcomes_floats_in_both_layouts():
    """IDs are written as in the file (text) in object columns (ingest gives pandas' ``str`` dtype); feedback,
    dropout and the 0/1 outcomes are float64 (NaN where undefined)."""
    session = pd.DataFrame({"pid": [1, 1], "tid": [7, 7], "svc": [3, 3], "grp": [0, 0], "session": [1, 2],
                            "phq9": [18, 5], "end_reason": [None, "completed"]})
    s_spec = {**SESSION, "columns": {**SESSION["columns"], "cluster": "svc", "arm": "grp", "ending": "end_reason"}}
    patient = pd.DataFrame({"pid": [1], "tid": [7], "svc": [3], "grp": [1], "pre": [18], "post": [5],
                            "end_reason": ["completed"]})
    p_spec = {**PATIENT, "columns": {**PATIENT["columns"], "cluster": "svc", "arm": "grp", "ending": "end_reason"}}
    for table, spec in ((session, s_spec), (patient, p_spec)):
        patients, _ = _derive(table, spec)
        assert patients[["patient", "therapist", "cluster"]].values.tolist() == [["1", "7", "3"]]
        assert [str(patients[c].dtype) for c in ("patient", "therapist", "cluster")] == ["object"] * 3
        for c in ("feedback", "dropout", "change", "recovered", "reliable_recovery"):
            assert patients[c].dtype == "float64", c
        assert patients["reliable_recovery"].tolist() == [1.0] and patients["dropout"].tolist() == [0.0]


def test_dated_occasions_order_the_sessions_by_date_not_by_row():
    """Occasions as dates: the file lists the later visit first; baseline is the earlier visit's score."""
    table = pd.DataFrame({"pid": ["A", "A", "A"], "tid": ["T1"] * 3, "phq9": [9, 18, 12],
                          "session": pd.to_datetime(["2023-03-01", "2023-01-10", "2023-02-01"])})
    patients, _ = _derive(table, SESSION)
    assert (patients.loc[0, "baseline"], patients.loc[0, "end"], patients.loc[0, "n_sessions"]) == (18, 9, 3)
    assert patients.loc[0, "first_occasion"] == pd.Timestamp("2023-01-10")


def test_feedback_of_rows_not_from_ingest_missing_arm_and_labels_of_mixed_types():
    """Rows passed in directly (not through ingest): a missing arm gives NaN feedback, also with a single level
    (0 for the others, with the single-level warning); labels of mixed types are ordered as text ('2' < 'ROM')."""
    table = pd.DataFrame({"pid": ["A", "B", "C"], "tid": ["T1"] * 3, "post": [5, 6, 7], "arm": ["ROM"] * 3})
    spec = {"layout": "patient", "columns": {"patient": "pid", "therapist": "tid", "outcome": "post", "arm": "arm"}}
    rows = ingest_frame(table, spec).rows
    rows["arm"] = pd.Series(["ROM", None, "ROM"], dtype=object)
    with pytest.warns(DataWarning, match="single level 'ROM'") as caught:
        patients, _ = derive_patient_outcomes(rows, spec)
    assert Path(caught[0].filename).name != "outcomes.py"  # stacklevel: points at the caller
    assert patients["feedback"].tolist()[::2] == [0.0, 0.0] and math.isnan(patients["feedback"].iloc[1])
    rows["arm"] = pd.Series(["ROM", 2, "ROM"], dtype=object)
    patients, _ = derive_patient_outcomes(rows, spec)
    assert patients["feedback"].tolist() == [1.0, 0.0, 1.0]


def test_patient_parquet_holds_no_index_column(tmp_path):
    """A filtered patient table (index 5, 7) is written without its index: the Parquet file has the table's columns
    only, and reads back with a fresh 0..n-1 index."""
    patients = pd.DataFrame({"patient": ["A", "B"], "end": [3.0, 4.0]}, index=[5, 7])
    write_patient_outputs(patients, tmp_path / "p.parquet", tmp_path / "p.csv")
    back = pd.read_parquet(tmp_path / "p.parquet")
    assert list(back.columns) == ["patient", "end"] and back.index.tolist() == [0, 1]
    assert back["patient"].tolist() == ["A", "B"]


def test_a_zero_one_arm_with_only_ones_is_its_own_code_and_zero_two_is_coded_by_level():
    """Numeric levels within {0, 1}: the value itself (all 1 -> 1, no single-level warning); levels {0, 2} are not
    within {0, 1}: the second level (2) is the feedback level, coded 1."""
    spec = {"layout": "patient", "columns": {"patient": "pid", "therapist": "tid", "outcome": "post", "arm": "arm"}}
    for arm, feedback in (([1, 1], [1.0, 1.0]), ([0, 2], [0.0, 1.0])):
        table = pd.DataFrame({"pid": ["A", "B"], "tid": ["T1", "T2"], "post": [5, 6], "arm": arm})
        rows = ingest_frame(table, spec).rows
        with warnings.catch_warnings():
            warnings.simplefilter("error", DataWarning)
            patients, _ = derive_patient_outcomes(rows, spec)
        assert patients["feedback"].tolist() == feedback


def test_unknown_layout_error_names_the_dataset_and_the_value():
    rows = pd.DataFrame({"row": [2], "patient": ["A"], "therapist": ["T1"], "end": [3.0]})
    with pytest.raises(ConfigError, match=r"^datasets\.demo\.layout: expected 'session' or 'patient', got 'wide'$"):
        derive_patient_outcomes(rows, {"name": "demo", "layout": "wide"})


def test_covariates_the_rows_lack_are_left_out_in_both_layouts():
    """Rows passed in directly without a configured covariate's column: the patient table simply has no such column;
    the covariates listed after it are still checked (session layout: B has no sex on any row and is rejected)."""
    rows = pd.DataFrame({"row": [2, 3, 4, 5], "patient": ["A", "A", "B", "B"], "therapist": ["T1"] * 4,
                         "occasion": [1.0, 2.0] * 2, "score": [18.0, 9.0] * 2, "end": [9.0] * 4,
                         "baseline": [18.0] * 4, "sex": [None, "f", None, None]})
    spec = {"layout": "session", "columns": {"covariates": ["age", "sex"]}}
    with pytest.warns(DataWarning, match="2 rows of 1 patient"):
        patients, rejects = derive_patient_outcomes(rows, spec)
    assert patients[["patient", "sex", "change"]].values.tolist() == [["A", "f", 9.0]] and "age" not in patients
    assert rejects["row"].tolist() == [4, 5]
    patients, _ = derive_patient_outcomes(rows.iloc[:2], {**spec, "layout": "patient"})
    assert "age" not in patients.columns and patients["change"].tolist() == [9.0, 9.0]


def test_patient_outputs_create_missing_parent_folders(tmp_path):
    patients = pd.DataFrame({"patient": ["A"], "end": [3.0]})
    write_patient_outputs(patients, tmp_path / "a" / "b" / "p.parquet", tmp_path / "c" / "d" / "p.csv")
    assert pd.read_parquet(tmp_path / "a" / "b" / "p.parquet")["patient"].tolist() == ["A"]
    assert (tmp_path / "c" / "d" / "p.csv").read_bytes() == b"patient,end\r\nA,3.0\r\n"


def test_session_patients_come_out_in_sorted_id_order_whatever_the_file_order():
    table = pd.DataFrame({"pid": ["B", "B", "A", "A"], "tid": ["T2", "T2", "T1", "T1"], "session": [1, 2, 1, 2],
                          "phq9": [12, 14, 18, 9]})
    patients, _ = _derive(table, SESSION)
    assert patients[["patient", "therapist", "baseline", "end"]].values.tolist() == [["A", "T1", 18, 9],
                                                                                     ["B", "T2", 12, 14]]


def test_write_rejects_keeps_the_order_of_several_lines_of_one_row(tmp_path):
    """Ingest may reject one row for several cells: lines of the same row keep their order (a stable sort; 40 lines
    so that an unstable sort would reorder them)."""
    n = 40
    rejects = pd.DataFrame({"row": [3, 2] * (n // 2), "patient": ["A"] * n, "column": [f"c{i}" for i in range(n)],
                            "value": [""] * n, "reason": ["missing value"] * n})
    path = tmp_path / "rejects.csv"
    write_rejects(rejects, path)
    written = pd.read_csv(path)
    assert written["column"].tolist() == [f"c{i}" for i in range(1, n, 2)] + [f"c{i}" for i in range(0, n, 2)]
