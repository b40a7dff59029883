"""Hostile and faulty input (issue 10): a table of cases, each ending in a clear one-line error or in
correct output with every input row accounted for.

The table (``CASES``) covers encodings, delimiters, duplicate headers, empty and wide files,
formula / HTML injections in every text column, path-like dataset and model names, weak
pseudonymisation keys, model outcomes that do not exist, and clusters that cannot be estimated.
File-system faults follow: a full output directory (a 256 KiB tmpfs mounted for the test when the
machine allows it, else ENOSPC simulated by a patched ``open``; the test says which in its output),
and a read-only one. Workflow-level cases last: a weak key stops the run before ingestion, a dataset
named ``..`` is refused without touching the input, and a one-therapist cluster no longer stops
``estimates.json``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
import yaml

from therapist_effects.config import load_config
from therapist_effects.io.csvsafe import DANGEROUS_PREFIXES
from therapist_effects.exceptions import ConfigError, InputError, PseudonymisationError
from therapist_effects.io.ingest import accounting, ingest_dataset
from therapist_effects.io.outcomes import derive_patient_outcomes, write_patient_outputs, write_rejects
from therapist_effects.io.readers import MAX_COLUMNS
from therapist_effects.safety import MIN_KEY_LENGTH, check_key, check_paths

pytestmark = pytest.mark.filterwarnings("ignore::therapist_effects.exceptions.DataWarning")

REPO = Path(__file__).resolve().parents[1]
GOOD_KEY = "test-key-not-secret-0001"

SESSION = {"layout": "session", "instrument": "PHQ-9",
           "columns": {"patient": "pid", "therapist": "tid", "occasion": "session", "score": "phq9"}}
FULL = {"layout": "session", "instrument": "PHQ-9",
        "columns": {"patient": "pid", "therapist": "tid", "occasion": "session", "score": "phq9",
                    "arm": "fb", "cluster": "site", "ending": "ending", "covariates": ["sex"]}}
PATIENT = {"layout": "patient", "instrument": "PHQ-9",
           "columns": {"patient": "pid", "therapist": "tid", "outcome": "post", "baseline": "pre"}}

GOOD_ROWS = "A,T1,1,12\nA,T1,2,8\nB,T2,1,20\nB,T2,2,15\n"
HEADER = "pid,tid,session,phq9\n"


def full_table(**override: str) -> str:
    """A small session table with every text role; ``override`` replaces one column's text values."""
    rows = []
    for i, (p, t) in enumerate([("P1", "T1"), ("P2", "T1"), ("P3", "T2"), ("P4", "T2")]):
        for s in (1, 2):
            rows.append({"pid": p, "tid": t, "session": s, "phq9": 15 - 3 * s + i, "fb": i % 2,
                         "site": "S1", "ending": "completed" if s == 2 else "", "sex": "F" if i % 2 else "M"})
    df = pd.DataFrame(rows)
    for col, value in override.items():
        df[col] = value
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    return buf.getvalue()


@dataclass
class Case:
    id: str
    content: bytes | str | Callable[[Path], Path]
    spec: dict = field(default_factory=lambda: SESSION)
    error: type | None = None          # expected error type, or None for correct output
    fragment: str = ""                 # in the error message, or a check on the output
    check: Callable[[Any], None] | None = None
    suffix: str = ".csv"


def _rows(n_cols_extra: int) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        p = tmp / "wide.csv"
        extra = "," * n_cols_extra
        with open(p, "w", encoding="utf-8") as fh:
            fh.write("pid,tid,session,phq9" + "".join(f",x{i}" for i in range(n_cols_extra)) + "\n")
            for line in GOOD_ROWS.splitlines():
                fh.write(line + extra + "\n")
        return p
    return make


def _long_header(tmp: Path) -> Path:
    p = tmp / "longline.csv"
    p.write_bytes(b"x" * (5 * 1024 * 1024))  # one 5 MiB line, no newline: no header row
    return p


def _million_empty_columns(tmp: Path) -> Path:
    """The reviewer's file: 82 rows and 1.1 million empty extra columns (~90 MB)."""
    p = tmp / "million.csv"
    extra = "," * 1_100_000
    with open(p, "w", encoding="utf-8") as fh:
        fh.write("pid,tid,session,phq9" + extra + "\n")
        for i in range(82):
            fh.write(f"P{i // 2},T1,{i % 2 + 1},12" + extra + "\n")
    return p


def _late_bad_byte(tmp: Path) -> Path:
    p = tmp / "late.csv"
    body = (HEADER + GOOD_ROWS * 30000).encode()  # ~0.5 MB of good rows, then one bad byte
    p.write_bytes(body + b"C,T1,1,\xff\n")
    return p


def _parquet(tmp: Path) -> Path:
    p = tmp / "d.parquet"
    pd.DataFrame({"pid": ["A", "A", "=B", "=B"], "tid": [1, 1, 2, 2], "session": [1, 2, 1, 2],
                  "phq9": [12.0, 8.0, np.inf, 3.0]}).to_parquet(p)
    return p


def kept(n: int) -> Callable[[Any], None]:
    def check(r):
        assert len(r.rows) == n, r.rejects
    return check


def rejected_for(reason: str, n: int = 1) -> Callable[[Any], None]:
    def check(r):
        assert (r.rejects["reason"].str.startswith(reason)).sum() == n, r.rejects
    return check


def ids_are(col: str, values: set) -> Callable[[Any], None]:
    def check(r):
        assert set(r.rows[col]) == values, r.rows
    return check


INJECTIONS = ["=1+1", "@SUM(A1:A9)", "+cmd|' /C calc'!A0", "-2+3+cmd", "\t=1", "=HYPERLINK(\"http://x\")"]
TEXT_COLUMNS = ["pid", "tid", "site", "ending", "sex", "fb"]

CASES = [
    # --- encodings -------------------------------------------------------------------------------
    Case("latin1", (HEADER + "Jos\xe9,T1,1,12\n").encode("latin-1"), error=InputError,
         fragment="not UTF-8 text (byte 0xe9 at offset 24)"),
    Case("utf16", (HEADER + GOOD_ROWS).encode("utf-16"), error=InputError, fragment="not UTF-8 text"),
    Case("late-bad-byte", _late_bad_byte, error=InputError, fragment="not UTF-8 text (byte 0xff"),
    Case("utf8-bom", b"\xef\xbb\xbf" + (HEADER + GOOD_ROWS).encode(), check=kept(4)),
    Case("crlf", (HEADER + GOOD_ROWS).replace("\n", "\r\n"), check=kept(4)),
    Case("cr-only", (HEADER + GOOD_ROWS).replace("\n", "\r"), check=kept(4)),
    Case("unicode-ids", HEADER + "Ünïcødé,治疗师,1,12\nÜnïcødé,治疗师,2,8\n", check=ids_are("therapist", {"治疗师"})),
    Case("nul-byte-in-id", HEADER + "A\x00B,T1,1,12\nA\x00B,T1,2,8\n", check=ids_are("patient", {"A\x00B"})),
    # --- delimiters and quoting ------------------------------------------------------------------
    Case("semicolon", (HEADER + GOOD_ROWS).replace(",", ";"), check=kept(4)),
    Case("tab", (HEADER + GOOD_ROWS).replace(",", "\t"), check=kept(4)),
    Case("pipe", (HEADER + GOOD_ROWS).replace(",", "|"), check=kept(4)),
    Case("quoted-comma-newline", HEADER + '"A,1",T1,1,12\n"A,1","T1",2,8\n"B\nC",T2,1,3\n"B\nC",T2,2,2\n',
         check=ids_are("patient", {"A,1", "B\nC"})),
    Case("too-many-fields", HEADER + "A,T1,1,12,oops\n", error=InputError, fragment="5 fields but the header has 4"),
    Case("too-few-fields", HEADER + "A,T1,1,12\nA,T1,2\n", check=rejected_for("missing value")),
    Case("unbalanced-quote", HEADER + 'A,T1,1,12\n"A,T1,2,8\n', error=InputError, fragment="cannot read"),
    # --- duplicate headers -----------------------------------------------------------------------
    Case("duplicate-configured", "pid,tid,session,phq9,phq9\nA,T1,1,12,3\n", error=InputError,
         fragment="has two columns named 'phq9'"),
    Case("duplicate-unused", "pid,tid,session,phq9,note,note\nA,T1,1,12,,\n", error=InputError,
         fragment="has two columns named 'note'"),
    Case("duplicate-after-blanks", "pid,tid,session,phq9, phq9 \nA,T1,1,12,3\n", error=InputError,
         fragment="has two columns named 'phq9'"),
    Case("duplicate-patient-layout", "pid,tid,pre,post,post\nA,T1,12,3,4\n", spec=PATIENT, error=InputError,
         fragment="has two columns named 'post'"),
    # --- empty and wide files --------------------------------------------------------------------
    Case("empty-file", b"", error=InputError, fragment="the file is empty"),
    Case("blank-file", "\n\n  \n", error=InputError, fragment="the file is empty"),
    Case("header-only", HEADER, error=InputError, fragment="has no data rows (only a header)"),
    Case("header-and-blank-lines", HEADER + "\n,,,\n\n", error=InputError, fragment="has no data rows"),
    Case("patient-header-only", "pid,tid,pre,post\n", spec=PATIENT, error=InputError, fragment="no data rows"),
    Case("too-wide", _rows(MAX_COLUMNS + 10), error=InputError, fragment=f"at most {MAX_COLUMNS} are supported"),
    Case("wide-but-allowed", _rows(5000), check=kept(4)),
    Case("million-empty-columns", _million_empty_columns, error=InputError,
         fragment=f"1100004 columns; at most {MAX_COLUMNS} are supported"),
    Case("one-huge-line", _long_header, error=InputError, fragment="the first line is longer than"),
    Case("blank-lines-before-header", "\n\n" + HEADER + GOOD_ROWS, check=kept(4)),
    Case("missing-column", "pid,tid,session,score\nA,T1,1,12\n", error=InputError,
         fragment="has no column 'phq9' (columns.score)"),
    # --- values ------------------------------------------------------------------------------------
    Case("na-tokens", HEADER + "A,T1,1,12\nA,T1,2,NA\nA,T1,3,n/a\nA,T1,4,#N/A\nA,T1,5,NULL\nA,T1,6,8\n",
         check=rejected_for("missing value", 4)),
    Case("huge-number", HEADER + "A,T1,1,12\nA,T1,2,1e999\nA,T1,3,8\n", check=rejected_for("not a finite number")),
    Case("formula-score", HEADER + "A,T1,1,12\nA,T1,2,=27\nA,T1,3,8\n", check=rejected_for("not a number")),
    Case("impossible-date", "pid,tid,session,phq9\nA,T1,2023-01-05,12\nA,T1,2023-02-30,9\nA,T1,2023-03-01,8\n",
         check=rejected_for("unparseable date")),
    Case("parquet-typed", _parquet, suffix=".parquet", check=rejected_for("not a finite number")),
    Case("html-in-ids", HEADER + "<script>alert(1)</script>,<b>T</b>,1,12\n<script>alert(1)</script>,<b>T</b>,2,8\n",
         check=ids_are("therapist", {"<b>T</b>"})),
    # --- injections in every text column: ingested as text, written neutralised (checked below) --
    *[Case(f"inject-{col}-{i}", full_table(**{col: inj}), spec=FULL, check=None)
      for col in TEXT_COLUMNS for i, inj in enumerate(INJECTIONS[:2])],
    Case("inject-rejected-value", HEADER + "A,T1,1,12\nA,T1,2,=1+1\nA,T1,3,-2\nA,T1,4,8\n",
         check=rejected_for("not a number")),
]


def _materialise(case: Case, tmp_path: Path) -> Path:
    if callable(case.content):
        return case.content(tmp_path)
    p = tmp_path / f"data{case.suffix}"
    if isinstance(case.content, bytes):
        p.write_bytes(case.content)
    else:
        p.write_bytes(case.content.encode("utf-8"))
    return p


def _read_back(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def _assert_no_formula_cells(path: Path) -> None:
    """Every cell of a written CSV is safe: no text starting with = + - @ tab CR, except plain numbers."""
    import re

    number = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
    for row in _read_back(path):
        for cell in row:
            assert not cell.startswith(DANGEROUS_PREFIXES) or number.fullmatch(cell), (path.name, cell)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, tmp_path):
    path = _materialise(case, tmp_path)
    if case.error is not None:
        t0 = time.perf_counter()
        with pytest.raises(case.error) as err:
            ingest_dataset(path, case.spec)
        msg = str(err.value)
        assert "\n" not in msg and case.fragment in msg, msg
        assert str(path) in msg
        assert time.perf_counter() - t0 < 30  # bounded time, even for the pathological files
        return
    r = ingest_dataset(path, case.spec)
    # balanced row accounting: every input row is kept or rejected, exactly once
    assert r.rows_read == len(r.rows) + len(r.rejects)
    assert set(r.rows["row"]).isdisjoint(r.rejects["row"])
    assert set(r.rows["row"]) | set(r.rejects["row"]) == set(range(2, r.rows_read + 2))
    if case.check is not None:
        case.check(r)
    # the patient outcomes keep the accounting; every CSV written is free of formulas
    patients, rej2 = derive_patient_outcomes(r.rows, case.spec, r.instrument)
    rejects = pd.concat([r.rejects, rej2], ignore_index=True)
    acc = accounting(r.rows_read, rejects)
    assert acc["rows_used"] + acc["rows_rejected"] == acc["rows_read"]
    write_patient_outputs(patients, tmp_path / "p.parquet", tmp_path / "p.csv")
    write_rejects(rejects, tmp_path / "rejects.csv")
    for out in ("p.csv", "rejects.csv"):
        _assert_no_formula_cells(tmp_path / out)
    if case.id.startswith("inject-") and case.id != "inject-rejected-value":
        inj = INJECTIONS[int(case.id.rsplit("-", 1)[1])]
        col = case.id.split("-")[1]
        text = (tmp_path / "p.csv").read_text(encoding="utf-8")
        role = {"pid": "patient", "tid": "therapist", "site": "cluster", "fb": "arm", "sex": "sex",
                "ending": None}[col]
        if role is not None:  # the value arrives, neutralised, in the patient table
            assert "'" + inj in text, text[:300]
    if case.id == "inject-rejected-value":
        rows = _read_back(tmp_path / "rejects.csv")
        values = {r[0]: r[3] for r in rows[1:]}
        assert values["3"] == "'=1+1"  # a formula is neutralised ...
        assert values["4"] == "-2"     # ... a plain negative number is not (issue 10, item 8)


# --------------------------------------------------------------------------------------------------
# configuration: path-like names, inputs inside output folders, weak keys, model outcomes
# --------------------------------------------------------------------------------------------------
def _cfg(name: str = "d", path: str = "data.csv", models: list | None = None) -> dict:
    cfg = {"datasets": {name: {"path": path, "layout": "session", "columns": SESSION["columns"]}}}
    if models is not None:
        cfg["models"] = models
    return cfg


@pytest.mark.parametrize("name, fragment", [
    ("..", "'..' cannot be a dataset name"),
    (".", "'.' cannot be a dataset name"),
    (".hidden", "'.hidden' cannot be a dataset name"),
    ("../x", "does not match"),
    ("a/b", "does not match"),
    ("meta", "'meta' is reserved"),
])
def test_path_like_dataset_names_are_refused(name, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(_cfg(name), source="my.yaml")
    assert fragment in str(err.value) and "\n" not in str(err.value) and str(err.value).startswith("my.yaml: ")


@pytest.mark.parametrize("mid, fragment", [("..", "cannot be a model id"), ("a/b", "does not match"),
                                           ("../../x", "does not match")])
def test_path_like_model_ids_are_refused(mid, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(_cfg(models=[{"id": mid, "type": "random_intercept"}]))


@pytest.mark.parametrize("where", ["results/d/patients.csv", "results/x.csv", "logs/d.csv", "results"])
def test_an_input_inside_an_output_folder_is_refused(tmp_path, where):
    cfg = load_config(_cfg(path=where))
    with pytest.raises(ConfigError, match="lies inside the output folder"):
        check_paths(cfg, tmp_path)
    check_paths(load_config(_cfg(path="data/sessions.csv")), tmp_path)  # elsewhere: fine


@pytest.mark.parametrize("target", ["directory", "missing"])
def test_config_file_that_is_a_directory_or_missing_is_one_line(tmp_path, target):
    # Snakemake itself reads --configfile before the Snakefile runs (a traceback we cannot catch
    # there); `validate-config` gives the one line, as config/README.md says
    path = tmp_path if target == "directory" else tmp_path / "nope.yaml"
    proc = subprocess.run([sys.executable, "-m", "therapist_effects", "validate-config", str(path)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "cannot read the config file" in lines[0]


@pytest.mark.parametrize("key", ["", "a", "ab", "x" * (MIN_KEY_LENGTH - 1)])
def test_weak_keys_are_refused_with_advice(key):
    with pytest.raises(PseudonymisationError) as err:
        check_key("K", environ={"K": key})
    msg = str(err.value)
    assert "\n" not in msg and "secrets.token_urlsafe(32)" in msg and "K" in msg


def test_a_sixteen_character_key_is_accepted():
    assert check_key("K", environ={"K": "x" * MIN_KEY_LENGTH}) == b"x" * MIN_KEY_LENGTH


def test_model_outcome_errors_name_the_model_key(tmp_path):
    from therapist_effects.pipeline import _check_model_outcomes

    data = tmp_path / "d.csv"
    data.write_text(HEADER + GOOD_ROWS)
    cfg = load_config(_cfg(path=str(data), models=[{"id": "ri", "type": "random_intercept"},
                                                   {"id": "x", "type": "random_intercept", "outcome": "nope"}]))
    with pytest.raises(InputError) as err:
        _check_model_outcomes(cfg, cfg["datasets"]["d"], str(data))
    assert "(models[1].outcome)" in str(err.value) and "columns.covariates" not in str(err.value)
    cfg = load_config(_cfg(path=str(data), models=[{"id": "rec", "type": "random_intercept", "family": "binomial",
                                                    "outcome": "recovered"}]))
    cfg["datasets"]["d"]["instrument"] = None
    with pytest.raises(ConfigError) as err:
        _check_model_outcomes(cfg, cfg["datasets"]["d"], str(data))
    assert str(err.value).startswith("models[0].outcome: 'recovered'") and "instrument" in str(err.value)


def test_a_cluster_with_one_therapist_is_reported_not_fatal():
    from therapist_effects.meta import per_cluster_estimates
    from therapist_effects.simulate import simulate_random_intercept

    df = simulate_random_intercept(20, 15, 0.2, seed=3)
    ther = df["therapist"].astype(str)
    df = df.assign(therapist=ther, cluster=np.where(ther == sorted(ther.unique())[0], "solo", "big"))
    outcome = "y"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        table = per_cluster_estimates(df, outcome, [], therapist="therapist", cluster="cluster")
    solo = table.set_index("cluster").loc["solo"]
    big = table.set_index("cluster").loc["big"]
    assert not solo["estimable"] and "at least two therapists" in solo["not_estimable"] and np.isnan(solo["icc"])
    assert big["estimable"] and 0 <= big["icc"] < 1
    assert any("not estimable" in str(x.message) for x in w)


# --------------------------------------------------------------------------------------------------
# file-system faults: a full and a read-only output directory
# --------------------------------------------------------------------------------------------------
def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                              capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True, timeout=20)


def _ingest_into(out_dir: Path, data: Path, simulate_enospc: bool) -> subprocess.CompletedProcess:
    """Run the ingest step (as the workflow's script does) in a subprocess writing into ``out_dir``."""
    code = f"""
import builtins, errno, os, sys
if {simulate_enospc!r}:
    real_open = builtins.open
    def full_open(file, mode='r', *a, **k):
        if any(m in mode for m in 'wax') and str(file).startswith({str(out_dir)!r}) and not str(file).endswith('.log'):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *a, **k)
    builtins.open = full_open
from therapist_effects.pipeline import ingest_step, run
cfg = {{"models": [], "instruments": {{}}, "datasets": {{}}}}
ds = {json.dumps(SESSION)}
ds["path"] = {str(data)!r}
run(ingest_step, {str(out_dir.parent / 'ingest.log')!r}, data_path={str(data)!r}, dataset=ds, cfg=cfg,
    out_rows={str(out_dir / 'validated.parquet')!r}, out_rejects={str(out_dir / 'ingest_rejects.csv')!r},
    out_summary={str(out_dir / 'ingest.json')!r})
"""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def _big_session_csv(path: Path, n_patients: int = 3000) -> Path:
    rng = np.random.default_rng(1)
    rows = [f"P{i:05d},T{i % 40:02d},{s},{int(rng.integers(0, 28))}" for i in range(n_patients) for s in (1, 2, 3)]
    path.write_text(HEADER + "\n".join(rows) + "\n")
    return path


def test_full_output_directory_is_one_line(tmp_path, capsys):
    data = _big_session_csv(tmp_path / "sessions.csv")
    out = tmp_path / "full"
    mounted = _mount_tmpfs(out, "size=256k")
    try:
        if mounted:
            (out / "filler").write_bytes(b"\0" * (200 * 1024))  # leave ~56 KiB: the outputs do not fit
        with capsys.disabled():
            print(f"\n[full disk: {'a 256 KiB tmpfs' if mounted else 'ENOSPC simulated by a patched open()'}]")
        proc = _ingest_into(out, data, simulate_enospc=not mounted)
    finally:
        if mounted:
            _umount(out)
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "a bug" not in proc.stderr
    assert errors[0].endswith(": No space left on device") and "cannot write " + str(out) in errors[0]


def test_read_only_output_directory_is_one_line(tmp_path):
    data = _big_session_csv(tmp_path / "sessions.csv", 50)
    out = tmp_path / "ro"
    mounted = _mount_tmpfs(out, "ro,size=64k")
    if not mounted:
        pytest.skip("cannot mount a read-only tmpfs here (needs root); root ignores file permissions")
    try:
        proc = _ingest_into(out / "results", data, simulate_enospc=False)
    finally:
        _umount(out)
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert errors[0].endswith("Read-only file system") and "cannot write " in errors[0]


# --------------------------------------------------------------------------------------------------
# the workflow: stops before any work, never overwrites its input, carries on past a bad cluster
# --------------------------------------------------------------------------------------------------
def _snakemake(work: Path, cfg: dict, *args: str, key: str | None = GOOD_KEY) -> subprocess.CompletedProcess:
    path = work / "my.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "TE_PSEUDONYM_KEY"}
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    if key is not None:
        env["TE_PSEUDONYM_KEY"] = key
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "1",
           "--directory", str(work), *args, "--configfile", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.parametrize("key, fragment", [(None, "is not set"), ("a", "1-character key")])
def test_workflow_stops_before_ingestion_without_a_good_key(tmp_path, key, fragment):
    data = tmp_path / "sessions.csv"
    data.write_text(HEADER + GOOD_ROWS)
    proc = _snakemake(tmp_path, _cfg(path=str(data)), key=key)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "TE_PSEUDONYM_KEY" in ln]
    assert len(lines) == 1 and fragment in lines[0] and "secrets.token_urlsafe(32)" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()  # no work done


def test_workflow_refuses_dataset_dotdot_and_keeps_the_input(tmp_path):
    data = tmp_path / "patients.csv"
    data.write_text("pid,tid,pre,post\nA,T1,12,3\nB,T2,14,6\n")
    before = data.read_bytes()
    cfg = {"datasets": {"..": {"path": "patients.csv", "layout": "patient", "columns": PATIENT["columns"]}}}
    proc = _snakemake(tmp_path, cfg)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "config error" in ln]
    assert len(lines) == 1 and "'..' cannot be a dataset name" in lines[0], proc.stderr
    assert data.read_bytes() == before


def test_workflow_writes_estimates_despite_a_one_therapist_cluster(tmp_path):
    from therapist_effects.simulate import PracticeSimulation, simulate_practice

    sessions, _ = simulate_practice(PracticeSimulation(n_services=3, therapists_per_service=6, mean_caseload=12,
                                                       seed=5))
    solo = sessions["therapist_id"] == sessions["therapist_id"].iloc[0]
    sessions.loc[solo, "service"] = "SOLO"
    data = tmp_path / "sessions.csv"
    sessions.to_csv(data, index=False)
    cfg = {"datasets": {"svc": {"path": str(data), "layout": "session", "instrument": "PHQ-9",
                                "export_date": "2030-01-01",
                                "columns": {"patient": "patient_id", "therapist": "therapist_id", "score": "phq9",
                                            "occasion": "session", "cluster": "service"}}},
           "models": [{"id": "ri", "type": "random_intercept", "interval": "wald"}]}
    proc = _snakemake(tmp_path, cfg, "results/svc/estimates.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    est = json.loads((tmp_path / "results" / "svc" / "estimates.json").read_text())
    assert "ri" in est["models"]
    table = pd.read_csv(tmp_path / "results" / "svc" / "per_cluster.csv")
    solo_row = table[table["cluster"] == "SOLO"].iloc[0]
    assert not solo_row["estimable"] and "two therapists" in solo_row["not_estimable"]
    assert est["meta"]["n_clusters"] == 4 and est["meta"]["n_clusters_pooled"] == 3


# --------------------------------------------------------------------------------------------------
# internal outputs are marked; the service report is the one to share; provenance says what it is
# --------------------------------------------------------------------------------------------------
def test_research_report_is_marked_internal_and_service_report_shareable(tmp_path, monkeypatch):
    from test_report_inputs import simulated_inputs

    from therapist_effects.report import research_report, service_report

    monkeypatch.setenv("TE_PSEUDONYM_KEY", GOOD_KEY)
    inp = simulated_inputs()
    research = research_report(inp["estimates"], inp["patients"], inp["therapists"], inp["rejects"],
                               tmp_path / "report.html").read_text(encoding="utf-8")
    service = service_report(inp["estimates"], inp["patients"], inp["therapists"],
                             tmp_path / "therapist_report.html").read_text(encoding="utf-8")
    assert 'class="internal-banner"' in research and "INTERNAL: not for circulation" in research
    assert research.index('class="internal-banner"') < research.index("<h1>")  # first thing on the page
    assert 'class="internal-banner"' not in service and 'id="shareable"' in service and "Shareable" in service
    for caption, word in [("research_report.rst", "Internal: not for circulation"),
                          ("therapists.rst", "Internal: not for circulation"),
                          ("therapist_report.rst", "Shareable")]:
        assert (REPO / "workflow" / "report" / caption).read_text().startswith(f"**{word}")


def test_provenance_command_is_labelled_a_suggestion():
    from therapist_effects.models.fitting import assemble_estimates

    cfg = load_config(_cfg(path=str(REPO / "data" / "demo_sessions.csv")))
    patients = pd.DataFrame({"patient": ["a", "b"], "therapist": ["x", "y"], "end": [1.0, 2.0]})
    acc = {"rows_read": 2, "rows_used": 2, "rows_rejected": 0, "rejected_by_reason": {}}
    est = assemble_estimates("d", cfg["datasets"]["d"], cfg, acc, patients, {}, {}, configfiles=["/x/my.yaml"])
    prov = est["provenance"]
    assert prov["command"] == "snakemake --cores 2 --configfile /x/my.yaml"  # unchanged field
    assert "suggested command" in prov["command_note"] and "not a record" in prov["command_note"]


def _separated_binary_data():
    """6 therapists x 12 patients; every patient with z = 1 recovered: the logistic coefficient of z
    has no finite maximum (complete separation on z = 1)."""
    rng = np.random.default_rng(0)
    n = 72
    t = np.repeat(np.arange(6), 12)
    z = (np.arange(n) % 4 == 0).astype(float)
    y = np.where(z == 1, 1.0, rng.integers(0, 2, n).astype(float))
    return y, np.column_stack([np.ones(n), z]), t


def test_separated_binary_outcome_is_a_one_line_model_error():
    from therapist_effects.exceptions import ModelError
    from therapist_effects.models.glmm import LogisticRandomInterceptModel

    y, X, t = _separated_binary_data()
    with pytest.raises(ModelError, match="separated") as err:
        LogisticRandomInterceptModel(y, X, t).fit()
    assert "\n" not in str(err.value)
    # without the separating covariate the same data fit
    assert LogisticRandomInterceptModel(y, X[:, :1], t).fit().converged


def test_bootstrap_counts_a_refit_that_raises_a_model_error_as_failed():
    from therapist_effects.engine.inference import parametric_bootstrap
    from therapist_effects.exceptions import ModelError

    def refit(i):
        if i % 3 == 0:
            raise ModelError("separated resample")
        return {"x": float(i)}

    counter = iter(range(9))
    res = parametric_bootstrap(lambda rng: next(counter), refit, 9, seed=1, columns=["x"])
    assert res.n_failed == 3
    assert res.draws["x"].isna().sum() == 3


def _rows_with_covariate(tmp_path, name):
    path = tmp_path / "rows.csv"
    pd.DataFrame({"patient_id": ["p1", "p1", "p2", "p2"], "therapist_id": ["t1", "t1", "t2", "t2"],
                  "session": [1, 2, 1, 2], "phq9": [15, 9, 18, 17], name: [1.0, 1.0, 0.0, 0.0]}).to_csv(path, index=False)
    spec = {"layout": "session", "instrument": "PHQ-9",
            "columns": {"patient": "patient_id", "therapist": "therapist_id", "occasion": "session",
                        "score": "phq9", "covariates": [name]}}
    return ingest_dataset(path, spec, name="demo"), spec


@pytest.mark.parametrize("name", ["change", "recovered", "n_sessions", "reliable_improvement"])
def test_covariate_named_like_a_derived_patient_column_is_refused(tmp_path, name):
    """A covariate called e.g. ``change`` would be overwritten by the column of the same name that the
    patient table derives (and silently lost): refused with one line naming the key."""
    from therapist_effects.io.outcomes import derive_patient_outcomes

    ing, spec = _rows_with_covariate(tmp_path, name)
    with pytest.raises(ConfigError, match=rf"columns.covariates: '{name}' is also a column") as err:
        derive_patient_outcomes(ing.rows, spec)
    assert "\n" not in str(err.value)


def test_covariate_named_like_an_outcome_the_dataset_does_not_derive_is_kept(tmp_path):
    """Without an ending column there is no derived ``dropout``: a file column of that name (e.g. a
    model outcome read from the file) is carried into the patient table as it is."""
    from therapist_effects.io.outcomes import derive_patient_outcomes

    ing, spec = _rows_with_covariate(tmp_path, "dropout")
    table, _ = derive_patient_outcomes(ing.rows, spec)
    assert table.set_index("patient")["dropout"].to_dict() == {"p1": 1.0, "p2": 0.0}


def test_the_refused_names_are_exactly_the_derived_columns(tmp_path):
    """The names refused as covariates are the columns the patient table really derives here."""
    from therapist_effects.io.outcomes import _derived_columns, derive_patient_outcomes

    ing, spec = _rows_with_covariate(tmp_path, "age")
    table, _ = derive_patient_outcomes(ing.rows, spec)
    own = {"patient", "therapist", "baseline", "end", "age"}
    assert _derived_columns("session", ing.rows, ing.instrument) == set(table.columns) - own
