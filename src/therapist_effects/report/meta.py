"""The meta-analysis report (``results/meta/report.html``): therapist ICCs pooled across studies.

The two-stage pooled ICC (random effects on the pooling scale: estimator, test and scale named)
beside the one-stage estimates from the patients of all trials (nested model with a trial level)
where raw data exist; a per-study table with each study's weight; a forest plot whose squares are
sized by weight; the leave-one-out (influence) table; and, when arm-specific ICCs exist, the pooled
ICC per arm and the pooled ICC ratio (feedback / control) two-stage and one-stage.

Every ICC-scale number in the report is written with one number of decimals (3, or 4 when a
displayed ICC is below 0.01), so that columns line up and compare.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..exceptions import InputError
from . import figures, fmt
from .common import finite, version
from .html import load_json, load_table, render

METHOD_WORDS = {"DL": "DerSimonian-Laird", "PM": "Paule-Mandel", "REML": "restricted maximum likelihood",
                "FE": "fixed (common) effect"}
TEST_WORDS = {"z": "Wald (normal) interval", "knha": "Knapp-Hartung (t) interval"}
SCALE_WORDS = {"fisher_z": "Fisher's z (atanh) of the ICC", "logit": "logit of the ICC", "log": "log ratio"}


def _studies(table: pd.DataFrame, est_cols=("icc", "estimate", "icc_ratio", "ratio")) -> pd.DataFrame:
    col = next((c for c in est_cols if c in table), None)
    if col is None or "study" not in table:
        raise InputError(f"study table needs a 'study' column and one of {list(est_cols)}; has {list(table.columns)}")
    out = pd.DataFrame({"study": table["study"].astype(str), "est": pd.to_numeric(table[col], errors="coerce")})
    for c in ("ci_low", "ci_high", "n_patients", "n_therapists", "weight_percent", "weight", "input"):
        out[c] = (pd.to_numeric(table[c], errors="coerce") if c != "input" else table[c]) if c in table else np.nan
    if out["weight_percent"].isna().all() and out["weight"].notna().any():
        out["weight_percent"] = 100 * out["weight"] / out["weight"].sum()
    return out


def _i2_percent(pooled: dict) -> float | None:
    """I^2 in percent. The pooled dict may give it as a proportion (0..1, ``I2``) or percent (``I2_percent``)."""
    if finite(pooled.get("I2_percent")) is not None:
        return finite(pooled["I2_percent"])
    v = finite(pooled.get("I2"))
    if v is None:
        return None
    return 100 * v if v <= 1 else v


def _common_decimals(values) -> int:
    """One number of decimals for every ICC in the report: 3, or 4 when a non-zero ICC is below 0.01."""
    small = [abs(v) for v in (finite(x) for x in values) if v is not None and 0 < abs(v) < 0.01]
    return 4 if small else 3


class _Fmt:
    """Formatting with the report's common number of decimals (``d``)."""

    def __init__(self, d: int):
        self.d = d

    def num(self, x) -> str:
        return fmt.num(x, self.d)

    def interval(self, est, lo, hi) -> str:
        if finite(lo) is None or finite(hi) is None:
            return fmt.num(est, self.d)
        return f"{fmt.num(est, self.d)} ({fmt.num(lo, self.d)} to {fmt.num(hi, self.d)})"


def _block(d: dict | None, keys=("estimate", "ci_low", "ci_high")) -> tuple | None:
    if not isinstance(d, dict) or finite(d.get(keys[0])) is None:
        return None
    return tuple(finite(d.get(k)) for k in keys)


def meta_report(study_table, pooled, out_path, *, per_arm=None, leave_one_out=None, one_stage=None,
                arms=None) -> Path:
    """Write the meta-analysis report and return its path.

    ``study_table``: DataFrame / CSV path with ``study, icc, ci_low?, ci_high?, n_patients,
    n_therapists, weight_percent?, input?``. ``pooled``: dict / JSON path ``{"method", "test",
    "scale", "estimate", "ci_low", "ci_high", "tau2", "I2", "pi_low", "pi_high", ...}`` on the ICC
    scale (a ``{"pooled": {...}}`` wrapper is accepted). ``leave_one_out``: rows of
    :func:`therapist_effects.meta.leave_one_out` (``study, icc, icc_ci_low, icc_ci_high, tau2, I2``).
    ``one_stage``: ``{dataset: {"icc": one_stage_icc(...), "arms": one_stage_ratio(...)}}``.
    ``arms``: :func:`therapist_effects.meta.pool_arms`'s result. ``per_arm`` (optional, older form): a
    DataFrame of per-study ratios (``study, icc_ratio, ci_low, ci_high``) or a dict
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
    loo = pd.DataFrame(leave_one_out or [])
    one_stage = {k: v for k, v in (one_stage or {}).items() if v}
    # one number of decimals for every ICC shown
    icc_values = [pe, plo, phi, *pi]
    if studies is not None:
        icc_values += [*studies["est"], *studies["ci_low"], *studies["ci_high"]]
    if len(loo) and "icc" in loo:
        icc_values += [*loo["icc"], *loo["icc_ci_low"], *loo["icc_ci_high"]]
    one_rows = []
    for name, entry in one_stage.items():
        b = _block(entry.get("icc"))
        if b:
            icc_values += list(b)
        one_rows.append({"dataset": name, "icc": b, "singular": bool((entry.get("icc") or {}).get("singular")),
                         "error": (entry.get("icc") or {}).get("error")})
    f = _Fmt(_common_decimals(icc_values))
    fig = None
    if studies is not None:
        w = studies["weight_percent"]
        fig = figures.forest(studies["study"], studies["est"], studies["ci_low"], studies["ci_high"],
                             pooled=("pooled", pe, plo if plo is not None else pe, phi if phi is not None else pe)
                             if pe is not None else None,
                             prediction=pi if None not in pi else None,
                             xlabel="therapist ICC", title="Therapist ICC by study",
                             weights=(w if w.notna().any() else studies["n_patients"]).fillna(1).to_numpy())
        if w.isna().all():
            notes.append("No weights given: squares are sized by the number of patients.")
    else:
        notes.append("No study table: forest plot omitted.")
    arm = _arm_section(per_arm, arms, one_stage)
    if arm is None:
        notes.append("No arm-specific estimates: ratio forest plot omitted.")
    method = str(pooled.get("method") or "")
    return render(
        "meta.html", out_path, version=version(), studies=studies.to_dict("records") if studies is not None else [],
        pooled=pooled, pe=pe, plo=plo, phi=phi, pi=pi, tau2=finite(pooled.get("tau2")), i2=_i2_percent(pooled),
        method=METHOD_WORDS.get(method.upper(), method), test=TEST_WORDS.get(str(pooled.get("test")), None),
        scale=SCALE_WORDS.get(str(pooled.get("scale")), None), scale_key=pooled.get("scale"),
        fig=fig, arm=arm, notes=notes, f=f, loo=loo.to_dict("records") if len(loo) else [], one_stage=one_rows,
        k=len(studies) if studies is not None else 0,
        n_patients=int(studies["n_patients"].sum()) if studies is not None and studies["n_patients"].notna().any() else None,
    )


def _arm_section(per_arm, arms, one_stage) -> dict | None:
    """Per-arm pooled ICCs, the pooled ratio two-stage (log scale) and one-stage, and the ratio forest."""
    rows, a_pool = None, {}
    if arms and isinstance(arms.get("ratio"), dict):
        rows = pd.DataFrame(arms["ratio"].get("studies") or [])
        a_pool = arms["ratio"].get("ratio") or {}
    elif per_arm is not None:
        a_tab, a_pool = (per_arm.get("studies"), per_arm.get("pooled") or {}) if isinstance(per_arm, dict) \
            else (per_arm, {})
        rows = load_table(a_tab)
    one = [(name, e["arms"]) for name, e in one_stage.items() if isinstance(e.get("arms"), dict)
           and "ratio" in e["arms"]]
    per_arm_pooled = []
    for role in ("control", "feedback"):
        if arms and isinstance(arms.get(role), dict):
            p = arms[role]
            per_arm_pooled.append({"arm": (arms.get("levels") or {}).get(role, role), "role": role,
                                   "icc": _block(p.get("icc")), "k": p.get("k")})
    if (rows is None or not len(rows)) and not one and not per_arm_pooled:
        return None
    out = {"rows": [], "pooled": a_pool, "fig": None, "per_arm": per_arm_pooled, "one_stage": one,
           "two_stage": _block(a_pool), "reduction": _block((arms or {}).get("reduction")),
           "left_out": ((arms or {}).get("ratio") or {}).get("left_out") or []}
    if rows is not None and len(rows):
        a = _studies(rows, ("icc_ratio", "ratio", "estimate"))
        ape = finite(a_pool.get("estimate"))
        out["rows"] = a.to_dict("records")
        w = a["weight_percent"]
        out["fig"] = figures.forest(a["study"], a["est"], a["ci_low"], a["ci_high"],
                                    pooled=("pooled", ape, finite(a_pool.get("ci_low")) or ape,
                                            finite(a_pool.get("ci_high")) or ape) if ape is not None else None,
                                    xlabel="ICC ratio (feedback / control)", reference=1.0,
                                    title="Feedback / control ICC ratio by study",
                                    weights=w.fillna(1).to_numpy() if w.notna().any() else None,
                                    log=bool((a["est"] > 0).all() and (a["ci_low"].fillna(1) > 0).all()))
    return out
