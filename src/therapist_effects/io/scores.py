"""Several instruments in the same session rows (``columns.scores``), and the NHS Talking Therapies
paired outcome definitions.

Config (CONTRACT.md, additions wave 2)::

    columns:
      scores: {PHQ-9: phq9, GAD-7: gad7}   # instrument name -> column, instead of score + instrument
    primary: PHQ-9                          # optional; default: the first instrument listed

The *primary* instrument plays the part of ``score`` + ``instrument`` of a one-instrument export: its
intake and last scores are the patient table's ``baseline`` and ``end`` (the continuous outcome of
the models, ``<column>_end`` in ``estimates.json``), and its direction says which way is better.

Ingestion (:func:`ingest_scores_frame`): the primary column is validated as ``score`` is; every other
score column must be present on each row and inside its instrument's range, else the row is rejected
(``missing value`` / ``not a number`` / ``out of range (GAD-7: 0-21)``, column = the file column).
These checks come after the cross-row checks of :mod:`~therapist_effects.io.ingest` (duplicates,
several therapists), so a row with a duplicate occasion and a missing GAD-7 is reported as the
duplicate.

Patient outcomes (:func:`derive_scores_outcomes`): ``patients.csv`` gets, per instrument column
``c``, ``c_baseline``, ``c_end`` (first and last scored session), ``c_change`` (positive =
improvement), ``c_caseness_baseline``, ``c_reliable_improvement`` and ``c_reliable_deterioration``
(the instrument's own cut-off and reliable change). When PHQ-9 and GAD-7 are both present the
patient-level ``caseness_baseline``, ``recovered``, ``reliable_improvement``,
``reliable_deterioration`` and ``reliable_recovery`` follow the NHS Talking Therapies paired
definitions (NHS England, *NHS Talking Therapies for anxiety and depression Manual*, 2023, section
on measuring recovery; NHS Digital / NHS England, *Psychological Therapies: reports on the use of
IAPT services, metric definitions*):

- *caseness* at a measurement: PHQ-9 >= 10 **or** GAD-7 >= 8;
- *finished a course of treatment*: at least two scored sessions; every other outcome is NaN for a
  patient who has not;
- *recovery*: caseness at the first measurement and neither score at caseness at the last
  (PHQ-9 < 10 **and** GAD-7 < 8); NaN for patients not at caseness at the start (the denominator);
- *reliable improvement*: PHQ-9 fell by at least 6 **or** GAD-7 by at least 4, and neither measure
  reliably deteriorated;
- *reliable deterioration*: PHQ-9 rose by at least 6 **or** GAD-7 by at least 4, and neither measure
  reliably improved (one measure reliably better and the other reliably worse is neither);
- *reliable recovery*: recovery and reliable improvement.

``clinically_significant`` (Jacobson & Truax) stays that of the primary instrument.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..exceptions import ConfigError, DataWarning
from .instruments import Instrument, get_instrument

__all__ = [
    "derive_scores_outcomes",
    "has_scores",
    "ingest_scores_frame",
    "paired_outcomes",
    "primary_of",
    "single_score_spec",
]

PAIRED = ("PHQ-9", "GAD-7")


def has_scores(spec: Mapping[str, Any]) -> bool:
    cols = spec.get("columns") if isinstance(spec, Mapping) else None
    return isinstance(cols, Mapping) and cols.get("scores") is not None


def _where(spec: Mapping[str, Any], name: str | None = None) -> str:
    name = name or spec.get("name")
    return f"datasets.{name}" if name else "dataset"


def _instruments(spec: Mapping[str, Any], user_instruments: Mapping[str, Any] | None,
                 name: str | None = None) -> dict[str, tuple[Instrument, str]]:
    """Instrument name (as configured) -> (Instrument, file column)."""
    where = _where(spec, name)
    scores = spec["columns"]["scores"]
    if not isinstance(scores, Mapping) or not scores:
        raise ConfigError(f"{where}.columns.scores: expected a mapping of instrument name -> column, e.g. "
                          "{PHQ-9: phq9, GAD-7: gad7}")
    out: dict[str, tuple[Instrument, str]] = {}
    for inst_name, col in scores.items():
        if not isinstance(col, str) or not col.strip():
            raise ConfigError(f"{where}.columns.scores.{inst_name}: expected a column name, got {col!r}")
        try:
            inst = get_instrument(str(inst_name), user_instruments or {})
        except ConfigError as exc:
            raise ConfigError(f"{where}.columns.scores.{inst_name}: {exc}") from None
        out[str(inst_name)] = (inst, col.strip())
    if len({c for _, c in out.values()}) != len(out):
        raise ConfigError(f"{where}.columns.scores: two instruments name the same column")
    return out


def primary_of(spec: Mapping[str, Any], name: str | None = None) -> str:
    """The configured name of the primary instrument (``primary``, default the first listed)."""
    scores = spec["columns"]["scores"]
    primary = spec.get("primary")
    if primary is None:
        return str(next(iter(scores)))
    for k in scores:
        if str(k) == str(primary):
            return str(k)
    for k in scores:
        if _known(k) and _known(primary) and get_instrument(str(k)).name == get_instrument(str(primary)).name:
            return str(k)
    raise ConfigError(f"{_where(spec, name)}.primary: {primary!r} is not one of columns.scores "
                      f"({', '.join(map(str, scores))})")


def _known(name: Any) -> bool:
    try:
        get_instrument(str(name))
        return True
    except ConfigError:
        return False


def single_score_spec(spec: Mapping[str, Any], user_instruments: Mapping[str, Any] | None = None,
                      name: str | None = None) -> tuple[dict, dict[str, tuple[Instrument, str]], str]:
    """The one-instrument spec that ingestion understands, the instruments, and the primary's name.

    ``columns.score`` becomes the primary column and ``instrument`` the primary instrument; the other
    score columns ride along as numeric covariates (checked afterwards by :func:`ingest_scores_frame`).
    """
    insts = _instruments(spec, user_instruments, name)
    primary = primary_of(spec, name)
    out = {k: v for k, v in spec.items() if k != "primary"}
    cols = {k: v for k, v in spec["columns"].items() if k != "scores"}
    cols["score"] = insts[primary][1]
    out["instrument"] = primary
    covs = cols.get("covariates") or []
    covs = [covs] if isinstance(covs, str) else list(covs)
    others = [c for k, (_, c) in insts.items() if k != primary]
    cols["covariates"] = covs + [c for c in others if c not in covs]
    out["columns"] = cols
    ctypes = dict(spec.get("covariate_types") or {})
    for c in others:
        ctypes[c] = "numeric"
    out["covariate_types"] = ctypes
    return out, insts, primary


def ingest_scores_frame(table: pd.DataFrame, spec: Mapping[str, Any], *, source: str = "<table>",
                        user_instruments: Mapping[str, Any] | None = None, today: Any = None,
                        name: str | None = None):
    """:func:`therapist_effects.io.ingest.ingest_frame` for a ``columns.scores`` export (see module doc)."""
    from .ingest import REJECT_COLUMNS, _fmt_value, accounting, ingest_frame

    if spec.get("layout") != "session":
        raise ConfigError(f"{_where(spec, name)}.columns.scores: several instruments per row need layout: session")
    spec1, insts, primary = single_score_spec(spec, user_instruments, name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = ingest_frame(table, spec1, source=source, user_instruments=user_instruments, today=today, name=name)
    rows = res.rows
    bad = pd.Series(False, index=rows.index)
    lines = []
    for inst_name, (inst, col) in insts.items():
        if inst_name == primary:
            continue
        v = pd.to_numeric(rows[col], errors="coerce").astype(float)
        missing = v.isna()
        out_of_range = ~missing & ((v < inst.min) | (v > inst.max))
        for pos in rows.index[(missing | out_of_range) & ~bad]:
            reason = "missing value" if missing[pos] else f"out of range ({inst.name}: {inst.min:g}-{inst.max:g})"
            lines.append({"row": int(rows.at[pos, "row"]), "patient": _fmt_value(rows.at[pos, "patient"]),
                          "column": col, "value": _fmt_value(rows.at[pos, col]), "reason": reason})
        bad |= missing | out_of_range
    if lines:
        extra = pd.DataFrame(lines, columns=REJECT_COLUMNS)
        rejects = pd.concat([res.rejects, extra], ignore_index=True).sort_values("row", kind="stable")
        rejects["row"] = rejects["row"].astype("int64")
        rejects = rejects.reset_index(drop=True)
        rows = rows.loc[~bad].reset_index(drop=True)
    else:
        rejects = res.rejects
    if len(rows) + len(rejects) != res.rows_read:  # the accounting identity is a guarantee
        raise RuntimeError(f"internal: {res.rows_read} rows read but {len(rows)} kept + {len(rejects)} rejected")
    columns = dict(res.columns)
    for inst_name, (_, col) in insts.items():
        columns[f"score:{inst_name}"] = col
    kinds = {k: v for k, v in res.covariate_kinds.items() if k not in {c for _, c in insts.values()}}
    # one warning, as ingest_frame gives, with the secondary-score rejects counted in
    if len(rejects) or res.notes:
        acct = accounting(res.rows_read, rejects)
        parts = [f"{k}: {v}" for k, v in acct["rejected_by_reason"].items()]
        msg = f"{source}: {len(rejects)} of {res.rows_read} rows rejected"
        if parts:
            msg += " (" + "; ".join(parts) + ")"
        if res.notes:
            msg += f"; {res.notes[0]}"
        warnings.warn(msg, DataWarning, stacklevel=2)
    for w in caught:  # anything else ingest_frame warned about
        if not (issubclass(w.category, DataWarning) and " rows rejected" in str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return dataclasses.replace(res, rows=rows, rejects=rejects, columns=columns, covariate_kinds=kinds)


def paired_outcomes(phq9_first, phq9_last, gad7_first, gad7_last, n_sessions=None,
                    phq9: Instrument | None = None, gad7: Instrument | None = None) -> dict[str, np.ndarray]:
    """NHS Talking Therapies paired outcomes from first and last PHQ-9 and GAD-7 scores.

    Returns 0/1 float arrays ``caseness_baseline``, ``caseness_end``, ``recovered``,
    ``reliable_improvement``, ``reliable_deterioration``, ``reliable_recovery`` and
    ``finished_treatment``; NaN where a score is missing or (outcomes) treatment was not finished
    (fewer than 2 scored sessions). Thresholds come from the registry (PHQ-9: caseness >= 10,
    reliable change 6; GAD-7: caseness >= 8, reliable change 4); see the module docstring.
    """
    phq9 = phq9 or get_instrument("PHQ-9")
    gad7 = gad7 or get_instrument("GAD-7")
    p0, p1 = np.atleast_1d(np.asarray(phq9_first, float)), np.atleast_1d(np.asarray(phq9_last, float))
    g0, g1 = np.atleast_1d(np.asarray(gad7_first, float)), np.atleast_1d(np.asarray(gad7_last, float))
    defined = ~(np.isnan(p0) | np.isnan(p1) | np.isnan(g0) | np.isnan(g1))
    finished = np.ones_like(p0, dtype=bool) if n_sessions is None else np.atleast_1d(np.asarray(n_sessions)) >= 2
    case0 = (np.asarray(phq9.is_case(p0)) == 1.0) | (np.asarray(gad7.is_case(g0)) == 1.0)
    case1 = (np.asarray(phq9.is_case(p1)) == 1.0) | (np.asarray(gad7.is_case(g1)) == 1.0)
    up_p, up_g = np.asarray(phq9.reliable_improvement(p0, p1)) == 1.0, np.asarray(gad7.reliable_improvement(g0, g1)) == 1.0
    dn_p, dn_g = np.asarray(phq9.reliable_deterioration(p0, p1)) == 1.0, np.asarray(gad7.reliable_deterioration(g0, g1)) == 1.0
    improved = (up_p | up_g) & ~(dn_p | dn_g)
    deteriorated = (dn_p | dn_g) & ~(up_p | up_g)
    ok = defined & finished

    def f(x, where=ok):
        return np.where(where, x.astype(float), np.nan)

    recovered = np.where(ok & case0, (~case1).astype(float), np.nan)
    return {
        "finished_treatment": np.where(np.isnan(p0) & np.isnan(g0), np.nan, finished.astype(float)),
        "caseness_baseline": f(case0, defined),
        "caseness_end": f(case1, defined),
        "recovered": recovered,
        "reliable_improvement": f(improved),
        "reliable_deterioration": f(deteriorated),
        "reliable_recovery": np.where(np.isnan(recovered), np.nan, (recovered == 1.0) & improved).astype(float),
    }


def derive_scores_outcomes(rows: pd.DataFrame, spec: Mapping[str, Any],
                           user_instruments: Mapping[str, Any] | None = None):
    """:func:`therapist_effects.io.outcomes.derive_patient_outcomes` for a ``columns.scores`` export."""
    from .outcomes import derive_patient_outcomes

    spec1, insts, primary = single_score_spec(spec, user_instruments)
    spec1["columns"].pop("scores", None)
    patients, rejects = derive_patient_outcomes(rows, spec1, insts[primary][0])
    secondary = [c for k, (_, c) in insts.items() if k != primary]
    r = rows[rows["patient"].isin(set(patients["patient"]))].sort_values(["patient", "occasion", "row"], kind="stable")
    g = r.groupby("patient", sort=True)
    idx = pd.Index(patients["patient"])
    new: dict[str, np.ndarray] = {}
    by_name: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for inst_name, (inst, col) in insts.items():
        src = "score" if inst_name == primary else col
        b = g[src].first().reindex(idx).to_numpy(dtype=float)
        e = g[src].last().reindex(idx).to_numpy(dtype=float)
        by_name[inst.name] = (b, e)
        new[f"{col}_baseline"] = b
        new[f"{col}_end"] = e
        new[f"{col}_change"] = np.asarray(inst.improvement(b, e), dtype=float)
        new[f"{col}_caseness_baseline"] = np.asarray(inst.is_case(b), dtype=float)
        new[f"{col}_reliable_improvement"] = np.asarray(inst.reliable_improvement(b, e), dtype=float)
        new[f"{col}_reliable_deterioration"] = np.asarray(inst.reliable_deterioration(b, e), dtype=float)
    out = patients.drop(columns=[c for c in secondary if c in patients.columns])
    if all(n in by_name for n in PAIRED):
        phq, gad = by_name["PHQ-9"], by_name["GAD-7"]
        names = {i.name: i for i, _ in insts.values()}
        paired = paired_outcomes(phq[0], phq[1], gad[0], gad[1], out["n_sessions"].to_numpy(),
                                 names["PHQ-9"], names["GAD-7"])
        for k in ("caseness_baseline", "recovered", "reliable_improvement", "reliable_deterioration",
                  "reliable_recovery"):
            if k in out.columns:
                out[k] = paired[k]
    pos = out.columns.get_loc("end") + 1 if "end" in out.columns else len(out.columns)
    for k in reversed(list(new)):
        out.insert(pos, k, new[k])
    return out, rejects
