"""Helpers shared by the reports: reading model entries of ``estimates.json`` defensively."""

from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd

from .. import __version__

DERIVED_HIGHER_BETTER = {"change": True, "recovered": True, "reliable_improvement": True,
                         "reliable_recovery": True, "clinically_significant": True,
                         "reliable_deterioration": False, "dropout": False}

TYPE_WORDS = {
    "random_intercept": "a random intercept for therapists",
    "arm_variance": "a separate therapist variance in each arm",
    "nested": "random intercepts for services (clusters) and for therapists within services",
    "random_slope": "a random intercept and a random slope of feedback across therapists",
    "growth": "sessions nested in patients nested in therapists, with random intercepts and slopes of time for therapists and patients",
}
METHOD_WORDS = {
    "reml": "restricted maximum likelihood (REML)",
    "ml": "maximum likelihood (ML)",
    "laplace": "maximum likelihood with the Laplace approximation",
    "agq": "maximum likelihood with adaptive Gauss-Hermite quadrature",
    "bayes": "Bayesian estimation (PyMC, No-U-Turn sampler)",
}
#: the Bayesian method in words by ``estimates.json``'s ``sampler``; NUTS (``METHOD_WORDS``) for nutpie and pymc
BAYES_SAMPLER_WORDS = {"grid": "Bayesian estimation (exact posterior of the variances on a grid, independent draws)"}
CI_WORDS = {
    "profile": "profile-likelihood", "wald": "Wald (normal approximation)", "delta": "delta-method",
    "bootstrap": "parametric bootstrap", "parametric_bootstrap": "parametric bootstrap",
    "hdi": "highest posterior density", "eti": "equal-tailed posterior", "quantile": "equal-tailed posterior",
}


def version() -> str:
    return __version__


def finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def triple(obj: Any) -> tuple[float | None, float | None, float | None]:
    """(estimate, low, high) from ``{"estimate","ci_low","ci_high"}``, a bare number, or None."""
    if isinstance(obj, dict):
        return finite(obj.get("estimate")), finite(obj.get("ci_low")), finite(obj.get("ci_high"))
    return finite(obj), None, None


def is_bayes(entry: dict) -> bool:
    return str(entry.get("method", "")).lower() == "bayes" or str(entry.get("engine", "")).lower() == "bayes"


def method_words(entry: dict) -> str:
    if is_bayes(entry):
        return BAYES_SAMPLER_WORDS.get(str(entry.get("sampler")), METHOD_WORDS["bayes"])
    m = str(entry.get("method", "")).lower()
    for key, words in METHOD_WORDS.items():
        if m.startswith(key):
            return words
    return str(entry.get("method") or "unstated method")


def model_flags(entry: dict) -> list[tuple[str, str, str]]:
    """Problems to show loudly: (css class, headline, advice)."""
    flags: list[tuple[str, str, str]] = []
    if entry.get("converged") is False:
        flags.append(("alert", "Did not converge: estimates may not be at the optimum.",
                      "Check the data (outliers, very small caseloads) and refit; do not interpret these numbers."))
    if entry.get("singular") is True:
        flags.append(("alert", "Singular fit: a variance component was estimated as zero.",
                      "The data cannot separate therapists from chance here; the ICC's lower bound is zero "
                      "and therapist effects are all shrunk to the average."))
    diag = entry.get("diagnostics") or {}
    if is_bayes(entry) and diag.get("failed"):
        flags.append(("alert", "Sampler diagnostics failed: do not use these posterior summaries.",
                      str(diag.get("advice") or "Run longer chains or raise target_accept.")))
    for w in entry.get("warnings") or []:
        flags.append(("warn", str(w), ""))
    return flags


def primary_model(estimates: dict, therapists: pd.DataFrame | None = None) -> str | None:
    """The model a service report describes: ``ri`` if fitted, else the first Gaussian random-intercept
    model, else the first model with therapist rows."""
    models = estimates.get("models") or {}
    have = set(therapists["model"].dropna().astype(str)) if therapists is not None and "model" in therapists else None
    ok = (lambda m: have is None or m in have)
    if "ri" in models and ok("ri"):
        return "ri"
    for mid, e in models.items():
        if e.get("type") == "random_intercept" and e.get("family", "gaussian") == "gaussian" and ok(mid):
            return mid
    if have:
        return sorted(have)[0]
    return next(iter(models), None)


def higher_is_better(estimates: dict, model_id: str | None) -> bool | None:
    """Whether higher values of the model's outcome are better: derived outcomes by definition,
    an explicit ``higher_is_better`` in the dataset config, the instrument's scoring, else None."""
    entry = (estimates.get("models") or {}).get(model_id or "", {})
    outcome = str(entry.get("outcome", ""))
    if outcome in DERIVED_HIGHER_BETTER:
        return DERIVED_HIGHER_BETTER[outcome]
    cfg = (estimates.get("provenance") or {}).get("config") or {}
    ds = (cfg.get("datasets") or {}).get(estimates.get("dataset"), {}) if isinstance(cfg, dict) else {}
    if isinstance(ds, dict) and ds.get("higher_is_better") is not None:
        return bool(ds["higher_is_better"])
    if estimates.get("instrument"):
        try:
            from ..io.instruments import get_instrument  # written by the ingestion engineer

            return bool(get_instrument(estimates["instrument"], cfg.get("instruments") or {}).higher_is_better)
        except Exception:  # noqa: BLE001 - unknown instrument or module not there: fall through
            pass
    return None


def dataset_columns(estimates: dict) -> dict:
    """The dataset's column mapping (role -> file column) from the provenance config, if there."""
    cfg = (estimates.get("provenance") or {}).get("config") or {}
    if not isinstance(cfg, dict):
        return {}
    if isinstance(cfg.get("columns"), dict):
        return cfg["columns"]
    datasets = cfg.get("datasets") or {}
    ds = datasets.get(estimates.get("dataset"))
    if ds is None and len(datasets) == 1:  # a single dataset in the config: it is this one
        ds = next(iter(datasets.values()))
    if isinstance(ds, dict) and isinstance(ds.get("columns"), dict):
        return ds["columns"]
    return {}


def fixed_terms(formula: str) -> list[str]:
    """Fixed-effect terms of an lme4-style formula (random parts ``(... | ...)`` dropped)."""
    rhs = formula.split("~", 1)[1] if "~" in formula else ""
    rhs = re.sub(r"\([^()]*\|[^()]*\)", "", rhs)
    terms = [t.strip() for t in rhs.split("+")]
    return [t for t in terms if t and t not in ("1", "0", "-1")]
