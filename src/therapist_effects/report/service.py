"""The therapist-level service report (``therapist_report.html``) for service managers.

Per therapist: caseload, case-mix-adjusted outcome, shrunken effect with its interval and a
plain-language classification, recovery and reliable-improvement rates; a Spiegelhalter funnel plot
of recovery rate against caseload; and a plain explanation of what the numbers can and cannot say.

Privacy by default (see :mod:`.privacy`): therapist IDs are replaced by keyed-hash pseudonyms,
therapists below the minimum caseload appear only in an aggregate row, counts from 1 to
``suppress_below - 1`` are suppressed, and nothing patient-level is written (no patient IDs, no
per-patient values; the figures are drawn from therapist-level summaries).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ..exceptions import InputError
from . import figures
from . import common
from .common import finite, model_flags, primary_model, triple, version
from .html import load_json, load_table, render
from .privacy import pseudonym_key, pseudonymise_ids, safe_count, safe_rate

LEVELS = (0.95, 0.998)


def funnel_limits(p0: float, n, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact binomial control limits for a proportion, interpolated (Spiegelhalter 2005, Stat Med 24:1185).

    For caseload n and two-sided ``level``, with p = (1 - level) / 2 (lower) or (1 + level) / 2
    (upper): r_p is the p-quantile of Binomial(n, p0), alpha = (F(r_p) - p) / (F(r_p) - F(r_p - 1))
    and the limit is (r_p - alpha) / n. Returns (lower, upper) arrays for the given caseloads.
    """
    n = np.asarray(n, dtype=float)
    out = []
    for p in ((1 - level) / 2, (1 + level) / 2):
        r = stats.binom.ppf(p, n, p0)
        f_r = stats.binom.cdf(r, n, p0)
        f_r1 = stats.binom.cdf(r - 1, n, p0)
        alpha = np.where(f_r > f_r1, (f_r - p) / np.where(f_r > f_r1, f_r - f_r1, 1.0), 0.0)
        out.append(np.clip((r - alpha) / n, 0.0, 1.0))
    return out[0], out[1]


def plain_classification(label: object, hib: bool | None) -> tuple[str, str]:
    """(words for a manager, css key) from the engine's classification."""
    key = figures.class_key(label)
    if key in ("above", "below") and hib is not None:
        key = "better" if (key == "above") == hib else "worse"
    words = {"better": "better than average", "worse": "poorer than average",
             "above": "above average", "below": "below average", "none": "within chance range"}[key]
    return words, key


def _rates(patients: pd.DataFrame | None, col: str) -> pd.DataFrame | None:
    if patients is None or col not in patients or "therapist" not in patients:
        return None
    d = patients[["therapist", col]].dropna()
    if not len(d):
        return None
    g = d.groupby(d["therapist"].astype(str))[col].agg(["sum", "size"])
    return g.rename(columns={"sum": "k", "size": "n"}).astype(int)


def service_report(estimates, patients, therapists, out_path, *, min_caseload: int = 10, suppress_below: int = 8,
                   pseudonymise: bool = True, key_env: str = "TE_PSEUDONYM_KEY", higher_is_better: bool | None = None,
                   model: str | None = None, not_on_track=None) -> Path:
    """Write the therapist-level service report and return its path.

    ``estimates`` (dict or path of ``estimates.json``), ``patients`` (``patients.parquet``) and
    ``therapists`` (``therapists.csv``) as DataFrames or paths. ``model`` picks the model whose
    therapist effects are shown (default: ``ri``, else the first Gaussian random-intercept model).
    ``higher_is_better`` says whether higher outcome values are better; None infers it
    from the outcome and instrument. Raises :class:`PseudonymisationError` when ``pseudonymise`` is on
    and the environment variable ``key_env`` is unset.
    """
    key = pseudonym_key(key_env) if pseudonymise else None  # fail first, before any work
    est = load_json(estimates, "estimates")
    if est is None:
        raise InputError(f"{estimates}: estimates.json not found")
    patients, therapists = load_table(patients), load_table(therapists)
    mid = model or primary_model(est, therapists)
    entry = (est.get("models") or {}).get(mid or "", {})
    hib = higher_is_better if higher_is_better is not None else common.higher_is_better(est, mid)
    notes: list[str] = []

    t = None
    if therapists is not None and "therapist" in therapists:
        t = therapists[therapists["model"].astype(str) == mid] if "model" in therapists and mid else therapists
        t = t.drop_duplicates("therapist").set_index(t.drop_duplicates("therapist")["therapist"].astype(str))
    if t is None or not len(t):
        notes.append("No therapist effects for this dataset (therapists.csv absent or empty): the table shows "
                     "caseloads and rates only.")
    caseload = None
    if t is not None and len(t) and "caseload" in t:
        caseload = pd.to_numeric(t["caseload"], errors="coerce")
    elif patients is not None and "therapist" in patients:
        caseload = patients.groupby(patients["therapist"].astype(str)).size()
    if caseload is None:
        raise InputError("service report: neither therapists.csv nor patients.parquet gives therapists' caseloads")
    caseload = caseload.dropna().astype(int)
    ids = sorted(caseload.index.astype(str))
    listed = [i for i in ids if caseload[i] >= min_caseload]
    small = [i for i in ids if caseload[i] < min_caseload]
    names = pseudonymise_ids(ids, key) if key is not None else {i: i for i in ids}

    rec = _rates(patients, "recovered")
    rel = _rates(patients, "reliable_improvement")
    rows = []
    for i in listed:
        r = {"name": names[i], "caseload": safe_count(caseload[i], suppress_below), "caseload_n": caseload[i]}
        if t is not None and i in t.index:
            row = t.loc[i]
            r["adjusted"] = finite(row.get("adjusted_mean"))
            r["effect"] = (finite(row.get("effect")), finite(row.get("ci_low")), finite(row.get("ci_high")))
            r["words"], r["key"] = plain_classification(row.get("classification", ""), hib)
        else:
            r["adjusted"], r["effect"], r["words"], r["key"] = None, (None, None, None), "no estimate", "none"
        for label, g in (("recovery", rec), ("improvement", rel)):
            if g is not None and i in g.index:
                r[label] = safe_rate(g.loc[i, "k"], g.loc[i, "n"], suppress_below)
            else:
                r[label] = ("\u2013", "\u2013", False)
        rows.append(r)
    rows.sort(key=lambda r: r["name"])

    agg = None
    if small:
        n_pat = int(caseload[small].sum())
        agg = {"therapists": safe_count(len(small), suppress_below), "patients": safe_count(n_pat, suppress_below)}
        for label, g in (("recovery", rec), ("improvement", rel)):
            if g is not None:
                gi = g.reindex([i for i in small if i in g.index])
                agg[label] = safe_rate(gi["k"].sum(), gi["n"].sum(), suppress_below)
            else:
                agg[label] = ("\u2013", "\u2013", False)

    funnel = None
    outcome_for_funnel = None
    for col, g in (("recovered", rec), ("reliable_improvement", rel)):
        if g is not None and len(g):
            outcome_for_funnel = (col, g)
            break
    if outcome_for_funnel is not None:
        col, g = outcome_for_funnel
        p0 = float(g["k"].sum() / g["n"].sum())
        gl = g.reindex([i for i in listed if i in g.index])
        gl = gl[gl["n"] > 0]
        if len(gl) and 0 < p0 < 1:
            grid = np.arange(max(1, int(gl["n"].min()) - 1), int(gl["n"].max()) + 3)
            limits = {lv: (grid, *funnel_limits(p0, grid, lv)) for lv in LEVELS}
            label = "recovery rate" if col == "recovered" else "reliable improvement rate"
            # A plotted rate would reveal a count the table suppresses (k or n - k in 1..suppress_below-1):
            # such therapists are left out of the plot, counted in the note and in "outside".
            k, rest = gl["k"], gl["n"] - gl["k"]
            hidden = ((k >= 1) & (k < suppress_below)) | ((rest >= 1) & (rest < suppress_below))
            gp = gl[~hidden]
            funnel = {"fig": figures.funnel(gp["n"], gp["k"] / gp["n"], p0, limits, ylabel=label,
                                            title=f"{label.capitalize()} by caseload"),
                      "p0": p0, "label": label, "hidden": int(hidden.sum()),
                      "outside": int(sum((k / n < lo) or (k / n > hi) for k, n, lo, hi in zip(
                          gl["k"], gl["n"], *funnel_limits(p0, gl["n"], LEVELS[-1]), strict=True)))}
    if funnel is None:
        notes.append("Funnel plot omitted: no recovery or reliable-improvement outcome in the patient table.")

    icc = triple(entry.get("icc")) if entry.get("icc") is not None else None
    flags = [f for f in model_flags(entry) if f[0] == "alert"]
    return render(
        "service.html", out_path, version=version(), dataset=est.get("dataset", "dataset"), model=mid,
        entry=entry, icc=icc, flags=flags, rows=rows, agg=agg, funnel=funnel, notes=notes, hib=hib,
        min_caseload=min_caseload, suppress_below=suppress_below, pseudonymised=key is not None,
        n_listed=len(listed), n_small=len(small), n_small_text=safe_count(len(small), suppress_below),
        n_therapists=len(ids), n_patients=int(caseload.sum()), instrument=est.get("instrument"),
        not_on_track=_not_on_track(not_on_track, min_caseload, suppress_below, key is not None, key_env),
    )


def _not_on_track(track, min_caseload: int, suppress_below: int, pseudonymise: bool, key_env: str):
    """Not-on-track counts per therapist (growth models), see :mod:`therapist_effects.report.growth`."""
    from .growth import not_on_track_counts

    return not_on_track_counts(track, min_caseload=min_caseload, suppress_below=suppress_below,
                               pseudonymise=pseudonymise, key_env=key_env)
