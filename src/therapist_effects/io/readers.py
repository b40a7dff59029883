"""Reading exports (CSV, Parquet, Excel): the header first, then only the columns asked for.

:func:`read_header` returns a file's column names (blanks collapsed) without reading its rows;
:func:`read_columns` reads the rows of the named columns only, every CSV cell as text. CSV files are
read by pyarrow's parser on one thread, as the rules declare (``threads: 1``), falling back to pandas'
parser for files with short rows, which pyarrow refuses. A file with duplicate column names, more than
:data:`MAX_COLUMNS` columns, a header line longer than :data:`MAX_HEADER_BYTES`, or text that is not UTF-8
is refused with one line naming the file, before its rows are read: pathological files cost bounded time and memory.

Row numbers: the header is row 1 and the first data row row 2 (blank lines inside the file keep
their number; blank lines before the header and at the end of the table are not rows).
"""

from __future__ import annotations

import codecs
import csv
import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..exceptions import InputError

__all__ = ["MAX_COLUMNS", "MAX_HEADER_BYTES", "read_columns", "read_header", "file_kind"]

#: Most columns a file may have (Excel's own limit); wider files are refused before reading rows.
MAX_COLUMNS = 16384
#: Longest header line read (bytes).
MAX_HEADER_BYTES = 4 * 1024 * 1024

_EXTENSIONS = {".csv": "csv", ".parquet": "parquet", ".xlsx": "excel", ".xlsm": "excel", ".xls": "excel"}
_TEXT = pd.StringDtype("pyarrow", na_value=np.nan)


def _one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def norm_name(name: object) -> str:
    """A column name as compared with the config: surrounding blanks stripped, inner runs collapsed."""
    return " ".join(str(name).split())


def file_kind(p: Path) -> str:
    kind = _EXTENSIONS.get(p.suffix.lower())
    if kind is None:
        raise InputError(
            f"cannot read {p}: unknown file type '{p.suffix}'; expected .csv, .parquet, .xlsx or .xls"
        )
    if not p.is_file():
        raise InputError(f"cannot read {p}: no such file" if not p.exists() else f"cannot read {p}: not a file")
    return kind


def _utf8_error(p: Path) -> InputError:
    """The first byte of ``p`` that is not UTF-8 (offset from the start of the file), in bounded memory."""
    base, carry = 0, b""
    with open(p, "rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            buf = carry + chunk
            try:
                buf.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as err:
                if chunk and err.reason == "unexpected end of data":
                    carry = buf[err.start:]  # a character cut by the chunk boundary
                    base += err.start
                    continue
                return InputError(
                    f"cannot read {p}: not UTF-8 text (byte 0x{buf[err.start]:02x} at offset "
                    f"{base + err.start}); save the file as CSV UTF-8"
                )
            if not chunk:
                break
            base += len(buf)
    return InputError(f"cannot read {p}: not UTF-8 text; save the file as CSV UTF-8")


def _csv_header(p: Path) -> tuple[list[str], str, int, int]:
    """Header names, delimiter, leading blank lines to skip, and the header's byte length."""
    with open(p, "rb") as fh:
        head = fh.read(MAX_HEADER_BYTES + 1)
    if head.startswith(codecs.BOM_UTF8):
        head = head[len(codecs.BOM_UTF8):]
    if not head.strip():
        raise InputError(f"cannot read {p}: the file is empty")
    stripped = head.lstrip(b"\r\n")
    skip = head[: len(head) - len(stripped)].replace(b"\r\n", b"\n").count(b"\n") + \
        head[: len(head) - len(stripped)].replace(b"\r\n", b"\n").count(b"\r")
    head = stripped
    end = min((i for i in (head.find(b"\n"), head.find(b"\r")) if i >= 0), default=-1)
    if end < 0:
        if len(head) > MAX_HEADER_BYTES:
            seps = max(head.count(c) for c in (b",", b";", b"\t", b"|"))
            if seps >= MAX_COLUMNS:
                raise InputError(
                    f"cannot read {p}: the header has more than {MAX_COLUMNS} columns; at most {MAX_COLUMNS} "
                    "are supported (check the delimiter and the export)"
                )
            raise InputError(
                f"cannot read {p}: the first line is longer than {MAX_HEADER_BYTES // (1 << 20)} MiB; "
                "not a table with a header row"
            )
        end = len(head)
    first = head[:end]
    try:
        text = first.decode("utf-8")
    except UnicodeDecodeError:
        raise _utf8_error(p) from None
    sep = ","
    if "," not in text:
        for cand in (";", "\t", "|"):
            if cand in text:
                sep = cand
                break
    ncols = text.count(sep) + 1
    if ncols > MAX_COLUMNS:
        raise InputError(
            f"cannot read {p}: the header has {ncols} columns; at most {MAX_COLUMNS} are supported "
            "(check the delimiter and the export)"
        )
    try:
        csv.field_size_limit(max(csv.field_size_limit(), MAX_HEADER_BYTES))
        names = next(csv.reader(io.StringIO(text, newline=""), delimiter=sep))
    except (csv.Error, StopIteration) as err:
        raise InputError(f"cannot read {p}: unreadable header line ({_one_line(err)})") from None
    return [norm_name(c) for c in names], sep, skip, end


def _excel_raw(p: Path, sheet: str | int | None) -> pd.DataFrame:
    return pd.read_excel(p, sheet_name=0 if sheet is None else sheet, dtype=object, header=None)


def read_header(path: str | Path, *, sheet: str | int | None = None) -> list[str]:
    """Column names of a file (blanks collapsed); refuses duplicate names with one line."""
    p = Path(path)
    kind = file_kind(p)
    try:
        if kind == "csv":
            names = _csv_header(p)[0]
        elif kind == "parquet":
            import pyarrow.parquet as pq

            names = [norm_name(c) for c in pq.read_schema(p).names]
        else:
            raw = _excel_raw(p, sheet)
            names = [norm_name(c) for c in _excel_header(raw)]
    except InputError:
        raise
    except ImportError as err:
        raise InputError(f"cannot read {p}: {_one_line(err)}") from None
    except Exception as err:  # any parser failure becomes one line naming the file
        raise InputError(f"cannot read {p}: {type(err).__name__}: {_one_line(err)}") from None
    check_unique(names, str(p))
    return names


def check_unique(names: Sequence[str], source: str) -> None:
    seen: set[str] = set()
    for c in names:
        if c in seen:
            raise InputError(
                f"file {source} has two columns named '{_one_line(c, 100)}'; rename one of them"
            )
        seen.add(c)


def _excel_header(raw: pd.DataFrame) -> list[str]:
    nonblank = raw.notna().any(axis=1).to_numpy()
    if not nonblank.any():
        return []
    first = int(np.flatnonzero(nonblank)[0])
    return ["" if pd.isna(v) else str(v) for v in raw.iloc[first].tolist()]


def _read_csv_arrow(p: Path, names: list[str], sep: str, skip: int, header_len: int,
                    positions: list[int]) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    auto = [f"c{i}" for i in range(len(names))]
    keep = [auto[i] for i in positions]
    long_rows: list = []

    def _invalid(row):  # a row with more fields than the header: refused (fields would be lost)
        if row.actual_columns > row.expected_columns:
            long_rows.append(row)
        return "error"

    try:
        table = _arrow_read(pcsv, pa, p, auto, keep, sep, skip, header_len, _invalid, _has_quote(p))
    except pa.ArrowInvalid:
        if long_rows:
            r = long_rows[0]
            raise InputError(
                f"cannot read {p}: a row has {r.actual_columns} fields but the header has "
                f"{r.expected_columns} ({_one_line(r.text, 80)}); check the delimiter and quoting"
            ) from None
        raise
    df = table.to_pandas(types_mapper=lambda t: _TEXT if t == pa.large_string() else None)
    df.columns = [names[i] for i in positions]
    return df


def _has_quote(p: Path) -> bool:
    """Whether the file holds a double quote anywhere: only then can a value span lines (a memchr scan)."""
    import mmap

    with open(p, "rb") as fh:
        try:
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return mm.find(b'"') >= 0
        except (ValueError, OSError):  # an empty file, or one that cannot be mapped
            return True


def _arrow_read(pcsv, pa, p, auto, keep, sep, skip, header_len, invalid, quoted=True):
    # One thread: on a shared machine the parser's thread pool costs more CPU than it saves in wall time
    # (1.3M rows: 0.19 s CPU single-threaded, 0.4-0.6 s threaded). Without any quote in the file no value
    # can hold a line break, and the parser can split blocks at line ends without tracking quotes.
    return pcsv.read_csv(
        p,
        read_options=pcsv.ReadOptions(column_names=auto, skip_rows=skip + 1, use_threads=False,
                                      block_size=max(1 << 22, 2 * header_len + 1024)),
        parse_options=pcsv.ParseOptions(delimiter=sep, newlines_in_values=quoted, ignore_empty_lines=False,
                                        invalid_row_handler=invalid),
        # large_string: what pandas' str dtype holds (plain string columns would be copied into it)
        convert_options=pcsv.ConvertOptions(include_columns=keep, column_types={c: pa.large_string() for c in keep},
                                            strings_can_be_null=False, quoted_strings_can_be_null=False),
    )


def _read_csv_pandas(p: Path, names: list[str], sep: str, positions: list[int]) -> pd.DataFrame:
    with warnings.catch_warnings():
        # a data row with more fields than the header would otherwise be silently truncated
        warnings.simplefilter("error", pd.errors.ParserWarning)
        df = pd.read_csv(p, sep=sep, dtype=str, keep_default_na=False, na_values=[""],
                         skip_blank_lines=False, index_col=False, encoding="utf-8-sig", header=0)
    # pandas skips blank lines before the header itself
    if len(df.columns) != len(names):
        raise InputError(f"cannot read {p}: the header has {len(names)} columns but pandas read "
                         f"{len(df.columns)}")
    df.columns = names
    return df[[names[i] for i in positions]].astype(_TEXT)


def read_columns(path: str | Path, columns: Sequence[str] | None = None, *,
                 sheet: str | int | None = None) -> pd.DataFrame:
    """The rows of ``columns`` (all columns when None) of a CSV, Parquet or Excel file.

    CSV cells are text (pandas' ``str`` dtype, NaN for nothing at all); Excel cells keep their
    typed values (text, number, date); Parquet columns their stored types. Column names are
    returned as :func:`read_header` gives them; blank rows at the end of the table are dropped.
    """
    p = Path(path)
    kind = file_kind(p)
    try:
        if kind == "csv":
            names, sep, skip, header_len = _csv_header(p)
            check_unique(names, str(p))
            wanted = list(names) if columns is None else list(columns)
            positions = [names.index(c) for c in wanted]
            try:
                df = _read_csv_arrow(p, names, sep, skip, header_len, positions)
            except InputError:
                raise
            except Exception as err:  # noqa: BLE001 - pyarrow's errors are not typed finely
                if "UTF8" in str(err) or "UTF-8" in str(err):
                    raise _utf8_error(p) from None
                # pyarrow refuses rows with fewer fields than the header; pandas pads them
                df = _read_csv_pandas(p, names, sep, positions)
        elif kind == "parquet":
            import pyarrow.parquet as pq

            file_names = pq.read_schema(p).names
            normed = [norm_name(c) for c in file_names]
            check_unique(normed, str(p))
            wanted = normed if columns is None else list(columns)
            df = pd.read_parquet(p, columns=[file_names[normed.index(c)] for c in wanted])
            df.columns = wanted
        else:
            raw = _excel_raw(p, sheet)
            nonblank = raw.notna().any(axis=1).to_numpy()
            first = int(np.flatnonzero(nonblank)[0]) if nonblank.any() else 0
            names = [norm_name(c) for c in _excel_header(raw)]
            check_unique(names, str(p))
            wanted = names if columns is None else list(columns)
            body = raw.iloc[first + 1:].reset_index(drop=True)
            df = body.iloc[:, [names.index(c) for c in wanted]]
            df.columns = wanted
    except InputError:
        raise
    except UnicodeDecodeError:
        raise _utf8_error(p) from None
    except ImportError as err:
        raise InputError(f"cannot read {p}: {_one_line(err)}") from None
    except Exception as err:  # any parser failure becomes one line naming the file
        raise InputError(f"cannot read {p}: {type(err).__name__}: {_one_line(err)}") from None
    return drop_trailing_empty(df.reset_index(drop=True))


_NA_TOKENS = ("", "na", "n/a", "nan", "null", "#n/a", "<na>", "nat")


def missing_mask(s: pd.Series) -> np.ndarray:
    """True where a cell is missing: nothing, blank, or an NA token (any case)."""
    if s.dtype == _TEXT or pd.api.types.is_string_dtype(s.dtype) and s.dtype != object:
        t = s.str.strip().str.lower()
        return (s.isna() | t.isin(_NA_TOKENS)).to_numpy(dtype=bool)
    from .ingest import _is_missing_scalar

    if s.dtype == object:
        return np.fromiter((_is_missing_scalar(v) for v in s.to_numpy(dtype=object)), dtype=bool,
                           count=len(s))
    return s.isna().to_numpy(dtype=bool)


def drop_trailing_empty(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` without its blank rows at the end (looked for from the end, block by block)."""
    if df.empty or len(df.columns) == 0:
        return df
    end = len(df)
    block = 256
    while end > 0:
        start = max(0, end - block)
        part = df.iloc[start:end]
        empty = np.ones(len(part), dtype=bool)
        for col in part.columns:
            empty &= missing_mask(part[col])
        nonempty = np.flatnonzero(~empty)
        if nonempty.size:
            end = start + int(nonempty[-1]) + 1
            break
        end = start
        block *= 4
    return df.iloc[:end].reset_index(drop=True) if end < len(df) else df.reset_index(drop=True)
