"""Model comparison: information criteria and likelihood-ratio tests between nested models.

Information criteria are computed as lme4's ``AIC()`` and ``BIC()``: from the model's own
log-likelihood (the REML criterion for a REML fit, as ``logLik()`` of a REML ``lmer`` fit), with
``n_params`` = fixed effects + covariance parameters (+ the residual variance of a Gaussian model) and
``n_obs`` = patients::

    AIC = -2 logLik + 2 n_params,      BIC = -2 logLik + log(n_obs) n_params.

REML criteria of models with different fixed effects are not comparable; the comparison table says
which criterion each row uses.

Likelihood-ratio tests are made between every pair of fitted models that are nested (same outcome,
family and patients; the smaller model's fixed effects a subset of the larger's; the random part of
the smaller model a special case of the larger's, see :func:`nesting`). Where the fixed effects differ
both models are refitted by ML (a REML likelihood ratio is then invalid, as ``anova()`` in lme4 refits
by default); where they are equal the fits' own criteria (REML or ML) are compared, as
``anova(..., refit = FALSE)``. When the null hypothesis puts a variance on the boundary of the parameter
space (a random-effect variance = 0) the statistic's null distribution is the 50:50 mixture of
chi-square distributions (Self & Liang 1987; Stram & Lee 1994): ``0.5 chi2_0 + 0.5 chi2_1`` for one
variance, ``0.5 chi2_1 + 0.5 chi2_2`` for a random slope with its covariance, each shifted by the number
of fixed effects tested at the same time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats

from ..exceptions import TherapistEffectsError

log = logging.getLogger("therapist_effects")

__all__ = [
    "information_criteria",
    "n_params_of",
    "nesting",
    "lrt",
    "model_comparison",
    "ml_loglik",
]

#: Model types whose parameters :func:`n_params_of` can count from a contract entry.
COUNTABLE_TYPES = ("random_intercept", "nested", "arm_variance", "random_slope")


def information_criteria(llf: float, n_params: int, n_obs: int) -> dict[str, float]:
    """AIC and BIC from a (restricted) log-likelihood, as lme4's ``AIC()`` / ``BIC()``."""
    if llf is None or not math.isfinite(llf):
        return {"aic": None, "bic": None}
    if n_params < 0 or n_obs < 1:
        raise ValueError(f"n_params must be >= 0 and n_obs >= 1, got {n_params}, {n_obs}")
    return {"aic": -2.0 * llf + 2.0 * n_params, "bic": -2.0 * llf + math.log(n_obs) * n_params}


def n_params_of(entry: dict) -> int | None:
    """Number of estimated parameters of a model's ``estimates.json`` entry (lme4's df of logLik).

    Fixed effects, plus every variance component except a binomial model's fixed latent residual
    (pi^2/3), plus one for a correlation. None for models it cannot count (Bayesian fits, unknown types).
    """
    if entry.get("engine") == "bayes" or entry.get("type") not in COUNTABLE_TYPES or entry.get("loglik") is None:
        return None
    k = len(entry.get("fixed_effects") or {})
    vcs = entry.get("variance_components") or {}
    for name in vcs:
        if entry.get("family") == "binomial" and name.startswith("residual"):
            continue
        k += 1
    if isinstance(entry.get("correlation"), dict):
        k += 1
    return k


def _random_spec(model: dict, entry: dict) -> tuple:
    """The random part of a model as a comparable tuple."""
    kind = model["type"]
    if kind == "arm_variance":
        return (kind, bool(model.get("correlated")), bool(model.get("arm_residual")), model.get("cluster_effect") == "random")
    if kind == "random_slope":
        return (kind, entry.get("slope") or model.get("slope") or "arm")
    return (kind,)


def nesting(small: tuple[dict, dict], big: tuple[dict, dict]) -> dict | None:
    """How model ``small`` is nested in model ``big`` (each a (config, entry) pair), or None.

    Returns ``{"df_random", "boundary", "what"}``: the number of random-part parameters the larger
    model adds, whether the null puts a variance on the boundary, and a description. Only the
    random-part relations listed here are recognised (others are not tested):

    * same random part: a fixed-effects test;
    * random intercept within nested (cluster) model: cluster variance = 0 (1 df, boundary);
    * random intercept within random slope: slope variance and covariance = 0 (2 df, boundary);
    * diagonal arm variances within correlated ones (1 df, interior) or within arm residuals (1 df, interior).
    """
    (ms, es), (mb, eb) = small, big
    for key in ("outcome", "family", "n_patients"):
        if es.get(key) != eb.get(key):
            return None
    if es.get("engine") == "bayes" or eb.get("engine") == "bayes":
        return None
    if es.get("family") == "binomial" and str(es.get("method")) != str(eb.get("method")):
        return None  # Laplace and AGQ log-likelihoods are different approximations: not comparable
    fs, fb = set(es.get("fixed_effects") or {}), set(eb.get("fixed_effects") or {})
    if not fs <= fb:
        return None
    rs, rb = _random_spec(ms, es), _random_spec(mb, eb)
    if rs == rb:
        if fs == fb:
            return None
        return {"df_random": 0, "boundary": False, "what": "fixed effects " + ", ".join(sorted(fb - fs))}
    if rs == ("random_intercept",):
        # not within arm_variance: (1 | therapist) gives a therapist the same effect in both arms, the
        # diagonal arm model independent ones (equal variances there is (1 | therapist:arm)); the
        # arm model's own lrt_equal_variances tests that
        if rb == ("nested",):
            return {"df_random": 1, "boundary": True, "what": "cluster variance"}
        if rb[0] == "random_slope":
            return {"df_random": 2, "boundary": True, "what": f"random slope of {rb[1]} (variance and covariance)"}
        return None
    if rs == ("arm_variance", False, False, False) and rb[0] == "arm_variance" and not rb[3]:
        if rb[1] and not rb[2]:
            return {"df_random": 1, "boundary": False, "what": "correlation of the arm effects"}
        if rb[2] and not rb[1]:
            return {"df_random": 1, "boundary": False, "what": "arm-specific residual variances"}
    return None


def lrt(ll_small: float, ll_big: float, df_fixed: int, df_random: int, boundary: bool) -> dict[str, Any]:
    """Likelihood-ratio statistic 2 (ll_big - ll_small), its df and p-value.

    ``boundary``: the null is on the boundary: mixture 0.5 chi2_{f + r - 1} + 0.5 chi2_{f + r}
    (f = ``df_fixed``, r = ``df_random``); otherwise chi2_{f + r}. chi2_0 is the point mass at 0.
    """
    stat = max(2.0 * (float(ll_big) - float(ll_small)), 0.0)
    df = int(df_fixed) + int(df_random)

    def sf(k: int) -> float:
        if k == 0:
            return 0.0 if stat > 0 else 1.0
        return float(stats.chi2.sf(stat, k))

    if boundary:
        p = 0.5 * sf(df - 1) + 0.5 * sf(df)
        null = f"0.5 chi2_{df - 1} + 0.5 chi2_{df}"
    else:
        p = sf(df)
        null = f"chi2_{df}"
    return {"statistic": stat, "df": df, "p_value": min(p, 1.0), "null_distribution": null}


def model_comparison(
    models: list[dict],
    entries: dict[str, dict],
    refit_ml: Callable[[dict], float] | None = None,
) -> dict[str, list[dict]]:
    """The ``model_comparison`` object of ``estimates.json``.

    ``models``: the fitted models' configs (in config order); ``entries``: their contract entries by id;
    ``refit_ml(model) -> loglik``: the ML log-likelihood of a model (needed where fixed effects differ
    between REML fits; pairs are skipped without it).

    ``models`` rows: model, type, family, method, criterion (REML/ML), loglik, n_params, n_obs, aic, bic.
    ``tests`` rows: model_0 (smaller), model_1 (larger), what is tested, criterion, refit_ml, loglik_0,
    loglik_1, statistic, df, p_value, null_distribution.
    """
    rows: list[dict] = []
    ml_cache: dict[str, float] = {}
    for model in models:
        e = entries.get(model["id"])
        if e is None:
            continue
        k = n_params_of(e)
        if k is None:
            continue
        crit = "REML" if str(e.get("method")).upper() == "REML" else "ML"
        ic = information_criteria(e["loglik"], k, int(e["n_patients"]))
        rows.append({"model": model["id"], "type": e.get("type"), "family": e.get("family"), "method": e.get("method"),
                     "criterion": crit, "loglik": e["loglik"], "n_params": k, "n_obs": int(e["n_patients"]),
                     "aic": e.get("aic", ic["aic"]), "bic": e.get("bic", ic["bic"])})
    tests: list[dict] = []
    by_id = {m["id"]: m for m in models}
    counted = [r["model"] for r in rows]
    for a in counted:
        for b in counted:
            if a == b:
                continue
            rel = nesting((by_id[a], entries[a]), (by_id[b], entries[b]))
            if rel is None:
                continue
            ea, eb = entries[a], entries[b]
            df_fixed = len(eb["fixed_effects"]) - len(ea["fixed_effects"])
            reml = [str(e.get("method")).upper() == "REML" for e in (ea, eb)]
            if df_fixed == 0 and reml[0] == reml[1]:
                ll0, ll1, crit, refit = ea["loglik"], eb["loglik"], "REML" if reml[0] else "ML", False
            else:
                if refit_ml is None:
                    continue
                lls = []
                for mid, e, is_reml in ((a, ea, reml[0]), (b, eb, reml[1])):
                    if not is_reml:
                        lls.append(e["loglik"])
                        continue
                    if mid not in ml_cache:
                        try:
                            ml_cache[mid] = float(refit_ml(by_id[mid]))
                        except (TherapistEffectsError, ValueError, np.linalg.LinAlgError) as exc:
                            log.warning("model comparison: ML refit of model %s failed (%s); its tests are left out",
                                        mid, exc)
                            ml_cache[mid] = float("nan")
                    lls.append(ml_cache[mid])
                if not all(math.isfinite(x) for x in lls):
                    continue
                ll0, ll1, crit, refit = lls[0], lls[1], "ML", any(reml)
            t = lrt(ll0, ll1, df_fixed, rel["df_random"], rel["boundary"])
            tests.append({"model_0": a, "model_1": b, "tests": rel["what"], "criterion": crit, "refit_ml": refit,
                          "loglik_0": ll0, "loglik_1": ll1, **t})
    return {"models": rows, "tests": tests}


def ml_loglik(patients, model: dict, dataset: dict) -> float:
    """Maximised ML log-likelihood of a configured Gaussian model (the refit behind an LRT)."""
    from .fitting import model_frame

    mf = model_frame(patients, model, dataset)
    kind = model["type"]
    if kind == "random_intercept":
        from .reml import RandomInterceptModel

        res = RandomInterceptModel.from_frame(mf.df, mf.outcome, mf.covariates, therapist=mf.therapist,
                                              method="ML").fit()
    elif kind == "nested":
        from .reml import NestedModel

        res = NestedModel.from_frame(mf.df, mf.outcome, mf.covariates, therapist=mf.therapist, cluster=mf.cluster,
                                     method="ML").fit()
    elif kind == "arm_variance":
        from .arm import ArmVarianceModel

        res = ArmVarianceModel.from_frame(
            mf.df, mf.outcome, mf.covariates, therapist=mf.therapist, arm=mf.arm, feedback_level=mf.feedback_level,
            method="ML", correlated=model.get("correlated", False), arm_residual=model.get("arm_residual", False),
        ).fit()
    elif kind == "random_slope":
        from .slopes import RandomSlopeModel

        res = RandomSlopeModel.from_frame(mf.df, mf.outcome, mf.covariates, therapist=mf.therapist, arm=mf.arm,
                                          feedback_level=mf.feedback_level, method="ML").fit()
    else:
        raise ValueError(f"no ML refit for model type {kind!r}")
    return float(res.loglik)


def add_to_estimates(est: dict, fitted: list[dict], patients, dataset: dict) -> dict:
    """Add ``aic``/``bic`` to every model entry that lacks them (None for models without a maximised
    likelihood, e.g. Bayesian fits), and the ``model_comparison``
    object (ML refits from ``patients``, the canonical patient table, where an LRT needs them)."""
    entries = est["models"]
    for model in fitted:
        e = entries.get(model["id"])
        if e is None:
            continue
        k = n_params_of(e)
        ic = information_criteria(e["loglik"], k, int(e["n_patients"])) if k is not None else {"aic": None, "bic": None}
        e.setdefault("aic", ic["aic"])  # None where there is no maximised likelihood (Bayesian fits)
        e.setdefault("bic", ic["bic"])
    est["model_comparison"] = model_comparison(
        fitted, entries, refit_ml=lambda model: ml_loglik(patients, model, dataset)
    )
    return est
