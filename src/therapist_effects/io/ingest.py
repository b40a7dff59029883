"""Reading and validating routine outcome monitoring (ROM) exports.

A dataset is a table exported from a service's records: either one row per measurement occasion
(``layout: session``: patient, therapist, session number or date, questionnaire score) or one row
per patient (``layout: patient``: intake and end-of-treatment score). :func:`ingest_dataset` reads
it, maps the configured columns to canonical names, validates every row with a pandera schema
built from the dataset's configuration, and returns the valid rows plus one *reject* line for
every row that cannot be used, so that ``rows_read == len(rows) + rows rejected`` always holds.

Row numbers
-----------
``row`` is the spreadsheet-style row number of a record in the file: the header is row 1 and the
first data row is row 2, as a spreadsheet program shows it. The same convention is used for Parquet
files (row ``k`` of the table is row ``k + 2``) and for in-memory tables given to
:func:`ingest_frame`. Blank lines inside a CSV keep their row number (and are rejected as
``empty row``); blank lines at the end of a CSV, Excel sheet or Parquet table are not rows.

Missing values
--------------
A cell is missing if it is empty, blank (only spaces) or one of ``NA``, ``N/A``, ``NaN``, ``NULL``,
``#N/A``, ``<NA>``, ``NaT`` (any case), whatever the file format. IDs (patient, therapist, cluster)
are kept as strings exactly as written ("007" stays "007"; a number cell 7 becomes "7").

Reject reasons and their order
------------------------------
Each rejected row gets exactly one reject line: the *first* problem found, in this order:

1. ``empty row`` (every configured cell missing: only the configured columns are read);
2. row checks, column by column in the order patient, therapist, occasion, score (session layout)
   or outcome, baseline (patient layout), arm, cluster, covariates; within a column: ``missing
   patient ID`` / ``missing therapist ID`` / ``missing value``, then ``not a number``, ``not a
   finite number``, ``out of range (...)`` for scores, ``unparseable date``, ``impossible date
   (...)`` and ``negative session number`` for occasions;
3. cross-row checks on the rows that passed 1-2: ``duplicate session (same patient and occasion
   as row N)`` / ``duplicate patient (first at row N)``: in the patient layout a row whose
   configured values all equal an earlier row's (the same record exported twice); rows that share
   a patient ID but differ are kept as separate patients and noted (IDs numbered within therapist,
   as in the Exam data, or re-referrals). The first valid row is kept. Then
   ``seen by more than one therapist (...)`` (``multi_therapist: reject``; with ``majority`` the
   rows are recoded and kept, and a note says so), then ``arm changes between sessions (...)``
   (all the patient's rows).

A reason is a category optionally followed by details in parentheses; :func:`accounting` counts
rejects by category. Missing ``ending`` values are never a reason to reject (endings are usually
recorded on the last session only); in the session layout missing covariates are allowed on some
rows (a patient's covariates come from their first row that has them, see ``outcomes``).

Dataset keys read here (beyond the documented ones)
---------------------------------------------------
``date_format`` (a ``strptime`` format for occasion dates that are not ISO 8601, e.g. ``%d/%m/%Y``)
and ``covariate_types`` (``{column: numeric | categorical}``; otherwise a covariate is numeric when
every non-missing value is a number, else categorical).
"""

from __future__ import annotations

import datetime as _dt
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..exceptions import ConfigError, DataWarning, InputError
from .instruments import Instrument, get_instrument
from .readers import check_unique, read_columns, read_header

if TYPE_CHECKING:  # pandera is imported where a schema is built (0.25 s: not on the outcomes step's path)
    import pandera.pandas as pa

__all__ = [
    "IngestResult",
    "REJECT_COLUMNS",
    "accounting",
    "ingest_dataset",
    "ingest_frame",
    "read_table",
    "reason_category",
]

#: Columns of the rejects table.
REJECT_COLUMNS = ["row", "patient", "column", "value", "reason"]

_NA_TOKENS = {"", "na", "n/a", "nan", "null", "#n/a", "<na>", "nat"}
_ROLES = ("patient", "therapist", "outcome", "baseline", "score", "occasion", "arm", "cluster",
          "ending", "covariates")
_DEFAULT_DROPOUT = ("dropout", "dropped out", "unilateral")
_MIN_YEAR = 1900
_FIRST_ROW = 2  # header is row 1


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
_TEXT = pd.StringDtype("pyarrow", na_value=np.nan)
_NUMBER_RE = r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(inf|infinity)"
_ISO_RE = r"^\d{4}-\d{1,2}-\d{1,2}([ T].*)?$"


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _fmt_value(v: Any, limit: int = 100) -> str:
    """A raw cell value as text for the rejects table ('' for missing)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    try:
        if v is pd.NA or v is pd.NaT:
            return ""
    except Exception:  # pragma: no cover - exotic objects
        pass
    if isinstance(v, (_dt.datetime, pd.Timestamp)) and v == pd.Timestamp(v).normalize():
        return pd.Timestamp(v).date().isoformat()
    if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer() \
            and abs(v) < 1e15:
        v = int(v)
    text = " ".join(str(v).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_missing_scalar(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, str):
        return v.strip().casefold() in _NA_TOKENS
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _id_text(v: Any) -> Any:
    """An ID as text: strings as written, integer-valued numbers without '.0'."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return np.nan
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isfinite(f) and f.is_integer() and abs(f) < 1e15:
            return str(int(f))
        return repr(f)
    return " ".join(str(v).split())


def _as_text(s: pd.Series) -> pd.Series:
    """Every cell as text (pandas ``str`` dtype), NaN where nothing at all; not yet stripped."""
    if s.dtype == _TEXT:
        t = s
    elif pd.api.types.is_bool_dtype(s.dtype):
        t = s.map(_id_text, na_action="ignore").astype(_TEXT)
    elif pd.api.types.is_integer_dtype(s.dtype):
        t = s.astype("Int64").astype(_TEXT) if s.hasnans else s.astype(_TEXT)
    elif pd.api.types.is_float_dtype(s.dtype):
        f = s.to_numpy(dtype=float, na_value=np.nan)
        whole = np.isfinite(f) & (np.abs(f) < 1e15) & (np.floor(f) == f)
        out = np.full(len(f), np.nan, dtype=object)
        out[whole] = f[whole].astype(np.int64).astype(str)
        other = ~whole & ~np.isnan(f)
        out[other] = [repr(float(v)) for v in f[other]]
        t = pd.Series(out, index=s.index, dtype=_TEXT)
    elif pd.api.types.is_datetime64_any_dtype(s.dtype):
        t = s.astype(str).where(s.notna()).astype(_TEXT)
    elif s.dtype == object and pd.api.types.infer_dtype(s, skipna=True) in ("string", "empty"):
        t = s.astype(_TEXT)
    else:
        t = pd.Series([_id_text(v) if not _is_missing_scalar(v) else np.nan
                       for v in s.to_numpy(dtype=object)], index=s.index, dtype=_TEXT)
    return t


def _clean(t: pd.Series) -> pd.Series:
    """Text stripped of surrounding blanks; NaN where blank or an NA token (any case)."""
    t = t.str.strip()
    missing = t.isna() | t.str.lower().isin(sorted(_NA_TOKENS))
    return t.mask(missing)


def _text_distinct(s: pd.Series) -> tuple[pd.Series, np.ndarray, pd.Series]:
    """:func:`_text` of ``s`` with its factorisation: ``(text, codes, distinct)``, ``text`` equal to
    ``distinct[codes]`` (``codes`` -1 where missing, ``distinct`` without repeats).

    Each distinct cell is stripped and checked for NA tokens once (a national export repeats its IDs,
    scores, dates and labels many times); a column that needs no change is returned as it is.
    """
    t = _as_text(s)
    codes, uniq = pd.factorize(t, use_na_sentinel=True)
    uniq = pd.Series(uniq, dtype=_TEXT)
    clean = _clean(uniq)
    if clean.isna().any() or bool((clean != uniq).any()):
        new_codes, uniq = pd.factorize(clean, use_na_sentinel=True)  # " a" and "a" are one value
        uniq = pd.Series(uniq, dtype=_TEXT)
        has = codes >= 0
        codes[has] = new_codes[codes[has]]
        t = pd.Series(uniq.array.take(codes, allow_fill=True), index=s.index, dtype=_TEXT)
    return t, codes, uniq


def _text(s: pd.Series) -> pd.Series:
    """Every cell as stripped text (pandas ``str`` dtype), NaN where missing.

    Text is taken as written; numbers as :func:`_id_text` writes them (7.0 -> "7"); dates and
    timestamps in ISO form. Vectorised for text columns (every CSV column) and typed columns;
    a loop only for mixed-type object columns (Excel, in-memory tables).
    """
    return _text_distinct(s)[0]


def _by_distinct(t: pd.Series, fn, fill, distinct: tuple[np.ndarray, pd.Series] | None = None):
    """``fn`` applied to the distinct values of a long text column and spread back (exports repeat
    their scores, dates, arms and labels many times); ``fill`` where a cell is missing.
    ``distinct``: the column's ``(codes, distinct values)`` when known (see :func:`_text_distinct`)."""
    if distinct is not None:
        codes, uniq = distinct
    else:
        if len(t) < 20000:
            return None
        codes, uniq = pd.factorize(t, use_na_sentinel=True)
        if len(uniq) * 4 > len(t):
            return None
    vals = fn(pd.Series(np.asarray(uniq, dtype=object), dtype=_TEXT))
    vals = np.asarray(vals)
    return np.append(vals, np.asarray([fill], dtype=vals.dtype))[codes]  # code -1 (missing) takes the fill


def _numbers(t: pd.Series, distinct: tuple[np.ndarray, pd.Series] | None = None) -> np.ndarray:
    """Numeric value of each text cell (float); NaN for missing and non-numbers; +-inf kept."""
    spread = _by_distinct(t, _numbers, np.nan, distinct)
    if spread is not None:
        return spread.astype(float, copy=False)
    import pyarrow as pyarrow_
    import pyarrow.compute as pc

    ok = t.str.fullmatch(_NUMBER_RE, case=False).fillna(False).to_numpy(dtype=bool)
    if not ok.any():
        return np.full(len(t), np.nan)
    arr = pyarrow_.array(t.where(ok).array)
    return pc.cast(arr, pyarrow_.float64()).to_numpy(zero_copy_only=False).astype(float, copy=False)


def _parse_dates(t: pd.Series, date_format: str | None,
                 distinct: tuple[np.ndarray, pd.Series] | None = None) -> pd.Series:
    """Dates (naive; zoned values in UTC) of each text cell; NaT where missing or unparseable.

    Text is read as ISO 8601 (``2023-01-05``, ``2023-01-05 14:00``) or, failing that, with
    ``date_format``; numbers are not dates.
    """
    spread = _by_distinct(t, lambda u: _parse_dates(u, date_format).to_numpy(), np.datetime64("NaT", "us"),
                          distinct)
    if spread is not None:
        return pd.Series(spread, index=t.index, dtype="datetime64[us]")
    iso = t.str.match(_ISO_RE).fillna(False).to_numpy(dtype=bool)
    out = pd.Series(pd.NaT, index=t.index, dtype="datetime64[us]")
    if iso.any():
        sub = t[iso]
        plain = pd.to_datetime(sub, format="%Y-%m-%d", errors="coerce").astype("datetime64[us]")
        rest = plain.isna().to_numpy()
        if rest.any():
            other = pd.to_datetime(sub[rest], format="ISO8601", errors="coerce", utc=True)
            plain[rest] = other.dt.tz_localize(None).astype("datetime64[us]")
        out[iso] = plain
    if date_format is not None:
        rest = out.isna().to_numpy() & t.notna().to_numpy()
        if rest.any():
            other = pd.to_datetime(t[rest], format=date_format, errors="coerce")
            if getattr(other.dt, "tz", None) is not None:
                other = other.dt.tz_convert("UTC").dt.tz_localize(None)
            out[rest] = other.astype("datetime64[us]")
    return out


def reason_category(reason: str) -> str:
    """The category of a reject reason: the text before any details in parentheses."""
    return str(reason).split(" (", 1)[0].strip()


# ------------------------------------------------------------------------------------------------
# reading files
# ------------------------------------------------------------------------------------------------
def read_table(path: str | Path, *, sheet: str | int | None = None,
               columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a CSV, Parquet or Excel (.xlsx/.xlsm; .xls needs the xlrd package) export.

    Values are returned as the file holds them: every CSV cell as text (so IDs such as "007" keep
    their leading zeros; ingestion converts scores to numbers), Excel cells as their typed values
    (text, number, date), Parquet columns with their stored types. ``sheet`` selects an Excel
    sheet by name or 0-based index (default: the first); ``columns`` reads only these columns
    (names as :func:`therapist_effects.io.readers.read_header` gives them). Column names are stripped
    of surrounding blanks; blank rows at the end of the table are dropped. Any failure to read,
    duplicate column names included, raises :class:`InputError` with one line naming the file.
    """
    return read_columns(path, columns, sheet=sheet)


# ------------------------------------------------------------------------------------------------
# the dataset specification
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    where: str
    layout: str
    roles: dict[str, str]  # role -> file column (single-column roles)
    covariates: list[str]
    covariate_types: dict[str, str]
    instrument: str | None
    multi_therapist: str
    min_sessions: int
    dropout_codes: tuple[str, ...]
    export_date: pd.Timestamp | None
    date_format: str | None
    sheet: str | int | None


def _parse_spec(spec: Mapping[str, Any], name: str | None = None) -> _Spec:
    name = name or (spec.get("name") if isinstance(spec, Mapping) else None)
    where = f"datasets.{name}" if name else "dataset"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(spec).__name__}")
    layout = spec.get("layout")
    if layout not in ("session", "patient"):
        raise ConfigError(f"{where}.layout: expected 'session' or 'patient', got {layout!r}")
    cols = spec.get("columns")
    if not isinstance(cols, Mapping):
        raise ConfigError(f"{where}.columns: expected a mapping of role -> column name")
    unknown = [str(k) for k in cols if k not in _ROLES]
    if unknown:
        raise ConfigError(
            f"{where}.columns: unknown role(s) {', '.join(map(repr, unknown))}; roles are "
            f"{', '.join(_ROLES)}"
        )
    required = ["patient", "therapist"] + (["score", "occasion"] if layout == "session" else ["outcome"])
    for role in required:
        if cols.get(role) in (None, ""):
            raise ConfigError(f"{where}.columns.{role}: required for layout '{layout}'")
    used_roles = ["patient", "therapist"] + (
        ["occasion", "score"] if layout == "session" else ["outcome", "baseline"]
    ) + ["arm", "cluster", "ending"]
    roles: dict[str, str] = {}
    for role in used_roles:
        col = cols.get(role)
        if col in (None, ""):
            continue
        if not isinstance(col, (str, int)) or isinstance(col, bool):
            raise ConfigError(f"{where}.columns.{role}: expected a column name, got {col!r}")
        roles[role] = str(col).strip()
    covs = cols.get("covariates") or []
    if isinstance(covs, str):
        covs = [covs]
    if not isinstance(covs, Sequence) or not all(
        isinstance(c, (str, int)) and not isinstance(c, bool) for c in covs
    ):
        raise ConfigError(f"{where}.columns.covariates: expected a list of column names")
    covs = [str(c).strip() for c in covs]
    if len(set(covs)) != len(covs):
        raise ConfigError(f"{where}.columns.covariates: a column is listed twice: {covs}")
    canonical = {"row", "patient", "therapist", "occasion", "score", "end", "baseline", "arm",
                 "cluster", "ending"}
    clash = [c for c in covs if c in canonical]
    if clash:
        raise ConfigError(
            f"{where}.columns.covariates: {clash[0]!r} clashes with a canonical column name "
            f"({', '.join(sorted(canonical))}); rename the column in the file"
        )
    ctypes = spec.get("covariate_types") or {}
    if not isinstance(ctypes, Mapping) or any(v not in ("numeric", "categorical") for v in ctypes.values()):
        raise ConfigError(
            f"{where}.covariate_types: expected a mapping of column -> 'numeric' or 'categorical'"
        )
    instrument = spec.get("instrument")
    if instrument is not None and not isinstance(instrument, str):
        raise ConfigError(f"{where}.instrument: expected an instrument name, got {instrument!r}")
    multi = spec.get("multi_therapist", "majority")
    if multi not in ("majority", "reject"):
        raise ConfigError(f"{where}.multi_therapist: expected 'majority' or 'reject', got {multi!r}")
    min_sessions = spec.get("min_sessions", 2)
    if isinstance(min_sessions, bool) or not isinstance(min_sessions, int) or min_sessions < 1:
        raise ConfigError(f"{where}.min_sessions: expected a whole number >= 1, got {min_sessions!r}")
    codes = spec.get("dropout_codes", list(_DEFAULT_DROPOUT))
    if codes is None:
        codes = []
    if isinstance(codes, str):
        codes = [codes]
    if not isinstance(codes, Sequence):
        raise ConfigError(f"{where}.dropout_codes: expected a list of values of the ending column")
    export = spec.get("export_date")
    export_ts = None
    if export is not None:
        try:
            export_ts = pd.Timestamp(export)
            if pd.isna(export_ts):
                raise ValueError
        except (ValueError, TypeError):
            raise ConfigError(
                f"{where}.export_date: expected a date (YYYY-MM-DD), got {export!r}"
            ) from None
        if export_ts.tzinfo is not None:
            export_ts = export_ts.tz_convert("UTC").tz_localize(None)
    date_format = spec.get("date_format")
    if date_format is not None and not isinstance(date_format, str):
        raise ConfigError(f"{where}.date_format: expected a strptime format such as '%d/%m/%Y'")
    sheet = spec.get("sheet")
    if sheet is not None and (isinstance(sheet, bool) or not isinstance(sheet, (str, int))):
        raise ConfigError(f"{where}.sheet: expected a sheet name or 0-based index, got {sheet!r}")
    return _Spec(
        where=where,
        layout=layout,
        roles=roles,
        covariates=covs,
        covariate_types={str(k): v for k, v in ctypes.items()},
        instrument=instrument,
        multi_therapist=multi,
        min_sessions=min_sessions,
        dropout_codes=tuple(" ".join(str(c).split()).casefold() for c in codes),
        export_date=export_ts,
        date_format=date_format,
        sheet=sheet,
    )


# ------------------------------------------------------------------------------------------------
# result
# ------------------------------------------------------------------------------------------------
@dataclass
class IngestResult:
    """Validated rows of one dataset and the rows that were rejected.

    ``rows`` has canonical columns: ``row``, ``patient``, ``therapist``, then ``occasion``,
    ``score`` (session layout) or ``end``, ``baseline`` (patient layout), then ``arm``,
    ``cluster``, ``ending`` and the covariates under their own names, where configured.
    ``rejects`` has one line per rejected row (``row``, ``patient``, ``column``, ``value``,
    ``reason``). ``rows_read == len(rows) + len(rejects)``.
    """

    rows: pd.DataFrame
    rejects: pd.DataFrame
    rows_read: int
    notes: list[str] = field(default_factory=list)
    layout: str = "session"
    instrument: Instrument | None = None
    columns: dict[str, str] = field(default_factory=dict)  # canonical name -> file column
    occasion_kind: str | None = None  # "number" or "date" (session layout)
    covariate_kinds: dict[str, str] = field(default_factory=dict)  # name -> numeric/categorical
    source: str = ""


def accounting(rows_read: int, rejects: pd.DataFrame) -> dict[str, Any]:
    """Row accounting of a dataset: rows read, used and rejected, and rejects by reason category.

    ``rejects`` may concatenate the rejects of ingestion and of ``outcomes``; each row is counted
    once (by its ``row`` number).
    """
    if rejects is None or len(rejects) == 0:
        return {"rows_read": int(rows_read), "rows_used": int(rows_read), "rows_rejected": 0,
                "rejected_by_reason": {}}
    first = rejects.drop_duplicates(subset="row", keep="first")
    by_reason = first["reason"].map(reason_category).value_counts()
    n_rej = len(first)
    return {
        "rows_read": int(rows_read),
        "rows_used": int(rows_read) - n_rej,
        "rows_rejected": int(n_rej),
        "rejected_by_reason": {str(k): int(v) for k, v in sorted(by_reason.items())},
    }


# ------------------------------------------------------------------------------------------------
# validation, stage by stage
# ------------------------------------------------------------------------------------------------
class _Rejector:
    """Collects the first problem of each rejected row (by table position), vectorised."""

    def __init__(self, n: int, patient: pd.Series, raw: pd.DataFrame, file_cols: dict[str, str],
                 row_numbers: np.ndarray | None = None):
        self.n = n
        self.row_numbers = (np.arange(_FIRST_ROW, n + _FIRST_ROW, dtype="int64") if row_numbers is None
                            else np.asarray(row_numbers, dtype="int64"))
        self.patient = patient
        self.raw = raw
        self.file_cols = file_cols
        self.rejected = np.zeros(n, dtype=bool)
        self._parts: list[tuple[np.ndarray, str, np.ndarray, np.ndarray | None]] = []

    def add(self, positions: Any, column: str, reason: Any, value: Any | None = None) -> None:
        """Reject the rows at ``positions`` (unless already rejected) for ``reason`` (one, or one
        per position) in canonical ``column``; ``value`` overrides the raw cell shown."""
        pos = np.atleast_1d(np.asarray(positions, dtype=np.int64))
        reasons = np.broadcast_to(np.asarray(reason, dtype=object), pos.shape)
        values = None if value is None else np.broadcast_to(np.asarray(value, dtype=object), pos.shape)
        fresh = ~self.rejected[pos]
        # the first occurrence of a position within this call wins too
        _, first = np.unique(pos, return_index=True)
        once = np.zeros(pos.shape, dtype=bool)
        once[first] = True
        keep = fresh & once
        if not keep.any():
            return
        self.rejected[pos[keep]] = True
        self._parts.append((pos[keep], column, reasons[keep],
                            None if values is None else values[keep]))

    def frame(self) -> pd.DataFrame:
        if not self._parts:
            df = pd.DataFrame({c: pd.Series(dtype=object) for c in REJECT_COLUMNS})
            df["row"] = df["row"].astype("int64")
            return df
        pos = np.concatenate([part[0] for part in self._parts])
        fcol = np.concatenate([np.full(len(part[0]), self.file_cols.get(part[1], part[1]), dtype=object)
                               for part in self._parts])
        given = np.concatenate([np.full(len(part[0]), part[3] is not None) for part in self._parts])
        value = np.concatenate([np.asarray(part[3], dtype=object) if part[3] is not None
                                else np.full(len(part[0]), "", dtype=object) for part in self._parts])
        for c in pd.unique(fcol[~given]):  # the raw cells shown, one look-up per column (not per part)
            at = np.flatnonzero(~given & (fcol == c))
            if c in self.raw.columns:
                value[at] = self.raw[c].iloc[pos[at]].to_numpy(dtype=object)
        df = pd.DataFrame({
            "pos": pos, "patient": [_fmt_value(v) for v in self.patient.iloc[pos].to_numpy(dtype=object)],
            "column": fcol, "value": [_fmt_value(v) for v in value],
            "reason": np.concatenate([part[2].astype(object) for part in self._parts]),
        }).sort_values("pos", kind="stable")
        df.insert(0, "row", self.row_numbers[df.pop("pos").to_numpy()])
        return df[REJECT_COLUMNS].reset_index(drop=True)


def _check(fn, name: str) -> pa.Check:
    import pandera.pandas as pa

    return pa.Check(fn, name=name, error=name)


def _mask_check(ok: np.ndarray, name: str) -> pa.Check:
    """A pandera check reading a precomputed per-position mask (True = passes)."""
    return _check(lambda s: pd.Series(ok[s.index.to_numpy()], index=s.index), name)


def _numeric_checks(num: np.ndarray, present: np.ndarray, rng: tuple[float, float, str] | None
                    ) -> list[pa.Check]:
    """``present``: where the column's cell is not missing."""
    checks = [_mask_check(~present | ~np.isnan(num), "not a number"),
              _mask_check(~np.isinf(num), "not a finite number")]
    if rng is not None:
        lo, hi, label = rng
        with np.errstate(invalid="ignore"):
            bad = np.isfinite(num) & ((num < lo) | (num > hi))
        checks.append(_mask_check(~bad, f"out of range ({label}: {lo:g}-{hi:g})"))
    return checks


@dataclass
class _Columns:
    """The configured columns of a table, as text and (where needed) as numbers or dates."""

    raw: pd.DataFrame                    # the table as read (file column names)
    file_cols: dict[str, str]            # canonical name -> file column
    text: dict[str, pd.Series]           # canonical name -> stripped text, NaN for missing
    distinct: dict[str, tuple[np.ndarray, pd.Series]]  # canonical name -> (codes, distinct text), -1 missing
    numbers: dict[str, np.ndarray] = field(default_factory=dict)
    occasion: pd.Series | None = None    # parsed occasions (session layout)
    occasion_kind: str | None = None
    arm_numeric: bool = False
    covariate_kinds: dict[str, str] = field(default_factory=dict)
    rows: np.ndarray | None = None       # row number of each table row (default: position + 2)
    decided: Mapping[str, Any] | None = None  # kinds decided over a whole file (streamed ingestion)

    @property
    def n(self) -> int:
        return len(self.raw)

    def present(self, name: str) -> np.ndarray:
        """Where the column's cell is not missing."""
        return self.distinct[name][0] >= 0

    def numbers_of(self, name: str) -> np.ndarray:
        """The column's cells as numbers (see :func:`_numbers`), converted once per distinct value."""
        return _numbers(self.text[name], self.distinct[name])

    def row_numbers(self) -> np.ndarray:
        if self.rows is None:
            return np.arange(_FIRST_ROW, self.n + _FIRST_ROW, dtype="int64")
        return np.asarray(self.rows, dtype="int64")


def _check_columns(present: Sequence[str], sp: _Spec, source: str) -> None:
    """Duplicate names and configured columns that the table lacks: one line naming the key."""
    present = list(present)
    check_unique(present, source)
    wanted = [(f"columns.{r}", c) for r, c in sp.roles.items()] + [
        ("columns.covariates", c) for c in sp.covariates
    ]
    for key, col in wanted:
        if col not in present:
            listing = ", ".join(present) if present else "(none)"
            raise InputError(
                f"file {source} has no column '{col}' ({key}); columns are: {_one_line(listing, 400)}"
            )


def _configured_columns(sp: _Spec) -> list[str]:
    cols = list(sp.roles.values()) + list(sp.covariates)
    return list(dict.fromkeys(cols))


def _canonical_columns(raw: pd.DataFrame, sp: _Spec) -> _Columns:
    """Stage 1: the configured columns under canonical names, as stripped text."""
    canon_name = {"outcome": "end"}
    file_cols: dict[str, str] = {canon_name.get(r, r): c for r, c in sp.roles.items()}
    for c in sp.covariates:
        file_cols[c] = c
    text, distinct = {}, {}
    for k, c in file_cols.items():
        text[k], codes, uniq = _text_distinct(raw[c])
        distinct[k] = (codes, uniq)
    return _Columns(raw=raw, file_cols=file_cols, text=text, distinct=distinct)


def _empty_rows(cols: _Columns, rej: _Rejector) -> np.ndarray:
    """Stage 2: rows whose every configured cell is missing are rejected; returns the live rows."""
    empty = np.ones(cols.n, dtype=bool)
    for codes, _ in cols.distinct.values():
        empty &= codes < 0
    rej.add(np.flatnonzero(empty), "patient", "empty row", value="")
    return ~empty


def _decide_occasion(cols: _Columns, live: np.ndarray, sp: _Spec) -> None:
    """Is the occasion a session number or a date? Sets the kind and the parsed values."""
    t = cols.text["occasion"]
    if cols.decided is not None:  # decided over the whole file (streamed ingestion)
        cols.occasion_kind = cols.decided["occasion_kind"]
        cols.occasion = (pd.Series(cols.numbers_of("occasion"), index=t.index) if cols.occasion_kind == "number"
                         else _parse_dates(t, sp.date_format, cols.distinct["occasion"]))
        return
    present = cols.present("occasion") & live
    m = int(present.sum())
    nums = cols.numbers_of("occasion")
    dates = _parse_dates(t, sp.date_format, cols.distinct["occasion"])
    n_num = int(np.isfinite(nums[present]).sum())
    n_date = int(dates[present].notna().sum())
    if m == 0 or (n_num >= n_date and n_num > 0):
        kind, bad, best = "number", present & np.isnan(nums), n_num
        cols.occasion = pd.Series(nums, index=t.index)
    else:
        kind, bad, best = "date", present & dates.isna().to_numpy(), n_date
        cols.occasion = dates
    cols.occasion_kind = kind
    if m and best * 2 < m:
        example = _fmt_value(t[bad].iloc[0] if bad.any() else t[present].iloc[0])
        raise ConfigError(
            f"{sp.where}.columns.occasion: column '{cols.file_cols['occasion']}' holds neither session "
            f"numbers nor ISO 8601 dates in {m - best} of {m} rows (e.g. {example!r}); set date_format "
            "(e.g. '%d/%m/%Y') if it holds dates in another format"
        )


def _row_schema(cols: _Columns, live: np.ndarray, sp: _Spec, instrument: Instrument | None,
                today: _dt.date | str | None) -> pa.DataFrameSchema:
    """Stage 3a: the pandera schema of one row, column by column in the documented order."""
    import pandera.pandas as pa

    columns: dict[str, pa.Column] = {"patient": pa.Column(nullable=False),
                                     "therapist": pa.Column(nullable=False)}
    rng = (instrument.min, instrument.max, instrument.name) if instrument is not None else None
    if sp.layout == "session":
        _decide_occasion(cols, live, sp)
        occ = cols.occasion
        if cols.occasion_kind == "number":
            num = occ.to_numpy(dtype=float)
            cols.numbers["occasion"] = num
            checks = _numeric_checks(num, cols.present("occasion"), None)
            with np.errstate(invalid="ignore"):
                checks.append(_mask_check(~(num < 0), "negative session number"))
        else:
            limit = sp.export_date if sp.export_date is not None else pd.Timestamp(
                today if today is not None else _dt.date.today()
            )
            limit = limit.normalize()
            lim_label = "export date" if sp.export_date is not None else "today"
            parsed = occ.notna().to_numpy()
            checks = [
                _mask_check(parsed | ~cols.present("occasion"), "unparseable date"),
                _mask_check(~(occ.dt.normalize() > limit).to_numpy(),
                            f"impossible date (after {lim_label} {limit.date()})"),
                _mask_check(~(occ.dt.year < _MIN_YEAR).to_numpy(), f"impossible date (before {_MIN_YEAR})"),
            ]
        columns["occasion"] = pa.Column(nullable=False, checks=checks)
        cols.numbers["score"] = cols.numbers_of("score")
        columns["score"] = pa.Column(nullable=False,
                                     checks=_numeric_checks(cols.numbers["score"], cols.present("score"), rng))
    else:
        for c in ("end", "baseline"):
            if c in cols.text:
                cols.numbers[c] = cols.numbers_of(c)
                columns[c] = pa.Column(nullable=False,
                                       checks=_numeric_checks(cols.numbers[c], cols.present(c), rng))
    if "arm" in cols.text:
        num = cols.numbers_of("arm")
        present = cols.present("arm") & live
        cols.arm_numeric = bool(present.any()) and bool(np.isfinite(num[present]).all())
        if cols.decided is not None:
            cols.arm_numeric = bool(cols.decided["arm_numeric"])
        if cols.arm_numeric:
            cols.numbers["arm"] = num
        columns["arm"] = pa.Column(nullable=False)
    if "cluster" in cols.text:
        columns["cluster"] = pa.Column(nullable=False)
    for c in sp.covariates:
        num = cols.numbers_of(c)
        present = cols.present(c) & live
        declared = sp.covariate_types.get(c) or (cols.decided or {}).get("covariate_kinds", {}).get(c)
        if declared is None:
            is_num = bool(present.any()) and bool(np.isfinite(num[present]).all())
            declared = "numeric" if is_num else "categorical"
        cols.covariate_kinds[c] = declared
        # a covariate is required per row in the patient layout; in the session layout the
        # patient's first row that has it is used (checked in outcomes)
        nullable = sp.layout == "session"
        if declared == "numeric":
            cols.numbers[c] = num
            columns[c] = pa.Column(nullable=nullable, checks=_numeric_checks(num, cols.present(c), None))
        else:
            columns[c] = pa.Column(nullable=nullable)
    return pa.DataFrameSchema(columns, strict=False, coerce=False)


def _row_checks(cols: _Columns, live: np.ndarray, schema: pa.DataFrameSchema, rej: _Rejector) -> None:
    """Stage 3b: validate the live rows; each failing row is rejected for its first problem."""
    from pandera.errors import SchemaErrors

    order = list(schema.columns)
    to_check = pd.DataFrame({c: cols.text[c] for c in order})
    if not live.all():
        to_check = to_check.loc[live]
    if not len(to_check):
        return
    try:
        schema.validate(to_check, lazy=True)
    except SchemaErrors as err:
        fc = err.failure_cases
        if fc["index"].isna().any():  # a column-level failure would be a bug here
            raise RuntimeError(f"internal: column-level validation failure: {fc.to_dict('records')}")
        fc = fc.assign(
            _col=fc["column"].map(order.index),
            _chk=pd.to_numeric(fc["check_number"], errors="coerce").fillna(-1),
        ).sort_values(["index", "_col", "_chk"], kind="stable").drop_duplicates("index")
        missing_reason = {"patient": "missing patient ID", "therapist": "missing therapist ID"}
        col = fc["column"].astype(str)
        check = fc["check"].astype(str)
        reason = np.where(check == "not_nullable",
                          col.map(lambda c: missing_reason.get(c, "missing value")), check)
        pos = fc["index"].astype(np.int64).to_numpy()
        for c in pd.unique(col):  # one call per column: the reject names the column at fault
            sel = (col == c).to_numpy()
            rej.add(pos[sel], c, reason[sel])


def _typed_rows(cols: _Columns, sp: _Spec) -> pd.DataFrame:
    """Stage 4: every row with typed canonical columns (IDs text, scores numbers, occasions parsed)."""
    n = cols.n
    typed = pd.DataFrame(index=pd.RangeIndex(n))
    typed["row"] = cols.row_numbers()
    typed["patient"] = cols.text["patient"]
    typed["therapist"] = cols.text["therapist"]
    if sp.layout == "session":
        typed["occasion"] = cols.occasion
        typed["score"] = cols.numbers["score"]
    else:
        typed["end"] = cols.numbers["end"]
        if "baseline" in cols.text:
            typed["baseline"] = cols.numbers["baseline"]
    if "arm" in cols.text:
        typed["arm"] = cols.numbers["arm"] if cols.arm_numeric else cols.text["arm"]
    for c in ("cluster", "ending"):
        if c in cols.text:
            typed[c] = cols.text[c]
    for c in sp.covariates:
        typed[c] = cols.numbers[c] if cols.covariate_kinds[c] == "numeric" else cols.text[c]
    return typed


def _check_arm_levels(typed: pd.DataFrame, valid: np.ndarray, cols: _Columns, sp: _Spec) -> None:
    """At most two arm levels among the valid rows (a config error otherwise)."""
    if "arm" not in typed.columns or not valid.any():
        return
    levels = pd.unique(typed.loc[valid, "arm"])
    if len(levels) > 2:
        shown = ", ".join(_fmt_value(v) for v in sorted(levels, key=lambda v: (str(type(v)), v)))
        raise ConfigError(
            f"{sp.where}.columns.arm: column '{cols.file_cols['arm']}' has {len(levels)} levels "
            f"({_one_line(shown, 200)}); expected at most two (feedback and control)"
        )


def _duplicates(typed: pd.DataFrame, sp: _Spec, rej: _Rejector, cols: _Columns) -> None:
    """Stage 5a: the same session (session layout) or the same record (patient layout) twice."""
    import pandera.pandas as pa
    from pandera.errors import SchemaErrors

    if sp.layout == "session":
        # a session is one integer: the codes of its patient's distinct ID and of its occasion (the same
        # rows are duplicates as with the text and the dates themselves; one integer column hashes fastest)
        occasion, n_occasions = pd.factorize(typed["occasion"].to_numpy())[0], len(typed) + 1
        key = ["session"]
        frame = pd.DataFrame({"row": typed["row"].to_numpy(),
                              "session": cols.distinct["patient"][0] * n_occasions + occasion + 1})
    else:
        # the same record twice; rows sharing a patient ID with different data are kept (IDs
        # numbered within therapist, re-referrals) and noted below
        key = [c for c in typed.columns if c != "row"]
        frame = typed
    current = _unrejected(frame, rej)
    if not len(current):
        return
    try:
        pa.DataFrameSchema(unique=key, report_duplicates="exclude_first").validate(current[key], lazy=True)
    except SchemaErrors as err:
        dup_pos = np.unique(err.failure_cases["index"].dropna().astype(np.int64).to_numpy())
        in_dup = current.loc[current.duplicated(key, keep=False)]  # the groups of the duplicates only
        fr = in_dup.groupby(key, sort=False, dropna=False)["row"].transform("min").loc[dup_pos].to_numpy()
        if sp.layout == "session":
            rej.add(dup_pos, "occasion",
                    [f"duplicate session (same patient and occasion as row {int(r)})" for r in fr])
        else:
            rej.add(dup_pos, "patient", [f"duplicate patient (first at row {int(r)})" for r in fr])


def _shared_patient_ids(typed: pd.DataFrame, rej: _Rejector, notes: list[str]) -> None:
    """Stage 5b (patient layout): a patient ID on several rows with different data is noted."""
    current = typed.loc[~rej.rejected]
    counts = current["patient"].value_counts()
    shared = counts[counts > 1]
    if len(shared):
        pid = shared.index[0]
        where_rows = ", ".join(str(x) for x in current.loc[current["patient"] == pid, "row"])
        notes.append(
            f"{len(shared)} patient ID(s) occur on more than one row with different data "
            f"(e.g. {pid} at rows {where_rows}); they are kept as separate patients"
        )


def _unrejected(frame: pd.DataFrame, rej: _Rejector) -> pd.DataFrame:
    """The rows of ``frame`` not rejected so far (``frame`` itself when none is: no copy)."""
    return frame.loc[~rej.rejected] if rej.rejected.any() else frame


def _varying(pcode: np.ndarray, vcode: np.ndarray, among: np.ndarray) -> np.ndarray:
    """Rows (of ``among``) whose patient has more than one distinct value among the rows of ``among``;
    patients and values as integer codes."""
    out = np.zeros(len(pcode), dtype=bool)
    if not among.any():
        return out
    p, v = pcode[among], vcode[among]
    n_pat = int(p.max()) + 1
    lo = np.full(n_pat, np.iinfo(np.int64).max)
    hi = np.full(n_pat, -1)
    np.minimum.at(lo, p, v)
    np.maximum.at(hi, p, v)
    out[among] = (hi > lo)[p]
    return out


def _multi_therapist(typed: pd.DataFrame, sp: _Spec, rej: _Rejector, notes: list[str], cols: _Columns) -> None:
    """Stage 5c (session layout): patients seen by more than one therapist, recoded or rejected."""
    multi = _varying(cols.distinct["patient"][0], cols.distinct["therapist"][0], ~rej.rejected)
    if not multi.any():
        return
    sub = typed.loc[multi].sort_values(["patient", "occasion", "row"], kind="stable")
    recoded, positions, chosen_of = 0, [], []
    for pid, g in sub.groupby("patient", sort=True):
        counts = g["therapist"].value_counts()
        listing = ", ".join(f"{t} ({int(k)})" for t, k in counts.items())
        if sp.multi_therapist == "reject":
            names = ", ".join(sorted(counts.index))
            rej.add(g.index.to_numpy(), "therapist", f"seen by more than one therapist ({names})")
        else:
            top = counts[counts == counts.max()].index
            chosen = g["therapist"].iloc[0] if g["therapist"].iloc[0] in top else (
                next(t for t in g["therapist"] if t in top)
            )
            positions.append(g.index.to_numpy())
            chosen_of.append(np.full(len(g), chosen, dtype=object))
            recoded += 1
            notes.append(
                f"patient {pid}: sessions with therapists {listing}; all {len(g)} rows assigned to {chosen}"
            )
    if recoded:  # one assignment: each would copy the whole column
        typed.loc[np.concatenate(positions), "therapist"] = np.concatenate(chosen_of)
        notes.insert(0, f"{recoded} patient(s) seen by more than one therapist were "
                        "assigned to the therapist with most sessions (ties: first session)")


def _arm_changes(typed: pd.DataFrame, rej: _Rejector, cols: _Columns) -> None:
    """Stage 5d (session layout): a patient whose arm changes between sessions (all their rows)."""
    # a numeric arm by its numbers ("1" and "1.0" are one level), a text arm by its distinct text
    arm = pd.factorize(typed["arm"].to_numpy())[0] if cols.arm_numeric else cols.distinct["arm"][0]
    changing = _varying(cols.distinct["patient"][0], arm, ~rej.rejected)
    if not changing.any():
        return
    sub = typed.loc[changing].sort_values(["patient", "occasion", "row"], kind="stable")
    for _, g in sub.groupby("patient", sort=True):
        seq = " -> ".join(_fmt_value(v) for v in pd.unique(g["arm"]))
        rej.add(g.index.to_numpy(), "arm", f"arm changes between sessions ({seq})")


def _kept_rows(typed: pd.DataFrame, rej: _Rejector, cols: _Columns) -> pd.DataFrame:
    """Stage 6: the rows kept, IDs and labels as text (pandas' ``str`` dtype, as Parquet gives them
    back) and a 0/1-style numeric arm as integers."""
    rows = _unrejected(typed, rej).reset_index(drop=True)
    if "arm" in rows.columns and cols.arm_numeric:
        a = rows["arm"].to_numpy(dtype=float)
        if len(a) and np.all(a == np.round(a)) and np.all(np.abs(a) < 2**53):
            rows["arm"] = a.astype("int64")
    return rows


def _report(source: str, n: int, rejects: pd.DataFrame, notes: list[str]) -> None:
    if len(rejects) or any(notes):
        acct = accounting(n, rejects)
        parts = [f"{k}: {v}" for k, v in acct["rejected_by_reason"].items()]
        msg = f"{source}: {len(rejects)} of {n} rows rejected"
        if parts:
            msg += " (" + "; ".join(parts) + ")"
        if notes:
            msg += f"; {notes[0]}"
        warnings.warn(msg, DataWarning, stacklevel=3)


def ingest_frame(
    table: pd.DataFrame,
    spec: Mapping[str, Any],
    *,
    source: str = "<table>",
    user_instruments: Mapping[str, Any] | None = None,
    today: _dt.date | str | None = None,
    name: str | None = None,
    _rows: np.ndarray | None = None,
    _decided: Mapping[str, Any] | None = None,
) -> IngestResult:
    """Validate an already-read table (see :func:`ingest_dataset`); ``source`` names it in errors.

    Row numbers follow the spreadsheet convention: the table's ``k``-th row (0-based) is row
    ``k + 2``. The stages: configured columns as text (:func:`_canonical_columns`), empty rows,
    row checks (a pandera schema), typed rows, cross-row checks (duplicates, patients seen by
    several therapists, arm changes), the rows kept.
    """
    if isinstance(spec, Mapping) and isinstance(spec.get("columns"), Mapping) and "scores" in spec["columns"]:
        from .scores import ingest_scores_frame  # several instruments per row: see therapist_effects.io.scores

        return ingest_scores_frame(table, spec, source=source, user_instruments=user_instruments,
                                   today=today, name=name)
    sp = _parse_spec(spec, name)
    instrument = get_instrument(sp.instrument, user_instruments) if sp.instrument else None
    if not isinstance(table, pd.DataFrame):
        raise InputError(f"{source}: expected a table, got {type(table).__name__}")
    raw = table.reset_index(drop=True)
    raw.columns = [str(c) for c in raw.columns]
    _check_columns(raw.columns, sp, source)
    raw = raw[_configured_columns(sp)]

    cols = _canonical_columns(raw, sp)
    cols.rows, cols.decided = _rows, _decided
    n = cols.n
    rej = _Rejector(n, cols.text["patient"], raw, cols.file_cols, _rows)
    live = _empty_rows(cols, rej)
    if (n and not live.any() or n == 0) and _decided is None:
        raise InputError(f"file {source} has no data rows (only a header"
                         + (f" and {n} empty row{'s' if n != 1 else ''})" if n else ")"))
    schema = _row_schema(cols, live, sp, instrument, today)
    _row_checks(cols, live, schema, rej)

    typed = _typed_rows(cols, sp)
    _check_arm_levels(typed, live & ~rej.rejected, cols, sp)
    notes: list[str] = []
    _duplicates(typed, sp, rej, cols)
    if sp.layout == "patient":
        _shared_patient_ids(typed, rej, notes)
    else:
        _multi_therapist(typed, sp, rej, notes, cols)
        if "arm" in typed.columns:
            _arm_changes(typed, rej, cols)

    rows = _kept_rows(typed, rej, cols)
    rejects = rej.frame()
    if len(rows) + len(rejects) != n:  # the accounting identity is a guarantee, not a hope
        raise RuntimeError(f"internal: {n} rows read but {len(rows)} kept + {len(rejects)} rejected")
    _report(source, n, rejects, notes)
    return IngestResult(
        rows=rows,
        rejects=rejects,
        rows_read=n,
        notes=notes,
        layout=sp.layout,
        instrument=instrument,
        columns=dict(cols.file_cols),
        occasion_kind=cols.occasion_kind,
        covariate_kinds=cols.covariate_kinds,
        source=source,
    )


def ingest_dataset(
    path: str | Path,
    spec: Mapping[str, Any],
    *,
    user_instruments: Mapping[str, Any] | None = None,
    today: _dt.date | str | None = None,
    name: str | None = None,
) -> IngestResult:
    """Read and validate one dataset (one entry of ``config["datasets"]``).

    Only the configured columns are read. ``user_instruments`` is ``config["instruments"]``;
    ``today`` (default: the current date) bounds occasion dates when the dataset has no
    ``export_date``; ``name`` (the dataset's key in the config) prefixes configuration errors.
    Returns an :class:`IngestResult`; raises :class:`InputError` when the file cannot be read,
    has duplicate column names, no data rows, or lacks a configured column, and
    :class:`ConfigError` when the dataset's settings are invalid. Emits one :class:`DataWarning`
    when rows were rejected or recoded.
    """
    if isinstance(spec, Mapping) and isinstance(spec.get("columns"), Mapping) and "scores" in spec["columns"]:
        from .scores import single_score_spec

        sp = _parse_spec(single_score_spec(spec, user_instruments, name)[0], name)
    else:
        sp = _parse_spec(spec, name)
    header = read_header(path, sheet=sp.sheet)
    _check_columns(header, sp, str(path))
    table = read_table(path, sheet=sp.sheet, columns=_configured_columns(sp))
    return ingest_frame(table, spec, source=str(path), user_instruments=user_instruments,
                        today=today, name=name)
