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


def _norm_ending(s: pd.Series) -> pd.Series:
    """Ending values with blanks collapsed and case folded; NaN where missing (each distinct
    value is normalised once)."""
    code, uniq = pd.factorize(s)
    norm = np.array([" ".join(str(v).split()).casefold() for v in uniq] + [np.nan], dtype=object)
    return pd.Series(norm[code], index=s.index)


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
        # patients as integer codes in sorted ID order: sorting and grouping on integers, not text
        pcode, pids = pd.factorize(rows["patient"], sort=True)
        # numbers and dates (datetime64) both sort as they are
        order = np.lexsort((rows["row"].to_numpy(), rows["occasion"].to_numpy(), pcode))
        r = rows.iloc[order]
        code = pcode[order]
        n_per = pd.Series(np.bincount(code)[code], index=r.index)
        few = n_per < min_sessions
        score_col = str(columns.get("score", "score"))
        reason = (f"fewer than {min_sessions} measured sessions: no end-of-treatment score")
        for rec in r[few].itertuples():
            rej_lines.append({"row": rec.row, "patient": rec.patient, "column": score_col,
                              "value": _fmt_value(rec.score), "reason": reason})
        r, code = r[~few.to_numpy()], code[~few.to_numpy()]
        for c in covs:
            if c not in r.columns:
                continue
            has = r[c].notna().groupby(code).transform("any").to_numpy()
            for rec in r[~has].itertuples():
                rej_lines.append({"row": rec.row, "patient": rec.patient, "column": c,
                                  "value": "", "reason": f"missing value (no {c} on any row of "
                                  "the patient)"})
            r, code = r[has], code[has]
        g = r.groupby(code)  # in sorted code order: r is sorted by code
        sizes = g.size()
        pt = pd.DataFrame(index=sizes.index)
        pt["patient"] = np.asarray(pids)[sizes.index.to_numpy()]
        pt["therapist"] = g["therapist"].first()
        if "cluster" in r.columns:
            pt["cluster"] = g["cluster"].first()
        if "arm" in r.columns:
            pt["arm"] = g["arm"].first()
        pt["baseline"] = g["score"].first()
        pt["end"] = g["score"].last()
        pt["n_sessions"] = sizes
        pt["first_occasion"] = g["occasion"].min()
        pt["last_occasion"] = g["occasion"].max()
        if "ending" in r.columns:
            ending = _norm_ending(r["ending"])
            is_drop = ending.isin(codes) & ending.notna()
            any_drop = is_drop.groupby(code).any()
            any_end = ending.notna().groupby(code).any()
            pt["dropout"] = np.where(any_drop, 1.0, np.where(any_end, 0.0, np.nan))  # both in pt's code order
        for c in covs:
            if c in r.columns:
                pt[c] = g[c].first()
        treated = pt["n_sessions"].to_numpy() >= 2
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
            ending = _norm_ending(r["ending"])
            pt["dropout"] = np.where(ending.isin(codes).to_numpy(), 1.0,
                                     np.where(ending.notna().to_numpy(), 0.0, np.nan))
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
    missing values are empty.
    """
    for p in (parquet_path, csv_path):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    patients.to_parquet(parquet_path, index=False)
    safe_csv(patients, csv_path, date_format="%Y-%m-%d", lineterminator=_CSV_EOL)


def write_rejects(rejects: pd.DataFrame, csv_path: str | Path) -> None:
    """Write a rejects table (``row, patient, column, value, reason``) as formula-escaped CSV."""
    Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
    df = rejects.sort_values("row", kind="stable")
    safe_csv(df[REJECT_COLUMNS], csv_path, lineterminator=_CSV_EOL)
