"""Ingestion: one test per reject reason on a tiny table, the row accounting, file formats, IDs kept
as strings, and the one-line configuration / input errors.

Row numbers are spreadsheet rows: header = row 1, first data row = row 2.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from therapist_effects.exceptions import ConfigError, DataWarning, InputError
from therapist_effects.io.ingest import accounting, ingest_dataset, read_table
from refdata import REFERENCE_DIR

pytestmark = pytest.mark.filterwarnings("ignore::therapist_effects.exceptions.DataWarning")

REFERENCE = REFERENCE_DIR

SESSION = {
    "layout": "session",
    "columns": {"patient": "pid", "therapist": "tid", "score": "phq9", "occasion": "session"},
    "instrument": "PHQ-9",
    "multi_therapist": "majority",
    "min_sessions": 2,
}
PATIENT = {
    "layout": "patient",
    "columns": {"patient": "pid", "therapist": "tid", "outcome": "post", "baseline": "pre"},
    "instrument": "PHQ-9",
}


def spec(base: dict, **changes) -> dict:
    out = {**base, "columns": dict(base["columns"])}
    for k, v in changes.items():
        if k in ("arm", "cluster", "ending", "covariates"):
            out["columns"][k] = v
        else:
            out[k] = v
    return out


def write_csv(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def only_reject(result) -> dict:
    assert len(result.rejects) == 1, result.rejects
    return result.rejects.iloc[0].to_dict()


def check_accounting(result) -> None:
    """Every input row is exactly once in rows or rejects."""
    kept = set(result.rows["row"])
    rejected = list(result.rejects["row"])
    assert len(rejected) == len(set(rejected))
    assert not kept & set(rejected)
    assert kept | set(rejected) == set(range(2, result.rows_read + 2))
    assert result.rows_read == len(result.rows) + len(result.rejects)


# ----------------------------------------------------------------------------------------------
# reject reasons, one per test
# ----------------------------------------------------------------------------------------------
def test_empty_row_keeps_row_numbers(tmp_path):
    # line 3 of the file is blank: a spreadsheet shows it as row 3, so the next record is row 4
    p = write_csv(tmp_path, "pid,tid,session,phq9\nA,T1,1,12\n\nA,T1,2,8\n\n\n")
    r = ingest_dataset(p, SESSION)
    rej = only_reject(r)
    assert (rej["row"], rej["reason"]) == (3, "empty row")
    assert r.rows["row"].tolist() == [2, 4]  # trailing blank lines are not rows
    assert r.rows_read == 3
    check_accounting(r)


def test_missing_patient_id(tmp_path):
    p = write_csv(tmp_path, "pid,tid,session,phq9\nA,T1,1,12\n ,T1,2,8\n")
    rej = only_reject(ingest_dataset(p, SESSION))
    assert (rej["row"], rej["column"], rej["reason"]) == (3, "pid", "missing patient ID")


def test_missing_therapist_id(tmp_path):
    p = write_csv(tmp_path, "pid,tid,session,phq9\nA,T1,1,12\nA,NA,2,8\n")
    rej = only_reject(ingest_dataset(p, SESSION))
    assert (rej["row"], rej["patient"], rej["column"], rej["reason"]) == (
        3, "A", "tid", "missing therapist ID")


def test_missing_score(tmp_path):
    p = write_csv(tmp_path, "pid,tid,session,phq9\nA,T1,1,12\nA,T1,2,\n")
    rej = only_reject(ingest_dataset(p, SESSION))
    assert (rej["row"], rej["column"], rej["reason"]) == (3, "phq9", "missing value")


def test_not_a_number(tmp_path):
    p = write_csv(tmp_path, "pid,tid,session,phq9\nA,T1,1,12\nA,T1,2,twelve\n")
    rej = only_reject(ingest_dataset(p, SESSION))
    assert (rej["row"], rej["column"], rej["value"], rej["reason"]) == (
        3, "phq9", "twelve", "not a number")


def test_not_a_finite_number_without_instrument(tmp_path):
    p = write_csv(tmp_path, "pid,tid,session,phq9\nA,T1,1,1e400\nA,T1,2,8\n")
    r = ingest_dataset(p, spec(SESSION, instrument=None))
    rej = only_reject(r)
    assert (rej["row"], rej["reason"]) == (2, "not a finite number")


def test_score_out_of_instrument_range(tmp_path):
    # PHQ-9 is 0-27: 28 and -1 are impossible, 27 and 0 are fine
    p = write_csv(tmp_path, "pid,tid,session,phq9\nA,T1,1,27\nA,T1,2,28\nA,T1,3,-1\nA,T1,4,0\n")
    r = ingest_dataset(p, SESSION)
    assert r.rejects["row"].tolist() == [3, 4]
    assert set(r.rejects["reason"]) == {"out of range (PHQ-9: 0-27)"}
    assert r.rows["score"].tolist() == [27.0, 0.0]


def test_baseline_and_outcome_range_in_patient_layout(tmp_path):
    p = write_csv(tmp_path, "pid,tid,pre,post\nA,T1,30,5\nB,T1,12,28\nC,T1,12,1\n")
    r = ingest_dataset(p, spec(PATIENT, instrument="GAD-7"))
    # GAD-7 is 0-21: baseline 30 (row 2) and end 28 (row 3) are out of range
    assert r.rejects[["row", "column"]].values.tolist() == [[2, "pre"], [3, "post"]]
    assert set(r.rejects["reason"]) == {"out of range (GAD-7: 0-21)"}


def test_binary_outcome_allowed_without_instrument(tmp_path):
    p = write_csv(tmp_path, "pid,tid,post\nA,T1,0\nB,T1,1\nC,T2,-2.5\n")
    cols = {"patient": "pid", "therapist": "tid", "outcome": "post"}
    r = ingest_dataset(p, {"layout": "patient", "columns": cols})
    assert r.rejects.empty and r.rows["end"].tolist() == [0.0, 1.0, -2.5]


def test_unparseable_date(tmp_path):
    p = write_csv(tmp_path, "pid,tid,session,phq9\nA,T1,2023-01-05,12\nA,T1,2023-02-30,8\n"
                            "A,T1,2023-03-01,7\n")
    r = ingest_dataset(p, SESSION, today="2024-01-01")
    rej = only_reject(r)
    assert (rej["row"], rej["column"], rej["value"], rej["reason"]) == (
        3, "session", "2023-02-30", "unparseable date")
    assert r.occasion_kind == "date"
    assert r.rows["occasion"].tolist() == [pd.Timestamp("2023-01-05"), pd.Timestamp("2023-03-01")]


def test_date_after_export_date_and_today_and_before_1900(tmp_path):
    text = "pid,tid,session,phq9\nA,T1,2023-01-05,12\nA,T1,2023-06-30,8\nA,T1,1899-12-31,7\n"
    p = write_csv(tmp_path, text)
    r = ingest_dataset(p, spec(SESSION, export_date="2023-06-01"))
    assert r.rejects[["row", "reason"]].values.tolist() == [
        [3, "impossible date (after export date 2023-06-01)"],
        [4, "impossible date (before 1900)"],
    ]
    # without export_date, dates after today are impossible
    r2 = ingest_dataset(p, SESSION, today="2023-03-01")
    assert r2.rejects[["row", "reason"]].values.tolist()[0] == [
        3, "impossible date (after today 2023-03-01)"]
    # a date ON the export date is possible
    r3 = ingest_dataset(p, spec(SESSION, export_date="2023-06-30"))
    assert r3.rejects["row"].tolist() == [4]


def test_non_iso_dates_need_date_format(tmp_path):
    p = write_csv(tmp_path, "pid,tid,session,phq9\nA,T1,05/01/2023,12\nA,T1,02/02/2023,8\n")
    with pytest.raises(ConfigError) as err:
        ingest_dataset(p, SESSION, today="2024-01-01")
    assert str(err.value) == (
        "dataset.columns.occasion: column 'session' holds neither session numbers nor ISO 8601 "
        "dates in 2 of 2 rows (e.g. '05/01/2023'); set date_format (e.g. '%d/%m/%Y') if it holds "
        "dates in another format"
    )
    r = ingest_dataset(p, spec(SESSION, date_format="%d/%m/%Y"), today="2024-01-01")
    assert r.rows["occasion"].tolist() == [pd.Timestamp("2023-01-05"), pd.Timestamp("2023-02-02")]


def test_negative_session_number(tmp_path):
    p = write_csv(tmp_path, "pid,tid,session,phq9\nA,T1,-1,12\nA,T1,1,8\nA,T1,2,8\n")
    rej = only_reject(ingest_dataset(p, SESSION))
    assert (rej["row"], rej["reason"]) == (2, "negative session number")


def test_duplicate_session_names_the_first_row(tmp_path):
    p = write_csv(tmp_path, "pid,tid,session,phq9\nA,T1,1,12\nA,T1,2,10\nA,T1,1,13\nB,T1,1,9\n"
                            "A,T1,1,14\n")
    r = ingest_dataset(p, SESSION)
    assert r.rejects[["row", "column", "reason"]].values.tolist() == [
        [4, "session", "duplicate session (same patient and occasion as row 2)"],
        [6, "session", "duplicate session (same patient and occasion as row 2)"],
    ]
    assert r.rows["row"].tolist() == [2, 3, 5]


def test_duplicate_session_keeps_the_first_valid_row(tmp_path):
    # the first copy (row 2) is invalid, so the second (row 3) is kept
    p = write_csv(tmp_path, "pid,tid,session,phq9\nA,T1,1,99\nA,T1,1,12\nA,T1,2,10\n")
    r = ingest_dataset(p, SESSION)
    assert r.rejects["row"].tolist() == [2] and r.rows["row"].tolist() == [3, 4]


def test_duplicate_patient_in_patient_layout(tmp_path):
    # row 4 repeats row 2 exactly: rejected. Row 5 shares A's ID with different data (another
    # episode, or IDs numbered within therapist as in the Exam data): kept and noted
    p = write_csv(tmp_path, "pid,tid,pre,post\nA,T1,15,5\nB,T1,12,8\nA,T1,15,5\nA,T2,14,6\n")
    r = ingest_dataset(p, PATIENT)
    rej = only_reject(r)
    assert (rej["row"], rej["column"], rej["reason"]) == (
        4, "pid", "duplicate patient (first at row 2)")
    assert r.rows["row"].tolist() == [2, 3, 5]
    assert r.notes == ["1 patient ID(s) occur on more than one row with different data "
                       "(e.g. A at rows 2, 5); they are kept as separate patients"]


def test_duplicate_patient_with_missing_optional_values(tmp_path):
    # found by the property tests: a missing ending must not hide an exact duplicate
    p = write_csv(tmp_path, "pid,tid,pre,post,end\nA,T1,15,5,\nA,T1,15,5,dropout\nA,T1,15,5,\n")
    r = ingest_dataset(p, spec(PATIENT, ending="end"))
    rej = only_reject(r)
    assert (rej["row"], rej["reason"]) == (4, "duplicate patient (first at row 2)")


MULTI = ("pid,tid,session,phq9\n"
         "A,T1,1,20\nA,T2,2,15\nA,T1,3,10\n"    # A: T1 twice, T2 once -> T1
         "B,T2,1,20\nB,T3,2,15\n"               # B: tie -> therapist of the first session, T2
         "C,T3,2,14\nC,T4,1,18\n"               # C: tie; first session (1) is with T4
         "D,T1,1,12\nD,T1,2,10\n")


def test_multi_therapist_majority_recodes_and_notes(tmp_path):
    p = write_csv(tmp_path, MULTI)
    with pytest.warns(DataWarning, match="assigned to the therapist with most sessions"):
        r = ingest_dataset(p, spec(SESSION, multi_therapist="majority"))
    assert r.rejects.empty
    got = r.rows.groupby("patient")["therapist"].unique().map(list).to_dict()
    assert got == {"A": ["T1"], "B": ["T2"], "C": ["T4"], "D": ["T1"]}
    assert "patient A: sessions with therapists T1 (2), T2 (1); all 3 rows assigned to T1" in r.notes
    assert sum(n.startswith("patient ") for n in r.notes) == 3


def test_multi_therapist_reject(tmp_path):
    p = write_csv(tmp_path, MULTI)
    r = ingest_dataset(p, spec(SESSION, multi_therapist="reject"))
    assert r.rows["patient"].unique().tolist() == ["D"]
    assert r.rejects["row"].tolist() == [2, 3, 4, 5, 6, 7, 8]
    assert r.rejects.loc[0, "reason"] == "seen by more than one therapist (T1, T2)"
    assert r.rejects.loc[0, "column"] == "tid"
    check_accounting(r)


def test_arm_change_rejects_all_rows_of_the_patient(tmp_path):
    p = write_csv(tmp_path, "pid,tid,session,phq9,fb\nA,T1,1,20,0\nA,T1,2,15,1\nB,T1,1,12,1\n"
                            "B,T1,2,9,1\n")
    r = ingest_dataset(p, spec(SESSION, arm="fb"))
    assert r.rejects[["row", "column", "reason"]].values.tolist() == [
        [2, "fb", "arm changes between sessions (0 -> 1)"],
        [3, "fb", "arm changes between sessions (0 -> 1)"],
    ]
    assert r.rows["arm"].tolist() == [1, 1]


def test_arm_with_three_levels_is_a_config_error(tmp_path):
    p = write_csv(tmp_path, "pid,tid,pre,post,cond\nA,T1,15,5,ROM\nB,T1,12,8,TAU\n"
                            "C,T2,14,6,ROM+\n")
    with pytest.raises(ConfigError) as err:
        ingest_dataset(p, spec(PATIENT, arm="cond"))
    assert str(err.value) == (
        "dataset.columns.arm: column 'cond' has 3 levels (ROM, ROM+, TAU); expected at most two "
        "(feedback and control)"
    )


def test_missing_arm_cluster_and_covariate_in_patient_layout(tmp_path):
    p = write_csv(tmp_path, "pid,tid,pre,post,fb,site,age,sex\nA,T1,15,5,1,S1,40,F\n"
                            "B,T1,12,8,,S1,30,M\nC,T2,14,6,0,,50,F\nD,T2,14,6,0,S2,,F\n"
                            "E,T2,14,6,0,S2,33,\n")
    r = ingest_dataset(p, spec(PATIENT, arm="fb", cluster="site", covariates=["age", "sex"]))
    assert r.rejects[["row", "column", "reason"]].values.tolist() == [
        [3, "fb", "missing value"],
        [4, "site", "missing value"],
        [5, "age", "missing value"],
        [6, "sex", "missing value"],
    ]
    assert r.covariate_kinds == {"age": "numeric", "sex": "categorical"}


def test_first_problem_wins_in_documented_order(tmp_path):
    # row 2 has a missing therapist AND a bad score: the therapist ID comes first
    p = write_csv(tmp_path, "pid,tid,session,phq9\nA,,1,99\nA,T1,1,12\nA,T1,2,8\n")
    r = ingest_dataset(p, SESSION)
    assert only_reject(r)["reason"] == "missing therapist ID"


def test_missing_ending_is_not_rejected(tmp_path):
    p = write_csv(tmp_path, "pid,tid,session,phq9,end\nA,T1,1,20,\nA,T1,2,15,Dropped out\n")
    r = ingest_dataset(p, spec(SESSION, ending="end"))
    assert r.rejects.empty and r.rows["ending"].isna().tolist() == [True, False]


# ----------------------------------------------------------------------------------------------
# accounting, formats, IDs
# ----------------------------------------------------------------------------------------------
def test_row_accounting_on_a_messy_table(tmp_path):
    text = ("pid,tid,session,phq9,fb\n"
            "A,T1,1,20,1\nA,T1,2,x,1\nA,T1,2,14,1\n,T1,3,9,1\n"
            "B,T2,1,30,0\nB,T2,1,12,0\nB,T2,1,11,0\nC,T3,1,10,1\nC,T3,2,9,0\n\n"
            "D,T4,1,9,1\nD,T5,2,8,1\nD,T4,3,7,1\n")
    p = write_csv(tmp_path, text)
    r = ingest_dataset(p, spec(SESSION, arm="fb", multi_therapist="reject"))
    check_accounting(r)
    acct = accounting(r.rows_read, r.rejects)
    assert acct == {
        "rows_read": 13,
        "rows_used": 3,
        "rows_rejected": 10,
        "rejected_by_reason": {
            "arm changes between sessions": 2,  # C
            "duplicate session": 1,             # row 8 (first valid B session 1 is row 7)
            "empty row": 1,
            "missing patient ID": 1,
            "not a number": 1,
            "out of range": 1,                  # B 30
            "seen by more than one therapist": 3,
        },
    }


def test_accounting_counts_each_row_once():
    rejects = pd.DataFrame({
        "row": [2, 3, 3], "patient": ["A", "A", "A"], "column": ["x"] * 3, "value": [""] * 3,
        "reason": ["duplicate session (same patient and occasion as row 9)",
                   "duplicate session (same patient and occasion as row 7)", "not a number"],
    })
    assert accounting(10, rejects) == {"rows_read": 10, "rows_used": 8, "rows_rejected": 2,
                                       "rejected_by_reason": {"duplicate session": 2}}


def _typed_table() -> pd.DataFrame:
    return pd.DataFrame({
        "pid": ["007", "007", "007", "010", "010", "011", "011", "012"],
        "tid": ["T01", "T01", "T02", "0042", "0042", "T9", "T9", "T9"],
        "date": pd.to_datetime(["2023-01-05", "2023-01-12", "2023-01-19", "2023-02-01",
                                "2023-02-01", "2023-03-01", "2030-01-01", "2023-03-01"]),
        "phq9": [20.0, 15.0, 9.0, 12.0, 11.0, np.nan, 8.0, 31.0],
        "fb": [1, 1, 1, 0, 0, 1, 1, 0],
        "age": [40, 40, 40, 25, 25, 61, 61, 33],
        "sex": ["F", "F", "F", "M", "M", "=1+2", "=1+2", "F"],
    })


def test_csv_parquet_excel_give_identical_results(tmp_path):
    df = _typed_table()
    paths = {
        "csv": tmp_path / "t.csv",
        "parquet": tmp_path / "t.parquet",
        "excel": tmp_path / "t.xlsx",
    }
    df.to_csv(paths["csv"], index=False)
    df.to_parquet(paths["parquet"], index=False)
    df.to_excel(paths["excel"], index=False)
    sp = {
        **SESSION,
        "columns": {"patient": "pid", "therapist": "tid", "score": "phq9", "occasion": "date",
                    "arm": "fb", "covariates": ["age", "sex"]},
    }
    results = {k: ingest_dataset(p, sp, today="2024-01-01") for k, p in paths.items()}
    base = results["csv"]
    assert base.rows_read == 8 and len(base.rejects) == 4
    for kind in ("parquet", "excel"):
        r = results[kind]
        pd.testing.assert_frame_equal(r.rows, base.rows, check_dtype=True)
        # `value` shows each cell as its format holds it (CSV text "31.0", a Parquet float 31);
        # row, patient, column and reason must agree
        cols = ["row", "patient", "column", "reason"]
        pd.testing.assert_frame_equal(r.rejects[cols], base.rejects[cols])
        assert r.notes == base.notes
    assert base.rows["patient"].tolist()[:2] == ["007", "007"]
    assert "0042" in set(base.rows["therapist"])


def test_ids_are_kept_as_strings(tmp_path):
    p = write_csv(tmp_path, "pid,tid,pre,post\n007,0042,15,5\n7,42,12,8\n")
    r = ingest_dataset(p, PATIENT)
    assert r.rows["patient"].tolist() == ["007", "7"]
    assert r.rows["therapist"].tolist() == ["0042", "42"]
    raw = read_table(p)
    assert raw["pid"].tolist() == ["007", "7"]


def test_numeric_ids_from_parquet_lose_no_digits_and_gain_no_decimals(tmp_path):
    df = pd.DataFrame({"pid": [1.0, 2.0, np.nan], "tid": [10, 10, 11], "pre": [15, 12, 9],
                       "post": [5, 8, 7]})
    p = tmp_path / "t.parquet"
    df.to_parquet(p)
    r = ingest_dataset(p, PATIENT)
    assert r.rows["patient"].tolist() == ["1", "2"] and r.rows["therapist"].tolist() == ["10", "10"]
    assert only_reject(r)["reason"] == "missing patient ID"


def test_excel_sheet_selection_and_semicolon_csv(tmp_path):
    p = tmp_path / "book.xlsx"
    with pd.ExcelWriter(p) as xw:
        pd.DataFrame({"x": [1]}).to_excel(xw, sheet_name="notes", index=False)
        pd.DataFrame({"pid": ["A"], "tid": ["T"], "pre": [14], "post": [3]}).to_excel(
            xw, sheet_name="data", index=False)
    r = ingest_dataset(p, spec(PATIENT, sheet="data"))
    assert r.rows[["patient", "end"]].values.tolist() == [["A", 3.0]]
    semi = write_csv(tmp_path, "pid;tid;pre;post\nA;T;14;3\n", "semi.csv")
    assert ingest_dataset(semi, PATIENT).rows["baseline"].tolist() == [14.0]


def test_data_warning_when_rows_are_rejected(tmp_path):
    p = write_csv(tmp_path, "pid,tid,session,phq9\nA,T1,1,12\nA,T1,2,x\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ingest_dataset(p, SESSION)
    msgs = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert msgs == [f"{p}: 1 of 2 rows rejected (not a number: 1)"]


# ----------------------------------------------------------------------------------------------
# one-line errors
# ----------------------------------------------------------------------------------------------
def test_missing_mapped_column_names_the_role(tmp_path):
    p = write_csv(tmp_path, "pid,tid,session,score\nA,T1,1,12\n")
    with pytest.raises(InputError) as err:
        ingest_dataset(p, SESSION)
    assert str(err.value) == (
        f"file {p} has no column 'phq9' (columns.score); columns are: pid, tid, session, score"
    )


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("nope.csv", None, "no such file"),
        ("data.txt", "a,b\n", "unknown file type '.txt'; expected .csv, .parquet, .xlsx or .xls"),
        ("bad.parquet", "not parquet at all", "cannot read"),
        ("bad.xlsx", "not a zip", "cannot read"),
        ("latin.csv", b"pid,tid\n\xe9,T\n", "not UTF-8 text (byte 0xe9 at offset 8)"),
        ("empty.csv", "", "the file is empty"),
        ("ragged.csv", "pid,tid\nA,T,extra,more\nB,T\n", "cannot read"),
        ("old.xls", "not an old Excel file", "cannot read"),
    ],
)
def test_unreadable_files_are_one_line_input_errors(tmp_path, name, content, fragment):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content)
    with pytest.raises(InputError) as err:
        read_table(p)
    msg = str(err.value)
    assert fragment in msg and str(p) in msg and "\n" not in msg


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"layout": "long"}, "dataset.layout: expected 'session' or 'patient', got 'long'"),
        ({"columns": {"patient": "pid", "therapist": "tid", "score": "phq9"}},
         "dataset.columns.occasion: required for layout 'session'"),
        ({"columns": {**SESSION["columns"], "therapst": "x"}},
         "dataset.columns: unknown role(s) 'therapst'; roles are patient, therapist, outcome, "
         "baseline, score, occasion, arm, cluster, ending, covariates"),
        ({"multi_therapist": "first"},
         "dataset.multi_therapist: expected 'majority' or 'reject', got 'first'"),
        ({"export_date": "last tuesday"},
         "dataset.export_date: expected a date (YYYY-MM-DD), got 'last tuesday'"),
        ({"min_sessions": 0}, "dataset.min_sessions: expected a whole number >= 1, got 0"),
    ],
)
def test_config_errors_are_one_line(tmp_path, changes, message):
    p = write_csv(tmp_path, "pid,tid,session,phq9\nA,T1,1,12\n")
    with pytest.raises(ConfigError) as err:
        ingest_dataset(p, {**SESSION, **changes})
    assert str(err.value) == message


def test_config_error_names_the_dataset_and_unknown_instrument(tmp_path):
    p = write_csv(tmp_path, "pid,tid,session,phq9\nA,T1,1,12\n")
    with pytest.raises(ConfigError, match=r"^datasets\.demo\.layout: "):
        ingest_dataset(p, {**SESSION, "layout": None}, name="demo")
    with pytest.raises(ConfigError, match="unknown instrument 'PHQ-99'"):
        ingest_dataset(p, {**SESSION, "instrument": "PHQ-99"})


# ----------------------------------------------------------------------------------------------
# the reference data sets ingest cleanly
# ----------------------------------------------------------------------------------------------
def test_reference_datasets_ingest_without_rejects():
    exam = ingest_dataset(REFERENCE / "exam.csv", {
        "layout": "patient",
        "columns": {"patient": "student", "therapist": "school", "outcome": "normexam",
                    "baseline": "standLRT", "covariates": ["sex"]},
    })
    # 4,059 pupils in 65 schools (README of the reference data; R: nrow(mlmRev::Exam))
    assert exam.rows_read == 4059 and exam.rejects.empty
    assert exam.rows["therapist"].nunique() == 65
    # student numbers restart in each school and four (school, student) pairs even repeat with
    # different pupils' data: kept as separate pupils, with a note
    assert len(exam.notes) == 1 and "kept as separate patients" in exam.notes[0]
    fb = ingest_dataset(REFERENCE / "therapy_feedback.csv", {
        "layout": "patient", "instrument": "PHQ-9",
        "columns": {"patient": "patient_id", "therapist": "therapist_id", "outcome": "phq9_post",
                    "baseline": "phq9_pre", "arm": "feedback", "cluster": "trial_id"},
    })
    # 2,070 patients of 60 therapists, two arms (README)
    assert fb.rows_read == 2070 and fb.rejects.empty
    assert fb.rows["therapist"].nunique() == 60 and sorted(fb.rows["arm"].unique()) == [0, 1]
