"""Expected-recovery curves and not-on-track flags from the growth model.

Feedback systems (OQ-Analyst, PCOMS, CORE Net) compare each patient's session scores with the
course expected for patients who started at the same severity. Here the expectation comes from the
fitted growth model (:mod:`therapist_effects.models.growth`): under the model a patient's scores are
jointly normal (therapist and patient effects integrated out), so given the intake score ``y_1``
(the first measured session) the score at a later session is normal with

    expected = mu_s + c_s1 / v_11 (y_1 - mu_1),   variance = v_ss - c_s1^2 / v_11

(``mu`` the fixed part, ``v``/``c`` the model's marginal variances and covariances). The upper
prediction band is ``expected + z sqrt(variance)`` with ``z`` the ``(1 + band_level) / 2`` normal
quantile (``band_level`` 0.8 by default: a one-sided 90% bound); a session score above it (below the
lower band for higher-is-better instruments) is "not on track" (``flag`` 1). The intake session
itself is never flagged.

The *early flag* of a patient is a flag at any session up to ``early_session`` (4). Its validity is
estimated by K-fold cross-validation over held-out patients: the growth model is refitted without
the fold's patients, their flags computed from that fit, and the early flag compared with the
patient's final outcome (reliable deterioration or no reliable improvement by the last session, from
the instrument; without an instrument: a last score no better than the intake). Only patients with
more sessions than ``early_session`` count (their final outcome lies beyond the flag window).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ..exceptions import ModelError
from .growth import GrowthResults, session_time

__all__ = ["growth_frame", "not_on_track", "recovery_curves", "severity_bands", "early_flag_validation",
           "TIME_NAMES"]

#: name of the time variable (the fixed effect) per ``time`` setting
TIME_NAMES = {"log": "log_session", "session": "session", "weeks": "weeks"}


def growth_frame(rows: pd.DataFrame, patients: pd.DataFrame, *, time: str = "log",
                 covariates: Sequence[str] = (), arm: bool = False) -> pd.DataFrame:
    """The session table the growth model is fitted to.

    ``rows``: validated session rows (``ingest``'s canonical columns: ``row``, ``patient``,
    ``therapist``, ``occasion``, ``score``, ...); ``patients``: the patient table, whose patients
    are the ones kept (the same exclusions as every other model: too few sessions, missing
    covariates). Patient-level ``covariates`` and the arm are taken from the patient table.
    Returns one row per session, sorted by therapist, patient and session, with ``patient``,
    ``therapist``, ``row``, ``session`` (number), the time variable (:data:`TIME_NAMES`),
    ``score``, ``intake`` (the patient's first score), the covariates and ``arm`` (when asked).
    """
    keep = set(patients["patient"].astype(str))
    r = rows.loc[rows["patient"].astype(str).isin(keep)].copy()
    r["patient"] = r["patient"].astype(str)
    r = r.sort_values(["patient", "occasion", "row"], kind="stable").reset_index(drop=True)
    session, t = session_time(r["occasion"], r["patient"], time)
    out = pd.DataFrame({"patient": r["patient"].to_numpy(dtype=object)})
    pt = patients.assign(patient=patients["patient"].astype(str)).set_index("patient")
    out["therapist"] = pt["therapist"].reindex(out["patient"]).astype(str).to_numpy(dtype=object)
    out["row"] = r["row"].to_numpy()
    out["session"] = session.astype(np.int64) if np.all(session == np.round(session)) else session
    out[TIME_NAMES[time]] = t
    out["score"] = r["score"].to_numpy(dtype=float)
    out["intake"] = out.groupby("patient", sort=False)["score"].transform("first")
    for c in covariates:
        if c not in pt.columns:
            raise ModelError(f"growth model: covariate {c!r} is not a column of the patient table")
        out[c] = pt[c].reindex(out["patient"]).to_numpy()
    if arm:
        out["arm"] = pt["arm"].reindex(out["patient"]).to_numpy()
    out = out.sort_values(["therapist", "patient", "session", "row"], kind="stable").reset_index(drop=True)
    return out


def _first_index(patient: np.ndarray) -> np.ndarray:
    """Row index of each row's patient's first row (rows grouped by patient, in session order)."""
    codes = pd.factorize(pd.Series(patient))[0]
    first = np.full(codes.max() + 1, -1)
    idx = np.arange(len(codes))
    first[codes[::-1]] = idx[::-1]
    return first[codes]


def design_rows(res: GrowthResults, frame: pd.DataFrame) -> np.ndarray:
    """The model's fixed-effects design rows for the sessions of ``frame`` (same columns)."""
    from .design import fixed_effects_matrix

    m = res.model
    cov = list(getattr(m, "covariate_terms", []))
    X, names = fixed_effects_matrix(frame, [m.time_name, *cov])
    if getattr(m, "arm_name", None):
        ind = (frame["arm"].astype(str) == str(m.arm_levels[1])).to_numpy(dtype=float)
        X = np.column_stack([X, ind, ind * X[:, 1]])
        names = names + [m.names[-2], m.names[-1]]
    if names != m.names:
        # categorical levels absent from a held-out fold: align by name, missing columns are 0
        Xa = np.zeros((len(frame), len(m.names)))
        for j, nm in enumerate(m.names):
            if nm in names:
                Xa[:, j] = X[:, names.index(nm)]
        X = Xa
    return X


def not_on_track(res: GrowthResults, frame: pd.DataFrame, *, band_level: float = 0.8,
                 higher_is_better: bool = False) -> pd.DataFrame:
    """One row per session: ``patient``, ``therapist``, ``session``, ``score``, ``expected``,
    ``upper`` (and ``lower``), ``flag`` (1 = not on track), given each patient's intake score."""
    X = design_rows(res, frame)
    first = _first_index(frame["patient"].to_numpy())
    mu, var, cov1, mu1 = res.marginal_moments(X, first)
    var1 = var[first]
    y = frame["score"].to_numpy(dtype=float)
    y1 = y[first]
    expected = mu + cov1 / var1 * (y1 - mu1)
    pvar = np.maximum(var - cov1 ** 2 / var1, 0.0)
    z = float(stats.norm.ppf(0.5 + band_level / 2.0))
    half = z * np.sqrt(pvar)
    upper, lower = expected + half, expected - half
    is_first = np.arange(len(frame)) == first
    bad = (y < lower) if higher_is_better else (y > upper)
    flag = (bad & ~is_first).astype(np.int64)
    return pd.DataFrame({
        "patient": frame["patient"].to_numpy(dtype=object), "therapist": frame["therapist"].to_numpy(dtype=object),
        "session": frame["session"].to_numpy(), "score": y, "expected": expected, "upper": upper,
        "lower": lower, "flag": flag,
    })


def severity_bands(intake: pd.Series, n_bands: int = 4) -> pd.Series:
    """Intake-severity band per patient: quantile bands of the intake score (at most ``n_bands``,
    fewer when scores tie), labelled by their score range, e.g. ``"intake 15-19"``."""
    x = intake.to_numpy(dtype=float)
    qs = np.unique(np.quantile(x, np.linspace(0, 1, n_bands + 1)))
    if len(qs) < 2:
        return pd.Series([f"intake {x.min():.3g}"] * len(x), index=intake.index)
    code = np.clip(np.searchsorted(qs, x, side="right") - 1, 0, len(qs) - 2)
    labels = []
    for k in range(len(qs) - 1):
        inb = x[code == k]
        lo, hi = (inb.min(), inb.max()) if len(inb) else (qs[k], qs[k + 1])
        labels.append(f"intake {lo:.3g}-{hi:.3g}")
    return pd.Series([labels[c] for c in code], index=intake.index)


def recovery_curves(track: pd.DataFrame, *, n_bands: int = 4, min_patients: int = 5) -> pd.DataFrame:
    """Expected-recovery curves by intake-severity band: per band and session, the number of
    patients observed, their mean observed score, the mean expected score and the mean prediction
    band (sessions with fewer than ``min_patients`` patients in a band are left out)."""
    t = track.copy()
    first = t.groupby("patient", sort=False)["score"].transform("first")
    intake = t.groupby("patient", sort=False)["score"].first()
    band_of = severity_bands(intake, n_bands)
    t["band"] = band_of.reindex(t["patient"]).to_numpy()
    t["intake"] = first
    order = {b: float(intake[band_of == b].min()) for b in band_of.unique()}
    g = t.groupby(["band", "session"], sort=False)
    out = g.agg(n=("patient", "size"), observed=("score", "mean"), expected=("expected", "mean"),
                lower=("lower", "mean"), upper=("upper", "mean"), flagged=("flag", "mean")).reset_index()
    out = out[out["n"] >= min_patients].copy()
    out["band_order"] = out["band"].map(order)
    out = out.sort_values(["band_order", "session"], kind="stable").drop(columns="band_order").reset_index(drop=True)
    return out


def poor_outcome(patients: pd.DataFrame, higher_is_better: bool = False) -> pd.Series:
    """Final deterioration or non-response per patient: reliable deterioration or no reliable
    improvement (instrument outcomes), else a last score no better than the intake."""
    p = patients.set_index(patients["patient"].astype(str))
    if "reliable_improvement" in p.columns and p["reliable_improvement"].notna().any():
        rd = p.get("reliable_deterioration", pd.Series(0.0, index=p.index)).fillna(0.0)
        ri = p["reliable_improvement"]
        out = ((rd == 1.0) | (ri == 0.0)).astype(float)
        return out.where(ri.notna())
    b, e = p["baseline"].astype(float), p["end"].astype(float)
    better = (e > b) if higher_is_better else (e < b)
    return (~better).astype(float)


def early_flags(track: pd.DataFrame, early_session: int = 4) -> pd.Series:
    """1 if the patient was flagged at any session up to ``early_session``, per patient."""
    t = track[track["session"] <= early_session]
    return t.groupby("patient", sort=True)["flag"].max().astype(int)


def early_flag_validation(frame: pd.DataFrame, outcome: pd.Series, fit_fn, *, folds: int = 5, seed: int = 1,
                          early_session: int = 4, band_level: float = 0.8, higher_is_better: bool = False,
                          level: float = 0.95) -> dict[str, Any]:
    """Cross-validated sensitivity and specificity of the early flag for a poor final outcome.

    ``frame``: the growth session table; ``outcome``: 1 (poor) / 0 (good) per patient (index =
    patient ID; NaN = undefined, left out); ``fit_fn(frame) -> GrowthResults`` fits the growth model
    to a training frame. Patients are split into ``folds`` folds by a seeded permutation.
    Returns counts, sensitivity and specificity with Wilson intervals.
    """
    pats = np.array(sorted(frame["patient"].astype(str).unique()), dtype=object)
    last = frame.groupby("patient")["session"].max()
    rng = np.random.default_rng(seed)
    fold_of = pd.Series(rng.permutation(len(pats)) % folds, index=pats)
    flags = []
    for k in range(folds):
        test = set(fold_of.index[fold_of == k])
        is_test = frame["patient"].isin(test).to_numpy()
        res = fit_fn(frame.loc[~is_test].reset_index(drop=True))
        track = not_on_track(res, frame.loc[is_test].reset_index(drop=True), band_level=band_level,
                             higher_is_better=higher_is_better)
        flags.append(early_flags(track, early_session))
    flag = pd.concat(flags).sort_index()
    y = outcome.reindex(flag.index)
    ok = y.notna() & (last.reindex(flag.index) > early_session)
    f, y = flag[ok].to_numpy(), y[ok].to_numpy()
    tp = int(((f == 1) & (y == 1)).sum())
    fn = int(((f == 0) & (y == 1)).sum())
    tn = int(((f == 0) & (y == 0)).sum())
    fp = int(((f == 1) & (y == 0)).sum())

    def wilson(k: int, n: int) -> tuple[float | None, float | None, float | None]:
        if n == 0:
            return None, None, None
        z = float(stats.norm.ppf(0.5 + level / 2))
        p = k / n
        d = 1 + z * z / n
        c = (p + z * z / (2 * n)) / d
        h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
        return p, max(0.0, c - h), min(1.0, c + h)

    sens = wilson(tp, tp + fn)
    spec = wilson(tn, tn + fp)
    return {
        "folds": folds, "early_session": early_session, "band_level": band_level, "seed": seed,
        "n_patients": int(ok.sum()), "n_poor": tp + fn, "n_good": tn + fp,
        "true_positive": tp, "false_negative": fn, "true_negative": tn, "false_positive": fp,
        "sensitivity": {"estimate": sens[0], "ci_low": sens[1], "ci_high": sens[2]},
        "specificity": {"estimate": spec[0], "ci_low": spec[1], "ci_high": spec[2]},
    }
