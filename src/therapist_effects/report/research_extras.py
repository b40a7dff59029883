"""Research-report pieces for publication: caterpillar panels per arm, the priors table, the
model-comparison tables and the sensitivity forest plot.

Kept apart from :mod:`therapist_effects.report.research` so that its sections stay small; each function
returns plain values for the ``research.html`` template (figures as :class:`figures.Figure`).
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import fmt
from .figures import _RC, CLASS_STYLE, OKABE_ITO, Figure, _encode, class_key

ANALYSIS_LABELS = {"all": "all patients (main analysis)", "completers": "completers (dropouts excluded)",
                   "unadjusted": "unadjusted (no case-mix covariates)",
                   "min_caseload_10": "therapists with \u2265 10 patients"}
PRIOR_PARAMETERS = {"intercept": "intercept", "sigma_residual": "residual SD", "sigma_therapist": "therapist SD",
                    "sigma_cluster": "cluster SD", "sigma_slope": "therapist slope SD"}


def arm_role(e: dict, arm: str) -> str:
    """"control arm (0)" / "feedback arm (1)" from the model's levels, else "arm <level>"."""
    role = {str(e.get("feedback_level")): "feedback", str(e.get("control_level")): "control"}.get(str(arm))
    return f"{role} arm ({arm})" if role else f"arm {arm}"


def caterpillar_panels(t: pd.DataFrame, e: dict, *, ylabel: str, model: str) -> list[dict]:
    """One caterpillar panel per arm for a model whose therapist table has an ``arm`` column: a
    therapist appears once in each arm in which they treat patients. Panels share the y axis.

    Returns ``[{"arm", "label", "n", "fig"}]`` in arm order (control first)."""
    arms = sorted(t["arm"].astype(str).unique(), key=lambda a: (a != str(e.get("control_level")), a))
    eff = pd.to_numeric(t["effect"], errors="coerce")
    lo = pd.to_numeric(t["ci_low"], errors="coerce") if "ci_low" in t else eff
    hi = pd.to_numeric(t["ci_high"], errors="coerce") if "ci_high" in t else eff
    ymin, ymax = float(np.nanmin(lo)), float(np.nanmax(hi))
    pad = 0.05 * (ymax - ymin or 1.0)
    out = []
    for k, arm in enumerate(arms):
        m = (t["arm"].astype(str) == arm).to_numpy()
        label = arm_role(e, arm)
        cls = (t["classification"].fillna("") if "classification" in t else pd.Series([""] * len(t)))[m]
        keys = np.array([class_key(c) for c in cls])
        e_, l_, h_ = eff[m].to_numpy(float), lo[m].to_numpy(float), hi[m].to_numpy(float)
        order = np.argsort(e_, kind="stable")
        x = np.arange(1, len(e_) + 1)
        panel = chr(ord("A") + k)
        with plt.rc_context(_RC):
            fig, ax = plt.subplots(figsize=(5.4, 3.8))
            ax.axhline(0, color=OKABE_ITO["black"], lw=0.8)
            for key in ("none", "better", "worse", "above", "below"):
                sel = keys[order] == key
                if not sel.any():
                    continue
                colour, marker = CLASS_STYLE[key]
                ax.vlines(x[sel], l_[order][sel], h_[order][sel], color=colour, lw=1.1, alpha=0.8)
                ax.scatter(x[sel], e_[order][sel], color=colour, marker=marker, s=16, zorder=3,
                           label=f"{key if key != 'none' else 'not distinguishable'} ({int(sel.sum())})")
            ax.set_ylim(ymin - pad, ymax + pad)
            ax.set_xlim(0, len(e_) + 1)
            ax.set_xlabel(f"therapists in the {label}, ranked by estimated effect")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{panel}: {label}, model {model}")
            ax.legend(loc="upper left", frameon=False, fontsize=8)
            src = _encode(fig)
        alt = (f"Panel {panel}, {label} of model {model}: caterpillar plot of {len(e_)} therapists' effects in this "
               f"arm, ranked from lowest to highest with intervals; effects range from {np.nanmin(e_):.2f} to "
               f"{np.nanmax(e_):.2f}.")
        out.append({"arm": arm, "panel": panel, "label": label, "n": int(len(e_)), "fig": Figure(src, alt)})
    return out


def _flatten_priors(priors: Any, path: tuple = ()) -> list[tuple[tuple, dict]]:
    if isinstance(priors, dict) and "dist" in priors:
        return [(path, priors)]
    out = []
    if isinstance(priors, dict):
        for k, v in priors.items():
            out += _flatten_priors(v, (*path, str(k)))
    return out


def priors_table(priors: Any) -> list[dict]:
    """Rows ``{"parameter", "distribution", "arguments"}`` of a model's priors (nested dicts whose
    leaves are ``{"dist": name, <argument>: value, ...}``)."""
    rows = []
    for path, spec in _flatten_priors(priors):
        if len(path) == 2 and path[0] == "slopes":
            name = f"coefficient of {path[1]}"
        else:
            name = PRIOR_PARAMETERS.get(path[-1], " / ".join(path)) if path else "parameter"
        args = []
        for k, v in spec.items():
            if k == "dist":
                continue
            val = fmt.num(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
            args.append(f"{k} = {val}")
        rows.append({"parameter": name, "distribution": str(spec["dist"]), "arguments": ", ".join(args)})
    return rows


def comparison_view(est: dict) -> dict | None:
    """The ``model_comparison`` object of estimates.json for the report (None when absent)."""
    mc = est.get("model_comparison")
    if not isinstance(mc, dict) or not (mc.get("models") or mc.get("tests")):
        return None
    return {"models": list(mc.get("models") or []), "tests": list(mc.get("tests") or [])}


def sensitivity_forest(table: pd.DataFrame) -> Figure | None:
    """Forest plot of the sensitivity analyses: ICC with interval per analysis (and model)."""
    if table is None or not len(table):
        return None
    t = table.reset_index(drop=True)
    labels = [ANALYSIS_LABELS.get(a, a) + (f", model {m}" if t["model"].nunique() > 1 else "")
              for a, m in zip(t["analysis"], t["model"], strict=True)]
    y = np.arange(len(t))
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * len(t)))
        ax.hlines(y, t["icc_ci_low"], t["icc_ci_high"], color=OKABE_ITO["blue"], lw=2)
        ax.plot(t["icc"], y, "s", color=OKABE_ITO["blue"], ms=7)
        main = t.loc[t["analysis"] == "all", "icc"]
        if len(main):
            ax.axvline(float(main.iloc[0]), color=OKABE_ITO["grey"], ls="--", lw=1)
        ax.set_yticks(y, labels)
        ax.set_ylim(-0.6, len(t) - 0.4)
        ax.invert_yaxis()
        ax.set_xlim(left=0)
        ax.set_xlabel("ICC (therapist share of outcome variance) with 95% interval")
        ax.set_title("Sensitivity of the therapist ICC")
        src = _encode(fig)
    alt = "Forest plot of the therapist ICC under the sensitivity analyses: " + "; ".join(
        f"{lab}: {i:.3f} ({a:.3f} to {b:.3f})"
        for lab, i, a, b in zip(labels, t["icc"], t["icc_ci_low"], t["icc_ci_high"], strict=True)) + "."
    return Figure(src, alt)
