"""The interface every fitted therapist model shares (Gaussian engines, GLMM and Bayes).

:class:`ModelResults` gives each results class the same names and defaults for the quantities that
do not depend on the engine: ``llf`` (the maximised log-likelihood, lme4's ``logLik``: the REML
criterion for REML fits), ``df_model`` (lme4's ``attr(logLik(fit), "df")``: fixed effects plus
covariance parameters plus the residual scale where there is one), ``nobs``, ``aic`` and ``bic``
(lme4's ``AIC()``/``BIC()``, so REML fits use the REML criterion as lme4 does), the default
interval method and level, and the keys ``aic``/``bic`` of the ``estimates.json`` entry.
Engines without a maximised likelihood (posterior sampling) report ``None``.
"""

from __future__ import annotations

import math

from .inference import DEFAULT_LEVEL, DEFAULT_N_BOOT

__all__ = ["ModelResults", "DEFAULT_INTERVAL", "DEFAULT_LEVEL", "DEFAULT_N_BOOT"]

#: the default interval method of every engine's ``conf_int``
DEFAULT_INTERVAL = "profile"


class ModelResults:
    """Mixin of every results class. Subclasses set ``loglik`` (or None) and implement
    :meth:`_n_params`; ``nobs`` is read from ``n_obs`` or ``n_patients``."""

    default_interval = DEFAULT_INTERVAL
    default_level = DEFAULT_LEVEL
    default_n_boot = DEFAULT_N_BOOT

    def _n_params(self) -> int | None:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    @property
    def llf(self) -> float | None:
        ll = getattr(self, "loglik", None)
        return None if ll is None else float(ll)

    @property
    def nobs(self) -> int:
        n = getattr(self, "n_obs", None)
        return int(n if n is not None else self.n_patients)

    @property
    def df_model(self) -> int | None:
        return self._n_params()

    @property
    def aic(self) -> float | None:
        ll, k = self.llf, self.df_model
        if ll is None or k is None or not math.isfinite(ll):
            return None
        return -2.0 * ll + 2.0 * k

    @property
    def bic(self) -> float | None:
        ll, k = self.llf, self.df_model
        if ll is None or k is None or not math.isfinite(ll):
            return None
        return -2.0 * ll + math.log(self.nobs) * k

    def information_criteria(self) -> dict[str, float | None]:
        """``{"aic": ..., "bic": ...}`` for the model's ``estimates.json`` entry."""
        return {"aic": self.aic, "bic": self.bic}

    def fit_fields(self) -> dict:
        """The fit-quality keys of an ``estimates.json`` entry: ``loglik``, ``aic``, ``bic``,
        ``converged``, ``singular`` (plain floats / None / bools)."""
        def num(v):
            return None if v is None or not math.isfinite(float(v)) else float(v)

        return {"loglik": num(self.llf), "aic": num(self.aic), "bic": num(self.bic),
                "converged": bool(self.converged), "singular": bool(self.singular)}
