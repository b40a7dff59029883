"""Jinja2 rendering of the reports: autoescaped templates, number filters, input loading."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from ..exceptions import InputError
from . import fmt


def _dv(x: Any) -> str:
    """The unrounded value for a ``data-value`` attribute (``repr`` of the float; empty if missing)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return ""
    return repr(v) if math.isfinite(v) else ""


@functools.cache
def environment() -> jinja2.Environment:
    """The reports' Jinja2 environment, one per process: it keeps the compiled templates (a compile took
    ~50 ms, once per therapist page when each render made its own environment)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("therapist_effects", "templates"),
        autoescape=True,  # every data-derived string is HTML-escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(num=fmt.num, interval=fmt.interval, pval=fmt.pval, count=fmt.count, pct=fmt.pct, dv=_dv)
    return env


def render(template: str, out_path: str | Path, **context: Any) -> Path:
    """Render ``template`` with ``context`` into ``out_path`` (UTF-8), creating its folder."""
    text = environment().get_template(template).render(**context)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out


def load_json(obj: dict | str | Path | None, what: str) -> dict | None:
    """A dict as given, or read from a JSON file; None stays None."""
    if obj is None or isinstance(obj, dict):
        return obj
    path = Path(obj)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: {what} is not valid JSON (line {err.lineno}: {err.msg})") from None


def load_table(obj: pd.DataFrame | str | Path | None, *, str_columns: tuple[str, ...] = ("therapist", "patient",
               "study", "model")) -> pd.DataFrame | None:
    """A DataFrame as given, or read from CSV / parquet; None (or a missing / empty file) gives None.

    ID columns are read as strings so that IDs such as ``007`` keep their leading zeros.
    """
    if obj is None:
        return None
    if isinstance(obj, pd.DataFrame):
        df = obj
    else:
        path = Path(obj)
        if not path.exists() or path.stat().st_size == 0:
            return None
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            try:
                df = pd.read_csv(path, dtype={c: str for c in str_columns})
            except pd.errors.EmptyDataError:
                return None
    df = df.copy()
    for c in str_columns:
        if c in df.columns:
            df[c] = df[c].map(lambda v: v if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    return df if len(df.columns) else None


def css() -> str:
    return environment().loader.get_source(environment(), "report.css")[0]  # type: ignore[union-attr]
