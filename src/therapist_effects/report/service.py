"""The therapist-level service report (``therapist_report.html``) for service managers, and the
per-therapist feedback pages for supervision (``therapists/<pseudonym>.html``).

At the top: the service's name, the model's plain-language ``label``, the data period (first and last
session dates, export date). Per listed therapist: caseload, case-mix-adjusted end score and its
difference from the service average in the instrument's points (1 decimal), the range expected by
chance for that caseload, and a plain-language classification; recovery and reliable-improvement
rates. One classification rule (:func:`therapist_effects.classify.classify_funnel`) serves the table
and both funnel plots: Spiegelhalter's control limits at ``classification_level`` (99.8% by default)
- the adjusted mean of therapist i is flagged when it lies outside ``target -+ z sigma / sqrt(n_i)``
(``sigma^2`` the model's residual variance, ``target`` the precision-weighted mean of the adjusted
means, which is the GLS intercept of the random-intercept model), and a recovery rate when it lies
outside the exact binomial limits around the service rate. The text says how many flags chance
alone would give (n (1 - level)). Therapists are listed in pseudonym order, never ranked. A run
chart (p-chart) shows the service's recovery rate by quarter of the last session, when dates exist.

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
from ..classify import CLASSIFICATION_LEVEL, classify_funnel, expected_chance_flags, normal_funnel_limits, z_for
from .common import TYPE_WORDS, dataset_columns, finite, model_flags, primary_model, triple, version
from .html import load_json, load_table, render
from .privacy import pseudonym_key, pseudonymise_ids, safe_count, safe_rate

ROUND = 5  # counts in the service report and the therapist pages: nearest 5 (NHS publication practice)

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


def _config(est: dict) -> dict:
    cfg = (est.get("provenance") or {}).get("config") or {}
    return cfg if isinstance(cfg, dict) else {}


def model_label(est: dict, mid: str | None, unit_name: str | None) -> str:
    """The model's ``label:`` from the config, else a plain description (never the id)."""
    for m in _config(est).get("models") or []:
        if isinstance(m, dict) and m.get("id") == mid and m.get("label"):
            return str(m["label"])
    entry = (est.get("models") or {}).get(mid or "", {})
    outcome = str(entry.get("outcome", ""))
    if entry.get("type", "random_intercept") == "random_intercept" and entry.get("family", "gaussian") == "gaussian" \
            and unit_name and not outcome.startswith(("recovered", "reliable", "dropout")):
        what = "improvement in" if outcome == "change" else "end-of-treatment"
        return f"Therapist differences in {what} {unit_name} scores, adjusted for how unwell patients were at the start"
    return "Therapist differences, estimated with " + TYPE_WORDS.get(str(entry.get("type")), "a multilevel model")


def outcome_instrument(est: dict, mid: str | None) -> str | None:
    """The instrument whose points the model's outcome is in (a ``columns.scores`` column or the primary)."""
    entry = (est.get("models") or {}).get(mid or "", {})
    outcome = str(entry.get("outcome", ""))
    scores = dataset_columns(est).get("scores") or {}
    for name, col in scores.items():
        if outcome in (f"{col}_end", f"{col}_change", f"{col}_baseline", col):
            return str(name)
    if outcome.startswith(("recovered", "reliable", "dropout", "clinically")):
        return None
    return est.get("instrument")


def _period(est: dict, patients: pd.DataFrame | None, export_date) -> dict:
    out = {"first": None, "last": None, "export": None}
    if patients is not None:
        for key, col, fn in (("first", "first_occasion", "min"), ("last", "last_occasion", "max")):
            if col in patients and pd.api.types.is_datetime64_any_dtype(patients[col]) and patients[col].notna().any():
                out[key] = getattr(patients[col], fn)().date().isoformat()
    if export_date is None:
        ds = (_config(est).get("datasets") or {}).get(est.get("dataset"), {})
        export_date = ds.get("export_date") if isinstance(ds, dict) else None
    out["export"] = str(export_date) if export_date else None
    return out


def _run_chart(patients: pd.DataFrame | None, suppress_below: int, unit: str = "recovery rate") -> dict | None:
    """p-chart of the recovery rate by quarter of the last session (NHS Talking Therapies count a course
    of treatment in the period it ended). Quarters whose counts would reveal a small number are not
    plotted (same suppression rule as the tables)."""
    if patients is None or "recovered" not in patients or "last_occasion" not in patients:
        return None
    if not pd.api.types.is_datetime64_any_dtype(patients["last_occasion"]):
        return None
    d = patients[["last_occasion", "recovered"]].dropna()
    if not len(d):
        return None
    q = d["last_occasion"].dt.to_period("Q")
    g = d.groupby(q)["recovered"].agg(["sum", "size"]).rename(columns={"sum": "k", "size": "n"})
    g = g.reindex(pd.period_range(g.index.min(), g.index.max(), freq="Q"), fill_value=0)
    if len(g) < 2:
        return None
    p0 = float(g["k"].sum() / g["n"].sum())
    k, n = g["k"].to_numpy(float), g["n"].to_numpy(float)
    small = lambda x: (x >= 1) & (x < suppress_below)  # noqa: E731
    hidden = small(k) | small(n - k) | small(n) | (n == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.where(hidden, np.nan, k / n)
        half = 3.0 * np.sqrt(p0 * (1.0 - p0) / n)
    lcl = np.where(hidden, np.nan, np.clip(p0 - half, 0.0, 1.0))
    ucl = np.where(hidden, np.nan, np.clip(p0 + half, 0.0, 1.0))
    labels = [f"{p.year}-Q{p.quarter}" for p in g.index]
    fig = figures.run_chart(labels, rate, p0, lcl, ucl, ylabel=unit, title="Service recovery rate by quarter")
    outside = int(np.nansum((rate > ucl) | (rate < lcl)))
    return {"fig": fig, "p0": p0, "first": labels[0], "last": labels[-1], "hidden": int(hidden.sum()),
            "outside": outside, "n_quarters": len(labels)}


def service_context(estimates, patients, therapists, *, min_caseload: int = 10, suppress_below: int = 8,
                    pseudonymise: bool = True, key_env: str = "TE_PSEUDONYM_KEY",
                    higher_is_better: bool | None = None, model: str | None = None,
                    classification_level: float = CLASSIFICATION_LEVEL, service_name: str | None = None,
                    export_date: str | None = None) -> dict:
    """Everything the service report and the therapist pages show (privacy rules applied)."""
    key = pseudonym_key(key_env) if pseudonymise else None  # fail first, before any work
    est = load_json(estimates, "estimates")
    if est is None:
        raise InputError(f"{estimates}: estimates.json not found")
    patients, therapists = load_table(patients), load_table(therapists)
    mid = model or primary_model(est, therapists)
    entry = (est.get("models") or {}).get(mid or "", {})
    hib = higher_is_better if higher_is_better is not None else common.higher_is_better(est, mid)
    level = float(classification_level)
    z = z_for(level)
    notes: list[str] = []
    inst = outcome_instrument(est, mid)
    unit = f"{inst} points" if inst else "outcome units"

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

    # -- the one classification rule: Spiegelhalter limits on the case-mix-adjusted mean ------------------
    vc = entry.get("variance_components") or {}
    s2 = finite((vc.get("residual") or {}).get("estimate")) if isinstance(vc.get("residual"), dict) else None
    tau2 = finite((vc.get("therapist") or {}).get("estimate")) if isinstance(vc.get("therapist"), dict) else None
    target = sd = None
    if t is not None and len(t) and "adjusted_mean" in t and s2 and s2 > 0:
        adj_all = pd.to_numeric(t["adjusted_mean"], errors="coerce")
        n_all = pd.to_numeric(t["caseload"], errors="coerce") if "caseload" in t else caseload.reindex(t.index)
        ok = adj_all.notna() & (n_all > 0)
        w = n_all[ok] / (s2 + n_all[ok] * max(tau2 or 0.0, 0.0))  # GLS weights of the random-intercept model
        target, sd = float((w * adj_all[ok]).sum() / w.sum()), float(np.sqrt(s2))
    rule = "funnel" if target is not None else ("interval" if t is not None and len(t) and "effect_se" in t else None)

    rec = _rates(patients, "recovered")
    rel = _rates(patients, "reliable_improvement")
    # per-therapist lookups as dicts and the limits for every listed caseload at once (O(1) a therapist)
    n_of = caseload.to_dict()
    t_rows = t.to_dict("index") if t is not None else {}
    rates = {lab: g.to_dict("index") if g is not None else {} for lab, g in (("recovery", rec), ("improvement", rel))}
    limits = {} if rule != "funnel" else dict(zip(listed, zip(
        *normal_funnel_limits(target, sd, [n_of[i] for i in listed], level), strict=True), strict=True))
    rows = []
    for i in listed:
        r = {"id": i, "name": names[i], "caseload": safe_count(n_of[i], suppress_below, ROUND),
             "n": int(n_of[i]), "adjusted": None, "diff": None, "half": None, "effect": (None, None, None),
             "words": "no estimate", "key": "none"}
        if i in t_rows:
            row = t_rows[i]
            r["adjusted"] = finite(row.get("adjusted_mean"))
            eff, se = finite(row.get("effect")), finite(row.get("effect_se"))
            if eff is not None and se is not None:
                r["effect"] = (eff, eff - z * se, eff + z * se)
            if rule == "funnel" and r["adjusted"] is not None:
                lo, hi = limits[i]
                r["diff"], r["half"] = r["adjusted"] - target, float(hi - target)
                label = classify_funnel(r["adjusted"], lo, hi, hib)
            elif rule == "interval" and eff is not None and se is not None:
                label = classify_funnel(eff, -z * se, z * se, hib)
            else:
                label = np.asarray("")
            r["words"], r["key"] = plain_classification(str(label), hib) if str(label) else ("no estimate", "none")
        for lab, by_id in rates.items():
            kn = by_id.get(i)
            r[lab] = safe_rate(kn["k"], kn["n"], suppress_below, ROUND, 0) if kn else ("\u2013", "\u2013", False)
        rows.append(r)
    rows.sort(key=lambda r: r["name"])
    n_flagged = sum(r["key"] != "none" for r in rows)

    agg = None
    if small:
        n_pat = int(caseload[small].sum())
        agg = {"therapists": safe_count(len(small), suppress_below, ROUND),
               "patients": safe_count(n_pat, suppress_below, ROUND)}
        for lab, g in (("recovery", rec), ("improvement", rel)):
            if g is not None:
                gi = g.reindex([i for i in small if i in g.index])
                agg[lab] = safe_rate(gi["k"].sum(), gi["n"].sum(), suppress_below, ROUND, 0)
            else:
                agg[lab] = ("\u2013", "\u2013", False)

    # -- funnel of the adjusted outcome (the table's rule) --------------------------------------------------
    outcome_funnel = None
    plotted = [r for r in rows if r["diff"] is not None]
    if rule == "funnel" and plotted:
        n_l = np.array([r["n"] for r in plotted], float)
        grid = np.arange(max(1, int(n_l.min()) - 1), int(n_l.max()) + 3)
        lo_g, hi_g = normal_funnel_limits(target, sd, grid, level)
        vals = np.array([r["adjusted"] for r in plotted])
        keys = [r["key"] for r in plotted]
        outcome_funnel = {"n": n_l, "value": vals, "grid": grid, "lo": lo_g, "hi": hi_g, "keys": keys,
                          "ids": [r["id"] for r in plotted], "target": target,
                          "fig": figures.control_funnel(n_l, vals, target, grid, lo_g, hi_g, keys, level=level,
                                                        ylabel=f"adjusted end score ({unit})",
                                                        title="Case-mix-adjusted outcome by caseload")}
    elif rows:
        notes.append("Funnel plot of the adjusted outcome omitted: the model gives no residual variance "
                     "(therapists are classified by their effect's interval at the same level).")

    # -- funnel of the recovery rate (same rule, binomial limits) ------------------------------------------
    funnel = None
    for col, g in (("recovered", rec), ("reliable_improvement", rel)):
        if g is None or not len(g):
            continue
        p0 = float(g["k"].sum() / g["n"].sum())
        gl = g.reindex([i for i in listed if i in g.index])
        gl = gl[gl["n"] > 0]
        if not len(gl) or not 0 < p0 < 1:
            continue
        label = "recovery rate" if col == "recovered" else "reliable improvement rate"
        # a plotted rate would reveal a count the table suppresses: such therapists are left out of the plot
        k, rest = gl["k"], gl["n"] - gl["k"]
        hidden = ((k >= 1) & (k < suppress_below)) | ((rest >= 1) & (rest < suppress_below))
        lo_i, hi_i = funnel_limits(p0, gl["n"], level)
        keys_all = np.array([figures.class_key(c) for c in classify_funnel(gl["k"] / gl["n"], lo_i, hi_i, True)])
        gp = gl[~hidden]
        grid = np.arange(max(1, int(gl["n"].min()) - 1), int(gl["n"].max()) + 3)
        lo_g, hi_g = funnel_limits(p0, grid, level)
        keys = keys_all[~hidden.to_numpy()]
        funnel = {"p0": p0, "label": label, "hidden": int(hidden.sum()), "outside": int((keys_all != "none").sum()),
                  "n": gp["n"].to_numpy(float), "value": (gp["k"] / gp["n"]).to_numpy(float), "grid": grid,
                  "lo": lo_g, "hi": hi_g, "keys": list(keys), "ids": list(gp.index),
                  "fig": figures.control_funnel(gp["n"], gp["k"] / gp["n"], p0, grid, lo_g, hi_g, keys, level=level,
                                                ylabel=label, title=f"{label.capitalize()} by caseload", percent=True)}
        break
    if funnel is None:
        notes.append("Funnel plot of rates omitted: no recovery or reliable-improvement outcome in the patient table.")

    icc = triple(entry.get("icc")) if entry.get("icc") is not None else None
    flags = [f for f in model_flags(entry) if f[0] == "alert"]
    return dict(
        version=version(), dataset=est.get("dataset", "dataset"), service=service_name or est.get("dataset", "dataset"),
        model=mid, label=model_label(est, mid, inst), unit=unit, entry=entry, icc=icc, flags=flags, rows=rows,
        agg=agg, funnel=funnel, outcome_funnel=outcome_funnel, notes=notes, hib=hib, min_caseload=min_caseload,
        suppress_below=suppress_below, pseudonymised=key is not None, n_listed=len(listed),
        n_small_text=safe_count(len(small), suppress_below, ROUND),
        n_therapists=safe_count(len(ids), suppress_below, ROUND),
        n_patients=safe_count(int(caseload.sum()), suppress_below, ROUND),
        instrument=est.get("instrument"), level=level, level_pct=f"{100 * level:g}%", rule=rule,
        n_flagged=n_flagged, chance=expected_chance_flags(len(plotted) if rule == "funnel" else len(rows), level),
        period=_period(est, patients, export_date), runchart=_run_chart(patients, suppress_below),
        round_base=ROUND,
    )


def service_report(estimates, patients, therapists, out_path, *, min_caseload: int = 10, suppress_below: int = 8,
                   pseudonymise: bool = True, key_env: str = "TE_PSEUDONYM_KEY", higher_is_better: bool | None = None,
                   model: str | None = None, classification_level: float = CLASSIFICATION_LEVEL,
                   service_name: str | None = None, export_date: str | None = None,
                   pages_dir: str | None = "therapists", not_on_track=None) -> Path:
    """Write the therapist-level service report and return its path.

    ``estimates`` (dict or path of ``estimates.json``), ``patients`` (``patients.parquet``) and
    ``therapists`` (``therapists.csv``) as DataFrames or paths. ``model`` picks the model whose
    therapist effects are shown (default: ``ri``, else the first Gaussian random-intercept model).
    ``higher_is_better`` says whether higher outcome values are better; None infers it
    from the outcome and instrument. ``classification_level``: level of the control limits of the one
    classification rule (table and funnels). ``pages_dir``: folder of the therapist pages, relative to
    the report, that the pseudonyms link to (None: no links). Raises :class:`PseudonymisationError` when
    ``pseudonymise`` is on and the environment variable ``key_env`` is unset.
    """
    ctx = service_context(estimates, patients, therapists, min_caseload=min_caseload, suppress_below=suppress_below,
                          pseudonymise=pseudonymise, key_env=key_env, higher_is_better=higher_is_better, model=model,
                          classification_level=classification_level, service_name=service_name,
                          export_date=export_date)
    for r in ctx["rows"]:
        r["href"] = f"{pages_dir}/{page_name(r['name'])}" if pages_dir else None
    ctx["not_on_track"] = _not_on_track(not_on_track, min_caseload, suppress_below, ctx["pseudonymised"], key_env)
    return render("service.html", out_path, **ctx)


def page_name(name: str) -> str:
    """File name of a therapist's page: the pseudonym, with anything but letters, digits, '-', '_' replaced."""
    import re

    return re.sub(r"[^A-Za-z0-9_-]", "_", str(name)) + ".html"


def therapist_pages(estimates, patients, therapists, out_dir, *, min_caseload: int = 10, suppress_below: int = 8,
                    pseudonymise: bool = True, key_env: str = "TE_PSEUDONYM_KEY",
                    higher_is_better: bool | None = None, model: str | None = None,
                    classification_level: float = CLASSIFICATION_LEVEL, service_name: str | None = None,
                    export_date: str | None = None) -> list[Path]:
    """One feedback page per listed therapist, ``out_dir/<pseudonym>.html``, for supervision: their own
    position in the funnel plots and the caterpillar plot (the others unlabelled) and their own rates,
    with the service report's suppression and rounding. Returns the paths written.

    Each figure is drawn and PNG-encoded once for all pages (:func:`page_backdrops`); a page embeds it and
    lays its own star over it as inline SVG, so a page costs the same whatever the number of therapists."""
    ctx = service_context(estimates, patients, therapists, min_caseload=min_caseload, suppress_below=suppress_below,
                          pseudonymise=pseudonymise, key_env=key_env, higher_is_better=higher_is_better, model=model,
                          classification_level=classification_level, service_name=service_name,
                          export_date=export_date)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backdrops = page_backdrops(ctx)
    paths = []
    for r in ctx["rows"]:
        figs = [(fid, bd.figure, bd.highlight(index[r["id"]])) for fid, bd, index in backdrops if r["id"] in index]
        paths.append(render("therapist_page.html", out / page_name(r["name"]), r=r, figs=figs, **ctx))
    return paths


def page_backdrops(ctx: dict) -> list[tuple[str, figures.Backdrop, dict[str, int]]]:
    """The therapist pages' figures, each drawn once for all pages: (html id, backdrop, {therapist id: its
    index in the backdrop}). A page shows those that contain its therapist, with its own mark overlaid."""
    out = []
    of, fu = ctx["outcome_funnel"], ctx["funnel"]
    if of is not None:
        out.append(("funnel-outcome", figures.control_funnel_backdrop(
            of["n"], of["value"], of["target"], of["grid"], of["lo"], of["hi"], level=ctx["level"],
            ylabel=f"adjusted end score ({ctx['unit']})", title="Your case-mix-adjusted outcome and caseload"),
            of["ids"]))
    if fu is not None:
        out.append(("funnel-rate", figures.control_funnel_backdrop(
            fu["n"], fu["value"], fu["p0"], fu["grid"], fu["lo"], fu["hi"], level=ctx["level"], ylabel=fu["label"],
            title=f"Your {fu['label']} and caseload", percent=True), fu["ids"]))
    eff = [r for r in ctx["rows"] if r["effect"][0] is not None]
    if len(eff) > 1:
        out.append(("caterpillar", figures.caterpillar_backdrop(
            [e["effect"][0] for e in eff], [e["effect"][1] for e in eff], [e["effect"][2] for e in eff],
            ylabel=f"effect ({ctx['unit']})", title="Your estimated effect among all listed therapists"),
            [e["id"] for e in eff]))
    return [(fid, bd, {t: j for j, t in enumerate(ids)}) for fid, bd, ids in out]


def _not_on_track(track, min_caseload: int, suppress_below: int, pseudonymise: bool, key_env: str):
    """Not-on-track counts per therapist (growth models), see :mod:`therapist_effects.report.growth`."""
    from .growth import not_on_track_counts

    return not_on_track_counts(track, min_caseload=min_caseload, suppress_below=suppress_below,
                               pseudonymise=pseudonymise, key_env=key_env, round_base=ROUND)
