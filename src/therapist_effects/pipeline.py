"""The workflow's steps as plain functions: each Snakemake rule's script calls exactly one of these.

Every step writes its log to the rule's ``log:`` file (warnings included, via :mod:`logging`), and a
user-facing error (:class:`~therapist_effects.exceptions.TherapistEffectsError`) ends the step with
one line on stderr and in the log instead of a traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from .exceptions import TherapistEffectsError
from .models.fitting import (
    applicable_models,
    assemble_estimates,
    extra_columns,
    fit_model,
    model_frame,
    role_names,
    write_json,
)

log = logging.getLogger("therapist_effects")


#: errno values of a write that failed for want of space or permission (reported in one line).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_WRITE_MESSAGES = ("No space left on device", "Read-only file system", "Disk quota exceeded")


def write_error(exc: BaseException, outputs: list[str] | None = None) -> str | None:
    """``cannot write <path>: <reason>`` for a failed write (full disk, read-only, no permission), else None."""
    if not isinstance(exc, OSError):
        return None
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code in _WRITE_ERRNOS:
        reason = os.strerror(code)
    else:
        reason = next((m for m in _WRITE_MESSAGES if m in text), None)
        if reason is None:
            return None
    path = exc.filename or (outputs[0] if outputs else None) or "the output"
    return f"cannot write {path}: {reason}"


@contextmanager
def step(log_path: str | Path | None, name: str, outputs: list[str] | None = None):
    """Log to ``log_path``, capture warnings, and turn user-facing errors into one line + exit 1.

    A write that fails for want of space or permission is one line too: ``cannot write <path>: No
    space left on device``.
    """
    logging.raiseExceptions = False  # a log file on a full disk must not add a traceback of its own
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        try:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(log_path, mode="w", encoding="utf-8"))
        except OSError as exc:
            print(f"ERROR therapist_effects: {write_error(exc, [str(log_path)]) or exc}", file=sys.stderr)
            sys.exit(1)
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
    except OSError as exc:
        line = write_error(exc, outputs)
        if line is None:
            log.exception("%s failed with an unexpected error (a bug: please report it with this log)", name)
            logging.shutdown()
            raise
        log.error("%s", line)
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


def _check_model_outcomes(cfg: dict, dataset: dict, data_path: str) -> None:
    """A model outcome that is neither derived nor a column of the file: one line naming models[i].outcome."""
    from .config import INSTRUMENT_OUTCOMES
    from .exceptions import ConfigError, InputError
    from .io.readers import read_header

    extra = set(extra_columns(cfg, dataset))
    if not extra:
        return
    header = read_header(data_path, sheet=dataset.get("sheet"))
    name = dataset.get("name") or next((k for k, v in cfg["datasets"].items() if v == dataset), None)
    where = f"datasets.{name}" if name else "the dataset"
    for i, model in enumerate(cfg["models"]):
        out = model.get("outcome")
        if out not in extra or out in header:
            continue
        if out in INSTRUMENT_OUTCOMES:
            raise ConfigError(
                f"models[{i}].outcome: {out!r} is derived from an instrument's cut-off and reliable change, "
                f"but {where} has no instrument (set {where}.instrument, e.g. PHQ-9)"
            )
        raise InputError(
            f"file {data_path} has no column '{out}' (models[{i}].outcome); it is not a derived outcome either "
            "(change, recovered, reliable_improvement, reliable_deterioration, reliable_recovery, "
            "clinically_significant, dropout)"
        )


#: CSV / Parquet exports larger than this are ingested streamed, in bounded memory
#: (:mod:`therapist_effects.io.stream`): the ingest step then writes the per-patient table itself.
STREAM_BYTES = 512 * 1024 * 1024


def _ingest_streamed(data_path: str, spec: dict, cfg: dict, out_rows: str, out_rejects: str,
                     out_summary: str) -> None:
    from .io.outcomes import write_rejects
    from .io.stream import ingest_patients_streamed

    Path(out_rows).parent.mkdir(parents=True, exist_ok=True)
    res = ingest_patients_streamed(data_path, spec, user_instruments=cfg.get("instruments") or {},
                                   workdir=str(Path(out_rows).parent))
    res.patients.to_parquet(out_rows, index=False)  # already one row per patient
    write_rejects(res.rejects, out_rejects)
    acc = res.accounting
    write_json({"rows_read": int(res.rows_read), "rows_valid": int(acc["rows_used"]),
                "rows_rejected": int(acc["rows_rejected"]), "notes": list(res.notes), "streamed": True,
                "partitions": int(res.partitions)}, out_summary)
    log.info("streamed %d rows from %s in %d partitions: %d patients, %d rows rejected", res.rows_read, data_path,
             res.partitions, len(res.patients), acc["rows_rejected"])
    for note in res.notes:
        log.info("note: %s", note)


def ingest_step(data_path: str, dataset: dict, cfg: dict, out_rows: str, out_rejects: str, out_summary: str) -> None:
    """Read and validate one dataset; write the valid rows (Parquet), the rejects and a summary.

    Exports over :data:`STREAM_BYTES` are streamed: ``out_rows`` then holds the per-patient table
    (and the summary says ``streamed``), which the outcomes step passes through.
    """
    from .io.ingest import ingest_dataset
    from .io.outcomes import write_rejects

    _check_model_outcomes(cfg, dataset, data_path)
    spec = _ingest_spec(cfg, dataset)
    # the streamed path derives single-instrument outcomes; several instruments per row are ingested in memory
    if Path(data_path).suffix.lower() in (".csv", ".parquet") and Path(data_path).is_file() \
            and Path(data_path).stat().st_size > STREAM_BYTES and not dataset["columns"].get("scores"):
        _ingest_streamed(data_path, spec, cfg, out_rows, out_rejects, out_summary)
        return
    result = ingest_dataset(data_path, spec, user_instruments=cfg.get("instruments") or {})
    Path(out_rows).parent.mkdir(parents=True, exist_ok=True)
    result.rows.to_parquet(out_rows, index=False)
    write_rejects(result.rejects, out_rejects)
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
    from .io.ingest import accounting
    from .io.instruments import get_instrument
    from .io.outcomes import derive_patient_outcomes, write_patient_outputs, write_rejects

    with open(ingest_summary, encoding="utf-8") as fh:
        summary = json.load(fh)
    rows_read = summary["rows_read"]
    rows = pd.read_parquet(rows_path)
    instrument = get_instrument(dataset["instrument"], cfg.get("instruments") or {}) if dataset.get("instrument") else None
    rejects1 = pd.read_csv(ingest_rejects, dtype={"patient": str, "value": str})
    if summary.get("streamed"):  # the streamed ingest derived the patients (and all rejects) already
        patients, rejects = rows, rejects1
    else:
        if dataset["columns"].get("scores"):  # several instruments per row: therapist_effects.io.scores
            from .io.scores import derive_scores_outcomes

            patients, rejects2 = derive_scores_outcomes(rows, _ingest_spec(cfg, dataset), cfg.get("instruments") or {})
        else:
            patients, rejects2 = derive_patient_outcomes(rows, _ingest_spec(cfg, dataset), instrument)
        rejects = pd.concat([rejects1, rejects2], ignore_index=True)
    rejects = rejects.sort_values("row", kind="stable").reset_index(drop=True)
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
        from .io.instruments import get_instrument

        return get_instrument(dataset["instrument"], cfg.get("instruments") or {}).higher_is_better
    return None


def fit_step(
    patients_path: str, model_id: str, dataset: dict, cfg: dict, out_json: str, out_therapists: str,
    out_narrowing: str | None = None, out_idata: str | None = None,
) -> None:
    """Fit one model; write its contract entry, its therapist table and (random slopes) the narrowing table."""
    from .io.csvsafe import safe_csv

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
    """Per-cluster (trial / service) ICCs, their random-effects pooling (two-stage meta-analysis) and
    the one-stage models with a trial level (:func:`therapist_effects.meta.dataset_meta`)."""
    from .io.csvsafe import safe_csv
    from .meta import dataset_meta

    patients = pd.read_parquet(patients_path)
    model = {"id": "per_cluster", "type": "nested"}  # keeps the cluster column
    mf = model_frame(patients, model, dataset)
    covariates = [c for c in mf.covariates]
    table, meta = dataset_meta(
        mf.df, mf.outcome, covariates, therapist=mf.therapist, cluster=role_names(dataset)["cluster"],
        arm=mf.arm, feedback_level=mf.feedback_level, meta_cfg=cfg["meta"], level=cfg["intervals"]["level"],
    )
    safe_csv(table, out_csv)
    for rec in table[~table["estimable"]].itertuples():
        log.warning("cluster %s: ICC not estimable (%s); left out of the pooling", rec.cluster, rec.not_estimable)
    write_json(meta, out_json)


def collect_step(
    dataset_name: str, dataset: dict, cfg: dict, patients_path: str, accounting_path: str,
    model_jsons: list[str], therapist_csvs: list[str], out_estimates: str, out_therapists: str,
    meta_json: str | None = None, configfiles: list[str] | None = None,
) -> None:
    """Assemble ``estimates.json`` (the contract) and the combined therapist table."""
    from .io.csvsafe import safe_csv

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
    from .models.comparison import add_to_estimates  # AIC/BIC where absent, LRTs between nested models

    add_to_estimates(est, fitted, patients, dataset)
    write_json(est, out_estimates)
    tables = [pd.read_csv(p, dtype={"therapist": str}) for p in therapist_csvs]
    tables = [t for t in tables if len(t)]
    combined = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["model", "therapist"])
    safe_csv(combined, out_therapists)


def run(fn: Callable[..., Any], log_path: str | None, **kwargs: Any) -> None:
    """Run one step under :func:`step` (what the workflow scripts call)."""
    outputs = [str(v) for k, v in kwargs.items() if k.startswith("out") and isinstance(v, (str, Path))]
    with step(log_path, fn.__name__, outputs):
        fn(**kwargs)


def research_report_step(
    estimates_path: str, patients_path: str, therapists_path: str, rejects_path: str,
    narrowing_paths: list[str], idata_paths: list[str], cfg: dict, out_html: str,
    sensitivity_paths: list[str] | None = None,
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
                    narrowing=narrowing, idata_paths=idata or None,
                    sensitivity=sensitivity_paths[0] if sensitivity_paths else None, growth_curves=growth_curves or None)


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
        higher_is_better=_higher_is_better(dataset, cfg), not_on_track=not_on_track_path, **_service_options(dataset, cfg),
    )


def _service_options(dataset: dict, cfg: dict) -> dict:
    rep = cfg["report"]
    return {"classification_level": rep.get("classification_level", 0.998),
            "service_name": rep.get("service_name"), "export_date": dataset.get("export_date")}


def therapist_pages_step(
    estimates_path: str, patients_path: str, therapists_path: str, dataset: dict, cfg: dict, out_dir: str,
) -> None:
    """Per-therapist feedback pages (``therapists/<pseudonym>.html``) for supervision."""
    from .report.service import therapist_pages

    rep = cfg["report"]
    paths = therapist_pages(
        estimates_path, patients_path, therapists_path, out_dir,
        min_caseload=rep["min_caseload"], suppress_below=rep["suppress_below"],
        pseudonymise=rep["pseudonymise"], key_env=rep["key_env"],
        higher_is_better=_higher_is_better(dataset, cfg), **_service_options(dataset, cfg),
    )
    log.info("wrote %d therapist pages to %s", len(paths), out_dir)


def _icc_scale(pooled: dict) -> dict:
    """meta.pool's result (pooling scale, with an ``icc`` block) as the ICC-scale dict the report shows."""
    icc = pooled.get("icc", {})
    return {
        "method": pooled.get("method"), "test": pooled.get("test"), "scale": pooled.get("scale"), "k": pooled.get("k"),
        "estimate": icc.get("estimate"), "ci_low": icc.get("ci_low"), "ci_high": icc.get("ci_high"),
        "pi_low": icc.get("pi_low"), "pi_high": icc.get("pi_high"),
        "tau2": pooled.get("tau2"), "I2": pooled.get("I2"), "I2_percent": pooled.get("I2"),
        "Q": pooled.get("Q"), "Q_p_value": pooled.get("Q_p_value"),
        "scale_estimate": pooled.get("estimate"), "scale_se": pooled.get("se"),
    }


def meta_report_step(
    pooled_paths: list[str], table_paths: list[str], studies_path: str | None, cfg: dict, out_html: str,
    out_json: str | None = None, out_csv: str | None = None,
) -> None:
    """Meta-analysis report: per-cluster ICCs of every dataset with clusters, and a user's study table,
    pooled by random effects (``meta.method``, ``meta.test``, on ``meta.scale``); the one-stage estimates
    of the datasets' ``meta.json`` beside the two-stage one."""
    from .meta import arms_long, pool_arms, pool_table, study_table
    from .report import meta_report

    opts = {k: cfg["meta"][k] for k in ("method", "test", "scale")}
    level = cfg["intervals"]["level"]
    rows, arm_rows, one_stage = [], [], {}
    for path in table_paths:
        t = pd.read_csv(path, dtype={"cluster": str})
        dataset = Path(path).parent.name
        t.insert(0, "study", [f"{dataset}: {c}" if len(table_paths) > 1 else str(c) for c in t["cluster"]])
        t["ci_low"], t["ci_high"] = t["icc_ci_low"], t["icc_ci_high"]
        rows.append(t)
        if "icc_control" in t.columns:
            arm_rows.append(arms_long(t, opts["scale"]))
    for path in pooled_paths:
        with open(path, encoding="utf-8") as fh:
            m = json.load(fh)
        one_stage[Path(path).parent.name] = {"icc": m.get("one_stage"), "arms": m.get("one_stage_arms")}
    if studies_path:
        from .io.ingest import read_table

        st = study_table(read_table(studies_path), columns=cfg["meta"].get("columns") or {}, scale=opts["scale"],
                         level=level, source=studies_path)
        has_arm = st["arm"].notna()
        if has_arm.any():
            arm_rows.append(st[has_arm])
        rows.append(st[~has_arm] if (~has_arm).any() else st)
    if not rows:
        raise ValueError("meta report: no per-cluster tables and no study table")
    table = pd.concat(rows, ignore_index=True)
    if "estimable" in table.columns:  # clusters whose ICC could not be estimated are not pooled
        table = table[table["estimable"].fillna(True).astype(bool)].reset_index(drop=True)
    pooled = pool_table(table, opts["method"], test=opts["test"], level=level, scale=opts["scale"])
    studies = pd.DataFrame(pooled.pop("studies"))
    loo = pooled.pop("leave_one_out", [])
    arms = None
    if arm_rows:
        long = pd.concat(arm_rows, ignore_index=True)
        if len(long) and long["arm"].nunique() == 2:
            # per-cluster arm rows are labelled control / feedback; a study table's by its own labels
            fb = cfg["meta"].get("feedback_level")
            if fb is not None and set(long["arm"].astype(str)) == {"control", "feedback"}:
                fb = None
            arms = pool_arms(long.reset_index(drop=True), opts["method"], test=opts["test"], level=level,
                             scale=opts["scale"], feedback_level=fb)
    meta_report(studies, _icc_scale(pooled), out_html, leave_one_out=loo, one_stage=one_stage, arms=arms)
    if out_json:
        arms_out = None
        if arms is not None:
            arms_out = {k: ({kk: vv for kk, vv in v.items() if kk not in ("studies", "leave_one_out")}
                            if isinstance(v, dict) and k in ("control", "feedback") else v) for k, v in arms.items()}
        write_json({**opts, "level": level, "pooled": pooled, "n_studies": int(len(studies)),
                    "leave_one_out": loo, "one_stage": one_stage or None, "arms": arms_out}, out_json)
    if out_csv:
        from .io.csvsafe import safe_csv

        safe_csv(studies, out_csv)
    log.info("pooled %d studies (%s, %s, %s scale): ICC %s", len(studies), opts["method"], opts["test"],
             opts["scale"], pooled.get("icc", {}).get("estimate"))


def plan_cell_step(design: dict, cfg: dict, out_json: str) -> None:
    """One design of the planning grid (``plan:`` config), simulated with the config's seed."""
    from .planning import plan

    p = cfg["plan"]
    res = plan(design["therapists"], design["caseload"], design["icc"], dispersion=design["dispersion"],
               reduction=design["reduction"], reps=p["reps"], seed=cfg["seed"], level=p["level"])
    write_json(res, out_json)
    log.info("plan %s: expected_ci_width %.4f, p_singular %.3f, power %s", design, res["expected_ci_width"],
             res["p_singular"], res["power"])


def plan_grid_step(cell_jsons: list[str], out_csv: str, out_png: str) -> None:
    """The planning grid's table and plot from the per-design results."""
    from .io.csvsafe import safe_csv
    from .planning import grid_figure, plan_grid

    results = []
    for path in cell_jsons:
        with open(path, encoding="utf-8") as fh:
            results.append(json.load(fh))
    table = plan_grid(results)
    safe_csv(table, out_csv)
    grid_figure(table, out_png)


def sensitivity_step(patients_path: str, dataset: dict, cfg: dict, out_csv: str) -> None:
    """``sensitivity: true``: refit the Gaussian random-intercept models under the sensitivity analyses."""
    from .io.csvsafe import safe_csv
    from .sensitivity import sensitivity_table

    patients = pd.read_parquet(patients_path)
    fitted, _ = applicable_models(cfg, dataset)
    table = sensitivity_table(patients, fitted, dataset, cfg)
    safe_csv(table, out_csv)
    log.info("sensitivity: %d analyses x models written to %s", len(table), out_csv)


def tables_step(estimates_path: str, patients_path: str, out_dir: str) -> None:
    """Publication tables (Markdown, LaTeX, CSV), the descriptive table by arm and the flow diagram."""
    from .report.tables import write_tables

    with open(estimates_path, encoding="utf-8") as fh:
        est = json.load(fh)
    paths = write_tables(est, pd.read_parquet(patients_path), out_dir)
    log.info("tables: %s", ", ".join(sorted(paths)))
