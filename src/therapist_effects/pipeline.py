"""The workflow's steps as plain functions: each Snakemake rule's script calls exactly one of these.

Every step writes its log to the rule's ``log:`` file (warnings included, via :mod:`logging`), and a
user-facing error (:class:`~therapist_effects.exceptions.TherapistEffectsError`) ends the step with
one line on stderr and in the log instead of a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from .exceptions import TherapistEffectsError
from .models import (
    applicable_models,
    assemble_estimates,
    extra_columns,
    fit_model,
    model_frame,
    role_names,
    write_json,
)

log = logging.getLogger("therapist_effects")


@contextmanager
def step(log_path: str | Path | None, name: str):
    """Log to ``log_path``, capture warnings, and turn user-facing errors into one line + exit 1."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w", encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    log.info("%s: start", name)
    try:
        yield log
    except TherapistEffectsError as exc:
        log.error("%s", exc)
        logging.shutdown()
        sys.exit(1)
    log.info("%s: done", name)


def _ingest_spec(cfg: dict, dataset: dict) -> dict:
    """The dataset spec for ingestion: model outcomes that are plain file columns are carried along."""
    spec = json.loads(json.dumps(dataset))
    extra = extra_columns(cfg, dataset)
    spec["columns"]["covariates"] = list(spec["columns"].get("covariates", [])) + extra
    return spec


def ingest_step(data_path: str, dataset: dict, cfg: dict, out_rows: str, out_rejects: str, out_summary: str) -> None:
    """Read and validate one dataset; write the valid rows (Parquet), the rejects and a summary."""
    from .ingest import ingest_dataset

    spec = _ingest_spec(cfg, dataset)
    result = ingest_dataset(data_path, spec, user_instruments=cfg.get("instruments") or {})
    Path(out_rows).parent.mkdir(parents=True, exist_ok=True)
    result.rows.to_parquet(out_rows, index=False)
    result.rejects.to_csv(out_rejects, index=False)
    summary = {"rows_read": int(result.rows_read), "rows_valid": int(len(result.rows)),
               "rows_rejected": int(len(result.rejects)), "notes": list(result.notes)}
    write_json(summary, out_summary)
    log.info("read %d rows from %s: %d valid, %d rejected", result.rows_read, data_path, len(result.rows), len(result.rejects))
    for note in result.notes:
        log.info("note: %s", note)


def outcomes_step(
    rows_path: str, ingest_rejects: str, ingest_summary: str, dataset: dict, cfg: dict,
    out_parquet: str, out_csv: str, out_rejects: str, out_accounting: str,
) -> None:
    """Derive one row per patient with the instrument's outcomes; combine the rejects of both steps."""
    from .ingest import accounting
    from .instruments import get_instrument
    from .outcomes import derive_patient_outcomes, write_patient_outputs
    from .report.csvsafe import safe_csv

    rows = pd.read_parquet(rows_path)
    instrument = get_instrument(dataset["instrument"], cfg.get("instruments") or {}) if dataset.get("instrument") else None
    patients, rejects2 = derive_patient_outcomes(rows, _ingest_spec(cfg, dataset), instrument)
    rejects1 = pd.read_csv(ingest_rejects, dtype={"patient": str, "value": str})
    rejects = pd.concat([rejects1, rejects2], ignore_index=True).sort_values("row", kind="stable").reset_index(drop=True)
    with open(ingest_summary, encoding="utf-8") as fh:
        rows_read = json.load(fh)["rows_read"]
    acc = accounting(rows_read, rejects)
    if acc["rows_used"] + acc["rows_rejected"] != acc["rows_read"]:
        raise AssertionError(f"row accounting broken: {acc}")
    write_patient_outputs(patients, out_parquet, out_csv)
    safe_csv(rejects, out_rejects)
    write_json(acc, out_accounting)
    log.info("%d patients of %d therapists; rows read %d = used %d + rejected %d",
             len(patients), patients["therapist"].nunique(), acc["rows_read"], acc["rows_used"], acc["rows_rejected"])


def _higher_is_better(dataset: dict, cfg: dict) -> bool | None:
    if dataset.get("higher_is_better") is not None:
        return bool(dataset["higher_is_better"])
    if dataset.get("instrument"):
        from .instruments import get_instrument

        return get_instrument(dataset["instrument"], cfg.get("instruments") or {}).higher_is_better
    return None


def fit_step(
    patients_path: str, model_id: str, dataset: dict, cfg: dict, out_json: str, out_therapists: str,
    out_narrowing: str | None = None, out_idata: str | None = None,
) -> None:
    """Fit one model; write its contract entry, its therapist table and (random slopes) the narrowing table."""
    from .report.csvsafe import safe_csv

    patients = pd.read_parquet(patients_path)
    model = next(m for m in cfg["models"] if m["id"] == model_id)
    entry, table, narrowing = fit_model(
        patients, model, dataset, cfg, higher_is_better=_higher_is_better(dataset, cfg), idata_path=out_idata,
    )
    write_json(entry, out_json)
    if table is None:
        table = pd.DataFrame(columns=["model", "therapist"])
    safe_csv(table, out_therapists)
    if out_narrowing:
        safe_csv(narrowing if narrowing is not None else pd.DataFrame(), out_narrowing)
    if out_idata and not Path(out_idata).exists():
        Path(out_idata).touch()
    for w in entry.get("warnings", []):
        log.warning("model %s: %s", model_id, w)
    log.info("model %s: %s fitted to %s patients", model_id, entry.get("formula"), entry.get("n_patients"))


def per_cluster_step(patients_path: str, dataset: dict, cfg: dict, out_csv: str, out_json: str) -> None:
    """Per-cluster (trial / service) ICCs and their random-effects pooling (two-stage meta-analysis)."""
    from .meta import per_cluster_estimates, pool
    from .report.csvsafe import safe_csv

    patients = pd.read_parquet(patients_path)
    model = {"id": "per_cluster", "type": "random_intercept"}
    mf = model_frame(patients, model, dataset)
    covariates = [c for c in mf.covariates]
    table = per_cluster_estimates(
        mf.df, mf.outcome, covariates, therapist=mf.therapist, cluster=role_names(dataset)["cluster"],
        arm=mf.arm, feedback_level=mf.feedback_level,
    )
    safe_csv(table, out_csv)
    pooled = pool(table["logit_icc"].to_numpy(), table["var_logit_icc"].to_numpy(), method=cfg["meta"]["method"])
    write_json({"method": cfg["meta"]["method"], "pooled": pooled, "n_clusters": int(len(table))}, out_json)


def collect_step(
    dataset_name: str, dataset: dict, cfg: dict, patients_path: str, accounting_path: str,
    model_jsons: list[str], therapist_csvs: list[str], out_estimates: str, out_therapists: str,
    meta_json: str | None = None, configfiles: list[str] | None = None,
) -> None:
    """Assemble ``estimates.json`` (the contract) and the combined therapist table."""
    from .report.csvsafe import safe_csv

    patients = pd.read_parquet(patients_path)
    with open(accounting_path, encoding="utf-8") as fh:
        acc = json.load(fh)
    fitted, skipped = applicable_models(cfg, dataset)
    entries = {}
    for model, path in zip(fitted, model_jsons):
        with open(path, encoding="utf-8") as fh:
            entries[model["id"]] = json.load(fh)
    meta = None
    if meta_json:
        with open(meta_json, encoding="utf-8") as fh:
            meta = json.load(fh)
    est = assemble_estimates(dataset_name, dataset, cfg, acc, patients, entries, skipped, meta=meta, configfiles=configfiles)
    write_json(est, out_estimates)
    tables = [pd.read_csv(p, dtype={"therapist": str}) for p in therapist_csvs]
    tables = [t for t in tables if len(t)]
    combined = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["model", "therapist"])
    safe_csv(combined, out_therapists)


def run(fn: Callable[..., Any], log_path: str | None, **kwargs: Any) -> None:
    """Run one step under :func:`step` (what the workflow scripts call)."""
    with step(log_path, fn.__name__):
        fn(**kwargs)
