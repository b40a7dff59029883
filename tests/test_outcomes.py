"""Patient-level outcomes from validated rows: hand-worked session histories, each derived outcome,
the feedback coding, dropout, the rejects of this step and the CSV/Parquet writer."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from therapist_effects.exceptions import ConfigError, DataWarning
from therapist_effects.io.ingest import accounting, ingest_dataset, ingest_frame
from therapist_effects.io.outcomes import (
    derive_patient_outcomes,
    escape_formulas,
    write_patient_outputs,
    write_rejects,
)
from refdata import REFERENCE_DIR

pytestmark = pytest.mark.filterwarnings("ignore::therapist_effects.exceptions.DataWarning")

REFERENCE = REFERENCE_DIR

SESSION = {
    "layout": "session",
    "columns": {"patient": "pid", "therapist": "tid", "score": "phq9", "occasion": "session",
                "ending": "ending"},
    "instrument": "PHQ-9",
    "min_sessions": 2,
}


def sessions(records: list[tuple], columns=("pid", "tid", "session", "phq9", "ending")) -> pd.DataFrame:
    return pd.DataFrame(records, columns=list(columns))


def nan_eq(a, b) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def patient_row(patients: pd.DataFrame, pid: str) -> dict:
    return patients.set_index("patient").loc[pid].to_dict()


def test_phq9_session_histories_hand_worked():
    table = sessions([
        # A: 18 -> 14 -> 9 (given out of order): baseline 18, end 9, change 9 >= 6 reliable;
        #    18 >= 10 case -> 9 < 10 not: recovered, reliable recovery, clinically significant
        ("A", "T1", 3, 9, "completed"), ("A", "T1", 1, 18, None), ("A", "T1", 2, 14, None),
        # B: 8 -> 12 -> 15: not a case at intake -> recovered NaN; change -7: reliable
        #    deterioration; clinically significant 0 (cannot cross from non-case)
        ("B", "T1", 1, 8, None), ("B", "T1", 2, 12, None), ("B", "T1", 3, 15, "Dropped Out"),
        # C: 20 -> 15 -> 14: change 6 = RC exactly: reliable improvement; 14 still a case:
        #    recovered 0, reliable recovery 0, clinically significant 0
        ("C", "T2", 1, 20, None), ("C", "T2", 2, 15, None), ("C", "T2", 3, 14, "planned"),
        # D: one session only -> no end-of-treatment score -> rejected
        ("D", "T2", 1, 10, None),
        # E: 14 -> 9: change 5 < 6: not reliable; 14 case -> 9 not: recovered 1, reliable
        #    recovery 0 (recovered but not reliably improved)
        ("E", "T2", 1, 14, None), ("E", "T2", 5, 9, None),
    ])
    rows = ingest_frame(table, SESSION).rows
    patients, rejects = derive_patient_outcomes(rows, SESSION)
    assert patients["patient"].tolist() == ["A", "B", "C", "E"]
    nan = float("nan")
    expected = {
        # baseline, end, n, first, last, change, case0, RI, RD, CSC, recovered, RR, dropout
        "A": (18, 9, 3, 1, 3, 9, 1, 1, 0, 1, 1, 1, 0),
        "B": (8, 15, 3, 1, 3, -7, 0, 0, 1, 0, nan, nan, 1),
        "C": (20, 14, 3, 1, 3, 6, 1, 1, 0, 0, 0, 0, 0),
        "E": (14, 9, 2, 1, 5, 5, 1, 0, 0, 0, 1, 0, nan),
    }
    cols = ["baseline", "end", "n_sessions", "first_occasion", "last_occasion", "change",
            "caseness_baseline", "reliable_improvement", "reliable_deterioration",
            "clinically_significant", "recovered", "reliable_recovery", "dropout"]
    for pid, values in expected.items():
        got = patient_row(patients, pid)
        for c, v in zip(cols, values):
            assert nan_eq(float(got[c]), float(v)), (pid, c, got[c], v)
    assert rejects[["row", "patient", "column", "reason"]].values.tolist() == [
        [11, "D", "phq9", "fewer than 2 measured sessions: no end-of-treatment score"]]
    assert list(patients.columns[:3]) == ["patient", "therapist", "baseline"]


def test_min_sessions_three_and_accounting_across_steps():
    table = sessions([("A", "T1", 1, 18, None), ("A", "T1", 2, 12, None),
                      ("B", "T1", 1, 18, None), ("B", "T1", 2, 12, None), ("B", "T1", 3, 9, None),
                      ("C", "T1", 1, "x", None)])
    spec = {**SESSION, "min_sessions": 3}
    res = ingest_frame(table, spec)
    patients, rejects = derive_patient_outcomes(res.rows, spec)
    assert patients["patient"].tolist() == ["B"]
    assert set(rejects["reason"]) == {"fewer than 3 measured sessions: no end-of-treatment score"}
    all_rejects = pd.concat([res.rejects, rejects], ignore_index=True)
    acct = accounting(res.rows_read, all_rejects)
    # 6 rows: C's row is not a number, A's two rows have too few sessions, B's 3 rows are used
    assert acct == {"rows_read": 6, "rows_used": 3, "rows_rejected": 3,
                    "rejected_by_reason": {
                        "fewer than 3 measured sessions: no end-of-treatment score": 2,
                        "not a number": 1}}


def test_single_session_patients_kept_with_min_sessions_one_have_no_derived_outcomes():
    table = sessions([("A", "T1", 1, 18, None)])
    spec = {**SESSION, "min_sessions": 1}
    patients, rejects = derive_patient_outcomes(ingest_frame(table, spec).rows, spec)
    row = patient_row(patients, "A")
    assert rejects.empty and row["n_sessions"] == 1 and row["end"] == 18
    # NHS Talking Therapies: treated = at least two sessions, so no recovery etc. for one session
    for c in ("recovered", "reliable_recovery", "reliable_improvement", "clinically_significant"):
        assert math.isnan(row[c])
    assert row["caseness_baseline"] == 1.0


def test_ors_patient_layout_higher_is_better():
    table = pd.DataFrame({"pid": ["A", "B", "C"], "tid": ["T1", "T1", "T2"],
                          "ors_pre": [20, 20, 30], "ors_post": [26, 24, 24]})
    spec = {"layout": "patient", "instrument": "ORS",
            "columns": {"patient": "pid", "therapist": "tid", "outcome": "ors_post",
                        "baseline": "ors_pre"}}
    patients, rejects = derive_patient_outcomes(ingest_frame(table, spec).rows, spec)
    assert rejects.empty
    a, b, c = (patient_row(patients, p) for p in "ABC")
    # A: 20 -> 26: change = end - baseline = +6 >= 5 reliable; 20 < 25 clinical -> 26 not:
    #    clinically significant, recovered, reliable recovery
    assert (a["change"], a["reliable_improvement"], a["clinically_significant"], a["recovered"],
            a["reliable_recovery"]) == (6, 1, 1, 1, 1)
    # B: 20 -> 24: +4 < 5 not reliable, still clinical (24 < 25): recovered 0
    assert (b["change"], b["reliable_improvement"], b["recovered"]) == (4, 0, 0)
    # C: 30 -> 24: -6: reliable deterioration; not clinical at intake -> recovered NaN
    assert (c["change"], c["reliable_deterioration"]) == (-6, 1) and math.isnan(c["recovered"])
    assert "n_sessions" not in patients.columns


def test_no_instrument_gives_change_only():
    table = pd.DataFrame({"pid": ["A", "B"], "tid": ["T1", "T2"], "pre": [0.5, -1.0],
                          "post": [0.1, 0.7]})
    spec = {"layout": "patient",
            "columns": {"patient": "pid", "therapist": "tid", "outcome": "post", "baseline": "pre"}}
    patients, _ = derive_patient_outcomes(ingest_frame(table, spec).rows, spec)
    assert patients["change"].tolist() == pytest.approx([0.4, -1.7])  # baseline - end
    assert "recovered" not in patients.columns and "reliable_improvement" not in patients.columns


def test_user_defined_instrument_from_ingest_result():
    table = sessions([("A", "T1", 1, 30, None), ("A", "T1", 2, 22, None),
                      ("B", "T1", 1, 27, None), ("B", "T1", 2, 19, None)])
    spec = {**SESSION, "instrument": "WSAS"}
    user = {"WSAS": {"min": 0, "max": 40, "higher_is_better": False, "cutoff": 20, "rci": 8}}
    res = ingest_frame(table, spec, user_instruments=user)
    patients, _ = derive_patient_outcomes(res.rows, spec, res.instrument)
    # A: 30 -> 22: change 8 = rci reliable, 22 >= 20 still a case; B: 27 -> 19 crosses
    assert patients["reliable_improvement"].tolist() == [1.0, 1.0]
    assert patients["clinically_significant"].tolist() == [0.0, 1.0]
    assert patients["recovered"].tolist() == [0.0, 1.0]
    # without the Instrument object the registry does not know WSAS: a one-line config error
    with pytest.raises(ConfigError, match="unknown instrument 'WSAS'"):
        derive_patient_outcomes(res.rows, spec)


@pytest.mark.parametrize(
    "arm_values, feedback_level, expected",
    [
        ([0, 1, 1], None, [0.0, 1.0, 1.0]),                       # numeric 0/1: the value itself
        (["control", "feedback", "feedback"], None, [0.0, 1.0, 1.0]),  # 2nd in sorted order
        (["ROM", "TAU", "TAU"], None, [0.0, 1.0, 1.0]),           # sorted: ROM < TAU -> TAU
        (["ROM", "TAU", "TAU"], "ROM", [1.0, 0.0, 0.0]),          # explicit level wins
        ([1, 2, 2], None, [0.0, 1.0, 1.0]),                       # numeric, not 0/1: 2nd level
        ([0, 1, 1], 0, [1.0, 0.0, 0.0]),
    ],
)
def test_feedback_coding(arm_values, feedback_level, expected):
    table = pd.DataFrame({"pid": ["A", "B", "C"], "tid": ["T1", "T1", "T2"], "post": [5, 6, 7],
                          "arm": arm_values})
    spec = {"layout": "patient", "feedback_level": feedback_level,
            "columns": {"patient": "pid", "therapist": "tid", "outcome": "post", "arm": "arm"}}
    patients, _ = derive_patient_outcomes(ingest_frame(table, spec).rows, spec)
    assert patients["feedback"].tolist() == expected
    assert list(patients.columns[:4]) == ["patient", "therapist", "arm", "feedback"]


def test_unknown_feedback_level_is_a_config_error():
    table = pd.DataFrame({"pid": ["A", "B"], "tid": ["T1", "T1"], "post": [5, 6],
                          "arm": ["ROM", "TAU"]})
    spec = {"layout": "patient", "feedback_level": "feedback",
            "columns": {"patient": "pid", "therapist": "tid", "outcome": "post", "arm": "arm"}}
    with pytest.raises(ConfigError) as err:
        derive_patient_outcomes(ingest_frame(table, spec).rows, spec)
    assert str(err.value) == ("dataset.feedback_level: 'feedback' is not a level of the arm "
                              "column (levels: ROM, TAU)")


def test_covariates_from_first_row_that_has_them_and_missing_everywhere_rejected():
    table = pd.DataFrame({
        "pid": ["A", "A", "B", "B"], "tid": ["T1"] * 4, "session": [2, 1, 1, 2],
        "phq9": [10, 15, 12, 8], "ending": [None] * 4,
        "age": [None, 41, None, None], "sex": ["F", None, "M", "M"],
    })
    spec = {**SESSION, "columns": {**SESSION["columns"], "covariates": ["age", "sex"]}}
    with pytest.warns(DataWarning, match="rejected while deriving patient outcomes"):
        patients, rejects = derive_patient_outcomes(ingest_frame(table, spec).rows, spec)
    a = patient_row(patients, "A")
    # A's first session (session 1, row 3) has age 41 and no sex; sex comes from session 2
    assert (a["age"], a["sex"]) == (41.0, "F")
    assert rejects[["row", "patient", "column"]].values.tolist() == [[4, "B", "age"], [5, "B", "age"]]
    assert set(rejects["reason"]) == {"missing value (no age on any row of the patient)"}


def test_date_occasions():
    table = sessions([("A", "T1", "2023-02-01", 18, None), ("A", "T1", "2023-01-04", 20, None),
                      ("A", "T1", "2023-03-15", 7, "completed")])
    res = ingest_frame(table, SESSION, today="2024-01-01")
    patients, _ = derive_patient_outcomes(res.rows, SESSION)
    a = patient_row(patients, "A")
    assert (a["baseline"], a["end"]) == (20, 7)  # first by date, last by date
    assert a["first_occasion"] == pd.Timestamp("2023-01-04")
    assert a["last_occasion"] == pd.Timestamp("2023-03-15")


def test_recovered_matches_the_reference_file():
    # therapy_feedback.csv carries its own `recovered`: PHQ-9 pre >= 10 and post < 10 (0 for
    # patients below caseness at intake). Ours must agree wherever it is defined, and be NaN
    # exactly for the patients below caseness at intake (caseness is the denominator).
    spec = {"layout": "patient", "instrument": "PHQ-9",
            "columns": {"patient": "patient_id", "therapist": "therapist_id",
                        "outcome": "phq9_post", "baseline": "phq9_pre", "arm": "feedback"}}
    res = ingest_dataset(REFERENCE / "therapy_feedback.csv", spec)
    patients, rejects = derive_patient_outcomes(res.rows, spec)
    ref = pd.read_csv(REFERENCE / "therapy_feedback.csv", dtype={"patient_id": str})
    merged = patients.merge(ref[["patient_id", "recovered", "phq9_pre"]], left_on="patient",
                            right_on="patient_id", suffixes=("", "_ref"))
    assert len(merged) == 2070 and rejects.empty
    defined = merged["recovered"].notna()
    assert (defined == (merged["phq9_pre"] >= 10)).all()
    assert (merged.loc[defined, "recovered"] == merged.loc[defined, "recovered_ref"]).all()
    assert (merged.loc[~defined, "recovered_ref"] == 0).all()
    assert patients["feedback"].tolist() == res.rows["arm"].astype(float).tolist()


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def test_csv_escapes_formula_cells_but_not_numbers(tmp_path):
    patients = pd.DataFrame({
        "patient": ["=HYPERLINK(\"x\")", "+1", "-2", "@SUM(A1)", "\tA", "\rB", "ok", "a=b"],
        "therapist": ["T"] * 8,
        "change": [-3.0, 1.0, -0.5, 2.0, 0.0, 1.0, -1.0, 4.0],
        "n_sessions": [3, 4, 5, 6, 7, 8, 9, -1],
    })
    pq, csv = tmp_path / "out" / "patients.parquet", tmp_path / "out" / "patients.csv"
    write_patient_outputs(patients, pq, csv)
    back = pd.read_csv(csv, dtype={"patient": str}, keep_default_na=False)
    # text that is a plain number ("+1", "-2") is not a formula and is left as it is (issue 10, item 8)
    assert back["patient"].tolist() == ["'=HYPERLINK(\"x\")", "+1", "-2", "'@SUM(A1)",
                                        "'\tA", "'\rB", "ok", "a=b"]
    assert back["change"].tolist() == [-3.0, 1.0, -0.5, 2.0, 0.0, 1.0, -1.0, 4.0]
    assert back["n_sessions"].tolist()[-1] == -1
    pd.testing.assert_frame_equal(pd.read_parquet(pq), patients)  # parquet is not escaped
    assert escape_formulas(patients)["change"].dtype == float


def test_write_rejects_escapes_user_text(tmp_path):
    rejects = pd.DataFrame({"row": [3], "patient": ["=cmd|' /C calc'!A0"], "column": ["phq9"],
                            "value": ["-1"], "reason": ["out of range (PHQ-9: 0-27)"]})
    write_rejects(rejects, tmp_path / "rejects.csv")
    back = pd.read_csv(tmp_path / "rejects.csv", dtype=str)
    # the formula is neutralised; the plain number -1 is not (issue 10, item 8)
    assert back.loc[0, "patient"].startswith("'=") and back.loc[0, "value"] == "-1"
    assert back.loc[0, "row"] == "3"


def _nasty_patients(seed: int) -> pd.DataFrame:
    """A patient table with every kind of cell the joined CSV writer formats itself."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = 300
    text = np.array(["P1", "=cmd()", "-2", "+1.5", "@x", "a,b", 'say "hi"', "two\nlines", "é ü", "", " pad "],
                    dtype=object)
    floats = np.array([0.0, -0.0, 1.5, -7.0, 1e-05, 12345678901.25, np.inf, -np.inf, np.nan, 1 / 3])
    dates = pd.to_datetime(["2024-01-05", "1999-12-31", None, "2025-06-30T13:45"], format="ISO8601").astype(
        "datetime64[us]")
    return pd.DataFrame({
        "patient": rng.choice(text, n),
        "therapist": pd.Series(rng.choice(text, n)).where(rng.random(n) > 0.1),
        "arm": rng.integers(-3, 3, n),
        "baseline": rng.choice(floats, n),
        "n_sessions": rng.integers(0, 10**12, n),
        "first_occasion": rng.choice(dates, n),
        "sex": pd.Series(rng.choice(["F", "M", "x,y"], n), dtype="str").where(rng.random(n) > 0.2),
    })


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_patient_csv_holds_the_bytes_that_safe_csv_writes(tmp_path, seed):
    from therapist_effects.io.csvsafe import safe_csv

    table = _nasty_patients(seed)
    write_patient_outputs(table, tmp_path / "p.parquet", tmp_path / "p.csv")
    safe_csv(table, tmp_path / "ref.csv", date_format="%Y-%m-%d", lineterminator="\r\n")
    assert (tmp_path / "p.csv").read_bytes() == (tmp_path / "ref.csv").read_bytes()


@pytest.mark.parametrize("extra", [
    {"note": ["line\rbreak", "b"] * 150},   # a carriage return: every text cell quoted (safe_csv's own path)
    {"flag": [True, False] * 150},          # a column of another kind
    {"age": pd.array([1, None] * 150, dtype="Int64")},
])
def test_patient_csv_falls_back_to_safe_csv(tmp_path, extra):
    from therapist_effects.io.csvsafe import safe_csv

    table = _nasty_patients(3).assign(**extra)
    write_patient_outputs(table, tmp_path / "p.parquet", tmp_path / "p.csv")
    safe_csv(table, tmp_path / "ref.csv", date_format="%Y-%m-%d", lineterminator="\r\n")
    assert (tmp_path / "p.csv").read_bytes() == (tmp_path / "ref.csv").read_bytes()


@pytest.mark.parametrize("numeric_occasion", [True, False])
def test_patient_table_does_not_depend_on_the_order_of_rows(numeric_occasion):
    """Rows listed patient by patient in session order (no sort needed) and the same rows shuffled give the
    same patient table: patients' first and last sessions, their covariates from the first row that has one."""
    import numpy as np

    rng = np.random.default_rng(5)
    records = []
    for p in range(60):
        for k in range(int(rng.integers(1, 6))):
            occasion = float(k + 1) if numeric_occasion else pd.Timestamp("2024-01-01") + pd.Timedelta(days=7 * k)
            age = float(20 + p) if rng.random() > 0.5 else np.nan
            records.append((f"P{p:03d}" if p % 7 else f"P{p}", f"T{p % 4}", occasion, float(rng.integers(0, 28)),
                            rng.choice(["completed", "dropout", None]), age))
    rows = pd.DataFrame(records, columns=["patient", "therapist", "occasion", "score", "ending", "age"])
    rows.insert(0, "row", np.arange(2, len(rows) + 2))
    spec = {"layout": "session", "instrument": "PHQ-9", "min_sessions": 2,
            "columns": {"patient": "pid", "therapist": "tid", "score": "phq9", "occasion": "s", "ending": "e",
                        "covariates": ["age"]}}
    ordered, rej_ordered = derive_patient_outcomes(rows, spec)
    shuffled, rej_shuffled = derive_patient_outcomes(rows.sample(frac=1, random_state=1), spec)
    pd.testing.assert_frame_equal(ordered, shuffled)
    pd.testing.assert_frame_equal(rej_ordered, rej_shuffled)
    first = rows[rows.groupby("patient")["row"].transform("size") >= 2].groupby("patient")
    expected = first["score"].first()
    assert ordered.set_index("patient")["baseline"].reindex(expected.index).dropna().equals(
        expected[ordered.set_index("patient")["baseline"].reindex(expected.index).notna()])
    assert len(rej_ordered) > 0 and set(rej_ordered["reason"].map(lambda r: r.split(" (")[0])) <= {
        "fewer than 2 measured sessions: no end-of-treatment score", "missing value"}
