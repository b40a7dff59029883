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

1. ``empty row`` (every cell missing);
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
import io
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors

from .exceptions import ConfigError, DataWarning, InputError
from .instruments import Instrument, get_instrument

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
_EXTENSIONS = {".csv": "csv", ".parquet": "parquet", ".xlsx": "excel", ".xlsm": "excel", ".xls": "excel"}
_ROLES = ("patient", "therapist", "outcome", "baseline", "score", "occasion", "arm", "cluster",
          "ending", "covariates")
_DEFAULT_DROPOUT = ("dropout", "dropped out", "unilateral")
_MIN_YEAR = 1900
_FIRST_ROW = 2  # header is row 1


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
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


def _clean_value(v: Any) -> Any:
    if isinstance(v, str):
        t = v.strip()
        return np.nan if t.casefold() in _NA_TOKENS else t
    return np.nan if _is_missing_scalar(v) else v


def _clean(s: pd.Series) -> pd.Series:
    """Object series: strings stripped, missing tokens and blanks -> NaN, other values unchanged."""
    return pd.Series([_clean_value(v) for v in s.to_numpy(dtype=object)], index=s.index,
                     dtype=object)


def _missing(s: pd.Series) -> pd.Series:
    return pd.Series([v is None or (isinstance(v, float) and math.isnan(v))
                      for v in s.to_numpy(dtype=object)], index=s.index, dtype=bool)


def _number_or_nan(v: Any) -> float:
    if isinstance(v, (bool, np.bool_)):
        return math.nan
    if isinstance(v, (int, float, np.integer, np.floating)):
        try:
            return float(v)
        except OverflowError:
            return math.inf if v > 0 else -math.inf
    if isinstance(v, str):
        t = v.strip()
        if not re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(inf|infinity)", t, re.I):
            return math.nan
        try:
            return float(t)
        except (ValueError, OverflowError):
            return math.nan
    return math.nan


def _to_number(s: pd.Series) -> pd.Series:
    """Numeric value of each cell (float); NaN for missing and non-numbers; +-inf kept."""
    return pd.Series([_number_or_nan(v) for v in s.to_numpy(dtype=object)], index=s.index,
                     dtype=float)


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


def _to_text(s: pd.Series) -> pd.Series:
    return pd.Series([_id_text(v) for v in s.to_numpy(dtype=object)], index=s.index, dtype=object)


def _parse_dates(s: pd.Series, date_format: str | None) -> pd.Series:
    """Dates (naive, UTC for zoned values) of each cell; NaT where missing or unparseable.

    Strings are read as ISO 8601 (``2023-01-05``, ``2023-01-05 14:00``) or, failing that, with
    ``date_format``; date/datetime objects (Excel date cells, Parquet timestamps) are taken as
    they are; numbers are not dates.
    """
    out = pd.Series(pd.NaT, index=s.index, dtype="datetime64[us]")
    values = s.to_numpy(dtype=object)
    is_str = np.array([isinstance(v, str) for v in values], dtype=bool)
    is_dt = np.array(
        [isinstance(v, (_dt.date, np.datetime64)) and not pd.isna(v) for v in values], dtype=bool
    )
    if is_dt.any():
        parsed = []
        for v in values[is_dt]:
            try:
                ts = pd.Timestamp(v)
                if ts.tzinfo is not None:
                    ts = ts.tz_convert("UTC").tz_localize(None)
                parsed.append(ts.as_unit("us"))
            except (ValueError, OverflowError, TypeError):
                parsed.append(pd.NaT)
        out[is_dt] = parsed
    if is_str.any():
        sub = pd.Series(values[is_str], index=s.index[is_str], dtype=object)
        iso = sub.where(sub.str.match(r"^\d{4}-\d{1,2}-\d{1,2}([ T].*)?$"), None)
        parsed = pd.to_datetime(iso, format="ISO8601", errors="coerce", utc=True)
        parsed = parsed.dt.tz_localize(None).astype("datetime64[us]")
        if date_format is not None:
            rest = parsed.isna()
            if rest.any():
                other = pd.to_datetime(sub[rest], format=date_format, errors="coerce")
                if getattr(other.dt, "tz", None) is not None:
                    other = other.dt.tz_convert("UTC").dt.tz_localize(None)
                parsed[rest] = other.astype("datetime64[us]")
        out[is_str] = parsed
    return out


def reason_category(reason: str) -> str:
    """The category of a reject reason: the text before any details in parentheses."""
    return str(reason).split(" (", 1)[0].strip()


# ------------------------------------------------------------------------------------------------
# reading files
# ------------------------------------------------------------------------------------------------
def _drop_trailing_empty(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    empty = np.ones(len(df), dtype=bool)
    for col in df.columns:
        empty &= _missing(_clean(df[col])).to_numpy()
    nonempty = np.flatnonzero(~empty)
    keep = 0 if nonempty.size == 0 else int(nonempty[-1]) + 1
    return df.iloc[:keep].reset_index(drop=True)


def _read_csv(p: Path) -> pd.DataFrame:
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(
            f"cannot read {p}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "save the file as CSV UTF-8"
        ) from None
    if not text.strip():
        raise InputError(f"cannot read {p}: the file is empty")
    first = text.lstrip("\r\n").splitlines()[0]
    sep = ","
    if "," not in first:
        for cand in (";", "\t", "|"):
            if cand in first:
                sep = cand
                break
    with warnings.catch_warnings():
        # a data row with more fields than the header would otherwise be silently truncated
        warnings.simplefilter("error", pd.errors.ParserWarning)
        return pd.read_csv(
            io.StringIO(text),
            sep=sep,
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            skip_blank_lines=False,
            index_col=False,
        )


def read_table(path: str | Path, *, sheet: str | int | None = None) -> pd.DataFrame:
    """Read a CSV, Parquet or Excel (.xlsx/.xlsm; .xls needs the xlrd package) export.

    Values are returned as the file holds them: every CSV cell as text (so IDs such as "007" keep
    their leading zeros; ingestion converts scores to numbers), Excel cells as their typed values
    (text, number, date), Parquet columns with their stored types. ``sheet`` selects an Excel
    sheet by name or 0-based index (default: the first). Column names are stripped of surrounding
    blanks; blank rows at the end of the table are dropped. Any failure to read raises
    :class:`InputError` with one line naming the file.
    """
    p = Path(path)
    kind = _EXTENSIONS.get(p.suffix.lower())
    if kind is None:
        raise InputError(
            f"cannot read {p}: unknown file type '{p.suffix}'; expected .csv, .parquet, .xlsx or .xls"
        )
    if not p.is_file():
        raise InputError(f"cannot read {p}: no such file")
    try:
        if kind == "csv":
            df = _read_csv(p)
        elif kind == "parquet":
            df = pd.read_parquet(p)
        else:
            df = pd.read_excel(p, sheet_name=0 if sheet is None else sheet, dtype=object)
    except InputError:
        raise
    except ImportError as err:
        raise InputError(f"cannot read {p}: {_one_line(err)}") from None
    except Exception as err:  # any parser failure becomes one line naming the file
        raise InputError(f"cannot read {p}: {type(err).__name__}: {_one_line(err)}") from None
    df = df.reset_index(drop=True)
    df.columns = [" ".join(str(c).split()) for c in df.columns]
    return _drop_trailing_empty(df)


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
# validation
# ------------------------------------------------------------------------------------------------
class _Rejector:
    """Collects the first problem of each rejected row (by table position)."""

    def __init__(self, canon: pd.DataFrame, raw: pd.DataFrame, file_cols: dict[str, str]):
        self.canon = canon
        self.raw = raw
        self.file_cols = file_cols
        self.lines: dict[int, dict[str, Any]] = {}

    def add(self, pos: int, column: str, reason: str, value: Any | None = None) -> None:
        if pos in self.lines:
            return
        fcol = self.file_cols.get(column, column)
        if value is None and fcol in self.raw.columns:
            value = self.raw.at[pos, fcol]
        patient = self.canon.at[pos, "patient"] if "patient" in self.canon.columns else None
        self.lines[pos] = {
            "row": pos + _FIRST_ROW,
            "patient": _fmt_value(patient),
            "column": fcol,
            "value": _fmt_value(value),
            "reason": reason,
        }

    def frame(self) -> pd.DataFrame:
        if not self.lines:
            df = pd.DataFrame({c: pd.Series(dtype=object) for c in REJECT_COLUMNS})
            df["row"] = df["row"].astype("int64")
            return df
        df = pd.DataFrame([self.lines[k] for k in sorted(self.lines)], columns=REJECT_COLUMNS)
        df["row"] = df["row"].astype("int64")
        return df


def _check(fn, name: str) -> pa.Check:
    return pa.Check(fn, name=name, error=name)


def _numeric_checks(num_cache: dict[str, pd.Series], col: str, rng: tuple[float, float, str] | None
                    ) -> list[pa.Check]:
    def _te_is_number(s: pd.Series) -> pd.Series:
        return num_cache[col].reindex(s.index).notna() | _missing(s)

    def _te_finite(s: pd.Series) -> pd.Series:
        return ~np.isinf(num_cache[col].reindex(s.index))

    checks = [_check(_te_is_number, "not a number"), _check(_te_finite, "not a finite number")]
    if rng is not None:
        lo, hi, label = rng

        def _te_in_range(s: pd.Series) -> pd.Series:
            v = num_cache[col].reindex(s.index)
            bad = np.isfinite(v) & ((v < lo) | (v > hi))
            return ~bad

        checks.append(_check(_te_in_range, f"out of range ({label}: {lo:g}-{hi:g})"))
    return checks


def _decide_occasion(s: pd.Series, spec: _Spec, fcol: str) -> tuple[str, pd.Series]:
    """Is the occasion a session number or a date? Returns the kind and the parsed values."""
    present = ~_missing(s)
    m = int(present.sum())
    nums = _to_number(s)
    dates = _parse_dates(s, spec.date_format)
    n_num = int(np.isfinite(nums[present]).sum())
    n_date = int(dates[present].notna().sum())
    if m == 0 or (n_num >= n_date and n_num > 0):
        kind, values, best = "number", nums, n_num
    else:
        kind, values, best = "date", dates, n_date
    if m and best * 2 < m:
        example = _fmt_value(s[present & (nums.isna() if kind == "number" else dates.isna())].iloc[0]
                             if (present & (nums.isna() if kind == "number" else dates.isna())).any()
                             else s[present].iloc[0])
        raise ConfigError(
            f"{spec.where}.columns.occasion: column '{fcol}' holds neither session numbers nor "
            f"ISO 8601 dates in {m - best} of {m} rows (e.g. {example!r}); set date_format "
            "(e.g. '%d/%m/%Y') if it holds dates in another format"
        )
    return kind, values


def ingest_frame(
    table: pd.DataFrame,
    spec: Mapping[str, Any],
    *,
    source: str = "<table>",
    user_instruments: Mapping[str, Any] | None = None,
    today: _dt.date | str | None = None,
    name: str | None = None,
) -> IngestResult:
    """Validate an already-read table (see :func:`ingest_dataset`); ``source`` names it in errors.

    Row numbers follow the spreadsheet convention: the table's ``k``-th row (0-based) is row
    ``k + 2``.
    """
    if isinstance(spec, Mapping) and isinstance(spec.get("columns"), Mapping) and "scores" in spec["columns"]:
        from .scores import ingest_scores_frame  # several instruments per row: see therapist_effects.scores

        return ingest_scores_frame(table, spec, source=source, user_instruments=user_instruments,
                                   today=today, name=name)
    sp = _parse_spec(spec, name)
    instrument = get_instrument(sp.instrument, user_instruments) if sp.instrument else None
    if not isinstance(table, pd.DataFrame):
        raise InputError(f"{source}: expected a table, got {type(table).__name__}")
    raw = table.reset_index(drop=True).copy()
    raw.columns = [str(c) for c in raw.columns]

    # -- the configured columns must exist ---------------------------------------------------------
    wanted = [(f"columns.{r}", c) for r, c in sp.roles.items()] + [
        ("columns.covariates", c) for c in sp.covariates
    ]
    present_cols = list(raw.columns)
    for key, col in wanted:
        if col not in present_cols:
            listing = ", ".join(present_cols) if present_cols else "(none)"
            raise InputError(
                f"file {source} has no column '{col}' ({key}); columns are: {_one_line(listing, 400)}"
            )
    if len(set(present_cols)) != len(present_cols):
        dup = next(c for c in present_cols if present_cols.count(c) > 1)
        raise InputError(f"file {source} has two columns named '{dup}'")

    canon_name = {"outcome": "end"}
    file_cols: dict[str, str] = {canon_name.get(r, r): c for r, c in sp.roles.items()}
    for c in sp.covariates:
        file_cols[c] = c

    n = len(raw)
    cleaned = {k: _clean(raw[c]) for k, c in file_cols.items()}
    canon = pd.DataFrame(cleaned, index=raw.index)
    canon["patient"] = _to_text(canon["patient"])
    rej = _Rejector(canon, raw, file_cols)

    # -- 1. empty rows -----------------------------------------------------------------------------
    empty = np.ones(n, dtype=bool)
    for col in raw.columns:
        empty &= _missing(_clean(raw[col])).to_numpy()
    for pos in np.flatnonzero(empty):
        rej.add(int(pos), "patient", "empty row", value="")
    live = ~empty

    # -- 2. row checks (pandera) ------------------------------------------------------------------
    notes: list[str] = []
    num_cache: dict[str, pd.Series] = {}
    columns: dict[str, pa.Column] = {}
    columns["patient"] = pa.Column(nullable=False)
    canon["therapist"] = _to_text(canon["therapist"])
    columns["therapist"] = pa.Column(nullable=False)

    occasion_kind = None
    occ_values = None
    rng = None
    if instrument is not None:
        rng = (instrument.min, instrument.max, instrument.name)
    if sp.layout == "session":
        occasion_kind, occ_values = _decide_occasion(canon.loc[live, "occasion"], sp,
                                                     file_cols["occasion"])
        occ_values = occ_values.reindex(canon.index)
        if occasion_kind == "number":
            num_cache["occasion"] = occ_values
            checks = _numeric_checks(num_cache, "occasion", None)
            checks.append(_check(lambda s: ~(num_cache["occasion"].reindex(s.index) < 0),
                                 "negative session number"))
        else:
            limit = sp.export_date if sp.export_date is not None else pd.Timestamp(
                today if today is not None else _dt.date.today()
            )
            limit = limit.normalize()
            lim_label = "export date" if sp.export_date is not None else "today"

            def _te_parseable(s: pd.Series) -> pd.Series:
                return occ_values.reindex(s.index).notna() | _missing(s)

            def _te_not_future(s: pd.Series) -> pd.Series:
                return ~(occ_values.reindex(s.index).dt.normalize() > limit)

            def _te_not_ancient(s: pd.Series) -> pd.Series:
                return ~(occ_values.reindex(s.index).dt.year < _MIN_YEAR)

            checks = [
                _check(_te_parseable, "unparseable date"),
                _check(_te_not_future, f"impossible date (after {lim_label} {limit.date()})"),
                _check(_te_not_ancient, f"impossible date (before {_MIN_YEAR})"),
            ]
        columns["occasion"] = pa.Column(nullable=False, checks=checks)
        num_cache["score"] = _to_number(canon["score"])
        columns["score"] = pa.Column(nullable=False, checks=_numeric_checks(num_cache, "score", rng))
    else:
        num_cache["end"] = _to_number(canon["end"])
        columns["end"] = pa.Column(nullable=False, checks=_numeric_checks(num_cache, "end", rng))
        if "baseline" in file_cols:
            num_cache["baseline"] = _to_number(canon["baseline"])
            columns["baseline"] = pa.Column(
                nullable=False, checks=_numeric_checks(num_cache, "baseline", rng)
            )

    arm_numeric = False
    if "arm" in file_cols:
        arm_num = _to_number(canon["arm"])
        arm_present = ~_missing(canon["arm"]) & live
        arm_numeric = bool(arm_present.any()) and bool(np.isfinite(arm_num[arm_present]).all())
        columns["arm"] = pa.Column(nullable=False)
    if "cluster" in file_cols:
        canon["cluster"] = _to_text(canon["cluster"])
        columns["cluster"] = pa.Column(nullable=False)

    covariate_kinds: dict[str, str] = {}
    for c in sp.covariates:
        nums = _to_number(canon[c])
        present = ~_missing(canon[c]) & live
        declared = sp.covariate_types.get(c)
        if declared is None:
            is_num = bool(present.any()) and bool(np.isfinite(nums[present]).all())
            declared = "numeric" if is_num else "categorical"
        covariate_kinds[c] = declared
        # a covariate is required per row in the patient layout; in the session layout the
        # patient's first row that has it is used (checked in outcomes)
        nullable = sp.layout == "session"
        if declared == "numeric":
            num_cache[c] = nums
            columns[c] = pa.Column(nullable=nullable, checks=_numeric_checks(num_cache, c, None))
        else:
            canon[c] = _to_text(canon[c])
            columns[c] = pa.Column(nullable=nullable)

    order = list(columns)
    schema = pa.DataFrameSchema(columns, strict=False, coerce=False)
    to_check = canon.loc[live, order]
    if len(to_check):
        try:
            schema.validate(to_check, lazy=True)
        except SchemaErrors as err:
            fc = err.failure_cases
            if fc["index"].isna().any():  # a column-level failure would be a bug here
                raise RuntimeError(f"internal: column-level validation failure: {fc.to_dict('records')}")
            fc = fc.assign(
                _col=fc["column"].map(order.index),
                _chk=pd.to_numeric(fc["check_number"], errors="coerce").fillna(-1),
            ).sort_values(["index", "_col", "_chk"], kind="stable")
            for rec in fc.drop_duplicates("index").itertuples(index=False):
                check = str(rec.check)
                col = str(rec.column)
                if check == "not_nullable":
                    if col == "patient":
                        reason = "missing patient ID"
                    elif col == "therapist":
                        reason = "missing therapist ID"
                    else:
                        reason = "missing value"
                else:
                    reason = check
                rej.add(int(rec.index), col, reason)

    valid = np.array([live[i] and i not in rej.lines for i in range(n)], dtype=bool)

    # -- typed canonical rows ------------------------------------------------------------------------
    typed = pd.DataFrame(index=canon.index)
    typed["row"] = (canon.index.to_numpy() + _FIRST_ROW).astype("int64")
    typed["patient"] = canon["patient"]
    typed["therapist"] = canon["therapist"]
    if sp.layout == "session":
        typed["occasion"] = occ_values
        typed["score"] = num_cache["score"]
    else:
        typed["end"] = num_cache["end"]
        if "baseline" in file_cols:
            typed["baseline"] = num_cache["baseline"]
    if "arm" in file_cols:
        if arm_numeric:
            typed["arm"] = _to_number(canon["arm"])
        else:
            typed["arm"] = _to_text(canon["arm"])
    if "cluster" in file_cols:
        typed["cluster"] = canon["cluster"]
    if "ending" in file_cols:
        typed["ending"] = _to_text(canon["ending"])
    for c in sp.covariates:
        typed[c] = num_cache[c] if covariate_kinds[c] == "numeric" else canon[c]

    # -- arm levels: at most two ---------------------------------------------------------------------
    if "arm" in file_cols and valid.any():
        levels = pd.unique(typed.loc[valid, "arm"])
        if len(levels) > 2:
            shown = ", ".join(_fmt_value(v) for v in sorted(levels, key=lambda v: (str(type(v)), v)))
            raise ConfigError(
                f"{sp.where}.columns.arm: column '{file_cols['arm']}' has {len(levels)} levels "
                f"({_one_line(shown, 200)}); expected at most two (feedback and control)"
            )

    # -- 3. cross-row checks -------------------------------------------------------------------------
    def keep_rows() -> pd.DataFrame:
        ok = np.array([valid[i] and i not in rej.lines for i in range(n)], dtype=bool)
        return typed.loc[ok]

    if sp.layout == "session":
        key = ["patient", "occasion"]
    else:
        # the same record twice; rows sharing a patient ID with different data are kept (IDs
        # numbered within therapist, re-referrals) and noted below
        key = [c for c in typed.columns if c != "row"]
    current = keep_rows()
    if len(current):
        dup_schema = pa.DataFrameSchema(unique=key, report_duplicates="exclude_first")
        try:
            dup_schema.validate(current[key], lazy=True)
        except SchemaErrors as err:
            dup_pos = sorted({int(i) for i in err.failure_cases["index"].dropna()})
            first_row = current.groupby(key, sort=False, dropna=False)["row"].transform("min")
            for pos in dup_pos:
                fr = int(first_row.loc[pos])
                if sp.layout == "session":
                    rej.add(pos, "occasion",
                            f"duplicate session (same patient and occasion as row {fr})")
                else:
                    rej.add(pos, "patient", f"duplicate patient (first at row {fr})")

    if sp.layout == "patient":
        current = keep_rows()
        counts = current["patient"].value_counts()
        shared = counts[counts > 1]
        if len(shared):
            pid = shared.index[0]
            where_rows = ", ".join(str(x) for x in current.loc[current["patient"] == pid, "row"])
            notes.append(
                f"{len(shared)} patient ID(s) occur on more than one row with different data "
                f"(e.g. {pid} at rows {where_rows}); they are kept as separate patients"
            )

    if sp.layout == "session":
        current = keep_rows()
        n_ther = current.groupby("patient")["therapist"].nunique()
        multi = n_ther[n_ther > 1].index
        if len(multi):
            sub = current[current["patient"].isin(multi)].sort_values(
                ["patient", "occasion", "row"], kind="stable"
            )
            recoded = 0
            for pid, g in sub.groupby("patient", sort=True):
                counts = g["therapist"].value_counts()
                listing = ", ".join(f"{t} ({int(k)})" for t, k in counts.items())
                if sp.multi_therapist == "reject":
                    names = ", ".join(sorted(counts.index))
                    for pos in g.index:
                        rej.add(int(pos), "therapist",
                                f"seen by more than one therapist ({names})")
                else:
                    top = counts[counts == counts.max()].index
                    chosen = g["therapist"].iloc[0] if g["therapist"].iloc[0] in top else (
                        next(t for t in g["therapist"] if t in top)
                    )
                    typed.loc[g.index, "therapist"] = chosen
                    recoded += 1
                    notes.append(
                        f"patient {pid}: sessions with therapists {listing}; "
                        f"all {len(g)} rows assigned to {chosen}"
                    )
            if recoded:
                notes.insert(0, f"{recoded} patient(s) seen by more than one therapist were "
                                "assigned to the therapist with most sessions (ties: first session)")

        if "arm" in file_cols:
            current = keep_rows()
            n_arm = current.groupby("patient")["arm"].nunique()
            changing = n_arm[n_arm > 1].index
            if len(changing):
                sub = current[current["patient"].isin(changing)].sort_values(
                    ["patient", "occasion", "row"], kind="stable"
                )
                for _, g in sub.groupby("patient", sort=True):
                    seq = " -> ".join(_fmt_value(v) for v in pd.unique(g["arm"]))
                    for pos in g.index:
                        rej.add(int(pos), "arm", f"arm changes between sessions ({seq})")

    rows = keep_rows().reset_index(drop=True)
    if "arm" in rows.columns and arm_numeric:
        a = rows["arm"].to_numpy(dtype=float)
        if len(a) and np.all(a == np.round(a)) and np.all(np.abs(a) < 2**53):
            rows["arm"] = a.astype("int64")
    for c in ("patient", "therapist", "cluster", "ending"):
        if c in rows.columns:
            rows[c] = rows[c].astype(object)
    rejects = rej.frame()
    if len(rows) + len(rejects) != n:  # the accounting identity is a guarantee, not a hope
        raise RuntimeError(f"internal: {n} rows read but {len(rows)} kept + {len(rejects)} rejected")
    if len(rejects) or any(notes):
        acct = accounting(n, rejects)
        parts = [f"{k}: {v}" for k, v in acct["rejected_by_reason"].items()]
        msg = f"{source}: {len(rejects)} of {n} rows rejected"
        if parts:
            msg += " (" + "; ".join(parts) + ")"
        if notes:
            msg += f"; {notes[0]}"
        warnings.warn(msg, DataWarning, stacklevel=2)
    return IngestResult(
        rows=rows,
        rejects=rejects,
        rows_read=n,
        notes=notes,
        layout=sp.layout,
        instrument=instrument,
        columns=dict(file_cols),
        occasion_kind=occasion_kind,
        covariate_kinds=covariate_kinds,
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

    ``user_instruments`` is ``config["instruments"]``; ``today`` (default: the current date)
    bounds occasion dates when the dataset has no ``export_date``; ``name`` (the dataset's key in
    the config) prefixes configuration errors. Returns an :class:`IngestResult`; raises
    :class:`InputError` when the file cannot be read or lacks a configured column and
    :class:`ConfigError` when the dataset's settings are invalid. Emits one :class:`DataWarning`
    when rows were rejected or recoded.
    """
    if isinstance(spec, Mapping) and isinstance(spec.get("columns"), Mapping) and "scores" in spec["columns"]:
        from .scores import single_score_spec

        sp = _parse_spec(single_score_spec(spec, user_instruments, name)[0], name)
    else:
        sp = _parse_spec(spec, name)
    table = read_table(path, sheet=sp.sheet)
    return ingest_frame(table, spec, source=str(path), user_instruments=user_instruments,
                        today=today, name=name)
