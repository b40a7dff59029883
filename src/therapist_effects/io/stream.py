"""Streamed ingestion for exports larger than memory: session rows in, the per-patient table out.

:func:`ingest_patients_streamed` gives what :func:`therapist_effects.io.ingest.ingest_dataset` followed by
:func:`therapist_effects.io.outcomes.derive_patient_outcomes` give (the same patients, outcomes, rejects
and reasons, the same row numbers) while holding only part of the file in memory:

1. *Pass 1* reads the CSV (or Parquet) in record batches (pyarrow), only the configured columns, and
   writes each batch's rows into one of ``k`` Parquet partitions by a stable hash of the patient ID,
   so that all rows of a patient land in the same partition. On the way it counts what ingestion
   decides over the whole file: whether the occasion holds session numbers or dates, whether the arm
   and each covariate are numeric, and where the last non-empty row is.
2. *Pass 2* validates each partition with :func:`~therapist_effects.io.ingest.ingest_frame` (the same
   stages and pandera schema, given the whole-file decisions and the original row numbers) and derives
   its patients' outcomes. The patient tables are concatenated in patient-ID order; the feedback
   indicator is derived once over all patients; at most two arm levels are allowed over the file.

Memory is bounded by one batch (pass 1) or one partition (pass 2) plus the per-patient table: the
partitions are sized from the file size (:data:`PARTITION_BYTES` of CSV each).
"""

from __future__ import annotations

import datetime as _dt
import math
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..exceptions import ConfigError, DataWarning, InputError
from .ingest import (
    REJECT_COLUMNS,
    _configured_columns,
    _fmt_value,
    _numbers,
    _parse_dates,
    _parse_spec,
    _text,
    accounting,
    ingest_frame,
)
from .instruments import get_instrument
from .readers import _TEXT, _csv_header, _one_line, check_unique, file_kind, read_header

__all__ = ["PARTITION_BYTES", "StreamedResult", "ingest_patients_streamed"]

#: CSV bytes per partition of pass 2 (about 1M session rows of a typical export).
PARTITION_BYTES = 64 * 1024 * 1024
_ROW = "__row__"


@dataclass
class StreamedResult:
    patients: pd.DataFrame
    rejects: pd.DataFrame
    rows_read: int
    notes: list[str] = field(default_factory=list)
    partitions: int = 1

    @property
    def accounting(self) -> dict[str, Any]:
        return accounting(self.rows_read, self.rejects)


@dataclass
class _Tally:
    """Whole-file counts behind ingestion's decisions."""

    occ_present: int = 0
    occ_number: int = 0
    occ_date: int = 0
    occ_example: str | None = None
    arm_present: int = 0
    arm_number: int = 0
    cov_present: dict[str, int] = field(default_factory=dict)
    cov_number: dict[str, int] = field(default_factory=dict)
    last_nonempty: int = 0  # row number of the last row with any configured cell
    rows: int = 0


def _batches(path: Path, columns: list[str], batch_rows: int):
    """(text frame of ``columns``, first row number) per record batch of a CSV or Parquet file."""
    import pyarrow as pa

    kind = file_kind(path)
    if kind == "csv":
        import pyarrow.csv as pcsv

        names, sep, skip, header_len = _csv_header(path)
        check_unique(names, str(path))
        auto = [f"c{i}" for i in range(len(names))]
        keep = [auto[names.index(c)] for c in columns]
        reader = pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(column_names=auto, skip_rows=skip + 1, use_threads=True,
                                          block_size=max(1 << 24, 2 * header_len + 1024)),
            parse_options=pcsv.ParseOptions(delimiter=sep, newlines_in_values=True, ignore_empty_lines=False),
            convert_options=pcsv.ConvertOptions(include_columns=keep, column_types={c: pa.string() for c in keep},
                                                strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
        source = reader
    elif kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        source = pf.iter_batches(batch_size=batch_rows, columns=columns)
    else:
        raise InputError(f"cannot stream {path}: streamed ingestion reads .csv and .parquet files")
    first = 2
    try:
        for batch in source:
            df = batch.to_pandas(types_mapper=lambda t: _TEXT if t == pa.string() else None)
            df.columns = list(columns)
            yield df, first
            first += len(df)
    except pa.ArrowInvalid as err:
        msg = str(err)
        if "UTF8" in msg:
            from .readers import _utf8_error

            raise _utf8_error(path) from None
        raise InputError(f"cannot read {path}: {_one_line(msg)}") from None


def _tally(tally: _Tally, text: dict[str, pd.Series], first: int, sp, roles: dict[str, str]) -> None:
    n = len(next(iter(text.values())))
    empty = np.ones(n, dtype=bool)
    for t in text.values():
        empty &= t.isna().to_numpy()
    live = ~empty
    if live.any():
        tally.last_nonempty = first + int(np.flatnonzero(live)[-1])
    tally.rows = first + n - 2
    if "occasion" in text:
        t = text["occasion"]
        present = t.notna().to_numpy() & live
        nums = _numbers(t)
        dates = _parse_dates(t, sp.date_format)
        tally.occ_present += int(present.sum())
        tally.occ_number += int(np.isfinite(nums[present]).sum())
        tally.occ_date += int(dates[present].notna().sum())
        bad = present & np.isnan(nums) & dates.isna().to_numpy()
        if tally.occ_example is None and bad.any():
            tally.occ_example = _fmt_value(t[bad].iloc[0])
    if "arm" in text:
        t = text["arm"]
        present = t.notna().to_numpy() & live
        tally.arm_present += int(present.sum())
        tally.arm_number += int(np.isfinite(_numbers(t)[present]).sum())
    for c in sp.covariates:
        t = text[c]
        present = t.notna().to_numpy() & live
        tally.cov_present[c] = tally.cov_present.get(c, 0) + int(present.sum())
        tally.cov_number[c] = tally.cov_number.get(c, 0) + int(np.isfinite(_numbers(t)[present]).sum())


def _decisions(tally: _Tally, sp, file_cols: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"occasion_kind": None, "arm_numeric": False, "covariate_kinds": {}}
    if sp.layout == "session":
        m, n_num, n_date = tally.occ_present, tally.occ_number, tally.occ_date
        kind, best = ("number", n_num) if (m == 0 or (n_num >= n_date and n_num > 0)) else ("date", n_date)
        if m and best * 2 < m:
            raise ConfigError(
                f"{sp.where}.columns.occasion: column '{file_cols['occasion']}' holds neither session "
                f"numbers nor ISO 8601 dates in {m - best} of {m} rows (e.g. {tally.occ_example!r}); set "
                "date_format (e.g. '%d/%m/%Y') if it holds dates in another format"
            )
        out["occasion_kind"] = kind
    out["arm_numeric"] = tally.arm_present > 0 and tally.arm_number == tally.arm_present
    for c in sp.covariates:
        if sp.covariate_types.get(c):
            out["covariate_kinds"][c] = sp.covariate_types[c]
        else:
            p = tally.cov_present.get(c, 0)
            out["covariate_kinds"][c] = "numeric" if p > 0 and tally.cov_number.get(c, 0) == p else "categorical"
    return out


def ingest_patients_streamed(
    path: str | Path,
    spec: Mapping[str, Any],
    *,
    user_instruments: Mapping[str, Any] | None = None,
    today: _dt.date | str | None = None,
    name: str | None = None,
    batch_rows: int = 1_000_000,
    partitions: int | None = None,
    workdir: str | Path | None = None,
) -> StreamedResult:
    """Ingest ``path`` and derive the per-patient table in bounded memory (see the module docstring).

    ``partitions`` (default: one per :data:`PARTITION_BYTES` of file) sets how many parts pass 2
    holds in memory one at a time; ``workdir`` holds the temporary partitions (default: a temporary
    directory, removed afterwards). Errors are those of :func:`~therapist_effects.io.ingest.ingest_dataset`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .outcomes import _feedback, derive_patient_outcomes

    path = Path(path)
    sp = _parse_spec(spec, name)
    instrument = get_instrument(sp.instrument, user_instruments) if sp.instrument else None
    header = read_header(path, sheet=sp.sheet)
    from .ingest import _check_columns

    _check_columns(header, sp, str(path))
    columns = _configured_columns(sp)
    canon_name = {"outcome": "end"}
    file_cols = {canon_name.get(r, r): c for r, c in sp.roles.items()} | {c: c for c in sp.covariates}
    k = partitions or max(1, math.ceil(path.stat().st_size / PARTITION_BYTES))

    with tempfile.TemporaryDirectory(dir=workdir, prefix="te-stream-") as tmp:
        # -- pass 1: partition by patient, tally the whole-file decisions ----------------------------
        tally = _Tally()
        writers: dict[int, pq.ParquetWriter] = {}
        schema = pa.schema([(c, pa.string()) for c in columns] + [(_ROW, pa.int64())])
        try:
            for df, first in _batches(path, columns, batch_rows):
                text = {k_: _text(df[c]) for k_, c in file_cols.items()}
                _tally(tally, text, first, sp, sp.roles)
                pid = text["patient"].fillna("").to_numpy(dtype=object)
                part = (pd.util.hash_array(pid) % np.uint64(k)).astype(np.int64)
                df[_ROW] = np.arange(first, first + len(df), dtype=np.int64)
                for j in np.unique(part):
                    sub = pa.Table.from_pandas(df[part == j], schema=schema, preserve_index=False)
                    if j not in writers:
                        writers[j] = pq.ParquetWriter(Path(tmp) / f"part{j}.parquet", schema)
                    writers[j].write_table(sub)
        finally:
            for w in writers.values():
                w.close()
        rows_read = tally.last_nonempty - 1
        if rows_read <= 0:
            raise InputError(f"file {path} has no data rows (only a header"
                             + (f" and {tally.rows} empty rows)" if tally.rows else ")"))
        decided = _decisions(tally, sp, file_cols)

        # -- pass 2: one partition at a time ------------------------------------------------------
        patients, rejects, notes, arm_levels = [], [], [], set()
        recoded = shared = 0
        for j in sorted(writers):
            raw = pd.read_parquet(Path(tmp) / f"part{j}.parquet")
            raw = raw[raw[_ROW].to_numpy() <= tally.last_nonempty]
            if not len(raw):
                continue
            rows = raw.pop(_ROW).to_numpy()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DataWarning)
                res = ingest_frame(raw.reset_index(drop=True), spec, source=str(path), user_instruments=user_instruments,
                                   today=today, name=name, _rows=rows, _decided=decided)
                if "arm" in res.rows.columns:
                    arm_levels.update(pd.unique(res.rows["arm"]))
                pts, rej2 = derive_patient_outcomes(res.rows, spec, instrument)
            for note in res.notes:
                if "assigned to the therapist with most sessions" in note:
                    recoded += int(note.split(" ", 1)[0])
                elif "occur on more than one row" in note:
                    shared += int(note.split(" ", 1)[0])
            pts = pts.drop(columns=["feedback"], errors="ignore")
            if sp.layout == "patient":  # one patient per row, in row order (as derive_patient_outcomes)
                pts[_ROW] = np.sort(res.rows["row"].to_numpy())
            patients.append(pts)
            rejects += [res.rejects, rej2]
            del raw, res

    if len(arm_levels) > 2:
        shown = ", ".join(sorted(_fmt_value(v) for v in arm_levels))
        raise ConfigError(
            f"{sp.where}.columns.arm: column '{file_cols['arm']}' has {len(arm_levels)} levels "
            f"({_one_line(shown, 200)}); expected at most two (feedback and control)"
        )
    table = pd.concat(patients, ignore_index=True) if patients else pd.DataFrame()
    if len(table):
        if sp.layout == "patient":
            table = table.sort_values(_ROW, kind="stable").drop(columns=[_ROW]).reset_index(drop=True)
        else:
            code, _ = pd.factorize(table["patient"], sort=True)
            table = table.iloc[np.argsort(code, kind="stable")].reset_index(drop=True)
        if "arm" in table.columns:
            where = f"datasets.{name}" if name else "dataset"
            table.insert(table.columns.get_loc("arm") + 1, "feedback",
                         _feedback(table["arm"], spec, where).to_numpy(dtype=float))
    rej = [r for r in rejects if len(r)]
    rej_all = (pd.concat(rej, ignore_index=True).sort_values("row", kind="stable").reset_index(drop=True)
               if rej else pd.DataFrame({c: pd.Series(dtype=object) for c in REJECT_COLUMNS}))
    if recoded:
        notes.append(f"{recoded} patient(s) seen by more than one therapist were assigned to the therapist "
                     "with most sessions (ties: first session)")
    if shared:
        notes.append(f"{shared} patient ID(s) occur on more than one row with different data; they are kept "
                     "as separate patients")
    acc = accounting(rows_read, rej_all)
    if acc["rows_rejected"]:
        parts = "; ".join(f"{r}: {v}" for r, v in acc["rejected_by_reason"].items())
        warnings.warn(f"{path}: {acc['rows_rejected']} of {rows_read} rows rejected ({parts})", DataWarning,
                      stacklevel=2)
    return StreamedResult(patients=table, rejects=rej_all, rows_read=rows_read, notes=notes, partitions=k)
