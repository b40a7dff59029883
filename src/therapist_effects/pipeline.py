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
    except Exception:
        log.exception("%s failed with an unexpected error (a bug: please report it with this log)", name)
        logging.shutdown()
        raise
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
    from .outcomes import derive_patient_outcomes, write_patient_outputs, write_rejects

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
    write_rejects(rejects, out_rejects)
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
    from .csvsafe import safe_csv

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
    from .csvsafe import safe_csv

    patients = pd.read_parquet(patients_path)
    model = {"id": "per_cluster", "type": "nested"}  # keeps the cluster column
    mf = model_frame(patients, model, dataset)
    covariates = [c for c in mf.covariates]
    table = per_cluster_estimates(
        mf.df, mf.outcome, covariates, therapist=mf.therapist, cluster=role_names(dataset)["cluster"],
        arm=mf.arm, feedback_level=mf.feedback_level, level=cfg["intervals"]["level"],
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
    from .csvsafe import safe_csv

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


def research_report_step(
    estimates_path: str, patients_path: str, therapists_path: str, rejects_path: str,
    narrowing_paths: list[str], idata_paths: list[str], cfg: dict, out_html: str,
    growth_curves: list[str] | None = None,
) -> None:
    """The research report (one self-contained HTML file)."""
    from .report import research_report

    narrowing = None
    for path in narrowing_paths:
        if Path(path).stat().st_size > 1:
            table = pd.read_csv(path, dtype={"therapist": str})
            if len(table):
                narrowing = table
                break
    idata = {Path(p).stem: p for p in idata_paths}
    research_report(estimates_path, patients_path, therapists_path, rejects_path, out_html,
                    narrowing=narrowing, idata_paths=idata or None, growth_curves=growth_curves or None)


def service_report_step(
    estimates_path: str, patients_path: str, therapists_path: str, dataset: dict, cfg: dict, out_html: str,
    not_on_track_path: str | None = None,
) -> None:
    """The therapist-level service report: pseudonymised, small numbers suppressed, no patient data."""
    from .report import service_report

    rep = cfg["report"]
    service_report(
        estimates_path, patients_path, therapists_path, out_html,
        min_caseload=rep["min_caseload"], suppress_below=rep["suppress_below"],
        pseudonymise=rep["pseudonymise"], key_env=rep["key_env"],
        higher_is_better=_higher_is_better(dataset, cfg), not_on_track=not_on_track_path,
    )


def _icc_scale(pooled: dict) -> dict:
    """meta.pool's result (logit scale, with an ``icc`` block) as the ICC-scale dict the report shows."""
    icc = pooled.get("icc", {})
    return {
        "method": pooled.get("method"), "k": pooled.get("k"),
        "estimate": icc.get("estimate"), "ci_low": icc.get("ci_low"), "ci_high": icc.get("ci_high"),
        "pi_low": icc.get("pi_low"), "pi_high": icc.get("pi_high"),
        "tau2": pooled.get("tau2"), "I2": pooled.get("I2"), "I2_percent": pooled.get("I2"),
        "Q": pooled.get("Q"), "Q_p_value": pooled.get("Q_p_value"),
        "logit_estimate": pooled.get("estimate"), "logit_se": pooled.get("se"),
    }


def meta_report_step(
    pooled_paths: list[str], table_paths: list[str], studies_path: str | None, cfg: dict, out_html: str,
    out_json: str | None = None, out_csv: str | None = None,
) -> None:
    """Meta-analysis report: per-cluster ICCs of every dataset with clusters, and a user's study table,
    pooled by random effects on the logit-ICC scale (the estimator of ``meta.method``)."""
    import numpy as np
    from scipy.stats import norm

    from .meta import pool, pool_study_table
    from .report import meta_report

    method = cfg["meta"]["method"]
    level = cfg["intervals"]["level"]
    z = norm.ppf(0.5 + level / 2)
    rows = []
    for path in table_paths:
        t = pd.read_csv(path, dtype={"cluster": str})
        dataset = Path(path).parent.name
        t.insert(0, "study", [f"{dataset}: {c}" if len(table_paths) > 1 else str(c) for c in t["cluster"]])
        rows.append(t)
    if studies_path:
        from .ingest import read_table

        st = read_table(studies_path)
        for col in ("icc", "n_patients", "n_therapists", "var_icc"):
            if col in st.columns:
                st[col] = pd.to_numeric(st[col], errors="coerce")
        pooled_st = pool_study_table(st, method, level=level, source=studies_path)
        rows.append(pd.DataFrame(pooled_st["studies"]))
    if not rows:
        raise ValueError("meta report: no per-cluster tables and no study table")
    table = pd.concat(rows, ignore_index=True)
    # Per-study intervals: the REML profile interval where raw data were fitted; for published ICCs a
    # Wald interval on the logit scale, back-transformed.
    half = z * np.sqrt(table["var_logit_icc"].astype(float))
    expit = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    table["ci_low"] = expit(table["logit_icc"] - half)
    table["ci_high"] = expit(table["logit_icc"] + half)
    if "icc_ci_low" in table.columns:
        has = table["icc_ci_low"].notna()
        table.loc[has, "ci_low"] = table.loc[has, "icc_ci_low"]
        table.loc[has, "ci_high"] = table.loc[has, "icc_ci_high"]
    pooled = pool(table["logit_icc"].to_numpy(float), table["var_logit_icc"].to_numpy(float), method, level=level)
    per_arm = None
    if "icc_ratio" in table.columns and table["icc_ratio"].notna().any():
        per_arm = table.loc[table["icc_ratio"].notna(), ["study", "icc_ratio"]].assign(ci_low=np.nan, ci_high=np.nan)
    meta_report(table, _icc_scale(pooled), out_html, per_arm=per_arm)
    if out_json:
        write_json({"method": method, "level": level, "pooled": pooled, "n_studies": int(len(table))}, out_json)
    if out_csv:
        from .csvsafe import safe_csv

        safe_csv(table, out_csv)
    log.info("pooled %d studies (%s): ICC %s", len(table), method, pooled.get("icc", {}).get("estimate"))
