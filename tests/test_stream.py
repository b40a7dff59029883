"""Streamed ingestion (issue 13) gives what in-memory ingestion + patient outcomes give: the same
patient table, the same rejects (rows, columns, values, reasons) and the same row accounting, with the
file split into several batches and partitions."""

from __future__ import annotations


import pandas as pd
import pytest

from therapist_effects.exceptions import ConfigError, InputError
from therapist_effects.io.ingest import accounting, ingest_dataset
from therapist_effects.io.outcomes import derive_patient_outcomes
from therapist_effects.simulate import PracticeSimulation, inject_data_errors, simulate_practice
from therapist_effects.io.stream import ingest_patients_streamed

pytestmark = pytest.mark.filterwarnings("ignore::therapist_effects.exceptions.DataWarning")

DEMO_SPEC = {"layout": "session", "instrument": "PHQ-9", "export_date": "2025-12-31",
             "columns": {"patient": "patient_id", "therapist": "therapist_id", "score": "phq9",
                         "occasion": "session_date", "arm": "feedback", "cluster": "service", "ending": "ending",
                         "covariates": ["age", "sex"]}}


def in_memory(path, spec):
    r = ingest_dataset(path, spec)
    patients, rej2 = derive_patient_outcomes(r.rows, spec, r.instrument)
    rejects = pd.concat([r.rejects, rej2], ignore_index=True).sort_values("row", kind="stable")
    return patients, rejects.reset_index(drop=True), r.rows_read


def assert_same(path, spec, **kw):
    patients, rejects, rows_read = in_memory(path, spec)
    s = ingest_patients_streamed(path, spec, **kw)
    assert s.rows_read == rows_read
    pd.testing.assert_frame_equal(s.patients.reset_index(drop=True), patients.reset_index(drop=True),
                                  check_dtype=False)
    pd.testing.assert_frame_equal(s.rejects[["row", "patient", "column", "value", "reason"]].reset_index(drop=True),
                                  rejects[["row", "patient", "column", "value", "reason"]].reset_index(drop=True),
                                  check_dtype=False)
    acc = accounting(s.rows_read, s.rejects)
    assert acc["rows_used"] + acc["rows_rejected"] == acc["rows_read"]
    return s


def test_streamed_equals_in_memory_on_messy_simulated_data(tmp_path):
    sessions, _ = simulate_practice(PracticeSimulation(n_services=3, therapists_per_service=8, mean_caseload=15,
                                                       seed=9))
    sessions = inject_data_errors(sessions, seed=9)  # duplicates, bad scores, multi-therapist patients, ...
    path = tmp_path / "s.csv"
    sessions.to_csv(path, index=False)
    with open(path, "a") as fh:
        fh.write("\n,,,,,,,,,\n\n")  # trailing blank rows are not rows
    s = assert_same(path, DEMO_SPEC, partitions=4, batch_rows=700)
    assert s.partitions == 4 and len(s.rejects) > 0


def test_streamed_equals_in_memory_on_the_demo_with_parquet(tmp_path):
    path = tmp_path / "demo.parquet"
    pd.read_csv("data/demo_sessions.csv", dtype=str).to_parquet(path)
    assert_same(path, DEMO_SPEC, partitions=3, batch_rows=2000)


def test_streamed_patient_layout_keeps_row_order(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("pid,tid,pre,post,fb\nZ,T1,20,5,0\nA,T1,15,14,1\nM,T2,22,9,0\nA,T1,15,14,1\nB,T2,x,3,1\n"
                    "C,T3,19,30,0\nD,T3,18,4,1\n")
    spec = {"layout": "patient", "instrument": "PHQ-9",
            "columns": {"patient": "pid", "therapist": "tid", "outcome": "post", "baseline": "pre", "arm": "fb"}}
    s = assert_same(path, spec, partitions=3, batch_rows=2)
    assert s.patients["patient"].tolist()[:3] == ["Z", "A", "M"]


def test_streamed_errors_match(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("pid,tid,session,phq9\n")
    spec = {"layout": "session", "columns": {"patient": "pid", "therapist": "tid", "score": "phq9",
                                             "occasion": "session"}}
    with pytest.raises(InputError, match="no data rows"):
        ingest_patients_streamed(path, spec)
    path.write_text("pid,tid,session,phq9,fb\nA,T,1,3,x\nA,T,2,4,x\nB,T,1,3,y\nB,T,2,4,y\nC,U,1,3,z\nC,U,2,4,z\n")
    arm_spec = {**spec, "columns": {**spec["columns"], "arm": "fb"}}
    with pytest.raises(ConfigError) as mem:
        ingest_dataset(path, arm_spec)
    with pytest.raises(ConfigError) as streamed:
        ingest_patients_streamed(path, arm_spec, partitions=3, batch_rows=1)
    assert str(streamed.value) == str(mem.value)


def test_workflow_steps_stream_large_exports_with_the_same_outputs(tmp_path, monkeypatch):
    """ingest_step + outcomes_step write the same patient table, rejects and accounting whether the
    export is ingested in memory or streamed (the workflow streams files over STREAM_BYTES)."""
    import yaml

    from therapist_effects import pipeline
    from therapist_effects.config import load_config

    sessions, _ = simulate_practice(PracticeSimulation(n_services=2, therapists_per_service=6, mean_caseload=10,
                                                       seed=4))
    data = tmp_path / "s.csv"
    inject_data_errors(sessions, seed=4).to_csv(data, index=False)
    cfg = load_config({"datasets": {"d": {**DEMO_SPEC, "path": str(data)}}})
    ds = cfg["datasets"]["d"]
    outs = {}
    for mode, limit in (("memory", 1 << 40), ("streamed", 0)):
        monkeypatch.setattr(pipeline, "STREAM_BYTES", limit)
        d = tmp_path / mode
        pipeline.ingest_step(str(data), ds, cfg, str(d / "v.parquet"), str(d / "ir.csv"), str(d / "i.json"))
        pipeline.outcomes_step(str(d / "v.parquet"), str(d / "ir.csv"), str(d / "i.json"), ds, cfg,
                               str(d / "p.parquet"), str(d / "p.csv"), str(d / "r.csv"), str(d / "a.json"))
        outs[mode] = d
    assert yaml.safe_load((outs["streamed"] / "i.json").read_text())["streamed"] is True
    for f in ("p.csv", "r.csv", "a.json"):
        assert (outs["memory"] / f).read_bytes() == (outs["streamed"] / f).read_bytes(), f
    pd.testing.assert_frame_equal(pd.read_parquet(outs["memory"] / "p.parquet"),
                                  pd.read_parquet(outs["streamed"] / "p.parquet"), check_dtype=False)
