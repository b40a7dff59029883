"""Fit the configured models to a patient table and assemble the contract's ``estimates.json``.

This module maps the workflow's configuration onto the model engines, through the registry
:mod:`therapist_effects.engine.registry` (model type -> class):

=================  ==========  =========================================================
type               family      engine
=================  ==========  =========================================================
random_intercept   gaussian    :class:`therapist_effects.models.reml.RandomInterceptModel`
random_intercept   binomial    :class:`therapist_effects.models.glmm.LogisticRandomInterceptModel`
nested             gaussian    :class:`therapist_effects.models.reml.NestedModel`
arm_variance       gaussian    :class:`therapist_effects.models.arm.ArmVarianceModel`
arm_variance       binomial    :class:`therapist_effects.models.glmm_arm.LogisticArmVarianceModel`
random_slope       gaussian    :class:`therapist_effects.models.slopes.RandomSlopeModel` (exact engine)
any (engine bayes)             :func:`therapist_effects.models.bayes.fit_bayes` (PyMC)
=================  ==========  =========================================================

The patient table uses canonical column names (``therapist``, ``end``, ``baseline``, ``arm``, ...);
before fitting they are renamed back to the file's column names so that fixed effects and formulas
carry the data's names, as the contract requires. In the session layout the end and baseline scores
are named ``<score>_end`` and ``<score>_baseline``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import DERIVED_OUTCOMES, INSTRUMENT_OUTCOMES, model_applies
from ..exceptions import ModelError, TherapistEffectsWarning

log = logging.getLogger("therapist_effects")


@dataclass
class ModelFrame:
    """The data of one model, with the file's column names, and what was left out and why."""

    df: pd.DataFrame
    outcome: str
    covariates: list[str]
    therapist: str
    cluster: str | None
    arm: str | None
    feedback_level: Any
    n_excluded: int = 0
    excluded_reason: dict[str, int] = field(default_factory=dict)


def role_names(dataset: dict) -> dict[str, str]:
    """Canonical patient-table column -> the name the models and outputs use."""
    cols = dataset["columns"]
    names = {"therapist": cols["therapist"], "patient": cols["patient"]}
    if dataset["layout"] == "patient":
        names["end"] = cols["outcome"]
        if "baseline" in cols:
            names["baseline"] = cols["baseline"]
    else:
        names["end"] = f"{cols['score']}_end"
        names["baseline"] = f"{cols['score']}_baseline"
    for role in ("arm", "cluster"):
        if role in cols:
            names[role] = cols[role]
    return names


def extra_columns(cfg: dict, dataset: dict) -> list[str]:
    """File columns the models use as outcomes that the column mapping does not already carry."""
    cols = dataset["columns"]
    mapped = {v for k, v in cols.items() if k not in ("covariates", "scores")} | set(cols.get("covariates", []))
    for c in (cols.get("scores") or {}).values():  # per-instrument patient columns (therapist_effects.io.scores)
        mapped |= {c} | {f"{c}_{s}" for s in ("baseline", "end", "change", "caseness_baseline",
                                               "reliable_improvement", "reliable_deterioration")}
    extra = []
    fitted, _ = applicable_models(cfg, dataset)
    for model in fitted:
        out = model.get("outcome")
        if out is None or out in mapped or out in extra:
            continue
        derived = out in DERIVED_OUTCOMES and (out not in INSTRUMENT_OUTCOMES or dataset.get("instrument"))
        if out == "dropout":
            derived = "ending" in cols
        if not derived:
            extra.append(out)
    return extra


def feedback_level_of(values: pd.Series, configured: Any = None) -> Any:
    """The arm level that is the feedback condition: configured, else 1 for 0/1 data, else the second label."""
    levels = sorted(pd.unique(values.dropna()), key=lambda v: str(v))
    if configured is not None:
        for level in levels:
            if str(level) == str(configured):
                return level
        raise ModelError(f"feedback_level {configured!r} is not a level of the arm column ({levels})")
    if len(levels) != 2:
        raise ModelError(f"the arm column needs exactly two levels, found {len(levels)}: {levels[:5]}")
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) for v in levels)
    if numeric and {float(v) for v in levels} == {0.0, 1.0}:
        return levels[[float(v) for v in levels].index(1.0)]
    return levels[1]


def model_frame(patients: pd.DataFrame, model: dict, dataset: dict) -> ModelFrame:
    """Select, rename and complete-case the patient table for one model (exclusions are counted)."""
    names = role_names(dataset)
    cols = dataset["columns"]
    renames = {k: v for k, v in names.items() if k in patients.columns and k != v}
    # A renamed role may take the name of a derived column (e.g. arm -> "feedback" while the table also
    # holds the derived 0/1 "feedback" indicator): the role's column wins.
    clash = [v for v in renames.values() if v in patients.columns and v not in renames]
    df = patients.drop(columns=clash).rename(columns=renames)
    outcome = model.get("outcome") or names["end"]
    if outcome not in df.columns:
        raise ModelError(f"model {model['id']!r}: outcome {outcome!r} is not a patient outcome or a column of the file")
    if "covariates" in model:
        covariates = list(model["covariates"])
    else:
        covariates = []
        own = outcome[: -len("_end")] + "_baseline" if outcome.endswith("_end") else None
        if own in {f"{c}_baseline" for c in (cols.get("scores") or {}).values()} and own in df.columns:
            covariates.append(own)  # a secondary instrument's end score: adjusted for its own intake score
        elif "baseline" in names and names["baseline"] in df.columns and outcome != names["baseline"]:
            covariates.append(names["baseline"])
        covariates += list(cols.get("covariates", []))
        if "arm" in names:
            covariates.append(names["arm"])
    if model["type"] == "arm_variance" and "cluster" in names and model.get("cluster_effect") == "fixed":
        covariates.append(names["cluster"])
    if model["type"] == "random_slope" and model.get("slope") and model["slope"] != names.get("arm"):
        if model["slope"] not in df.columns:
            raise ModelError(f"model {model['id']!r}: slope {model['slope']!r} is not a column of the patient table")
        if model["slope"] not in covariates:  # the slope variable is also a fixed effect, as in lme4 practice
            covariates.append(model["slope"])
    missing_cols = [c for c in covariates if c not in df.columns]
    if missing_cols:
        raise ModelError(f"model {model['id']!r}: covariates {missing_cols} are not columns of the patient table")
    used = [outcome, *covariates, names["therapist"]]
    if "cluster" in names and (model["type"] == "nested" or model.get("cluster_effect") == "random"):
        used.append(names["cluster"])
    if "arm" in names:
        used.append(names["arm"])
    used = list(dict.fromkeys(used))
    sub = df[list(dict.fromkeys([names["patient"], *used]))].copy()
    incomplete = sub[used].isna()
    excluded: dict[str, int] = {}
    for c in used:
        k = int(incomplete[c].sum())
        if k:
            excluded[f"missing {c}"] = k
    keep = ~incomplete.any(axis=1)
    sub = sub.loc[keep].reset_index(drop=True)
    if model.get("family", "gaussian") == "binomial":
        values = set(pd.unique(sub[outcome]))
        if not values <= {0, 1, 0.0, 1.0, True, False}:
            raise ModelError(f"model {model['id']!r}: binomial outcome {outcome!r} must be 0/1, found {sorted(map(str, values))[:5]}")
        sub[outcome] = sub[outcome].astype(float)
    feedback_level = None
    if "arm" in names:
        feedback_level = feedback_level_of(sub[names["arm"]], dataset.get("feedback_level"))
    return ModelFrame(
        df=sub,
        outcome=outcome,
        covariates=covariates,
        therapist=names["therapist"],
        cluster=names.get("cluster"),
        arm=names.get("arm"),
        feedback_level=feedback_level,
        n_excluded=int((~keep).sum()),
        excluded_reason=excluded,
    )


def formula(model: dict, mf: ModelFrame) -> str:
    """An lme4/glmmTMB-style formula describing the model as fitted."""
    rhs = " + ".join(mf.covariates) if mf.covariates else "1"
    t = mf.therapist
    kind = model["type"]
    if kind == "nested":
        re = f"(1 | {mf.cluster}/{t})"
    elif kind == "arm_variance":
        re = f"diag(0 + factor({mf.arm}) | {t})"
        if model.get("correlated"):
            re = f"(0 + factor({mf.arm}) | {t})"
        if model.get("cluster_effect") == "random":
            re = f"(1 | {mf.cluster}) + {re.replace(f'| {t})', f'| {mf.cluster}:{t})')}"
    elif kind == "random_slope":
        re = f"(1 + {model.get('slope') or mf.arm} | {t})"
    else:
        re = f"(1 | {t})"
    return f"{mf.outcome} ~ {rhs} + {re}"


def _clean(obj: Any) -> Any:
    """JSON-safe plain Python values: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


def fit_model(
    patients: pd.DataFrame, model: dict, dataset: dict, cfg: dict, *, higher_is_better: bool | None = None,
    idata_path: str | Path | None = None,
) -> tuple[dict, pd.DataFrame | None, pd.DataFrame | None]:
    """Fit one configured model. Returns (contract entry, therapist table or None, narrowing table or None)."""
    from ..engine.registry import FitRequest, lookup

    mf = model_frame(patients, model, dataset)
    family = model.get("family", "gaussian")
    kind = model["type"]
    engine = model.get("engine", "reml")
    hib = higher_is_better if family == "gaussian" else True
    if family == "binomial" and model.get("outcome") in ("reliable_deterioration", "dropout"):
        hib = False
    request = FitRequest(
        mf=mf, model=model, cfg=cfg, level=cfg["intervals"]["level"],
        interval=model.get("interval") or cfg["intervals"]["method"],
        n_boot=cfg["intervals"]["bootstrap_replicates"], seed=cfg["seed"], higher_is_better=hib,
        idata_path=idata_path,
    )
    spec = lookup(kind, family, engine)  # the registry: model type -> class and adapter
    caught: list[warnings.WarningMessage]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TherapistEffectsWarning)
        fitted = spec.fit(request)
    entry, table, narrowing = fitted.entry, fitted.table, fitted.narrowing
    # every model entry carries aic and bic (lme4's AIC()/BIC(); None without a maximised likelihood)
    ic = getattr(fitted.result, "information_criteria", None)
    entry = {**entry, **(ic() if ic is not None else {"aic": None, "bic": None})}
    messages = [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, TherapistEffectsWarning)]
    entry = dict(entry)
    own = list(entry.pop("warnings", []) or [])
    for m in messages:
        if not any(m.endswith(o) or o in m for o in own):
            own.append(m)
    out = {
        "type": kind,
        "family": family,
        "engine": engine,
        "outcome": mf.outcome,
        "formula": formula(model, mf),
        **entry,
    }
    out["n_excluded"] = mf.n_excluded
    out["excluded_by_reason"] = mf.excluded_reason
    out["warnings"] = own
    # Re-emit the engines' warnings so that callers (and the rule logs) see them too.
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if table is not None:
        table = table.copy()
        table.insert(0, "model", model["id"])
    return _clean(out), table, narrowing


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("therapist-effects", "numpy", "scipy", "pandas", "statsmodels", "pymc", "arviz", "nutpie",
                 "pandera", "snakemake", "matplotlib", "jinja2"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def public_config(cfg: dict) -> dict:
    """The config as written into outputs (internal keys, starting with '_', dropped)."""
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def assemble_estimates(
    dataset_name: str,
    dataset: dict,
    cfg: dict,
    accounting: dict,
    patients: pd.DataFrame,
    model_entries: dict[str, dict],
    skipped: dict[str, str],
    *,
    meta: dict | None = None,
    configfiles: list[str] | None = None,
) -> dict:
    """The contract's ``estimates.json`` object for one dataset (deterministic: no timestamps)."""
    n_clusters = int(patients["cluster"].nunique()) if "cluster" in patients.columns else None
    cfile = " ".join(f"--configfile {c}" for c in (configfiles or []))
    est: dict[str, Any] = {
        "dataset": dataset_name,
        "n_patients": int(len(patients)),
        "n_therapists": int(patients["therapist"].nunique()),
        "n_clusters": n_clusters,
        "rows_read": int(accounting["rows_read"]),
        "rows_rejected": int(accounting["rows_rejected"]),
        "rows_used": int(accounting["rows_used"]),
        "rejected_by_reason": accounting.get("rejected_by_reason", {}),
        "layout": dataset["layout"],
        "instrument": dataset.get("instrument"),
        "models": model_entries,
        "skipped_models": skipped,
    }
    if meta is not None:
        est["meta"] = meta
    est["provenance"] = {
        "data_file": dataset["path"],
        "data_sha256": file_sha256(dataset["path"]),
        "config": public_config(cfg),
        "packages": package_versions(),
        "seed": cfg["seed"],
        "command": f"snakemake --cores 2 {cfile}".strip(),
        # not the command line that was run (that would differ between equal runs and break the
        # byte-identical estimates.json): a command that reruns this analysis from the work directory
        "command_note": "suggested command to rerun this analysis in its work directory; not a record of "
                        "the command that was run",
        "created_by": "therapist-effects workflow",
    }
    return _clean(est)


def write_json(obj: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(_clean(obj), fh, indent=2, ensure_ascii=False, allow_nan=False)
        fh.write("\n")


def applicable_models(cfg: dict, dataset: dict) -> tuple[list[dict], dict[str, str]]:
    """Models to fit to ``dataset`` and, for default models the data do not allow, why they are skipped."""
    fit, skipped = [], {}
    for model in cfg["models"]:
        reason = None if cfg.get("_explicit_models") else model_applies(model, dataset)
        if reason:
            skipped[model["id"]] = reason
        else:
            fit.append(model)
    return fit, skipped
