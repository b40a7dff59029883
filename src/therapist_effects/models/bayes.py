"""Bayesian therapist-effects models (PyMC), sampled on per-therapist sufficient statistics.

Models
------
``random_intercept``
    Patient outcome ``y = X b + u[therapist] + e`` with ``u ~ Normal(0, sigma_therapist)`` and
    ``e ~ Normal(0, sigma)`` (``family="gaussian"``), or ``logit P(y = 1) = X b + u[therapist]``
    (``family="binomial"``; the ICC is then on the latent scale, residual variance pi^2 / 3).
``nested``
    Therapists within clusters (services, sites, trials), as lme4's ``(1 | cluster/therapist)``:
    ``y = X b + v[cluster] + u[cluster:therapist] + e``. The ICC is the therapist share of the total
    variance, ``sigma_therapist^2 / (sigma_cluster^2 + sigma_therapist^2 + sigma^2)``; the cluster
    share is reported as ``icc_cluster``.
``arm_variance``
    A separate therapist variance in each arm of a feedback trial (independent arm-specific
    therapist intercepts, as lme4's ``(0 + control | therapist) + (0 + feedback | therapist)``), a
    common residual variance. ICC per arm, their ratio (feedback / control), ``1 - ratio`` and the
    posterior probability that the feedback ICC is smaller than the control ICC.

All therapist (and cluster) effects are non-centred: ``u = sigma_therapist * z``, ``z ~ Normal(0, 1)``.
For Gaussian random_intercept and arm_variance models, ``BayesConfig(parameterization="marginal")``
instead integrates the therapist effects out of the likelihood (still on the same sufficient
statistics), samples only the fixed effects and SDs, and then draws the effects exactly from their
conditional posterior ``u_b | b, sigma, sd_b, y ~ Normal(n_b sd_b^2 rbar_b / (sigma^2 + n_b sd_b^2),
sigma^2 sd_b^2 / (sigma^2 + n_b sd_b^2))`` (``rbar_b`` the block's mean residual): the same joint
posterior with a few-dimensional NUTS problem, much faster for thousands of therapists.

Samplers
--------
``BayesConfig(sampler="grid")`` (the choice of ``"auto"`` for Gaussian models) integrates the therapist
(and cluster) effects and the fixed effects out, evaluates the exact posterior of the 2-3 standard
deviations on an adaptive grid and draws from it independently, then the fixed, cluster and therapist
effects exactly (:mod:`therapist_effects.models.bayes_grid`): no compilation, the same posterior as NUTS.
Binomial models, and ``parameterization="noncentred"``, are sampled by NUTS (nutpie, or PyMC's own).

Sufficient statistics
---------------------
For a Gaussian model the log-likelihood given the therapist effects ``w_b`` of the blocks ``b``
(therapists; therapist-within-cluster units; therapist-by-arm units) is

    -n log(sigma) - RSS / (2 sigma^2),
    RSS = y'y - 2 b'X'y + b'X'X b - 2 sum_b w_b (S_yb - S_xb' b) + sum_b n_b w_b^2,

where ``S_yb``, ``S_xb`` are the per-block sums of the outcome and the covariates and ``n_b`` the
caseload. It is written as a ``pm.Potential`` on these sums, so a gradient costs
O(therapists x covariates) whatever the number of patients. Binary outcomes cannot use Gaussian
sums: the Bernoulli likelihood is aggregated to binomial counts per (therapist, covariate pattern),
which is exact and as small as the data allow (per patient when every covariate pattern is unique).

Scaling and default priors
--------------------------
Internally the outcome (Gaussian only) is centred and divided by its SD, and every covariate
column is centred and divided by its SD; results are transformed back, and priors are stated (and
reported in ``to_contract()["priors"]``) on the data's scale. With ``sd_y`` the outcome's SD and
``sd_x`` a covariate's SD, the weakly-informative defaults are (in the spirit of rstanarm / brms):

* ``intercept`` (the expected outcome at the covariate means): Normal(mean(y), 2.5 sd_y);
  binomial: Normal(logit(mean(y)), 2.5) on the log-odds scale.
* ``slopes``: each Normal(0, 2.5 sd_y / sd_x); binomial: Normal(0, 2.5 / sd_x).
* ``sigma_residual``: HalfStudentT(nu=3, sigma=sd_y) (Gaussian only).
* ``sigma_therapist`` (each arm's, for ``arm_variance``), ``sigma_cluster``:
  HalfStudentT(nu=3, sigma=sd_y); binomial: HalfStudentT(nu=3, sigma=1) on the log-odds scale.

Override any of them with ``BayesConfig(priors={...})``, e.g.
``{"sigma_therapist": {"dist": "halfnormal", "sigma": 0.5}, "slopes": {"phq9_pre": {"dist":
"normal", "mu": 0, "sigma": 1}}}``. Fixed effects take ``normal`` (``mu``, ``sigma``); standard
deviations take ``halfnormal`` (``sigma``), ``halfstudentt`` (``nu``, ``sigma``), ``halfcauchy``
(``beta``) or ``exponential`` (``lam``). A ``slopes`` entry with a ``dist`` key applies to every slope.

Diagnostics
-----------
R-hat (rank-normalised split R-hat), bulk and tail ESS (ArviZ) over every sampled parameter, and
the number of divergent transitions. Any R-hat > 1.01, any ESS < 400 or any divergence marks the
fit ``failed``, issues a :class:`~therapist_effects.exceptions.SamplerWarning` and fills ``advice``.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from ..classify import classify_effects
from .bayes_grid import EDGE_DROP, CaseloadSums, GridPosterior, cluster_terms
from .design import INTERCEPT, build_design, group_codes
from ..engine.results import ICC, ModelResults, icc_table, json_plain
from ..exceptions import ConfigError, ModelError, SamplerWarning
from ..progress import nutpie_progress
from ..pytensor_setup import configure as _configure_pytensor

_configure_pytensor()  # before PyMC is imported: Numba backend, no C-BLAS search (see pytensor_setup)

MODEL_TYPES = ("random_intercept", "nested", "arm_variance")
SAMPLERS = ("auto", "grid", "nutpie", "pymc")
FAMILIES = ("gaussian", "binomial")
RHAT_MAX = 1.01
ESS_MIN = 400
DEFAULT_SEED = 20240917
LOGISTIC_VARIANCE = math.pi**2 / 3

_LOCATION_DISTS = {"normal": ("mu", "sigma")}
_SCALE_DISTS = {
    "halfnormal": ("sigma",),
    "halfstudentt": ("nu", "sigma"),
    "halfcauchy": ("beta",),
    "exponential": ("lam",),
}
_PRIOR_KEYS = ("intercept", "slopes", "sigma_residual", "sigma_therapist", "sigma_cluster")


@dataclass
class BayesConfig:
    """Sampler settings and priors of a Bayesian therapist-effects fit.

    ``sampler``: ``"grid"`` (Gaussian random_intercept, arm_variance and nested models on sufficient
    statistics: the exact posterior of the SDs on a grid, sampled iid, then the fixed, cluster and
    therapist effects exactly from their conditional posteriors; no compilation, see
    :mod:`therapist_effects.models.bayes_grid`), ``"nutpie"`` (compiled NUTS), ``"pymc"`` (PyMC's own
    NUTS) or ``"auto"`` (``grid`` where it applies, else nutpie where it is importable, else PyMC).
    ``chains`` x ``draws`` is the number of draws of every sampler (``tune`` and ``target_accept`` are
    NUTS settings). The same config and data give identical draws.
    ``priors``: overrides of the default priors (see the module docstring), on the data's scale.
    ``parameterization``: ``"auto"`` (the default: ``"marginal"`` where it applies -- Gaussian
    random_intercept and arm_variance models on sufficient statistics, i.e. not ``per_patient`` --
    else ``"noncentred"``),
    ``"noncentred"`` (sample ``z``; therapist effects ``u = sigma_therapist * z``)
    or ``"marginal"`` (Gaussian random_intercept / arm_variance only: the therapist effects are
    integrated out analytically, NUTS samples only the fixed effects and SDs, and the effects are then
    drawn exactly from their conditional posterior -- the same joint posterior, far fewer dimensions).
    The grid sampler is always ``"marginal"`` (it integrates the fixed effects out as well).
    """

    chains: int = 4
    draws: int = 1000
    tune: int = 1000
    target_accept: float = 0.9
    seed: int = DEFAULT_SEED
    sampler: str = "auto"
    priors: dict | None = None
    cores: int | None = None
    parameterization: str = "auto"

    def resolved_sampler(self, grid_applies: bool = False) -> str:
        """The sampler used; ``grid_applies``: the model is one the grid sampler covers (Gaussian, on
        sufficient statistics, parameterization auto or marginal)."""
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"bayes.sampler: expected one of {list(SAMPLERS)}, got {self.sampler!r}")
        if self.sampler == "grid" and not grid_applies:
            raise ConfigError(
                "bayes.sampler: 'grid' covers Gaussian models on sufficient statistics with parameterization "
                "'auto' or 'marginal'; use 'auto', 'nutpie' or 'pymc' for this model"
            )
        if self.sampler == "auto":
            if grid_applies:
                return "grid"
            try:
                import nutpie  # noqa: F401
            except ImportError:
                return "pymc"
            return "nutpie"
        return self.sampler


# ----------------------------------------------------------------------------------------------
# data preparation


def _level_label(v: Any) -> str:
    """Label of an arm / therapist level: integer-valued floats without '.0' (0.0 -> '0')."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


@dataclass
class _Prepared:
    """Everything a model needs from the patient table, standardised."""

    model_type: str
    family: str
    outcome: str
    therapist: str
    cluster: str | None
    arm: str | None
    terms: list[str]
    names: list[str]  # fixed-effect names, R-style, (Intercept) first
    y: np.ndarray
    Xs: np.ndarray  # standardised design (intercept column of ones first)
    ys: np.ndarray  # standardised outcome (gaussian) or 0/1 (binomial)
    ybar: float
    sy: float
    xbar: np.ndarray
    sx: np.ndarray
    block: np.ndarray  # block code per patient
    blocks: pd.DataFrame  # one row per block: therapist, [cluster], [arm], caseload, label
    cluster_of_block: np.ndarray
    cluster_labels: list[str]
    arm_of_block: np.ndarray
    arm_labels: list[str]
    feedback_index: int | None
    n_therapists: int

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def formula(self) -> str:
        rhs = " + ".join(self.terms) if self.terms else "1"
        if self.model_type == "nested":
            re = f"(1 | {self.cluster}/{self.therapist})"
        elif self.model_type == "arm_variance":
            re = f"diag(0 + factor({self.arm}) | {self.therapist})"
        else:
            re = f"(1 | {self.therapist})"
        return f"{self.outcome} ~ {rhs} + {re}"


def _prepare(
    model_type: str,
    df: pd.DataFrame,
    outcome: str,
    covariates: Sequence[str],
    *,
    family: str,
    therapist: str,
    cluster: str | None,
    arm: str | None,
    feedback_level: Any,
) -> _Prepared:
    if model_type not in MODEL_TYPES:
        raise ModelError(f"model type {model_type!r} is not one of {list(MODEL_TYPES)} (bayes engine)")
    if family not in FAMILIES:
        raise ModelError(f"family {family!r} is not one of {list(FAMILIES)} (bayes engine)")
    if family == "binomial" and model_type != "random_intercept":
        raise ModelError(f"bayes engine: family 'binomial' is fitted only as random_intercept, not {model_type!r}")
    if model_type == "nested" and not cluster:
        raise ModelError("bayes engine: a nested model needs the cluster column (cluster=...)")
    if model_type == "arm_variance" and not arm:
        raise ModelError("bayes engine: an arm_variance model needs the arm column (arm=...)")
    terms = list(dict.fromkeys(covariates))
    if arm and arm not in terms:
        terms.append(arm)
    grouping = [therapist] + ([cluster] if model_type == "nested" else []) + (
        [arm] if model_type == "arm_variance" else []
    )
    for col in grouping:
        if col not in df.columns:
            raise ModelError(f"bayes engine: column {col!r} is not a column of the patient table")
        if df[col].isna().any():
            raise ModelError(f"bayes engine: {int(df[col].isna().sum())} rows have a missing {col!r}; drop them before fitting")
    design = build_design(df, outcome, terms)
    y, X, names = design.y, design.X, design.names
    n = len(y)
    if n < 3:
        raise ModelError(f"bayes engine: {n} patients are too few to fit a model")
    if family == "binomial":
        if not np.isin(y, (0.0, 1.0)).all():
            raise ModelError(f"bayes engine: binomial outcome {outcome!r} must be 0/1")
        ybar, sy = 0.0, 1.0
        ys = y.copy()
    else:
        ybar, sy = float(y.mean()), float(y.std(ddof=1))
        if not sy > 0:
            raise ModelError(f"bayes engine: outcome {outcome!r} does not vary")
        ys = (y - ybar) / sy
    xbar = X[:, 1:].mean(axis=0)
    sx = X[:, 1:].std(axis=0, ddof=1)
    Xs = np.column_stack([np.ones(n), (X[:, 1:] - xbar) / sx]) if X.shape[1] > 1 else np.ones((n, 1))

    th_codes, th_labels = group_codes(df[therapist])
    n_therapists = len(th_labels)
    if n_therapists < 2:
        raise ModelError(f"bayes engine: {n_therapists} therapist in {therapist!r}; at least 2 are needed")
    cluster_labels: list[str] = []
    arm_labels: list[str] = []
    feedback_index = None
    if model_type == "random_intercept":
        block = th_codes
        blocks = pd.DataFrame({"therapist": [str(t) for t in th_labels]})
        blocks["label"] = blocks["therapist"]
        cluster_of_block = np.zeros(len(blocks), dtype=np.int64)
        arm_of_block = np.zeros(len(blocks), dtype=np.int64)
    elif model_type == "nested":
        cl_codes, cl_labels = group_codes(df[cluster])
        cluster_labels = [str(c) for c in cl_labels]
        if len(cluster_labels) < 2:
            raise ModelError(f"bayes engine: nested model needs at least 2 clusters in {cluster!r}")
        key = pd.MultiIndex.from_arrays([cl_codes, th_codes])
        block, uniq = pd.factorize(key, sort=True)
        ucl = np.array([k[0] for k in uniq], dtype=np.int64)
        uth = np.array([k[1] for k in uniq], dtype=np.int64)
        blocks = pd.DataFrame({"therapist": [str(th_labels[i]) for i in uth], "cluster": [cluster_labels[i] for i in ucl]})
        blocks["label"] = blocks["cluster"] + "/" + blocks["therapist"]
        cluster_of_block = ucl
        arm_of_block = np.zeros(len(blocks), dtype=np.int64)
    else:
        arm_values = df[arm]
        labels = arm_values.map(_level_label).astype(str)
        arm_codes, a_labels = group_codes(labels)
        arm_labels = [str(a) for a in a_labels]
        if len(arm_labels) != 2:
            raise ModelError(f"bayes engine: arm column {arm!r} needs exactly two levels, found {arm_labels[:5]}")
        if feedback_level is None:
            feedback_index = arm_labels.index("1") if set(arm_labels) == {"0", "1"} else 1
        else:
            fl = _level_label(feedback_level)
            if fl not in arm_labels:
                raise ModelError(f"bayes engine: feedback_level {feedback_level!r} is not a level of {arm!r} ({arm_labels})")
            feedback_index = arm_labels.index(fl)
        key = pd.MultiIndex.from_arrays([arm_codes, th_codes])
        block, uniq = pd.factorize(key, sort=True)
        uarm = np.array([k[0] for k in uniq], dtype=np.int64)
        uth = np.array([k[1] for k in uniq], dtype=np.int64)
        blocks = pd.DataFrame({"therapist": [str(th_labels[i]) for i in uth], "arm": [arm_labels[i] for i in uarm]})
        blocks["label"] = blocks["therapist"] + "[" + blocks["arm"] + "]"
        cluster_of_block = np.zeros(len(blocks), dtype=np.int64)
        arm_of_block = uarm
    block = np.asarray(block, dtype=np.int64)
    blocks["caseload"] = np.bincount(block, minlength=len(blocks))
    return _Prepared(
        model_type=model_type, family=family, outcome=outcome, therapist=therapist,
        cluster=cluster if model_type == "nested" else None, arm=arm if model_type == "arm_variance" else None,
        terms=terms, names=names, y=y, Xs=Xs, ys=ys, ybar=ybar, sy=sy, xbar=xbar, sx=sx, block=block,
        blocks=blocks, cluster_of_block=np.asarray(cluster_of_block, dtype=np.int64), cluster_labels=cluster_labels,
        arm_of_block=np.asarray(arm_of_block, dtype=np.int64), arm_labels=arm_labels,
        feedback_index=feedback_index, n_therapists=n_therapists,
    )


def sufficient_statistics(prep: _Prepared) -> dict[str, np.ndarray]:
    """Per-block sums on the standardised scale: the only data a Gaussian model's likelihood needs."""
    B = prep.n_blocks
    Xs, ys, g = prep.Xs, prep.ys, prep.block
    p = Xs.shape[1]
    n_b = np.bincount(g, minlength=B).astype(float)
    Sy = np.bincount(g, weights=ys, minlength=B)
    Sx = np.column_stack([np.bincount(g, weights=Xs[:, j], minlength=B) for j in range(p)])
    return {
        "n": np.asarray(float(len(ys))),
        "yty": np.asarray(float(ys @ ys)),
        "Xty": Xs.T @ ys,
        "XtX": Xs.T @ Xs,
        "n_b": n_b,
        "Sy_b": Sy,
        "Sx_b": Sx,
    }


def binomial_counts(prep: _Prepared) -> dict[str, np.ndarray]:
    """Successes and trials per (block, covariate pattern): the aggregated Bernoulli likelihood."""
    key = np.column_stack([prep.block.astype(float), prep.Xs])
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.ravel()
    trials = np.bincount(inv, minlength=len(uniq)).astype(np.int64)
    succ = np.rint(np.bincount(inv, weights=prep.ys, minlength=len(uniq))).astype(np.int64)
    return {"pat_X": uniq[:, 1:], "pat_block": uniq[:, 0].astype(np.int64), "trials": trials, "successes": succ}


# ----------------------------------------------------------------------------------------------
# priors


def default_priors(prep: _Prepared) -> dict:
    """The weakly-informative default priors for this model and data, on the data's scale."""
    slopes = {}
    if prep.family == "binomial":
        m = float(np.clip(prep.y.mean(), 0.01, 0.99))
        intercept = {"dist": "normal", "mu": math.log(m / (1 - m)), "sigma": 2.5}
        for name, s in zip(prep.names[1:], prep.sx):
            slopes[name] = {"dist": "normal", "mu": 0.0, "sigma": 2.5 / float(s)}
        sd_scale = 1.0
    else:
        intercept = {"dist": "normal", "mu": prep.ybar, "sigma": 2.5 * prep.sy}
        for name, s in zip(prep.names[1:], prep.sx):
            slopes[name] = {"dist": "normal", "mu": 0.0, "sigma": 2.5 * prep.sy / float(s)}
        sd_scale = prep.sy
    priors: dict[str, Any] = {"intercept": intercept, "slopes": slopes}
    if prep.family == "gaussian":
        priors["sigma_residual"] = {"dist": "halfstudentt", "nu": 3.0, "sigma": sd_scale}
    priors["sigma_therapist"] = {"dist": "halfstudentt", "nu": 3.0, "sigma": sd_scale}
    if prep.model_type == "nested":
        priors["sigma_cluster"] = {"dist": "halfstudentt", "nu": 3.0, "sigma": sd_scale}
    return priors


def _check_spec(key: str, spec: Any, allowed: dict) -> dict:
    if not isinstance(spec, Mapping) or "dist" not in spec:
        raise ConfigError(f"bayes.priors.{key}: expected a mapping with 'dist' and its parameters, got {spec!r}")
    dist = str(spec["dist"]).lower()
    if dist not in allowed:
        raise ConfigError(f"bayes.priors.{key}: dist {spec['dist']!r} is not one of {sorted(allowed)}")
    params = {k: v for k, v in spec.items() if k != "dist"}
    need = allowed[dist]
    if set(params) != set(need):
        raise ConfigError(f"bayes.priors.{key}: dist {dist!r} takes parameters {list(need)}, got {sorted(params)}")
    out: dict[str, Any] = {"dist": dist}
    for k in need:
        try:
            v = float(params[k])
        except (TypeError, ValueError):
            raise ConfigError(f"bayes.priors.{key}.{k}: expected a number, got {params[k]!r}") from None
        if not math.isfinite(v) or (k != "mu" and v <= 0):
            raise ConfigError(f"bayes.priors.{key}.{k}: expected a positive finite number, got {params[k]!r}")
        out[k] = v
    return out


def resolve_priors(prep: _Prepared, overrides: Mapping | None) -> dict:
    """Default priors updated with ``overrides`` (validated); the dict actually used."""
    priors = default_priors(prep)
    if not overrides:
        return priors
    for key, spec in overrides.items():
        if key not in _PRIOR_KEYS:
            raise ConfigError(f"bayes.priors: unknown key {key!r}; expected one of {list(_PRIOR_KEYS)}")
        if key not in priors:
            continue  # e.g. sigma_cluster for a model without clusters, sigma_residual for binomial
        if key == "intercept":
            priors[key] = _check_spec(key, spec, _LOCATION_DISTS)
        elif key == "slopes":
            if isinstance(spec, Mapping) and "dist" in spec:
                checked = _check_spec(key, spec, _LOCATION_DISTS)
                priors["slopes"] = {name: dict(checked) for name in priors["slopes"]}
            elif isinstance(spec, Mapping):
                for name, s in spec.items():
                    if name not in priors["slopes"]:
                        raise ConfigError(f"bayes.priors.slopes: {name!r} is not a fixed effect; expected one of {list(priors['slopes'])}")
                    priors["slopes"][name] = _check_spec(f"slopes.{name}", s, _LOCATION_DISTS)
            else:
                raise ConfigError(f"bayes.priors.slopes: expected a mapping, got {spec!r}")
        else:
            priors[key] = _check_spec(key, spec, _SCALE_DISTS)
    return priors


def model_priors(
    model_type: str,
    df: pd.DataFrame,
    outcome: str,
    covariates: Sequence[str] = (),
    *,
    priors: Mapping | None = None,
    family: str = "gaussian",
    therapist: str = "therapist",
    cluster: str | None = None,
    arm: str | None = None,
    feedback_level: Any = None,
) -> dict:
    """The priors (data scale) a fit with these arguments would use: defaults updated by ``priors``."""
    prep = _prepare(
        model_type, df, outcome, covariates, family=family, therapist=therapist, cluster=cluster, arm=arm,
        feedback_level=feedback_level,
    )
    return resolve_priors(prep, priors)


def _scale_spec_std(spec: dict, scale: float) -> dict:
    """A prior on a standard deviation, transformed to the standardised scale (sd / scale)."""
    out = dict(spec)
    if spec["dist"] == "exponential":
        out["lam"] = spec["lam"] * scale
    elif spec["dist"] == "halfcauchy":
        out["beta"] = spec["beta"] / scale
    else:
        out["sigma"] = spec["sigma"] / scale
    return out


def _model_inputs(prep: _Prepared, priors: dict) -> dict[str, np.ndarray]:
    """Data and prior hyper-parameters (standardised scale) fed to the model as ``pm.Data``."""
    sy = prep.sy
    ic = priors["intercept"]
    mu = [(ic["mu"] - prep.ybar) / sy]
    sd = [ic["sigma"] / sy]
    for name, s in zip(prep.names[1:], prep.sx):
        sp = priors["slopes"][name]
        mu.append(sp["mu"] * s / sy)
        sd.append(sp["sigma"] * s / sy)
    inputs: dict[str, np.ndarray] = {"prior_beta_mu": np.asarray(mu, float), "prior_beta_sigma": np.asarray(sd, float)}
    for key in ("sigma_residual", "sigma_therapist", "sigma_cluster"):
        if key in priors:
            for k, v in _scale_spec_std(priors[key], sy).items():
                if k != "dist":
                    inputs[f"prior_{key}_{k}"] = np.asarray(float(v))
    if prep.model_type == "nested":
        inputs["cluster_of_block"] = prep.cluster_of_block
    if prep.model_type == "arm_variance":
        inputs["arm_of_block"] = prep.arm_of_block
    if prep.family == "binomial":
        inputs.update(binomial_counts(prep))
    else:
        inputs.update(sufficient_statistics(prep))
    return inputs


# ----------------------------------------------------------------------------------------------
# the PyMC model


def _sd_rv(pm, name: str, dist: str, d: dict, key: str, dims=None):
    kw = {} if dims is None else {"dims": dims}
    if dist == "halfnormal":
        return pm.HalfNormal(name, sigma=d[f"prior_{key}_sigma"], **kw)
    if dist == "halfstudentt":
        return pm.HalfStudentT(name, nu=d[f"prior_{key}_nu"], sigma=d[f"prior_{key}_sigma"], **kw)
    if dist == "halfcauchy":
        return pm.HalfCauchy(name, beta=d[f"prior_{key}_beta"], **kw)
    return pm.Exponential(name, lam=d[f"prior_{key}_lam"], **kw)


def build_model(prep: _Prepared, priors: dict, *, per_patient: bool = False, parameterization: str = "noncentred"):
    """The PyMC model on the standardised scale.

    Sampled parameters: ``beta_std`` (fixed effects), ``sigma_std`` (residual SD, Gaussian),
    ``sd_therapist_std`` (per arm for arm_variance), ``sd_cluster_std`` (nested), and the
    standard-normal ``z_therapist`` (per block) and ``z_cluster``. ``per_patient=True`` writes the
    likelihood per patient (Normal / Bernoulli) instead of on sufficient statistics / binomial
    counts (for benchmarks and checks; same posterior). ``parameterization="marginal"`` (Gaussian
    random_intercept / arm_variance on sufficient statistics) integrates the therapist effects out:
    per block, ``-(n_b - 1) log sigma - log(sigma^2 + n_b sd_b^2) / 2`` and the quadratic form
    ``RSS / sigma^2 - sum_b m_b^2 / n_b (1 / sigma^2 - 1 / (sigma^2 + n_b sd_b^2))`` with
    ``m_b = S_yb - S_xb' b``; no ``z_therapist`` is sampled.
    """
    import pymc as pm
    import pytensor.tensor as pt

    inputs = _model_inputs(prep, priors)
    coords = {"coef": prep.names, "block": prep.blocks["label"].tolist()}
    if prep.model_type == "nested":
        coords["cluster"] = prep.cluster_labels
    if prep.model_type == "arm_variance":
        coords["arm"] = prep.arm_labels
    with pm.Model(coords=coords) as model:
        d = {k: pm.Data(k, v) for k, v in inputs.items() if not (per_patient and k in ("XtX",))}
        beta = pm.Normal("beta_std", mu=d["prior_beta_mu"], sigma=d["prior_beta_sigma"], dims="coef")
        if prep.model_type == "arm_variance":
            sd_t = _sd_rv(pm, "sd_therapist_std", priors["sigma_therapist"]["dist"], d, "sigma_therapist", dims="arm")
        else:
            sd_t = _sd_rv(pm, "sd_therapist_std", priors["sigma_therapist"]["dist"], d, "sigma_therapist")
        marginal = parameterization == "marginal"
        sd_b = sd_t[d["arm_of_block"]] if prep.model_type == "arm_variance" else sd_t
        if marginal:
            if prep.family != "gaussian" or prep.model_type == "nested" or per_patient:
                raise ModelError(
                    "bayes engine: parameterization 'marginal' is available for Gaussian random_intercept and "
                    f"arm_variance models on sufficient statistics, not {prep.family} {prep.model_type}"
                )
            sigma = _sd_rv(pm, "sigma_std", priors["sigma_residual"]["dist"], d, "sigma_residual")
            s2, nb = sigma**2, d["n_b"]
            v_b = s2 + nb * sd_b**2  # marginal variance of a block mean times n_b
            m_b = d["Sy_b"] - pt.dot(d["Sx_b"], beta)
            rss = d["yty"] - 2.0 * pt.dot(beta, d["Xty"]) + pt.dot(beta, pt.dot(d["XtX"], beta))
            quad = rss / s2 - pt.sum(m_b**2 / nb * (1.0 / s2 - 1.0 / v_b))
            pm.Potential(
                "loglik",
                -(d["n"] - nb.shape[0]) * pt.log(sigma) - 0.5 * pt.sum(pt.log(v_b)) - 0.5 * quad
                - 0.5 * d["n"] * math.log(2 * math.pi),
            )
            return model
        z = pm.Normal("z_therapist", 0.0, 1.0, dims="block")
        w = sd_b * z
        if prep.model_type == "nested":
            sd_c = _sd_rv(pm, "sd_cluster_std", priors["sigma_cluster"]["dist"], d, "sigma_cluster")
            zc = pm.Normal("z_cluster", 0.0, 1.0, dims="cluster")
            w = w + sd_c * zc[d["cluster_of_block"]]
        if prep.family == "binomial" and per_patient:
            Xd = pm.Data("X_patient", prep.Xs)
            gd = pm.Data("block_patient", prep.block)
            pm.Bernoulli("y", logit_p=pt.dot(Xd, beta) + w[gd], observed=pm.Data("y_patient", prep.ys))
        elif prep.family == "binomial":
            eta = pt.dot(d["pat_X"], beta) + w[d["pat_block"]]  # pat_X: standardised design incl. intercept
            pm.Binomial("y", n=d["trials"], logit_p=eta, observed=d["successes"])
        else:
            sigma = _sd_rv(pm, "sigma_std", priors["sigma_residual"]["dist"], d, "sigma_residual")
            if per_patient:
                Xd = pm.Data("X_patient", prep.Xs)
                gd = pm.Data("block_patient", prep.block)
                pm.Normal("y", mu=pt.dot(Xd, beta) + w[gd], sigma=sigma, observed=pm.Data("y_patient", prep.ys))
            else:
                rss = (
                    d["yty"]
                    - 2.0 * pt.dot(beta, d["Xty"])
                    + pt.dot(beta, pt.dot(d["XtX"], beta))
                    - 2.0 * pt.sum(w * (d["Sy_b"] - pt.dot(d["Sx_b"], beta)))
                    + pt.sum(d["n_b"] * w**2)
                )
                pm.Potential(
                    "loglik",
                    -d["n"] * pt.log(sigma) - rss / (2.0 * sigma**2) - 0.5 * d["n"] * math.log(2 * math.pi),
                )
    return model


# ----------------------------------------------------------------------------------------------
# sampling and diagnostics


def _sample(model, compiled, config: BayesConfig, sampler: str):
    """Draws from the posterior (InferenceData) and the sampling wall time in seconds."""
    cores = config.cores or min(config.chains, os.cpu_count() or 1)
    t0 = time.perf_counter()
    if sampler == "nutpie":
        import nutpie

        with nutpie_progress(f"sampling ({config.chains} chains x {config.tune} + {config.draws} draws)") as bar:
            idata = nutpie.sample(
                compiled, draws=config.draws, tune=config.tune, chains=config.chains, cores=cores,
                seed=config.seed, progress_bar=bar, save_warmup=False, target_accept=config.target_accept,
            )
    else:
        import pymc as pm

        with model:
            idata = pm.sample(
                draws=config.draws, tune=config.tune, chains=config.chains, cores=cores,
                random_seed=config.seed, target_accept=config.target_accept, progressbar=False,
                compute_convergence_checks=False, nuts_sampler="pymc",
            )
    return idata, time.perf_counter() - t0


def grid_posterior(prep: _Prepared, priors: dict) -> GridPosterior:
    """The exact posterior of the SDs of a Gaussian model (grid sampler)."""
    d = _model_inputs(prep, priors)
    nested = prep.model_type == "nested"
    sums = CaseloadSums.from_statistics(sufficient_statistics(prep), prep.arm_of_block,
                                        prep.cluster_of_block if nested else None)
    std = {key: {"dist": priors[key]["dist"], **{k[len(f"prior_{key}_"):]: float(v) for k, v in d.items()
                                                 if k.startswith(f"prior_{key}_")}}
           for key in ("sigma_residual", "sigma_therapist", "sigma_cluster") if key in priors}
    sd_priors = [std["sigma_therapist"]] * max(len(prep.arm_labels), 1) + ([std["sigma_cluster"]] if nested else [])
    return GridPosterior(sums, d["prior_beta_mu"], d["prior_beta_sigma"], std["sigma_residual"], sd_priors)


def _sample_grid(prep: _Prepared, priors: dict, config: BayesConfig):
    """Independent draws from the exact posterior (InferenceData laid out as a marginal NUTS fit; the grid's
    size and edge drop in the posterior's attributes) and the wall time in seconds."""
    import arviz as az

    t0 = time.perf_counter()
    post = grid_posterior(prep, priors)
    grid = post.build()
    n = config.chains * config.draws
    d = post.draw(grid, n, np.random.default_rng([int(config.seed), 11]))
    shape = (config.chains, config.draws)
    sd = d["sd"].reshape(shape + (-1,))
    coords = {"coef": prep.names}
    dims = {"beta_std": ["coef"]}
    draws = {"beta_std": d["beta"].reshape(shape + (-1,)), "sigma_std": d["sigma"].reshape(shape)}
    if prep.model_type == "arm_variance":
        coords["arm"] = prep.arm_labels
        dims["sd_therapist_std"] = ["arm"]
        draws["sd_therapist_std"] = sd
    else:
        draws["sd_therapist_std"] = sd[..., 0]
    if prep.model_type == "nested":
        draws["sd_cluster_std"] = sd[..., 1]
    idata = az.from_dict(
        posterior=draws,
        sample_stats={"lp": d["lp"].reshape(shape), "diverging": np.zeros(shape, dtype=bool)},
        coords=coords, dims=dims,
    )
    idata.posterior.attrs.update({"sampler": "grid", "grid_points": grid.points, "grid_edge_drop": grid.edge_gap})
    return idata, time.perf_counter() - t0


def _compile(model, sampler: str):
    if sampler == "nutpie":
        import nutpie

        return nutpie.compile_pymc_model(model)
    return None


def _sampled_vars(prep: _Prepared, parameterization: str = "noncentred") -> list[str]:
    names = ["beta_std", "sd_therapist_std"] + (["z_therapist"] if parameterization != "marginal" else [])
    if prep.family == "gaussian":
        names.append("sigma_std")
    if prep.model_type == "nested":
        names += ["sd_cluster_std"] + (["z_cluster"] if parameterization != "marginal" else [])
    return names


def diagnose(idata, var_names: Sequence[str]) -> dict:
    """R-hat, bulk/tail ESS, divergences; ``failed`` and ``advice`` by the thresholds of the module."""
    import arviz as az

    post = idata.posterior[list(var_names)]

    numba_was_on = az.Numba.numba_flag  # ArviZ's Numba kernels cost a JIT compile (~0.4 s) per process; these
    az.Numba.disable_numba()  # arrays are small, and its NumPy code computes the same numbers
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rhat = az.rhat(post)
            ess_b = az.ess(post, method="bulk")
            ess_t = az.ess(post, method="tail")
    finally:
        if numba_was_on:
            az.Numba.enable_numba()
    max_rhat = float(np.nanmax([np.nanmax(rhat[v].values) if np.isfinite(rhat[v].values).any() else np.inf for v in rhat.data_vars]))
    min_bulk = float(np.min([np.nan_to_num(ess_b[v].values, nan=0.0).min() for v in ess_b.data_vars]))
    min_tail = float(np.min([np.nan_to_num(ess_t[v].values, nan=0.0).min() for v in ess_t.data_vars]))
    div = int(idata.sample_stats["diverging"].sum()) if "diverging" in idata.sample_stats else 0
    problems = []
    if not max_rhat <= RHAT_MAX:
        problems.append(f"max R-hat {max_rhat:.3f} > {RHAT_MAX}")
    if min_bulk < ESS_MIN:
        problems.append(f"min bulk ESS {min_bulk:.0f} < {ESS_MIN}")
    if min_tail < ESS_MIN:
        problems.append(f"min tail ESS {min_tail:.0f} < {ESS_MIN}")
    if div:
        problems.append(f"{div} divergent transitions")
    failed = bool(problems)
    advice = None
    if failed:
        steps = []
        if max_rhat > RHAT_MAX or min_bulk < ESS_MIN or min_tail < ESS_MIN:
            steps.append("raise draws / tune (e.g. draws=2000, tune=2000) or the number of chains")
        if div:
            steps.append(
                "raise target_accept (e.g. 0.95 or 0.99); divergences with few therapists or an ICC near zero "
                "often mean a funnel at sigma_therapist = 0: a tighter prior on sigma_therapist helps"
            )
        advice = "; ".join(problems) + ": " + "; ".join(steps)
    return {
        "max_rhat": max_rhat, "min_ess_bulk": min_bulk, "min_ess_tail": min_tail, "divergences": div,
        "failed": failed, "advice": advice,
    }


# ----------------------------------------------------------------------------------------------
# summaries


def hdi(draws: np.ndarray, prob: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Highest-density interval of each column of ``draws`` (draws along axis 0), as ArviZ computes it."""
    return _hdi_sorted(np.sort(np.asarray(draws, dtype=float), axis=0), prob)


def _hdi_sorted(s: np.ndarray, prob: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`hdi` of draws already sorted along axis 0."""
    n = s.shape[0]
    k = int(math.floor(prob * n))
    if k >= n:
        return s[0], s[-1]
    widths = s[k:] - s[: n - k]
    i = np.argmin(widths, axis=0)
    low = np.take_along_axis(s, i[None, ...], axis=0)[0]
    high = np.take_along_axis(s, (i + k)[None, ...], axis=0)[0]
    return low, high


def _median_sorted(s: np.ndarray) -> np.ndarray:
    """``np.median(draws, axis=0)`` of draws already sorted along axis 0."""
    n = s.shape[0]
    return np.mean(s[(n - 1) // 2: n // 2 + 1], axis=0)


#: threads for the per-therapist summaries (NumPy releases the GIL in sorts and array arithmetic)
THREADS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _chunks(n: int, size: int = 256) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _in_threads(fn, chunks: list) -> None:
    """``fn(chunk)`` for every chunk, on up to :data:`THREADS` threads (each writes its own slice of the
    results: the outcome does not depend on the number of threads)."""
    if THREADS == 1 or len(chunks) == 1:
        for c in chunks:
            fn(c)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(THREADS, len(chunks))) as pool:
        list(pool.map(fn, chunks))


def _flat(da) -> np.ndarray:
    """(chain, draw, ...) -> (chain * draw, ...)."""
    v = np.asarray(da)
    return v.reshape((-1,) + v.shape[2:])


def _hdi_only(method: str | None) -> None:
    if method not in (None, "hdi"):
        raise ModelError(f"Bayesian intervals are highest-density intervals: method must be 'hdi', got {method!r}")


def _summ(draws: np.ndarray, level: float = 0.95) -> dict:
    lo, hi = hdi(draws, level)
    med = float(np.median(draws))
    return {"estimate": med, "mean": float(np.mean(draws)), "median": med, "ci_low": float(lo), "ci_high": float(hi)}


def _conditional_cluster_effects(post, prep: _Prepared, seed: int) -> np.ndarray:
    """Cluster effects v (standardised scale) of a nested model drawn from p(v | b, sigma, sd, sd_cluster, y)
    with the therapist effects integrated out: with W the inverse covariance of a cluster's patients given
    v, ``v_c ~ Normal(g^2 (y'W1 - b'X'W1) / (1 + g^2 1'W1), g^2 / (1 + g^2 1'W1))``, g = sd_cluster."""
    st = sufficient_statistics(prep)
    order = np.argsort(prep.cluster_of_block, kind="stable")
    start = np.flatnonzero(np.r_[True, np.diff(prep.cluster_of_block[order]) != 0])
    shape = post["sigma_std"].values.shape
    sigma2 = post["sigma_std"].values.reshape(-1, 1) ** 2
    sd2 = post["sd_therapist_std"].values.reshape(-1, 1) ** 2
    g2 = post["sd_cluster_std"].values.reshape(-1, 1) ** 2
    beta = post["beta_std"].values.reshape(len(sigma2), -1)
    a, gx, gy = cluster_terms(sigma2, sd2, st["n_b"][order], np.ones(len(order)), st["Sx_b"][order],
                              st["Sy_b"][order], start)
    h = 1.0 + g2 * a
    mean = g2 * (gy - np.einsum("scp,sp->sc", gx, beta)) / h
    e = np.random.default_rng([int(seed), 8]).standard_normal(mean.shape)
    return (mean + np.sqrt(g2 / h) * e).reshape(shape + (-1,))


def _conditional_effects(post, prep: _Prepared, seed: int, cluster_effect: np.ndarray | None = None,
                         chunk: int = 256) -> np.ndarray:
    """Therapist effects u (standardised scale) drawn from p(u | b, sigma, sd, [v,] y) (Gaussian):
    u_b ~ Normal(sd_b^2 m_b / v_b, sigma^2 sd_b^2 / v_b), v_b = sigma^2 + n_b sd_b^2,
    m_b = S_yb - S_xb'b - n_b v_c(b) (n_b times the block's mean residual; v the nested model's cluster
    effects, standardised scale). The (draws x therapists) array of standard normal draws becomes the
    effects in place, ``chunk`` draws at a time (no full-size temporaries; in threads)."""
    st = sufficient_statistics(prep)
    n_b, Sy, SxT = st["n_b"], st["Sy_b"], st["Sx_b"].T
    beta = post["beta_std"].values
    u = np.random.default_rng([int(seed), 7]).standard_normal(beta.shape[:-1] + (prep.n_blocks,))
    flat = u.reshape(-1, prep.n_blocks)
    beta = beta.reshape(len(flat), -1)
    sigma = post["sigma_std"].values.reshape(-1, 1)
    sd = post["sd_therapist_std"].values.reshape(len(flat), -1)
    v = None if cluster_effect is None else cluster_effect.reshape(len(flat), -1)

    def fill(rows: slice) -> None:
        sd_b = sd[rows][:, prep.arm_of_block] if prep.model_type == "arm_variance" else sd[rows]
        w = n_b * sd_b**2
        w += sigma[rows] ** 2
        np.sqrt(w, out=w)
        np.reciprocal(w, out=w)  # 1 / sqrt(v_b)
        m = beta[rows] @ SxT
        np.subtract(Sy, m, out=m)
        if v is not None:
            m -= n_b * v[rows][:, prep.cluster_of_block]
        m *= w
        m *= sd_b  # sd_b m_b / sqrt(v_b)
        e = flat[rows]
        e *= sigma[rows]
        e += m
        e *= w
        e *= sd_b  # sd_b / sqrt(v_b) (sd_b m_b / sqrt(v_b) + sigma e)

    _in_threads(fill, _chunks(len(flat), chunk))
    return u


def _postprocess(idata, prep: _Prepared, seed: int = DEFAULT_SEED) -> None:
    """Add the data-scale quantities to ``idata.posterior``: fixed effects, variances, ICCs, effects."""
    import xarray as xr

    post = idata.posterior
    sy = prep.sy
    b = post["beta_std"].values  # (chain, draw, p)
    fixed = np.empty_like(b)
    if b.shape[-1] > 1:
        slopes = b[..., 1:] * sy / prep.sx
        fixed[..., 1:] = slopes
        fixed[..., 0] = prep.ybar + sy * b[..., 0] - slopes @ prep.xbar
    else:
        fixed[..., 0] = prep.ybar + sy * b[..., 0]
    dims2 = ("chain", "draw")
    new = {"fixed": xr.DataArray(fixed, dims=(*dims2, "term"), coords={"term": prep.names})}
    sd_t = post["sd_therapist_std"].values * sy
    if prep.family == "gaussian":
        var_res = (post["sigma_std"].values * sy) ** 2
    else:
        var_res = np.full(b.shape[:2], LOGISTIC_VARIANCE)
    new["var_residual"] = xr.DataArray(var_res, dims=dims2)
    if "z_therapist" in post:
        z = post["z_therapist"].values
        effect = (sd_t[..., prep.arm_of_block] if prep.model_type == "arm_variance" else sd_t[..., None]) * z
        cluster_effect = None
        if "z_cluster" in post:
            cluster_effect = post["sd_cluster_std"].values[..., None] * sy * post["z_cluster"].values
    else:  # marginal parameterization: draw the effects from their exact conditional posterior
        cluster_effect = _conditional_cluster_effects(post, prep, seed) if prep.model_type == "nested" else None
        effect = _conditional_effects(post, prep, seed, cluster_effect)
        effect *= sy
        if cluster_effect is not None:
            cluster_effect *= sy
    if prep.model_type == "arm_variance":
        var_arm = sd_t**2  # (chain, draw, arm)
        new["var_therapist_arm"] = xr.DataArray(var_arm, dims=(*dims2, "arm"))
        icc_arm = var_arm / (var_arm + var_res[..., None])
        new["icc_arm"] = xr.DataArray(icc_arm, dims=(*dims2, "arm"))
        fb = prep.feedback_index
        ctrl = 1 - fb
        with np.errstate(divide="ignore", invalid="ignore"):
            new["icc_ratio"] = xr.DataArray(icc_arm[..., fb] / icc_arm[..., ctrl], dims=dims2)
    else:
        var_t = sd_t**2
        new["var_therapist"] = xr.DataArray(var_t, dims=dims2)
        total = var_t + var_res
        if prep.model_type == "nested":
            sd_c = post["sd_cluster_std"].values * sy
            var_c = sd_c**2
            new["var_cluster"] = xr.DataArray(var_c, dims=dims2)
            total = total + var_c
            new["icc_cluster"] = xr.DataArray(var_c / total, dims=dims2)
            new["cluster_effect"] = xr.DataArray(cluster_effect, dims=(*dims2, "cluster"))
        new["icc"] = xr.DataArray(var_t / total, dims=dims2)
    new["therapist_effect"] = xr.DataArray(effect, dims=(*dims2, "block"))
    coords = {"chain": post["chain"].values, "draw": post["draw"].values, "term": prep.names,
              "block": prep.blocks["label"].tolist()}
    if prep.model_type == "arm_variance":
        coords["arm"] = prep.arm_labels
    if prep.model_type == "nested":
        coords["cluster"] = prep.cluster_labels
    for k, v in new.items():
        idata.posterior[k] = v.assign_coords({c: coords[c] for c in v.dims})


# ----------------------------------------------------------------------------------------------
# results


class BayesResults(ModelResults):
    """Posterior of a Bayesian therapist-effects model.

    ``idata`` (ArviZ InferenceData) holds the sampled (standardised) parameters and, on the data's
    scale, ``fixed`` (fixed effects), ``var_therapist`` / ``var_therapist_arm`` / ``var_cluster`` /
    ``var_residual`` (variance components), ``icc`` / ``icc_arm`` / ``icc_ratio`` / ``icc_cluster``
    and ``therapist_effect`` (each therapist's -- for nested models, each therapist-within-cluster's,
    for arm_variance, each therapist-by-arm's -- deviation from the expected outcome of a patient
    with the same covariates).
    """

    def __init__(self, idata, prep: _Prepared, priors: dict, diagnostics: dict, sampler: str, warnings_: list[str]):
        self.idata = idata
        self._prep = prep
        self.priors = priors
        self.diagnostics = diagnostics
        self.sampler = sampler
        self.warnings = list(warnings_)
        self.model_type = prep.model_type
        self.family = prep.family
        self._model: BayesModel | None = None  # the compiled model that produced these draws

    def _n_params(self) -> None:
        """A posterior has no maximised likelihood: no AIC / BIC."""
        return None

    # -- basic accessors ---------------------------------------------------------------------
    @property
    def failed(self) -> bool:
        return bool(self.diagnostics["failed"])

    @property
    def advice(self) -> str | None:
        return self.diagnostics["advice"]

    @property
    def formula(self) -> str:
        return self._prep.formula()

    def _variance_draws(self) -> dict[str, np.ndarray]:
        """Variance components by contract key -> flat draws."""
        post = self.idata.posterior
        out: dict[str, np.ndarray] = {}
        if self.model_type == "arm_variance":
            v = _flat(post["var_therapist_arm"].values)
            for i, a in enumerate(self._prep.arm_labels):
                out[f"therapist[{a}]"] = v[:, i]
        else:
            out["therapist"] = _flat(post["var_therapist"].values)
        if self.model_type == "nested":
            out["cluster"] = _flat(post["var_cluster"].values)
        out["residual"] = _flat(post["var_residual"].values)
        return out

    def _param_draws(self) -> pd.DataFrame:
        fixed = _flat(self.idata.posterior["fixed"].values)
        cols = {name: fixed[:, j] for j, name in enumerate(self._prep.names)}
        for k, v in self._variance_draws().items():
            cols[f"var({k})"] = v
        return pd.DataFrame(cols)

    @property
    def params(self) -> pd.Series:
        """Posterior medians: fixed effects (R-style names) then variances ``var(therapist)``, ``var(residual)``, ..."""
        return self._param_draws().median(axis=0)

    #: Bayesian intervals are highest-density intervals of the posterior
    default_interval = "hdi"

    @property
    def bse(self) -> pd.Series:
        """Posterior standard deviations of the parameters in ``params``."""
        return self._param_draws().std(axis=0, ddof=1).rename("se")

    @property
    def fe_params(self) -> pd.Series:
        """Posterior medians of the fixed effects."""
        return self.params.loc[list(self._prep.names)].rename("estimate")

    @property
    def vcomp(self) -> dict[str, float]:
        """Posterior medians of the variance components."""
        return {k: float(np.median(v)) for k, v in self._variance_draws().items()}

    @property
    def vcov(self) -> pd.DataFrame:
        """Posterior covariance of the fixed effects."""
        d = self._param_draws()[list(self._prep.names)]
        return d.cov()

    @property
    def n_therapists(self) -> int:
        return int(self._prep.n_therapists)

    @property
    def n_patients(self) -> int:
        return int(self._prep.n)

    @property
    def converged(self) -> bool:
        """The sampler's diagnostics passed (R-hat, ESS, divergences)."""
        return not self.failed

    singular = False

    def conf_int(self, level: float = 0.95, method: str | None = None) -> pd.DataFrame:
        """Highest-density intervals (columns ``lower``, ``upper``) of the parameters in ``params``
        (``method``: ``"hdi"``, the only one offered)."""
        _hdi_only(method)
        d = self._param_draws()
        lo, hi = hdi(d.to_numpy(), level)
        return pd.DataFrame({"lower": lo, "upper": hi}, index=d.columns)

    def _icc_draws(self) -> dict[str, np.ndarray]:
        post = self.idata.posterior
        if self.model_type == "arm_variance":
            v = _flat(post["icc_arm"].values)
            out = {f"icc[{a}]": v[:, i] for i, a in enumerate(self._prep.arm_labels)}
            out["icc_ratio"] = _flat(post["icc_ratio"].values)
            return out
        out = {"icc": _flat(post["icc"].values)}
        if self.model_type == "nested":
            out["icc_cluster"] = _flat(post["icc_cluster"].values)
        return out

    def icc(self, level: float | None = None, method: str | None = None) -> ICC:
        """Posterior of the ICC(s): rows ``icc`` (``icc_cluster`` for nested; ``icc[<arm>]`` and
        ``icc_ratio`` for arm_variance), columns estimate (median), ci_low, ci_high (HDI at
        ``level``; NaN without one), ci_method, then mean and median."""
        _hdi_only(method)
        draws = self._icc_draws()
        summ = {k: _summ(v, 0.95 if level is None else level) for k, v in draws.items()}
        est = {k: v["estimate"] for k, v in summ.items()}
        extra = {k: {"mean": v["mean"], "median": v["median"]} for k, v in summ.items()}
        if level is None:
            return icc_table(est, extra=extra)
        return icc_table(est, {k: (v["ci_low"], v["ci_high"]) for k, v in summ.items()}, "hdi", extra)

    def therapist_effects(self, level: float = 0.95, higher_is_better: bool | None = None) -> pd.DataFrame:
        """The engines' common name of :meth:`therapist_table` (same table)."""
        return self.therapist_table(level, higher_is_better)

    # -- therapist ranking ---------------------------------------------------------------------
    def therapist_table(self, level: float = 0.95, higher_is_better: bool | None = None) -> pd.DataFrame:
        """One row per therapist (per therapist-within-cluster for nested, per therapist and arm for
        arm_variance): caseload (patients), the posterior of the therapist effect (mean, median, HDI),
        the posterior of the therapist's rank, and the probabilities of being in the bottom / top quarter.

        Rank 1 is the best therapist: the largest effect when ``higher_is_better`` is True or None
        (e.g. exam scores, recovery), the smallest when False (symptom scores such as PHQ-9). Ranks
        are within arm for arm_variance. ``p_top_quartile`` = P(rank <= K / 4), ``p_bottom_quartile``
        = P(rank > K - K / 4) with K the number of therapists ranked; ``rank_low``/``rank_high`` are the
        equal-tailed ``level`` interval of the rank.
        """
        prep = self._prep
        eff = _flat(self.idata.posterior["therapist_effect"].values)  # (S, B)
        n_draws, B = eff.shape
        mean, sd, med, lo, hi, p_top, p_bot, rank_med, rank_low, rank_high = (np.empty(B) for _ in range(10))

        def effect_summaries(cols: slice) -> None:
            draws = np.ascontiguousarray(eff[:, cols].T)  # one row per therapist
            mean[cols], sd[cols] = draws.mean(axis=1), draws.std(axis=1, ddof=1)
            draws.sort(axis=1)
            med[cols] = _median_sorted(draws.T)
            lo[cols], hi[cols] = _hdi_sorted(draws.T, level)

        _in_threads(effect_summaries, _chunks(B))
        groups = [slice(None)] if prep.model_type != "arm_variance" else [
            np.flatnonzero(prep.arm_of_block == a) for a in range(len(prep.arm_labels))
        ]
        k = np.bincount(prep.arm_of_block)[prep.arm_of_block]  # therapists ranked together with each
        ranks = np.empty(eff.shape, dtype=np.int32)

        def rank_draws(rows: slice) -> None:
            for idx in groups:
                order = np.argsort(eff[rows][:, idx], axis=1)  # rank 1 = best: the largest effect, or the smallest
                if higher_is_better is not False:
                    order = order[:, ::-1]
                r = np.empty(order.shape, dtype=np.int32)
                np.put_along_axis(r, order, np.arange(1, order.shape[1] + 1, dtype=np.int32)[None, :], axis=1)
                ranks[rows, idx] = r

        _in_threads(rank_draws, _chunks(n_draws))
        a = (1 - level) / 2

        def rank_summaries(cols: slice) -> None:  # as np.median, np.quantile(method="lower" / "higher")
            r = np.ascontiguousarray(ranks[:, cols].T)
            kc = k[cols, None]
            p_top[cols] = (r <= kc / 4).mean(axis=1)
            p_bot[cols] = (r > kc - kc / 4).mean(axis=1)
            r.sort(axis=1)
            rank_med[cols] = _median_sorted(r.T)
            rank_low[cols] = r[:, int(np.floor((n_draws - 1) * a))]
            rank_high[cols] = r[:, int(np.ceil((n_draws - 1) * (1 - a)))]

        _in_threads(rank_summaries, _chunks(B))
        table = prep.blocks.drop(columns="label").copy()
        cols = ["therapist"] + [c for c in ("cluster", "arm") if c in table.columns] + ["caseload"]
        table = table[cols]
        table["effect_mean"] = mean
        table["effect_median"] = med
        table["effect_hdi_low"] = lo
        table["effect_hdi_high"] = hi
        table["rank_median"] = rank_med
        table["rank_low"] = rank_low
        table["rank_high"] = rank_high
        table["p_bottom_quartile"] = p_bot
        table["p_top_quartile"] = p_top
        # The columns every engine's therapist table shares (effect = posterior median, interval = HDI).
        table["effect"] = med
        table["effect_se"] = sd
        table["ci_low"] = lo
        table["ci_high"] = hi
        table["classification"] = classify_effects(lo, hi, higher_is_better)
        return table.reset_index(drop=True)

    # -- output ------------------------------------------------------------------------------
    def _summary_title(self) -> str:
        return f"Bayesian {self.model_type} ({self.family}), sampler {self.sampler}: {self.formula}"

    def _summary_info(self) -> dict:
        prep, d = self._prep, self.diagnostics
        info = {"patients": prep.n, "therapists": prep.n_therapists}
        if prep.cluster_labels:
            info["clusters"] = len(prep.cluster_labels)
        info.update({"max R-hat": d["max_rhat"], "min ESS bulk": d["min_ess_bulk"], "min ESS tail": d["min_ess_tail"],
                     "divergences": d["divergences"], "diagnostics": "FAILED" if self.failed else "ok"})
        return info

    def _summary_tables(self) -> dict:
        ci = self.conf_int()
        par = pd.DataFrame({"median": self.params, "sd": self.bse, "hdi_low": ci["lower"], "hdi_high": ci["upper"]})
        icc = self.icc(0.95).table
        return {"Parameters: posterior median [95% HDI]": par,
                "ICC: posterior median [95% HDI]": icc[["estimate", "ci_low", "ci_high"]]}

    def _summary_notes(self) -> list:
        return list(self.warnings) + ([f"advice: {self.advice}"] if self.advice else [])

    def to_netcdf(self, path) -> str:
        """Write the InferenceData (posterior with the data-scale quantities) to a netCDF file, uncompressed
        (zlib saves ~4% of the draws' bytes at ~15x the time: 8.5 s for 4,000 draws of 10,000 therapists)."""
        return self.idata.to_netcdf(str(path), compress=False)

    def to_contract(self) -> dict:
        """This model's entry of ``estimates.json`` (plain JSON values), ``"method": "bayes"``."""
        prep = self._prep
        fixed = _flat(self.idata.posterior["fixed"].values)
        fe = {}
        for j, name in enumerate(prep.names):
            s = _summ(fixed[:, j])
            fe[name] = {"estimate": s["median"], "se": float(np.std(fixed[:, j], ddof=1)), "ci_low": s["ci_low"], "ci_high": s["ci_high"]}
        vc = {k: _summ(v) for k, v in self._variance_draws().items()}
        out: dict[str, Any] = {
            "type": self.model_type, "family": self.family, "method": "bayes", "outcome": prep.outcome,
            "formula": self.formula, "fixed_effects": fe, "variance_components": vc,
        }
        iccs = self._icc_draws()
        if self.model_type == "arm_variance":
            by_arm = {a: {**_summ(iccs[f"icc[{a}]"]), "ci_method": "hdi"} for a in prep.arm_labels}
            ratio = iccs["icc_ratio"]
            fb = prep.arm_labels[prep.feedback_index]
            ctrl = prep.arm_labels[1 - prep.feedback_index]
            out["icc_by_arm"] = by_arm
            out["icc_ratio"] = {**_summ(ratio), "ci_method": "hdi"}
            out["icc_reduction"] = {**_summ(1.0 - ratio), "ci_method": "hdi"}
            out["p_icc_feedback_lt_control"] = float(np.mean(iccs[f"icc[{fb}]"] < iccs[f"icc[{ctrl}]"]))
            out["feedback_level"] = fb
            out["control_level"] = ctrl
        else:
            out["icc"] = {**_summ(iccs["icc"]), "ci_method": "hdi"}
            if self.family == "binomial":
                out["icc"]["scale"] = "latent"
            if "icc_cluster" in iccs:
                out["icc_cluster"] = {**_summ(iccs["icc_cluster"]), "ci_method": "hdi"}
        out["diagnostics"] = {k: self.diagnostics[k] for k in ("max_rhat", "min_ess_bulk", "min_ess_tail", "divergences", "failed", "advice")}
        out["diagnostics"].update({k: self.diagnostics[k] for k in ("chains", "draws", "tune", "target_accept", "seed", "parameterization", "sampling_seconds") if k in self.diagnostics})
        out["priors"] = copy.deepcopy(self.priors)
        out["sampler"] = self.sampler
        out["converged"] = not self.failed
        out["singular"] = False
        out["n_patients"] = int(prep.n)
        out["n_therapists"] = int(prep.n_therapists)
        out["n_clusters"] = len(prep.cluster_labels) if prep.cluster_labels else None
        out["warnings"] = list(self.warnings)
        return json_plain(out)




# ----------------------------------------------------------------------------------------------
# fitting


@dataclass
class BayesModel:
    """A compiled Bayesian model that can be refitted to new data of the same structure.

    Compiling (nutpie / numba) takes seconds to minutes; sampling a sufficient-statistics model takes
    far less (the grid sampler compiles nothing). Simulation studies build one ``BayesModel`` and call
    :meth:`fit` on each simulated data set (same model type, fixed effects, number of therapists / clusters / blocks; the priors must
    be fixed, i.e. given explicitly in ``config.priors`` if they are to be the same in every fit --
    the defaults are scaled to each data set's SD).
    """

    model_type: str
    df: pd.DataFrame
    outcome: str
    covariates: Sequence[str] = ()
    family: str = "gaussian"
    therapist: str = "therapist"
    cluster: str | None = None
    arm: str | None = None
    feedback_level: Any = None
    config: BayesConfig = field(default_factory=BayesConfig)
    per_patient: bool = False

    def __post_init__(self) -> None:
        self._kw = dict(
            family=self.family, therapist=self.therapist, cluster=self.cluster, arm=self.arm,
            feedback_level=self.feedback_level,
        )
        self.prep = _prepare(self.model_type, self.df, self.outcome, self.covariates, **self._kw)
        self.priors = resolve_priors(self.prep, self.config.priors)
        gaussian_sums = self.family == "gaussian" and not self.per_patient  # the collapsed likelihoods' data
        collapsible = gaussian_sums and self.model_type in ("random_intercept", "arm_variance")  # for NUTS
        if self.config.parameterization not in ("auto", "noncentred", "marginal"):
            raise ConfigError(
                "bayes.parameterization: expected 'auto', 'noncentred' or 'marginal', "
                f"got {self.config.parameterization!r}"
            )
        self.sampler = self.config.resolved_sampler(gaussian_sums and self.config.parameterization != "noncentred")
        if self.config.parameterization == "auto":
            marginal = collapsible or self.sampler == "grid"
            self.config = replace(self.config, parameterization="marginal" if marginal else "noncentred")
        self._refitted = False
        self.model = self.compiled = None
        self.compile_seconds = 0.0
        if self.sampler == "grid":  # nothing to build or compile
            return
        self.model = build_model(
            self.prep, self.priors, per_patient=self.per_patient, parameterization=self.config.parameterization
        )
        t0 = time.perf_counter()
        self.compiled = _compile(self.model, self.sampler)
        self.compile_seconds = time.perf_counter() - t0

    def _refit_prep(self, df: pd.DataFrame) -> _Prepared:
        """The new data of a refit, checked to have this model's structure."""
        prep = _prepare(self.model_type, df, self.outcome, self.covariates, **self._kw)
        if prep.names != self.prep.names or prep.n_blocks != self.prep.n_blocks or len(prep.cluster_labels) != len(
            self.prep.cluster_labels
        ):
            raise ModelError("bayes engine: refit data differ in fixed effects or numbers of therapists/clusters")
        return prep

    def _set_pymc_data(self, inputs: dict) -> None:
        import pymc as pm

        with self.model:
            pm.set_data(inputs)

    def fit(self, df: pd.DataFrame | None = None, *, config: BayesConfig | None = None) -> BayesResults:
        """Sample the posterior for ``df`` (default: the data the model was built with).

        ``config`` may change chains, draws, tune, target_accept, seed and the priors' parameters (not
        their families: that needs a new model).
        Draws are reproducible for the same config and data; a refit to new data gives draws that are
        statistically but not bitwise equal to a fresh :func:`fit_bayes` on those data.
        """
        cfg = config or self.config
        if cfg.parameterization == "auto":
            cfg = replace(cfg, parameterization=self.config.parameterization)
        if cfg.parameterization != self.config.parameterization:
            raise ModelError("bayes engine: a refit cannot change the parameterization; build a new model")
        same_data = df is None or df is self.df
        if self.sampler == "grid":
            prep = self.prep if same_data else self._refit_prep(df)
            priors = self.priors if same_data and cfg.priors == self.config.priors else resolve_priors(prep, cfg.priors)
            idata, seconds = _sample_grid(prep, priors, cfg)
        elif same_data and cfg.priors == self.config.priors:
            prep, priors = self.prep, self.priors
            compiled = self.compiled
            if self.sampler == "pymc" and self._refitted:
                inputs = _model_inputs(prep, priors)
                if self.per_patient:
                    inputs.update({"X_patient": prep.Xs, "block_patient": prep.block, "y_patient": prep.ys})
                    inputs.pop("XtX", None)
                self._set_pymc_data(inputs)
                self._refitted = False
        else:
            prep = self.prep if same_data else self._refit_prep(df)
            priors = resolve_priors(prep, cfg.priors)
            if self.per_patient and prep.n != self.prep.n:
                raise ModelError("bayes engine: a per-patient model is refitted only to data with as many patients")
            for key in ("sigma_residual", "sigma_therapist", "sigma_cluster"):
                if key in priors and priors[key]["dist"] != self.priors[key]["dist"]:
                    raise ModelError(
                        f"bayes engine: refit prior family for {key} ({priors[key]['dist']}) differs from the compiled "
                        f"model's ({self.priors[key]['dist']}); build a new model"
                    )
            inputs = _model_inputs(prep, priors)
            if self.per_patient:
                inputs.update({"X_patient": prep.Xs, "block_patient": prep.block, "y_patient": prep.ys})
                inputs.pop("XtX", None)
            for k, v in inputs.items():
                if np.shape(v) != np.shape(self.model[k].get_value()):
                    raise ModelError(f"bayes engine: refit data {k!r} has shape {np.shape(v)}, the compiled model {np.shape(self.model[k].get_value())}")
            if self.sampler == "nutpie":
                compiled = self.compiled.with_data(**inputs)
            else:
                self._set_pymc_data(inputs)
                self._refitted = True
                compiled = None
        if self.sampler != "grid":
            idata, seconds = _sample(self.model, compiled, cfg, self.sampler)
        res = _finish(idata, prep, priors, cfg, self.sampler, seconds, self.compile_seconds)
        res._model = self
        return res


def _finish(idata, prep, priors, cfg, sampler, seconds, compile_seconds) -> BayesResults:
    diagnostics = diagnose(idata, _sampled_vars(prep, cfg.parameterization))
    gap = idata.posterior.attrs.get("grid_edge_drop")
    if gap is not None and gap < EDGE_DROP / 2:  # cannot happen unless the grid search failed: say so loudly
        problem = (f"the grid's edge density is exp(-{gap:.1f}) of its maximum, so the tails may be cut: "
                   "use sampler 'nutpie'")
        diagnostics.update(failed=True, advice="; ".join(filter(None, [diagnostics["advice"], problem])))
    diagnostics.update({
        "chains": cfg.chains, "draws": cfg.draws, "tune": cfg.tune, "target_accept": cfg.target_accept,
        "seed": cfg.seed, "sampling_seconds": seconds, "compile_seconds": compile_seconds,
    })
    _postprocess(idata, prep, cfg.seed)
    diagnostics["parameterization"] = cfg.parameterization
    warns = []
    if diagnostics["failed"]:
        msg = f"Bayesian {prep.model_type} model of {prep.outcome!r}: sampler diagnostics failed ({diagnostics['advice']})"
        warnings.warn(msg, SamplerWarning, stacklevel=3)
        warns.append(msg)
    return BayesResults(idata, prep, priors, diagnostics, sampler, warns)


def fit_bayes(
    model_type: str,
    df: pd.DataFrame,
    outcome: str,
    covariates: Sequence[str] = (),
    *,
    family: str = "gaussian",
    therapist: str = "therapist",
    cluster: str | None = None,
    arm: str | None = None,
    feedback_level: Any = None,
    config: BayesConfig | None = None,
) -> BayesResults:
    """Fit a Bayesian therapist-effects model to a patient table (one row per patient).

    ``model_type``: ``"random_intercept"`` (gaussian or binomial), ``"nested"`` (needs ``cluster``)
    or ``"arm_variance"`` (needs ``arm``; ``feedback_level`` names the feedback arm, default 1 for
    0/1 data, else the second level). ``covariates`` are the case-mix fixed effects (the arm is added
    as a fixed effect when given and not among them). Rows must be complete.
    """
    cfg = config or BayesConfig()
    bm = BayesModel(
        model_type, df, outcome, tuple(covariates), family=family, therapist=therapist, cluster=cluster,
        arm=arm, feedback_level=feedback_level, config=cfg,
    )
    return bm.fit()


def prior_sensitivity(
    model_type: str,
    df: pd.DataFrame,
    outcome: str,
    covariates: Sequence[str] = (),
    *,
    alt_priors: Mapping,
    config: BayesConfig | None = None,
    base: BayesResults | None = None,
    **fit_kwargs,
) -> dict:
    """Refit under ``alt_priors`` (merged over the config's priors) and compare the ICC(s).

    Returns ``{"icc": {"base": {...}, "alt": {...}}, "change": {name: alt median - base median},
    "relative_change": {name: change / base median}, "priors": {"base": ..., "alt": ...},
    "failed": {"base": bool, "alt": bool}}`` (plain JSON values). Pass ``base`` to reuse a fit (and
    its compiled model: when the alternative priors are of the same families, nothing is recompiled).
    """
    cfg = config or BayesConfig()
    merged = dict(cfg.priors or {})
    merged.update(dict(alt_priors))
    alt_cfg = BayesConfig(**{**cfg.__dict__, "priors": merged})
    model = base._model if base is not None else None
    if model is None:
        model = BayesModel(model_type, df, outcome, tuple(covariates), config=cfg, **fit_kwargs)
        base = model.fit()
    alt_priors_used = model_priors(model_type, df, outcome, covariates, priors=merged, **fit_kwargs)
    same_family = all(
        alt_priors_used[k]["dist"] == model.priors[k]["dist"]
        for k in ("sigma_residual", "sigma_therapist", "sigma_cluster") if k in alt_priors_used
    )
    if same_family:  # same graph: refit the compiled model with the new prior parameters
        alt = model.fit(df, config=alt_cfg)
    else:
        alt = fit_bayes(model_type, df, outcome, covariates, config=alt_cfg, **fit_kwargs)
    ib, ia = base.icc(0.95).table[["estimate", "mean", "median", "ci_low", "ci_high"]], \
        alt.icc(0.95).table[["estimate", "mean", "median", "ci_low", "ci_high"]]
    change = {k: float(ia.loc[k, "median"] - ib.loc[k, "median"]) for k in ib.index}
    rel = {k: (change[k] / float(ib.loc[k, "median"]) if float(ib.loc[k, "median"]) != 0 else None) for k in ib.index}
    return json_plain({
        "icc": {"base": ib.to_dict(orient="index"), "alt": ia.to_dict(orient="index")},
        "change": change,
        "relative_change": rel,
        "priors": {"base": base.priors, "alt": alt.priors},
        "failed": {"base": base.failed, "alt": alt.failed},
    })


__all__ = [
    "BayesConfig", "BayesModel", "BayesResults", "fit_bayes", "prior_sensitivity", "default_priors", "model_priors",
    "resolve_priors", "sufficient_statistics", "binomial_counts", "build_model", "diagnose", "hdi",
    "RHAT_MAX", "ESS_MIN", "INTERCEPT",
]
