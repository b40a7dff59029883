"""Patient-level outcomes: one row per patient from validated session or patient rows.

Session layout (one row per measurement occasion, as returned by ``ingest``): a patient's
``baseline`` is their first measured score (by occasion, then row), ``end`` their last observed
score (the last-observation end-of-treatment score used in practice-based research, so that
patients who stop early still count), ``n_sessions`` the number of measured sessions and
``first_occasion``/``last_occasion`` the first and last session number or date. Patients with fewer
than ``min_sessions`` measured sessions have no end-of-treatment score: all their rows are rejected
("fewer than 2 measured sessions: no end-of-treatment score"). Covariates are taken from the
patient's first row that has a value; a patient with no value on any row is rejected ("missing
value"). Patient layout: the row's own baseline and outcome.

``change`` is oriented so that positive = improvement: ``baseline - end`` for lower-is-better
instruments (and when no instrument is configured), ``end - baseline`` for higher-is-better ones
(ORS). With an instrument (see :mod:`therapist_effects.io.instruments`):

- ``reliable_improvement`` / ``reliable_deterioration``: oriented change >= the reliable change
  index either way;
- ``clinically_significant`` (Jacobson & Truax, 1991): reliable improvement *and* caseness at
  intake *and* non-caseness at the end (0 for patients who started outside the clinical range);
- NHS Talking Therapies ``caseness_baseline`` (intake score in the clinical range), ``recovered``
  (caseness at intake, not at the end; **NaN for patients not at caseness at intake**: caseness is
  the denominator) and ``reliable_recovery`` (recovered and reliably improved).

All are 0/1 floats; they are NaN when a score is missing or when the patient has fewer than two
measured sessions (NHS Talking Therapies count a patient as treated from two sessions; only
possible in the session layout with ``min_sessions: 1``; the patient layout is taken as treated
patients). ``dropout`` (0/1, where an ``ending`` column is configured) is 1 if any of the patient's
ending values is one of ``dropout_codes`` (case- and blank-insensitive), 0 if an ending is
recorded otherwise, NaN if none is.

``feedback`` (0/1 float, where an ``arm`` column is configured) is 1 for the feedback level:
``spec["feedback_level"]`` if given; otherwise, when the arm is numeric with levels within {0, 1},
the arm value itself; otherwise the second level in sorted order (numbers numerically, labels
alphabetically: ``control`` < ``feedback``, ``TAU`` > ``ROM`` so check the order or set
``feedback_level``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .csvsafe import neutralise_frame, safe_csv
from ..config import INSTRUMENT_OUTCOMES
from ..exceptions import ConfigError, DataWarning
from .ingest import REJECT_COLUMNS, _fmt_value, _id_text, accounting
from .instruments import Instrument, get_instrument

__all__ = [
    "accounting",
    "derive_patient_outcomes",
    "escape_formulas",
    "write_patient_outputs",
    "write_rejects",
]

# RFC 4180 line ends; with "\r\n" as line terminator the csv writer also quotes cells that hold a
# bare "\r" (with "\n" alone such a cell would break the row)
_CSV_EOL = "\r\n"


def _empty_rejects() -> pd.DataFrame:
    df = pd.DataFrame({c: pd.Series() for c in REJECT_COLUMNS})  # an empty Series is of dtype object
    df["row"] = df["row"].astype("int64")
    return df


def _resolve_instrument(spec: Mapping[str, Any], instrument: Instrument | str | None
                        ) -> Instrument | None:
    if isinstance(instrument, Instrument):
        return instrument
    name = instrument if isinstance(instrument, str) else spec.get("instrument")
    if not name:
        return None
    return get_instrument(name)


def _ending_flags(s: pd.Series, dropout_codes: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per row: is an ending recorded, and is it a dropout (blanks collapsed, case folded; each
    distinct value is normalised once)."""
    code, uniq = pd.factorize(s)
    dropout = np.array([" ".join(str(v).split()).casefold() in dropout_codes for v in uniq] + [False])
    return code >= 0, dropout[code]


def _feedback(arm: pd.Series, spec: Mapping[str, Any], where: str) -> pd.Series:
    """0/1 float: 1 for the feedback level (see the module docstring for the rule)."""
    present = arm.dropna()
    numeric = pd.api.types.is_numeric_dtype(arm) and not pd.api.types.is_bool_dtype(arm)
    levels = sorted(pd.unique(present), key=(float if numeric else str))
    wanted = spec.get("feedback_level")
    if wanted is not None:
        match = [lv for lv in levels if _id_text(lv) == _id_text(wanted)]
        if not match:
            shown = ", ".join(_fmt_value(v) for v in levels)
            raise ConfigError(
                f"{where}.feedback_level: {wanted!r} is not a level of the arm column "
                f"(levels: {shown})"
            )
        level = match[0]
    elif numeric and set(float(v) for v in levels) <= {0.0, 1.0}:
        return arm.astype(float)
    elif len(levels) >= 2:
        level = levels[1]
    else:
        if len(levels) == 1:
            warnings.warn(
                f"{where}: the arm column has a single level {_fmt_value(levels[0])!r}; "
                "feedback set to 0 (set feedback_level to choose)",
                DataWarning,
                stacklevel=3,
            )
        return pd.Series(np.where(arm.isna(), np.nan, 0.0), index=arm.index)
    out = (arm == level).astype(float)
    return out.where(arm.notna())


def _run_positions(notna: np.ndarray, starts: np.ndarray, ends: np.ndarray, last: bool) -> np.ndarray | None:
    """Position of the first (or last) True of each run ``starts[i]..ends[i]``; None when a run has none."""
    pos = np.arange(len(notna))
    if last:
        at = np.maximum.reduceat(np.where(notna, pos, -1), starts)
    else:
        at = np.minimum.reduceat(np.where(notna, pos, len(notna)), starts)
    return None if ((at < starts) | (at > ends)).any() else at


def _session_patients(rows: pd.DataFrame, covs: list[str], dropout_codes: set[str], min_sessions: int,
                      score_col: str, rej_lines: list[dict[str, Any]]) -> tuple[pd.DataFrame, np.ndarray]:
    """The patient table of the session layout (see the module docstring) and who counts as treated.

    Rows are ordered by patient (integer codes in sorted ID order), occasion and row number once, and
    each patient's values are looked up at the first and last position of their run of rows: no copy
    of the whole table. Rejected rows are appended to ``rej_lines``.
    """
    # patients as integer codes in sorted ID order: sorting and grouping on integers, not text
    pcode, pids = pd.factorize(rows["patient"], sort=True)
    order = _patient_order(pcode, rows["occasion"].to_numpy(), rows["row"].to_numpy())
    code = pcode[order]
    keep = np.bincount(code)[code] >= min_sessions
    reason = f"fewer than {min_sessions} measured sessions: no end-of-treatment score"
    few = order[~keep]
    for row, patient, score in zip(rows["row"].to_numpy()[few], rows["patient"].iloc[few], rows["score"].iloc[few]):
        rej_lines.append({"row": row, "patient": patient, "column": score_col, "value": _fmt_value(score),
                          "reason": reason})
    for c in covs:
        if c not in rows.columns:
            continue
        present = rows[c].notna().to_numpy()[order] & keep
        has = (np.bincount(code[present], minlength=len(pids)) > 0)[code] & keep
        gone = order[keep & ~has]
        for row, patient in zip(rows["row"].to_numpy()[gone], rows["patient"].iloc[gone]):
            rej_lines.append({"row": row, "patient": patient, "column": c, "value": "",
                              "reason": f"missing value (no {c} on any row of the patient)"})
        keep = has
    order, code = order[keep], code[keep]
    starts = np.flatnonzero(np.r_[True, code[1:] != code[:-1]]) if len(code) else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], len(code)] - 1
    r = _SortedRows(rows, order, starts, ends)
    pt = pd.DataFrame({"patient": np.asarray(pids)[code[starts]]})
    for c in ("therapist", "cluster", "arm"):
        if c in rows.columns:
            pt[c] = r.first(c)
    pt["baseline"] = r.first("score")
    pt["end"] = r.first("score", last=True)
    pt["n_sessions"] = (ends - starts + 1).astype(np.int64)
    # sorted by occasion within a patient (missing ones last): the first and last are the min and max
    pt["first_occasion"] = r.first("occasion")
    pt["last_occasion"] = r.first("occasion", last=True)
    if "ending" in rows.columns:
        recorded, dropped = (x[order] for x in _ending_flags(rows["ending"], dropout_codes))
        any_drop, any_end = (np.logical_or.reduceat(x, starts) if len(starts) else np.zeros(0, dtype=bool)
                             for x in (dropped, recorded))
        pt["dropout"] = np.where(any_drop, 1.0, np.where(any_end, 0.0, np.nan))
    for c in covs:
        if c in rows.columns:
            pt[c] = r.first(c)
    return pt, pt["n_sessions"].to_numpy() >= 2


def _patient_order(pcode: np.ndarray, occasion: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Positions that sort the rows by patient code, occasion and row number (numbers and dates both sort
    as they are; missing occasions last). Exports usually list each patient's sessions together and in
    order: then only the patients' blocks are put in order (checked), not every row."""
    n = len(pcode)
    if n > 1:
        same = np.diff(pcode) == 0
        do = np.diff(occasion)
        zero = np.zeros(1, dtype=do.dtype)  # 0, or a zero timedelta
        in_order = (do > zero) | ((do == zero) & (np.diff(row) > 0))  # False where an occasion is missing
        if np.all(in_order | ~same):
            starts = np.flatnonzero(np.r_[True, ~same])
            block_code = pcode[starts]
            if np.bincount(block_code).max() == 1:  # each patient in one block
                by_code = np.argsort(block_code)
                lengths = np.diff(np.r_[starts, n])[by_code]
                offsets = np.cumsum(lengths) - lengths
                return np.arange(n) + np.repeat(starts[by_code] - offsets, lengths)
    return np.lexsort((row, occasion, pcode))


class _SortedRows:
    """The rows in patient order, looked up per patient run (groupby's first/last where a run has no value)."""

    def __init__(self, rows: pd.DataFrame, order: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        self.rows, self.order, self.starts, self.ends = rows, order, starts, ends

    def first(self, col: str, last: bool = False) -> pd.Series:
        values = self.rows[col]
        notna = values.notna().to_numpy()[self.order]
        if len(self.starts):
            at = _run_positions(notna, self.starts, self.ends, last)
            if at is not None:
                return values.iloc[self.order[at]].reset_index(drop=True)
        sorted_values = values.iloc[self.order].reset_index(drop=True)
        groups = sorted_values.groupby(np.repeat(np.arange(len(self.starts)), self.ends - self.starts + 1))
        return (groups.last() if last else groups.first()).reset_index(drop=True)


def _derived_columns(layout: str, rows: pd.DataFrame, inst: Instrument | None) -> set[str]:
    """The columns :func:`derive_patient_outcomes` derives for this layout, these rows and instrument."""
    out = {"n_sessions", "first_occasion", "last_occasion"} if layout == "session" else set()
    if "arm" in rows.columns:
        out.add("feedback")
    if "ending" in rows.columns:
        out.add("dropout")
    if layout == "session" or "baseline" in rows.columns:
        out.add("change")
        if inst is not None:
            out |= INSTRUMENT_OUTCOMES | {"caseness_baseline"}
    return out


def derive_patient_outcomes(
    rows: pd.DataFrame,
    spec: Mapping[str, Any],
    instrument: Instrument | str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per patient (the patient table) and the rejects of this step.

    ``rows`` are the valid rows of :func:`therapist_effects.io.ingest.ingest_dataset`; ``spec`` the
    dataset's configuration (layout, columns, min_sessions, dropout_codes, feedback_level);
    ``instrument`` an :class:`Instrument` (e.g. ``IngestResult.instrument``) or a registry name;
    when None the spec's ``instrument`` is looked up in the registry. Returns ``(patients,
    rejects)``; ``rejects`` has the columns of the ingestion rejects and one line per rejected row.
    """
    if isinstance(spec.get("columns"), Mapping) and "scores" in spec["columns"]:
        from .scores import derive_scores_outcomes  # several instruments per row, NHS paired outcomes

        return derive_scores_outcomes(rows, spec)
    name = spec.get("name")
    where = f"datasets.{name}" if name else "dataset"
    inst = _resolve_instrument(spec, instrument)
    layout = spec.get("layout")
    if layout not in ("session", "patient"):
        raise ConfigError(f"{where}.layout: expected 'session' or 'patient', got {layout!r}")
    columns = spec.get("columns") or {}
    covs = columns.get("covariates") or []
    covs = [covs] if isinstance(covs, str) else [str(c).strip() for c in covs]
    derived_here = _derived_columns(layout, rows, inst)
    shadowed = [c for c in covs if c in derived_here]
    if shadowed:
        raise ConfigError(f"{where}.columns.covariates: {shadowed[0]!r} is also a column that this dataset's patient "
                          "table derives (the file's values would be lost); rename the column in the file")
    min_sessions = int(spec.get("min_sessions", 2))
    codes = spec.get("dropout_codes", ["dropout", "dropped out", "unilateral"]) or []
    codes = {" ".join(str(c).split()).casefold() for c in ([codes] if isinstance(codes, str) else codes)}
    rejects = _empty_rejects()
    rej_lines: list[dict[str, Any]] = []

    if layout == "session":
        pt, treated = _session_patients(rows, covs, codes, min_sessions, str(columns.get("score", "score")),
                                        rej_lines)
    else:
        r = rows.sort_values("row")
        pt = pd.DataFrame({"patient": r["patient"].to_numpy(), "therapist": r["therapist"].to_numpy()})
        for c in ("cluster", "arm"):
            if c in r.columns:
                pt[c] = r[c].to_numpy()
        if "baseline" in r.columns:
            pt["baseline"] = r["baseline"].to_numpy()
        pt["end"] = r["end"].to_numpy()
        if "ending" in r.columns:
            recorded, dropped = _ending_flags(r["ending"], codes)
            pt["dropout"] = np.where(dropped, 1.0, np.where(recorded, 0.0, np.nan))
        for c in covs:
            if c in r.columns:
                pt[c] = r[c].to_numpy()
        treated = np.ones(len(pt), dtype=bool)

    pt = pt.reset_index(drop=True)
    if "arm" in pt.columns:
        pt["feedback"] = _feedback(pt["arm"], spec, where)

    derived: dict[str, np.ndarray] = {}
    if "baseline" in pt.columns:
        b = pt["baseline"].to_numpy()
        e = pt["end"].to_numpy()
        derived["change"] = inst.improvement(b, e) if inst else b - e
        if inst is not None:
            untreated = ~treated
            # the instrument returns float arrays (NaN where undefined) for array input
            case_b, case_e = inst.is_case(b), inst.is_case(e)
            ri, rd = inst.reliable_improvement(b, e), inst.reliable_deterioration(b, e)
            csc = inst.clinically_significant(b, e)
            recovered = np.where(case_b == 1.0, 1.0 - case_e, np.nan)
            recovered[np.isnan(case_e)] = np.nan
            reliable_recovery = np.where(np.isnan(recovered) | np.isnan(ri), np.nan,
                                         (recovered == 1.0) & (ri == 1.0))
            for arr in (ri, rd, csc, recovered, reliable_recovery):
                arr[untreated] = np.nan
            derived.update(
                caseness_baseline=case_b,
                reliable_improvement=ri,
                reliable_deterioration=rd,
                clinically_significant=csc,
                recovered=recovered,
                reliable_recovery=reliable_recovery,
            )
    # column order: IDs, arm, scores, sessions, derived outcomes, dropout, covariates
    order = [c for c in ("patient", "therapist", "cluster", "arm", "feedback", "baseline", "end",
                         "n_sessions", "first_occasion", "last_occasion") if c in pt.columns]
    out = pt[order].copy()
    for k, v in derived.items():
        out[k] = v
    if "dropout" in pt.columns:
        out["dropout"] = pt["dropout"]
    for c in covs:
        if c in pt.columns and c not in out.columns:
            out[c] = pt[c].to_numpy()
    for c in ("patient", "therapist", "cluster"):
        if c in out.columns:
            out[c] = out[c].astype(object)

    if rej_lines:
        rejects = pd.DataFrame(rej_lines).sort_values("row")
        rejects["row"] = rejects["row"].astype("int64")
        rejects["patient"] = rejects["patient"].map(_fmt_value)
        rejects = rejects.reset_index(drop=True)
        n_pat = rejects["patient"].nunique()
        warnings.warn(
            f"{where}: {len(rejects)} rows of {n_pat} patient(s) rejected while deriving "
            f"patient outcomes ({'; '.join(sorted(set(rejects['reason'])))})",
            DataWarning,
            stacklevel=2,
        )
    return out, rejects


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def escape_formulas(df: pd.DataFrame) -> pd.DataFrame:
    """Copy of ``df`` whose text cells starting with ``= + - @``, tab or CR get a leading ``'``
    (spreadsheet formula injection); numbers untouched. See :mod:`therapist_effects.io.csvsafe`."""
    return neutralise_frame(df)


def write_patient_outputs(patients: pd.DataFrame, parquet_path: str | Path,
                          csv_path: str | Path) -> None:
    """Write the patient table as Parquet (values as they are) and as CSV (formula-escaped text).

    Parent directories are created. In the CSV (RFC 4180, CRLF line ends), dates are ISO 8601 and
    missing values are empty. The CSV holds the bytes that :func:`~therapist_effects.io.csvsafe.safe_csv`
    writes; a table of numbers, dates and text without carriage returns (every patient table) is
    formatted once per distinct value of each column and joined by pyarrow (a national table: 0.15 s
    instead of 1.2 s in pandas' row-by-row writer).
    """
    for p in (parquet_path, csv_path):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    patients.to_parquet(parquet_path, index=False)
    if not _write_csv_joined(patients, csv_path, _PATIENT_DATES):
        safe_csv(patients, csv_path, date_format=_PATIENT_DATES, lineterminator=_CSV_EOL)


_PATIENT_DATES = "%Y-%m-%d"
#: Characters that make Python's csv writer (QUOTE_MINIMAL, CRLF line ends) quote a text cell.
_QUOTED_IF = r'[,"\r\n]'


def _text_cells(values: np.ndarray):
    """Distinct text values as the CSV holds them: neutralised (:func:`~therapist_effects.io.csvsafe.neutralise`,
    called for the values that start like a formula only) and quoted as Python's csv writer quotes them
    (QUOTE_MINIMAL: a delimiter, quote or line break; quotes doubled). A pyarrow array; None when a value is
    not text or holds a carriage return (safe_csv then quotes every text cell)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from .csvsafe import DANGEROUS_PREFIXES, neutralise

    if pd.api.types.infer_dtype(values, skipna=False) not in ("string", "empty"):
        return None
    arr = pa.array(values, type=pa.large_string())
    if len(arr) and pc.any(pc.match_substring(arr, "\r")).as_py():
        return None
    formula_like = np.zeros(len(arr), dtype=bool)
    for prefix in DANGEROUS_PREFIXES:
        formula_like |= pc.starts_with(arr, prefix).to_numpy(zero_copy_only=False)
    if formula_like.any():
        values = values.copy()
        values[formula_like] = [neutralise(v) for v in values[formula_like]]
        arr = pa.array(values, type=pa.large_string())
    quote = pc.match_substring_regex(arr, _QUOTED_IF)
    text = pa.scalar('"', pa.large_string())
    quoted = pc.binary_join_element_wise(text, pc.replace_substring(arr, '"', '""'), text,
                                         pa.scalar("", pa.large_string()))
    return pc.if_else(quote, quoted, arr)


def _distinct_cells(s: pd.Series, date_format: str):
    """``(codes, cells)``: the column's cells as :func:`~therapist_effects.io.csvsafe.safe_csv` writes them,
    ``cells[codes]`` (a pyarrow array) with code -1 for an empty cell; each distinct value formatted once.
    None for a column the joined writer does not handle (the caller falls back to safe_csv)."""
    import pyarrow as pa

    kind = s.dtype.kind
    if kind == "f" and s.dtype == np.float64:
        v = s.to_numpy()
        codes, bits = pd.factorize(v.view(np.int64))  # by bit pattern: -0.0 and 0.0 are written differently
        uniq = bits.view(np.float64)
        nan = np.isnan(uniq)
        if nan.any():
            codes = np.where(nan[codes], -1, codes)
        return codes, pa.array(uniq.astype(str), type=pa.large_string())  # as pandas formats floats
    if kind in "iu" and isinstance(s.dtype, np.dtype):
        codes, uniq = pd.factorize(s.to_numpy())
        return codes, pa.array(uniq.astype(str), type=pa.large_string())
    if kind == "M" and isinstance(s.dtype, np.dtype):
        codes, uniq = pd.factorize(s, use_na_sentinel=True)
        if not len(uniq):
            return codes, pa.array([], type=pa.large_string())
        # the distinct dates through pandas' own date formatting (they hold no delimiter or line break)
        shown = pd.DataFrame({"d": uniq, "k": 0}).to_csv(index=False, header=False, date_format=date_format,
                                                        lineterminator="\n")
        return codes, pa.array([line[:-2] for line in shown.split("\n")[:-1]], type=pa.large_string())  # ",0"
    if kind == "O" or isinstance(s.dtype, pd.StringDtype):
        codes, uniq = pd.factorize(s, use_na_sentinel=True)
        cells = _text_cells(np.asarray(uniq, dtype=object))
        return None if cells is None else (codes, cells)
    return None


def _write_csv_joined(df: pd.DataFrame, path: str | Path, date_format: str) -> bool:
    """Write ``df`` as ``safe_csv(df, path, date_format=date_format, lineterminator="\r\n")`` would, joining
    the cells of each row with pyarrow; False (nothing written) when a column is of a kind this writer does
    not handle."""
    import csv
    import io

    import pyarrow as pa
    import pyarrow.compute as pc

    from .csvsafe import neutralise

    if len(df.columns) < 2 or not all(isinstance(c, str) for c in df.columns):
        return False  # a lone empty cell is quoted by the csv writer; a one-column table is not a patient table
    columns = []
    for name in df.columns:
        distinct = _distinct_cells(df[name], date_format)
        if distinct is None:
            return False
        codes, cells = distinct
        lookup = pa.concat_arrays([cells, pa.array([""], type=pa.large_string())])
        columns.append(lookup.take(pa.array(np.where(codes < 0, len(cells), codes))))
    head = io.StringIO()
    csv.writer(head, lineterminator=_CSV_EOL).writerow([neutralise(c) for c in df.columns])
    with open(path, "wb") as fh:
        fh.write(head.getvalue().encode("utf-8"))
        if len(df):
            lines = pc.binary_join_element_wise(*columns, pa.scalar(",", pa.large_string()))
            lines = pc.binary_join_element_wise(lines, pa.scalar(_CSV_EOL, pa.large_string()),
                                                pa.scalar("", pa.large_string()))
            offsets = np.frombuffer(lines.buffers()[1], dtype=np.int64)
            fh.write(memoryview(lines.buffers()[2])[offsets[lines.offset]:offsets[lines.offset + len(lines)]])
    return True


def write_rejects(rejects: pd.DataFrame, csv_path: str | Path) -> None:
    """Write a rejects table (``row, patient, column, value, reason``) as formula-escaped CSV."""
    Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
    df = rejects.sort_values("row", kind="stable")
    safe_csv(df[REJECT_COLUMNS], csv_path, lineterminator=_CSV_EOL)
