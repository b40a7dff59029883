"""The meta-analysis report (``results/meta/report.html``): therapist ICCs pooled across studies.

A per-study table (ICC with interval, patients, therapists), a forest plot of the ICCs with the
pooled estimate (diamond) and prediction interval, the between-study variance tau^2 and I^2, and,
when arm-specific estimates exist, a forest plot of the per-study ICC ratios (feedback / control).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..exceptions import InputError
from . import figures
from .common import finite, version
from .html import load_json, load_table, render

METHOD_WORDS = {"DL": "DerSimonian-Laird", "PM": "Paule-Mandel", "REML": "restricted maximum likelihood",
                "FE": "fixed (common) effect"}


def _studies(table: pd.DataFrame, est_cols=("icc", "estimate", "icc_ratio", "ratio")) -> pd.DataFrame:
    col = next((c for c in est_cols if c in table), None)
    if col is None or "study" not in table:
        raise InputError(f"study table needs a 'study' column and one of {list(est_cols)}; has {list(table.columns)}")
    out = pd.DataFrame({"study": table["study"].astype(str), "est": pd.to_numeric(table[col], errors="coerce")})
    for c in ("ci_low", "ci_high", "n_patients", "n_therapists", "weight"):
        out[c] = pd.to_numeric(table[c], errors="coerce") if c in table else np.nan
    return out


def _i2_percent(pooled: dict) -> float | None:
    """I^2 in percent. The pooled dict may give it as a proportion (0..1, ``I2``) or percent (``I2_percent``)."""
    if finite(pooled.get("I2_percent")) is not None:
        return finite(pooled["I2_percent"])
    v = finite(pooled.get("I2"))
    if v is None:
        return None
    return 100 * v if v <= 1 else v


def meta_report(study_table, pooled, out_path, *, per_arm=None) -> Path:
    """Write the meta-analysis report and return its path.

    ``study_table``: DataFrame / CSV path with ``study, icc, ci_low?, ci_high?, n_patients, n_therapists``.
    ``pooled``: dict / JSON path ``{"method", "estimate", "ci_low", "ci_high", "tau2", "I2", "pi_low",
    "pi_high", ...}`` on the ICC scale (a ``{"pooled": {...}}`` wrapper is accepted). ``per_arm``
    (optional): a DataFrame of per-study ratios (``study, icc_ratio, ci_low, ci_high``) or a dict
    ``{"studies": DataFrame, "pooled": {...}}``.
    """
    table = load_table(study_table)
    pooled = load_json(pooled, "pooled estimate") or {}
    if isinstance(pooled.get("pooled"), dict):
        pooled = {**pooled["pooled"], **{k: v for k, v in pooled.items() if k != "pooled"}}
    notes: list[str] = []
    studies = _studies(table) if table is not None and len(table) else None
    pe, plo, phi = (finite(pooled.get(k)) for k in ("estimate", "ci_low", "ci_high"))
    pi = (finite(pooled.get("pi_low")), finite(pooled.get("pi_high")))
    fig = None
    if studies is not None:
        fig = figures.forest(studies["study"], studies["est"], studies["ci_low"], studies["ci_high"],
                             pooled=("pooled", pe, plo if plo is not None else pe, phi if phi is not None else pe)
                             if pe is not None else None,
                             prediction=pi if None not in pi else None,
                             xlabel="therapist ICC", title="Therapist ICC by study",
                             weights=studies["n_patients"].fillna(1).to_numpy())
    else:
        notes.append("No study table: forest plot omitted.")
    arm = None
    if per_arm is not None:
        a_tab, a_pool = (per_arm.get("studies"), per_arm.get("pooled") or {}) if isinstance(per_arm, dict) \
            else (per_arm, {})
        a_tab = load_table(a_tab)
        if a_tab is not None and len(a_tab):
            a = _studies(a_tab, ("icc_ratio", "ratio", "estimate"))
            ape = finite(a_pool.get("estimate"))
            arm = {"rows": a.to_dict("records"), "pooled": a_pool,
                   "fig": figures.forest(a["study"], a["est"], a["ci_low"], a["ci_high"],
                                         pooled=("pooled", ape, finite(a_pool.get("ci_low")) or ape,
                                                 finite(a_pool.get("ci_high")) or ape) if ape is not None else None,
                                         xlabel="ICC ratio (feedback / control)", reference=1.0,
                                         title="Feedback / control ICC ratio by study")}
    if arm is None:
        notes.append("No arm-specific estimates: ratio forest plot omitted.")
    method = str(pooled.get("method") or "")
    return render(
        "meta.html", out_path, version=version(), studies=studies.to_dict("records") if studies is not None else [],
        pooled=pooled, pe=pe, plo=plo, phi=phi, pi=pi, tau2=finite(pooled.get("tau2")), i2=_i2_percent(pooled),
        method=METHOD_WORDS.get(method.upper(), method), fig=fig, arm=arm, notes=notes,
        k=len(studies) if studies is not None else 0,
        n_patients=int(studies["n_patients"].sum()) if studies is not None and studies["n_patients"].notna().any() else None,
    )
