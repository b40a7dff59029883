"""CSV export that cannot be turned into spreadsheet formulas (CSV / formula injection).

A text cell that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is run as a
formula by Excel, LibreOffice and Google Sheets. :func:`safe_csv` prefixes such text cells with a
single quote (OWASP's advice); numbers, including negative ones, are written unchanged, and so is
text that is a plain number (``-2``, ``+1.5``, ``-1e3``: a spreadsheet reads it as that number, not
as a formula). Every CSV the package writes goes through :func:`safe_csv`.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DANGEROUS_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def neutralise(value: Any) -> Any:
    """``value`` with a leading single quote if it is text that a spreadsheet would run as a formula
    (text that is a plain number, such as ``-2``, is left as it is)."""
    if isinstance(value, str) and value.startswith(DANGEROUS_PREFIXES) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def _neutralise_series(s: pd.Series) -> pd.Series:
    """``s`` with its formula-like text cells neutralised; a text column stays text (pandas writes it
    vectorised), any other column becomes objects. Each distinct value is checked once (a national
    patient table repeats its therapist and service IDs thousands of times); only the cells whose text
    changes are replaced, so every other cell keeps its own object."""
    if not isinstance(s.dtype, pd.StringDtype):
        s = s.astype(object)
    codes, uniq = pd.factorize(s)
    new = np.frompyfunc(neutralise, 1, 1)(uniq)  # objects; numbers and other non-text come back as they are
    changed = np.array([n is not u for n, u in zip(new, uniq)])
    if changed.any():
        hit = codes >= 0
        hit[hit] = changed[codes[hit]]
        s = s.mask(hit, new[codes])
    return s


def neutralise_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` whose text cells (and column names) are neutralised; numbers untouched."""
    out = df.copy()
    for col in out.columns:
        s = out[col]
        if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_datetime64_any_dtype(s):  # no text in these
            continue
        out[col] = _neutralise_series(s)
    out.columns = [neutralise(c) for c in out.columns]  # non-text names come back as they are
    return out


def _has_carriage_return(s: pd.Series) -> bool:
    return any(isinstance(v, str) and "\r" in v for v in s.unique())


def safe_csv(df: pd.DataFrame, path: str | Path, **to_csv_kwargs: Any) -> Path:
    """Write ``df`` to ``path`` as CSV with formula-like text cells neutralised (index off by default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_csv_kwargs = {"index": False, **to_csv_kwargs}
    safe = neutralise_frame(df)
    text_cols = [c for c in safe.columns if safe[c].dtype == object or isinstance(safe[c].dtype, pd.StringDtype)]
    if any(_has_carriage_return(safe[c]) for c in text_cols):
        # pandas does not quote a bare carriage return, which readers take as a line break
        to_csv_kwargs.setdefault("quoting", csv.QUOTE_NONNUMERIC)
    safe.to_csv(path, **to_csv_kwargs)
    return path
