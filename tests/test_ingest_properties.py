"""Property tests: malformed tables thrown at ingestion.

Whatever the table holds (mixed types in a column, NaN, empty strings, huge numbers, duplicates,
missing columns, unicode), ingestion and the patient outcomes either succeed with every input row
accounted for exactly once (kept or rejected), or raise InputError / ConfigError with a one-line
message. Anything else (a traceback from inside pandas, pandera or numpy) fails the test.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from therapist_effects.exceptions import ConfigError, InputError
from therapist_effects.io.ingest import accounting, ingest_dataset, ingest_frame
from therapist_effects.io.outcomes import derive_patient_outcomes

pytestmark = pytest.mark.filterwarnings("ignore::therapist_effects.exceptions.DataWarning")

ODD_TEXT = ["", " ", "NA", "n/a", "null", "007", "1e999", "-1", "=1+2", "2023-01-05",
            "1899-01-01", "2999-12-31", "05/01/2023", "3.5", "١٢", "Ünïcødé", "\t", "x,y", '"q"']

cells = st.one_of(
    st.none(),
    st.just(float("nan")),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=0, max_value=30),
    st.text(max_size=6),
    st.sampled_from(ODD_TEXT),
    st.booleans(),
)
ids = st.one_of(st.sampled_from(["A", "B", "007", "7", 7, 7.0, "Ä", ""]), cells)
scores = st.one_of(st.integers(min_value=-2, max_value=30), cells)
occasions = st.one_of(st.integers(min_value=-1, max_value=4),
                      st.sampled_from(["2023-01-05", "2023-01-12", "2031-01-01", "1850-01-01"]),
                      cells)
arms = st.one_of(st.sampled_from([0, 1, "0", "1", "ROM", "TAU"]), cells)
endings = st.one_of(st.sampled_from(["dropout", "Dropped Out", "completed"]), cells)

COLUMN_STRATEGIES = {
    "pid": ids, "tid": ids, "session": occasions, "phq9": scores, "pre": scores,
    "fb": arms, "age": cells, "sex": cells, "ending": endings, "extra": cells,
}


@st.composite
def tables_and_specs(draw):
    layout = draw(st.sampled_from(["session", "patient"]))
    n = draw(st.integers(min_value=0, max_value=10))
    cols = {"patient": "pid", "therapist": "tid"}
    if layout == "session":
        cols.update(score="phq9", occasion="session")
    else:
        cols.update(outcome="phq9")
        if draw(st.booleans()):
            cols["baseline"] = "pre"
    for role, col in (("arm", "fb"), ("ending", "ending")):
        if draw(st.booleans()):
            cols[role] = col
    covs = draw(st.lists(st.sampled_from(["age", "sex"]), unique=True, max_size=2))
    if covs:
        cols["covariates"] = covs
    spec = {
        "layout": layout,
        "columns": cols,
        "instrument": draw(st.sampled_from([None, "PHQ-9", "ORS"])),
        "multi_therapist": draw(st.sampled_from(["majority", "reject"])),
        "min_sessions": draw(st.integers(min_value=1, max_value=3)),
    }
    names = ["pid", "tid", "session", "phq9", "pre", "fb", "age", "sex", "ending", "extra"]
    if draw(st.integers(min_value=0, max_value=9)) == 0:  # sometimes a configured column is absent
        names.remove(draw(st.sampled_from(["pid", "tid", "session", "phq9", "fb", "age"])))
    data = {c: [draw(COLUMN_STRATEGIES[c]) for _ in range(n)] for c in names}
    if n and draw(st.booleans()):  # exact duplicate rows
        k = draw(st.integers(min_value=0, max_value=n - 1))
        for c in names:
            data[c].append(data[c][k])
    table = pd.DataFrame({c: pd.Series(v, dtype=object) for c, v in data.items()})
    return table, spec


def assert_one_line(err: Exception) -> None:
    msg = str(err)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg


def check_run(run, spec) -> None:
    """Ingest + outcomes: typed one-line errors only, and no row lost from the accounting."""
    try:
        res = run()
    except (InputError, ConfigError) as err:
        assert_one_line(err)
        return
    kept = list(res.rows["row"])
    rejected = list(res.rejects["row"])
    assert len(set(rejected)) == len(rejected)
    assert not set(kept) & set(rejected)
    assert sorted(kept + rejected) == list(range(2, res.rows_read + 2))
    assert res.rows_read == len(res.rows) + len(res.rejects)
    try:
        patients, more = derive_patient_outcomes(res.rows, spec, res.instrument)
    except ConfigError as err:
        assert_one_line(err)
        return
    all_rejects = pd.concat([res.rejects, more], ignore_index=True)
    acct = accounting(res.rows_read, all_rejects)
    assert acct["rows_used"] + acct["rows_rejected"] == res.rows_read
    assert sum(acct["rejected_by_reason"].values()) == acct["rows_rejected"]
    used = set(kept) - set(more["row"])
    assert acct["rows_used"] == len(used)
    if spec["layout"] == "session":
        assert int(patients["n_sessions"].sum()) == len(used) if len(patients) else not used
    else:
        assert len(patients) == len(used)
    for col in ("recovered", "reliable_improvement", "feedback", "dropout"):
        if col in patients.columns:
            vals = patients[col].dropna()
            assert set(vals) <= {0.0, 1.0}
    assert all(isinstance(p, str) for p in patients["patient"])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables_and_specs())
def test_in_memory_tables_never_crash_and_never_lose_rows(case):
    table, spec = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_run(lambda: ingest_frame(table, spec, today="2024-06-01"), spec)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables_and_specs())
def test_csv_files_never_crash_and_never_lose_rows(case):
    table, spec = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "export.csv"
        table.to_csv(path, index=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_run(lambda: ingest_dataset(path, spec, today="2024-06-01"), spec)


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([".csv", ".parquet", ".xlsx"]))
def test_garbage_files_are_input_errors(blob, suffix):
    spec = {"layout": "patient", "columns": {"patient": "a", "therapist": "b", "outcome": "c"}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"garbage{suffix}"
        path.write_bytes(blob)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_run(lambda: ingest_dataset(path, spec), spec)


def test_huge_and_odd_numbers_are_classified_not_crashed():
    # a fixed example of the kinds of values the properties throw, with the expected reasons
    table = pd.DataFrame({
        "pid": ["A", "B", "C", "D", "E", "F"],
        "tid": ["T"] * 6,
        "phq9": [10**30, float("inf"), "1e999", "١٢", True, 12],
    }, dtype=object)
    spec = {"layout": "patient", "columns": {"patient": "pid", "therapist": "tid",
                                             "outcome": "phq9"}}
    res = ingest_frame(table, spec)
    assert res.rejects["reason"].tolist() == ["not a finite number", "not a finite number",
                                              "not a number", "not a number"]
    assert res.rows["end"].tolist() == [1e30, 12.0]
    assert not math.isnan(res.rows["end"].iloc[0])
