"""Model registry: model type (and family / engine) -> the class that fits it.

:func:`therapist_effects.models.fitting.fit_model` looks a configured model up here instead of walking an
if/elif chain. Each entry is a :class:`ModelSpec`: the results-producing model class (imported
lazily, so that e.g. PyMC is only imported for Bayesian models) and an adapter that builds the
model from the model frame, fits it and returns the contract entry, the per-therapist table and the
narrowing-the-gap table. New model types register with :func:`register`.

Lookup order: ``engine: bayes`` -> the ``bayes`` entry; then ``(type, family)``; then ``type``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..exceptions import ModelError

__all__ = ["FitRequest", "Fitted", "ModelSpec", "REGISTRY", "register", "lookup", "model_class"]

log = logging.getLogger("therapist_effects")


@dataclass
class FitRequest:
    """Everything an adapter needs: the model frame (``models.ModelFrame``), the model's config
    entry, the whole config and the derived interval settings."""

    mf: Any
    model: dict
    cfg: dict
    level: float
    interval: str
    n_boot: int
    seed: int
    higher_is_better: bool | None
    idata_path: str | Path | None = None

    @property
    def method(self) -> str | None:
        return self.model.get("method")

    @property
    def interval_or_profile(self) -> str:
        """Engines without Wald intervals for variance components use the profile likelihood."""
        return "profile" if self.interval == "wald" else self.interval


@dataclass
class Fitted:
    entry: dict
    table: pd.DataFrame | None
    narrowing: pd.DataFrame | None
    result: Any


@dataclass(frozen=True)
class ModelSpec:
    """``cls``: "module:Class" of the model class; ``fit``: the adapter."""

    cls: str
    fit: Callable[[FitRequest], Fitted]


REGISTRY: dict[str | tuple[str, str], ModelSpec] = {}


def register(key: str | tuple[str, str], cls: str) -> Callable[[Callable[[FitRequest], Fitted]], Callable]:
    def deco(fn: Callable[[FitRequest], Fitted]) -> Callable[[FitRequest], Fitted]:
        REGISTRY[key] = ModelSpec(cls, fn)
        return fn
    return deco


def lookup(kind: str, family: str = "gaussian", engine: str = "reml") -> ModelSpec:
    for key in (("bayes",) if engine == "bayes" else ()) + ((kind, family), kind):
        if key in REGISTRY:
            return REGISTRY[key]
    raise ModelError(f"no engine fits a {family} {kind!r} model (engine {engine!r})")


def model_class(kind: str, family: str = "gaussian", engine: str = "reml") -> type:
    """The model class registered for ``kind`` (imports its module)."""
    mod, name = lookup(kind, family, engine).cls.split(":")
    return getattr(importlib.import_module(mod, package="therapist_effects"), name)


# ----------------------------------------------------------------------------------------------
# adapters of the built-in model types
# ----------------------------------------------------------------------------------------------
def _fit(r: FitRequest, kind: str, family: str = "gaussian", *, default_method: str, arm: bool = False, **kw):
    """``model_class(kind, family).from_frame(...)`` on the request's model frame (with the arm
    columns when ``arm``), fitted."""
    mf = r.mf
    if arm:
        kw.update(arm=mf.arm, feedback_level=mf.feedback_level)
    return model_class(kind, family).from_frame(
        mf.df, mf.outcome, mf.covariates, therapist=mf.therapist, method=r.method or default_method, **kw,
    ).fit()


def _table(r: FitRequest, res) -> pd.DataFrame:
    return res.therapist_effects(level=r.level, higher_is_better=r.higher_is_better)


def _gap(res) -> pd.DataFrame:
    """The narrowing-the-gap table of a random-slope fit, with the effects named for the CSV."""
    gap = res.gap_table()
    return gap.assign(intercept_effect=gap["intercept"], slope_effect=gap["slope"])


@register("random_intercept", ".models.reml:RandomInterceptModel")
def _fit_random_intercept(r: FitRequest) -> Fitted:
    res = _fit(r, "random_intercept", default_method="REML")
    return Fitted(res.to_contract(interval=r.interval, n_boot=r.n_boot, seed=r.seed), _table(r, res), None, res)


@register("nested", ".models.reml:NestedModel")
def _fit_nested(r: FitRequest) -> Fitted:
    res = _fit(r, "nested", default_method="REML", cluster=r.mf.cluster)
    return Fitted(res.to_contract(interval=r.interval, n_boot=r.n_boot, seed=r.seed), _table(r, res), None, res)


@register(("random_intercept", "binomial"), ".models.glmm:LogisticRandomInterceptModel")
def _fit_logistic(r: FitRequest) -> Fitted:
    res = _fit(r, "random_intercept", "binomial", default_method="agq", n_quad=r.model["n_quad"])
    entry = res.to_contract(interval=r.interval_or_profile, n_boot=r.n_boot, seed=r.seed)
    return Fitted(entry, _table(r, res), None, res)


@register("arm_variance", ".models.arm:ArmVarianceModel")
def _fit_arm_variance(r: FitRequest) -> Fitted:
    mf, model = r.mf, r.model
    res = _fit(r, "arm_variance", default_method="REML", arm=True, correlated=model.get("correlated", False),
               arm_residual=model.get("arm_residual", False),
               **({"cluster": mf.cluster, "cluster_random": True} if model.get("cluster_effect") == "random" else {}))
    entry = res.to_contract(interval=r.interval_or_profile, n_boot=r.n_boot, seed=r.seed)
    try:
        table = _table(r, res)
    except ModelError as exc:  # e.g. with a random cluster level: no per-therapist table (yet)
        log.warning("model %s: no therapist table: %s", model["id"], exc)
        table = None
    return Fitted(entry, table, None, res)


@register(("arm_variance", "binomial"), ".models.glmm_arm:LogisticArmVarianceModel")
def _fit_logistic_arm_variance(r: FitRequest) -> Fitted:
    res = _fit(r, "arm_variance", "binomial", default_method="agq", arm=True, n_quad=r.model["n_quad"])
    return Fitted(res.to_contract(interval=r.interval_or_profile), _table(r, res), None, res)


@register("random_slope", ".models.slopes:RandomSlopeModel")
def _fit_random_slope(r: FitRequest) -> Fitted:
    res = _fit(r, "random_slope", default_method="REML", arm=True, slope=r.model.get("slope"))
    entry = res.to_contract(interval=r.interval_or_profile, n_boot=r.n_boot, seed=r.seed)
    return Fitted(entry, None, _gap(res), res)


@register(("random_slope", "binomial"), ".models.glmm_slope:LogisticRandomSlopeModel")
def _fit_logistic_random_slope(r: FitRequest) -> Fitted:
    res = _fit(r, "random_slope", "binomial", default_method="laplace", arm=True, slope=r.model.get("slope"),
               n_quad=r.model["n_quad"])
    return Fitted(res.to_contract(interval=r.interval_or_profile), None, _gap(res), res)


@register("bayes", ".models.bayes:BayesModel")
def _fit_bayes(r: FitRequest) -> Fitted:
    from ..models.bayes import BayesConfig, fit_bayes, prior_sensitivity

    mf, model, cfg = r.mf, r.model, r.cfg
    kind, family = model["type"], model.get("family", "gaussian")
    b = cfg["bayes"]
    bcfg = BayesConfig(
        chains=b["chains"], draws=b["draws"], tune=b["tune"], target_accept=b["target_accept"],
        seed=r.seed, sampler=b["sampler"], priors=b.get("priors") or None,
        parameterization=b["parameterization"],
    )
    data = dict(
        family=family, therapist=mf.therapist, cluster=mf.cluster if kind == "nested" else None,
        arm=mf.arm if kind == "arm_variance" else None, feedback_level=mf.feedback_level,
    )
    result = fit_bayes(kind, mf.df, mf.outcome, mf.covariates, config=bcfg, **data)
    entry = dict(result.to_contract())
    entry.setdefault("loglik", None)  # no maximised likelihood for a posterior
    # Wall-clock timings would break byte-identical reruns: they go to the log only.
    diag = dict(entry.get("diagnostics") or {})
    for key in [k for k in diag if "seconds" in k]:
        log.info("model %s: %s = %.2f", model["id"], key, diag.pop(key))
    entry["diagnostics"] = diag
    if model.get("prior_sensitivity") and b.get("sensitivity_priors"):
        entry["prior_sensitivity"] = prior_sensitivity(
            kind, mf.df, mf.outcome, mf.covariates, config=bcfg, alt_priors=b["sensitivity_priors"],
            base=result, **data,
        )
    if r.idata_path is not None:
        result.to_netcdf(r.idata_path)
    table = result.therapist_table(level=r.level, higher_is_better=r.higher_is_better)
    return Fitted(entry, table, None, result)
