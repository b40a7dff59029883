"""The research report: one self-contained HTML file describing a dataset's therapist-effect analysis.

Sections: methods (generated from the estimates and config), sample flow, descriptive table by arm,
model tables (fixed effects, variance components, ICC with intervals, likelihood-ratio tests, loud
flags for singular or non-converged fits and failed samplers), caterpillar plots of therapist
effects, per-arm ICCs, the narrowing-the-gap plot, diagnostics (residual plots; trace and rank plots
for Bayesian fits) and provenance (data SHA-256, config, package versions, seed, command).

A section whose inputs are absent is replaced by a short note; nothing here raises on missing
optional inputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..models.design import INTERCEPT, fixed_effects_matrix
from ..exceptions import InputError
from . import figures, fmt, research_extras
from .common import (CI_WORDS, TYPE_WORDS, dataset_columns, finite, fixed_terms, higher_is_better,
                     is_bayes, method_words, model_flags, triple, version)
from .html import load_json, load_table, render

BINARY_OUTCOMES = [("recovered", "recovered"), ("reliable_improvement", "reliable improvement"),
                   ("reliable_recovery", "reliable recovery"), ("reliable_deterioration", "reliable deterioration"),
                   ("dropout", "dropped out")]
CONTINUOUS = [("baseline", "baseline score"), ("end", "end-of-treatment score"), ("change", "change (improvement)"),
              ("n_sessions", "sessions attended")]
MAX_LISTED = 40


# --------------------------------------------------------------------------------------- sections
def methods_text(est: dict) -> list[str]:
    """The methods paragraphs, in words, from the estimates (models, estimation, intervals, software)."""
    prov = est.get("provenance") or {}
    paras = []
    src = prov.get("data_file")
    s = (f"The analysis used {fmt.count(est.get('rows_used', est.get('n_patients')))} of "
         f"{fmt.count(est.get('rows_read'))} rows" + (f" of {src}" if src else "")
         + (f" ({est['layout']} layout)" if est.get("layout") else "") + ". ")
    s += (f"The sample comprised {fmt.count(est.get('n_patients'))} patients treated by "
          f"{fmt.count(est.get('n_therapists'))} therapists"
          + (f" in {fmt.count(est['n_clusters'])} services" if est.get("n_clusters") else "") + ".")
    if est.get("instrument"):
        s += f" Outcomes were measured with the {est['instrument']}."
    paras.append(s)
    cis = set()
    for mid, e in (est.get("models") or {}).items():
        family = e.get("family", "gaussian")
        kind = "logistic mixed model" if family == "binomial" else "linear mixed model"
        text = (f"Model {mid}: a {kind} of {e.get('outcome', 'the outcome')} with "
                f"{TYPE_WORDS.get(e.get('type'), str(e.get('type', 'unstated structure')))}"
                + (f" ({e['formula']})" if e.get("formula") else "")
                + f", estimated by {method_words(e)}.")
        if family == "binomial":
            text += " Its ICC is on the latent scale (residual variance \u03c0\u00b2/3)."
        ci = (e.get("icc") or {}).get("ci_method") if isinstance(e.get("icc"), dict) else None
        if ci:
            cis.add(CI_WORDS.get(str(ci).lower(), str(ci)))
        paras.append(text)
    if cis:
        paras.append("Intervals for the intraclass correlation (ICC, the therapists' share of the outcome "
                     f"variance) are {', '.join(sorted(cis))} intervals. Therapist effects are empirical-Bayes "
                     "(shrunken) predictions with intervals; a therapist is called better or worse than average "
                     "only when the interval excludes the average.")
    pk = prov.get("packages") or {}
    if pk:
        paras.append("Software: " + ", ".join(f"{k} {v}" for k, v in pk.items()) + ".")
    return paras


def sample_flow(est: dict, patients: pd.DataFrame | None, rejects: pd.DataFrame | None) -> dict:
    reasons = dict(est.get("rejected_by_reason") or {})
    if not reasons and rejects is not None and "reason" in rejects:
        reasons = rejects["reason"].astype(str).value_counts().to_dict()
    read, rejected = est.get("rows_read"), est.get("rows_rejected")
    used = est.get("rows_used")
    if used is None and finite(read) is not None and finite(rejected) is not None:
        used = int(read) - int(rejected)
    problems = []
    if None not in (read, rejected, used) and int(read) != int(used) + int(rejected):
        problems.append(f"Row accounting does not add up: {read} read \u2260 {used} used + {rejected} rejected.")
    if reasons and rejected is not None and sum(int(v) for v in reasons.values()) != int(rejected):
        problems.append(f"Rejections by reason sum to {sum(int(v) for v in reasons.values())}, "
                        f"not to the {rejected} rows rejected.")
    caseload = None
    fig = None
    if patients is not None and "therapist" in patients:
        sizes = patients.groupby("therapist").size().to_numpy()
        q = np.percentile(sizes, [0, 25, 50, 75, 100])
        caseload = {"min": q[0], "q1": q[1], "median": q[2], "q3": q[3], "max": q[4], "mean": sizes.mean(),
                    "n": len(sizes), "under10": int((sizes < 10).sum())}
        fig = figures.histogram(sizes, xlabel="caseload (patients per therapist)", title="Caseload distribution")
    return {"read": read, "rejected": rejected, "used": used, "patients": est.get("n_patients"),
            "therapists": est.get("n_therapists"), "clusters": est.get("n_clusters"),
            "reasons": sorted(reasons.items(), key=lambda kv: -int(kv[1])), "problems": problems,
            "caseload": caseload, "caseload_fig": fig}


def arm_label(level: str, feedback: pd.Series | None) -> str:
    """Column heading of an arm: "feedback (1)" / "control (0)" where the patient table's 0/1
    ``feedback`` indicator says which level is which, else "arm <level>"."""
    if feedback is not None and feedback.notna().any():
        return f"{'feedback' if float(feedback.dropna().iloc[0]) == 1.0 else 'control'} ({level})"
    return f"arm {level}"


def descriptives(patients: pd.DataFrame | None) -> dict | None:
    """Descriptive table by arm: rows are variables, columns the arms and all patients."""
    if patients is None or not len(patients):
        return None
    groups: list[tuple[str, pd.DataFrame]] = []
    if "arm" in patients and patients["arm"].notna().any():
        feedback = patients["feedback"] if "feedback" in patients else None
        for level, g in patients.groupby(patients["arm"].astype(str), sort=True):
            groups.append((arm_label(level, g["feedback"] if feedback is not None else None), g))
    groups.append(("all patients", patients))
    rows: list[dict] = []
    rows.append({"label": "patients", "kind": "count", "cells": [len(g) for _, g in groups]})
    if "therapist" in patients:
        rows.append({"label": "therapists", "kind": "count", "cells": [g["therapist"].nunique() for _, g in groups]})
    for col, label in CONTINUOUS:
        if col in patients and pd.api.types.is_numeric_dtype(patients[col]) and patients[col].notna().any():
            rows.append({"label": f"{label}, mean (SD)", "kind": "meansd",
                         "cells": [(g[col].mean(), g[col].std(ddof=1), int(g[col].notna().sum())) for _, g in groups]})
    for col, label in BINARY_OUTCOMES:
        if col in patients and patients[col].notna().any():
            rows.append({"label": f"{label}, % (n of N)", "kind": "rate",
                         "cells": [(float(np.nansum(g[col])), int(g[col].notna().sum())) for _, g in groups]})
    return {"columns": [name for name, _ in groups], "rows": rows}


def model_view(mid: str, e: dict) -> dict:
    fixed = []
    for name, v in (e.get("fixed_effects") or {}).items():
        d = v if isinstance(v, dict) else {"estimate": v}
        fixed.append({"name": name, "est": finite(d.get("estimate")), "se": finite(d.get("se")),
                      "lo": finite(d.get("ci_low")), "hi": finite(d.get("ci_high"))})
    variances = [{"name": k, "t": triple(v)} for k, v in (e.get("variance_components") or {}).items()]
    icc = e.get("icc")
    icc_t = triple(icc) if icc is not None else None
    by_arm = [{"arm": k, "t": triple(v)} for k, v in (e.get("icc_by_arm") or {}).items()]
    lrts = []
    for key, label in (("lrt", "Likelihood-ratio test"),
                       ("lrt_equal_variances", "Likelihood-ratio test of equal therapist variances in the arms")):
        t = e.get(key)
        if isinstance(t, dict):
            lrts.append({"label": t.get("test") or t.get("description") or label, "stat": t.get("statistic"),
                         "df": t.get("df"), "p": t.get("p_value")})
    diag = e.get("diagnostics") if is_bayes(e) else None
    extras = {}
    priors = research_extras.priors_table(e["priors"]) if e.get("priors") else []
    if e.get("prior_sensitivity"):
        extras["Prior sensitivity"] = json.dumps(e["prior_sensitivity"], indent=2, default=str)
    return {
        "id": mid, "type": e.get("type"), "family": e.get("family", "gaussian"), "method": method_words(e),
        "outcome": e.get("outcome"), "formula": e.get("formula"), "n_patients": e.get("n_patients"),
        "n_therapists": e.get("n_therapists"), "n_excluded": e.get("n_excluded"), "loglik": e.get("loglik"),
        "flags": model_flags(e), "singular": e.get("singular") is True, "converged": e.get("converged"),
        "fixed": fixed, "variances": variances, "icc": icc_t,
        "icc_method": CI_WORDS.get(str((icc or {}).get("ci_method", "")).lower(), (icc or {}).get("ci_method"))
        if isinstance(icc, dict) else None,
        "by_arm": by_arm, "icc_ratio": triple(e["icc_ratio"]) if e.get("icc_ratio") is not None else None,
        "icc_reduction": triple(e["icc_reduction"]) if e.get("icc_reduction") is not None else None,
        "correlation": triple(e["correlation"]) if e.get("correlation") is not None else None,
        "lrts": lrts, "diagnostics": diag, "extras": extras, "priors": priors,
    }


def _arm_text(v: Any) -> str:
    """An arm level read back from CSV as text (1.0 -> "1")."""
    try:
        f = float(v)
        return str(int(f)) if f.is_integer() else str(v)
    except (TypeError, ValueError):
        return str(v)


def effect_label(est: dict, mid: str) -> str:
    e = (est.get("models") or {}).get(mid, {})
    hib = higher_is_better(est, mid)
    scale = "log-odds" if e.get("family") == "binomial" else "outcome scale"
    if e.get("type") == "growth":
        scale = f"rate of change per unit of {e.get('time_variable', 'time')}"
    direction = {True: "higher = better", False: "lower = better", None: "direction not stated"}[hib]
    return f"effect on {e.get('outcome', 'outcome')} ({scale}; {direction})"


def therapist_sections(est: dict, therapists: pd.DataFrame | None) -> tuple[list[dict], list[str]]:
    notes: list[str] = []
    if therapists is None or "effect" not in therapists or not len(therapists):
        return [], ["No therapist effects (therapists.csv absent or empty): caterpillar plot omitted."]
    out = []
    order = list((est.get("models") or {}).keys())
    models = therapists["model"].astype(str).unique().tolist() if "model" in therapists else [""]
    models.sort(key=lambda m: order.index(m) if m in order else len(order))
    for mid in models:
        t = therapists[therapists["model"].astype(str) == mid] if mid else therapists
        t = t[pd.to_numeric(t["effect"], errors="coerce").notna()]
        if not len(t):
            continue
        lo = t["ci_low"] if "ci_low" in t else t["effect"]
        hi = t["ci_high"] if "ci_high" in t else t["effect"]
        cls = t["classification"].fillna("") if "classification" in t else pd.Series([""] * len(t))
        panels = None
        if "arm" in t and t["arm"].notna().all() and t["arm"].nunique() > 1:
            # therapist x arm pairs: one panel per arm, so that each point is one therapist
            panels = research_extras.caterpillar_panels(
                t.assign(arm=t["arm"].map(_arm_text)), (est.get("models") or {}).get(mid, {}),
                ylabel=effect_label(est, mid), model=mid)
            fig = None
        else:
            fig = figures.caterpillar(t["effect"], lo, hi, cls, ylabel=effect_label(est, mid),
                                      title=f"Therapist effects, model {mid}")
        keys = [figures.class_key(c) for c in cls]
        listed = t.assign(_k=keys)[[k != "none" for k in keys]]
        listed = listed.sort_values("effect")
        rows = [{"therapist": r["therapist"], "arm": _arm_text(r.get("arm")) if panels else None,
                 "caseload": r.get("caseload"), "est": r["effect"],
                 "lo": r.get("ci_low"), "hi": r.get("ci_high"), "cls": r.get("classification"), "key": r["_k"]}
                for _, r in listed.head(MAX_LISTED).iterrows()]
        out.append({"model": mid, "fig": fig, "n": len(t), "rows": rows, "more": max(0, len(listed) - MAX_LISTED),
                    "label": effect_label(est, mid), "panels": panels})
    return out, notes


def arm_icc_figures(est: dict) -> list[dict]:
    out = []
    for mid, e in (est.get("models") or {}).items():
        by_arm = e.get("icc_by_arm")
        if not isinstance(by_arm, dict) or not by_arm:
            continue
        rows = []
        for arm, v in by_arm.items():
            t = triple(v)
            if t[0] is not None:
                name = {str(e.get("feedback_level")): "feedback", str(e.get("control_level")): "control"}.get(str(arm))
                rows.append((f"{name} ({arm})" if name else f"arm {arm}", t[0], t[1], t[2]))
        if rows:
            xlabel = ("latent-scale ICC (therapist share of latent variance)" if e.get("family") == "binomial"
                      else "ICC (therapist share of outcome variance)")
            out.append({"model": mid, "fig": figures.icc_by_arm(rows, title=f"ICC by arm, model {mid}", xlabel=xlabel)})
    return out


def conditional_residuals(est: dict, mid: str, patients: pd.DataFrame, therapists: pd.DataFrame
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fitted values, residuals and therapist effects of a Gaussian random-intercept model.

    fitted = X beta + u_therapist, with beta from ``estimates.json`` and u from ``therapists.csv``;
    the design matrix is rebuilt with :func:`therapist_effects.models.design.fixed_effects_matrix` after the
    patient table's canonical columns are renamed back to the file's names (as the models do).
    Raises ``ValueError`` with the reason when the fit cannot be reconstructed.
    """
    e = est["models"][mid]
    cols = dataset_columns(est)
    rename = {}
    if "outcome" in cols:
        rename["end"] = cols["outcome"]
    elif "score" in cols:
        rename["end"], rename["baseline"] = f"{cols['score']}_end", f"{cols['score']}_baseline"
    for role in ("baseline", "arm", "therapist", "cluster"):
        if role in cols and role not in rename:
            rename[role] = cols[role]
    df = patients.drop(columns=[c for c in rename.values() if c in patients and c not in rename])
    df = df.rename(columns=rename)
    outcome = e.get("outcome")
    terms = fixed_terms(e.get("formula", ""))
    tcol = rename.get("therapist", "therapist")
    need = [outcome, *terms, tcol]
    missing = [c for c in need if c not in df]
    if missing:
        raise ValueError(f"patient table lacks {missing}")
    df = df[need].dropna()
    X, names = fixed_effects_matrix(df, terms, intercept=INTERCEPT in (e.get("fixed_effects") or {}))
    fe = e.get("fixed_effects") or {}
    if set(names) != set(fe):
        raise ValueError(f"design columns {names} do not match the fixed effects {sorted(fe)}")
    beta = np.array([triple(fe[n])[0] for n in names], dtype=float)
    t = therapists[therapists["model"].astype(str) == mid] if "model" in therapists else therapists
    u = dict(zip(t["therapist"].astype(str), pd.to_numeric(t["effect"], errors="coerce"), strict=True))
    ui = df[tcol].astype(str).map(u).to_numpy(dtype=float)
    ok = np.isfinite(ui)
    if ok.sum() < 0.5 * len(df):
        raise ValueError("fewer than half the patients have a therapist effect for this model")
    fitted = X[ok] @ beta + ui[ok]
    resid = df[outcome].to_numpy(dtype=float)[ok] - fitted
    return fitted, resid, np.asarray(list(u.values()), dtype=float)


def diagnostics(est: dict, patients, therapists, idata_paths) -> tuple[list[dict], list[str]]:
    items, notes = [], []
    models = est.get("models") or {}
    for mid, e in models.items():
        if is_bayes(e) or e.get("family", "gaussian") != "gaussian" or e.get("type") != "random_intercept":
            continue
        if patients is None or therapists is None:
            notes.append(f"Residual plots for model {mid} need patients.parquet and therapists.csv.")
            continue
        try:
            fitted, resid, u = conditional_residuals(est, mid, patients, therapists)
        except (ValueError, KeyError, TypeError) as err:
            notes.append(f"Residual plots for model {mid} omitted: {err}.")
            continue
        items.append({"title": f"Residuals, model {mid}",
                      "fig": figures.residual_panels(fitted, resid, u, title=f"model {mid}")})
    paths = _idata_map(idata_paths, models)
    for mid, e in models.items():
        if not is_bayes(e):
            continue
        p = paths.get(mid)
        if p is None:
            notes.append(f"Trace and rank plots for model {mid}: no InferenceData file given.")
            continue
        try:
            fig = figures.bayes_diagnostics(p, title=f"model {mid}")
        except Exception as err:  # noqa: BLE001 - unreadable or empty NetCDF: note it, never crash
            notes.append(f"Trace and rank plots for model {mid} omitted: {Path(p).name} could not be read "
                         f"({type(err).__name__}).")
            continue
        items.append({"title": f"Trace and rank plots, model {mid}", "fig": fig})
    return items, notes


def _idata_map(idata_paths, models: dict) -> dict[str, Path]:
    if not idata_paths:
        return {}
    if isinstance(idata_paths, dict):
        return {str(k): Path(v) for k, v in idata_paths.items() if v and Path(v).exists()}
    out = {}
    for p in idata_paths:  # a list: match files to models by the model id in the file name
        p = Path(p)
        for mid in models:
            if p.exists() and (p.stem == mid or p.stem.endswith(f"_{mid}") or p.stem.startswith(f"{mid}_")
                               or p.parent.name == mid):
                out[mid] = p
    return out


def narrowing_view(narrowing) -> tuple[Any, str | None]:
    df = load_table(narrowing)
    if df is None or not {"intercept_effect", "slope_effect"} <= set(df.columns) or len(df) < 3:
        return None, "Narrowing-the-gap plot omitted: no random-slope model (narrowing.csv absent or empty)."
    a = pd.to_numeric(df["intercept_effect"], errors="coerce")
    b = pd.to_numeric(df["slope_effect"], errors="coerce")
    ok = a.notna() & b.notna()
    return figures.narrowing(a[ok], b[ok], title="Narrowing the gap: therapist effects with and without feedback"), None


def provenance_view(est: dict) -> dict | None:
    prov = est.get("provenance")
    if not isinstance(prov, dict):
        return None
    cfg = prov.get("config")
    return {"data_file": prov.get("data_file"), "sha256": prov.get("data_sha256"), "seed": prov.get("seed"),
            "command": prov.get("command"), "created_by": prov.get("created_by"),
            "packages": sorted((prov.get("packages") or {}).items()),
            "config": json.dumps(cfg, indent=2, default=str, ensure_ascii=False) if cfg is not None else None}


# ------------------------------------------------------------------------------------------ entry
def research_report(estimates, patients, therapists, rejects, out_path, *, narrowing=None,
                    idata_paths=None, sensitivity=None, growth_curves=None) -> Path:
    """Write the research report (``results/<dataset>/report.html``) and return its path.

    ``estimates`` is the ``estimates.json`` dict (or its path); ``patients``, ``therapists``,
    ``rejects`` and ``narrowing`` DataFrames or paths (any may be None); ``idata_paths`` a dict
    ``{model id: NetCDF path}`` or a list of paths named after the models; ``sensitivity`` the
    sensitivity.csv table (or its path), shown as a forest plot when given.
    """
    est = load_json(estimates, "estimates")
    if est is None:
        raise InputError(f"{estimates}: estimates.json not found")
    patients, therapists, rejects = load_table(patients), load_table(therapists), load_table(rejects)
    models = [model_view(mid, e) for mid, e in (est.get("models") or {}).items()]
    alerts = [(m["id"], f) for m in models for f in m["flags"] if f[0] == "alert"]
    effects, effect_notes = therapist_sections(est, therapists)
    diag_items, diag_notes = diagnostics(est, patients, therapists, idata_paths)
    narrow_fig, narrow_note = narrowing_view(narrowing)
    notes = {"effects": effect_notes, "narrowing": [narrow_note] if narrow_note else [], "diagnostics": diag_notes}
    if patients is None:
        notes["patients"] = ["patients.parquet absent: descriptive table and caseload distribution omitted."]
    return render(
        "research.html", out_path, version=version(), est=est, dataset=est.get("dataset", "dataset"),
        methods=methods_text(est), flow=sample_flow(est, patients, rejects), desc=descriptives(patients),
        models=models, alerts=alerts, effects=effects, arm_iccs=arm_icc_figures(est), narrowing=narrow_fig,
        diagnostics=diag_items, notes=notes, provenance=provenance_view(est),
        skipped=sorted((est.get("skipped_models") or {}).items()),
        comparison=research_extras.comparison_view(est), sensitivity=_sensitivity_view(sensitivity),
        growth=_growth_sections(est, growth_curves),
    )


def _sensitivity_view(sensitivity) -> dict | None:
    table = load_table(sensitivity)
    if table is None or not len(table):
        return None
    return {"rows": table.to_dict("records"), "fig": research_extras.sensitivity_forest(table),
            "labels": research_extras.ANALYSIS_LABELS}


def _growth_sections(est: dict, growth_curves) -> list[dict]:
    """Sections of growth models (see :mod:`therapist_effects.report.growth`)."""
    from .growth import growth_sections

    return growth_sections(est, growth_curves)
