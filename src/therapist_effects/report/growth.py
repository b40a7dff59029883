"""Report sections of growth models: expected-recovery curves by intake band (observed against
expected, with the prediction band), the early-flag validation, the therapist share of the variance
in rate of change (research report), and not-on-track counts per therapist (service report, under
the same suppression rules as the rest of that report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .common import triple
from .figures import OKABE_ITO, Figure, _RC, _encode, plt
from .privacy import pseudonymise_ids, pseudonym_key, safe_count, safe_rate


def curves_figure(curves: pd.DataFrame, *, outcome: str, title: str) -> Figure:
    """Small multiples, one panel per intake band: mean observed score by session (points) against
    the mean expected score (line) and the mean prediction band (shaded)."""
    bands = list(dict.fromkeys(curves["band"]))
    n = len(bands)
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 0.6, 2.7 * rows + 0.4), sharey=True, squeeze=False)
        for k, band in enumerate(bands):
            ax = axes[k // cols][k % cols]
            c = curves[curves["band"] == band]
            ax.fill_between(c["session"], c["lower"], c["upper"], color=OKABE_ITO["sky"], alpha=0.35, lw=0,
                            label="prediction band")
            ax.plot(c["session"], c["expected"], color=OKABE_ITO["blue"], lw=1.6, label="expected")
            ax.plot(c["session"], c["observed"], color=OKABE_ITO["vermillion"], marker="o", ms=3.5, lw=0.9,
                    ls="--", label="observed mean")
            ax.set_title(f"{band} (n = {int(c['n'].iloc[0])})", fontsize=9)
            ax.set_xlabel("session")
            if k % cols == 0:
                ax.set_ylabel(outcome)
        for k in range(n, rows * cols):
            axes[k // cols][k % cols].set_visible(False)
        axes[0][0].legend(loc="best", frameon=False, fontsize=8)
        fig.suptitle(title, fontsize=11)
        src = _encode(fig)
    worst = curves.assign(gap=(curves["observed"] - curves["expected"]).abs()).sort_values("gap").iloc[-1]
    alt = (f"Expected-recovery curves of {outcome} by session in {n} intake-severity bands ({', '.join(bands)}): "
           f"mean observed scores against the scores expected from the growth model with the mean prediction band. "
           f"The largest gap between observed and expected means is {worst['gap']:.2f} points "
           f"({worst['band']}, session {int(worst['session'])}).")
    return Figure(src, alt)


def _load(path) -> pd.DataFrame | None:
    if path is None:
        return None
    if isinstance(path, pd.DataFrame):
        return path
    p = Path(path)
    if not p.is_file() or p.stat().st_size <= 1:
        return None
    return pd.read_csv(p, dtype={"patient": str, "therapist": str, "band": str, "model": str})


def growth_sections(est: dict, curves_paths: list | None) -> list[dict[str, Any]]:
    """One section per growth model in ``estimates.json``: its curves figure (from the model's
    ``<id>_curves.csv``), slope share, early-flag validation and the arm comparison."""
    by_model: dict[str, pd.DataFrame] = {}
    for p in curves_paths or []:
        t = _load(p)
        if t is not None and len(t):
            mid = str(t["model"].iloc[0]) if "model" in t else Path(p).stem.replace("_curves", "")
            by_model[mid] = t
    out = []
    for mid, e in (est.get("models") or {}).items():
        if e.get("type") != "growth":
            continue
        curves = by_model.get(mid)
        fig = (curves_figure(curves, outcome=str(e.get("outcome")), title=f"Expected recovery by intake severity, model {mid}")
               if curves is not None else None)
        v = e.get("early_flag_validation") or {}
        arm = e.get("arm_slopes")
        arm_rows = []
        if arm:
            for k, val in (arm.get("variance_components") or {}).items():
                arm_rows.append({"name": k, "t": triple(val)})
        out.append({
            "id": mid, "fig": fig, "share": triple(e.get("slope_share")), "time": e.get("time"),
            "time_variable": e.get("time_variable"), "band_level": e.get("band_level"),
            "validation": v, "sens": triple(v.get("sensitivity")), "spec": triple(v.get("specificity")),
            "arm": arm, "arm_rows": arm_rows, "ratio": triple((arm or {}).get("ratio")),
            "lrt": (arm or {}).get("lrt"), "flagged": e.get("not_on_track") or {},
            "note": None if fig is not None else "Curves table absent: expected-recovery plot omitted.",
        })
    return out


def not_on_track_counts(track: pd.DataFrame | str | Path | None, *, min_caseload: int, suppress_below: int,
                        pseudonymise: bool, key_env: str, round_base: int = 5) -> dict[str, Any] | None:
    """Per therapist: patients, patients flagged not on track at least once, flagged sessions.
    Therapists with fewer than ``min_caseload`` patients appear only in the aggregate row; counts from
    1 to ``suppress_below - 1`` are suppressed and the others rounded to ``round_base`` (the service
    report's rule, so that no suppressed count follows by subtraction); IDs are pseudonymised as in the
    rest of the report."""
    t = _load(track)
    if t is None or not len(t):
        return None
    per_patient = t.groupby(["therapist", "patient"], sort=True)["flag"].max().reset_index()
    agg = per_patient.groupby("therapist", sort=True).agg(patients=("patient", "size"), flagged=("flag", "sum"))
    sessions = t.groupby("therapist", sort=True)["flag"].sum()
    agg["flagged_sessions"] = sessions.reindex(agg.index).astype(int)
    big = agg[agg["patients"] >= min_caseload]
    small = agg[agg["patients"] < min_caseload]
    names = (pseudonymise_ids(big.index, pseudonym_key(key_env)) if pseudonymise else {str(i): str(i) for i in big.index})
    rows = []
    for tid, r in big.iterrows():
        n, f = int(r["patients"]), int(r["flagged"])
        rows.append({"therapist": names[str(tid)], "patients": safe_count(n, suppress_below, round_base),
                     "flagged": safe_rate(f, n, suppress_below, round_base),
                     "sessions": safe_count(int(r["flagged_sessions"]), suppress_below, round_base)})
    rows.sort(key=lambda r: r["therapist"])
    aggregate = None
    if len(small):
        n, f = int(small["patients"].sum()), int(small["flagged"].sum())
        aggregate = {"therapists": safe_count(len(small), suppress_below, round_base), "patients": safe_count(n, suppress_below, round_base),
                     "flagged": safe_rate(f, n, suppress_below, round_base)}
    total_p, total_f = int(agg["patients"].sum()), int(agg["flagged"].sum())
    return {"rows": rows, "aggregate": aggregate, "total": safe_rate(total_f, total_p, suppress_below, round_base),
            "min_caseload": min_caseload, "suppress_below": suppress_below}
