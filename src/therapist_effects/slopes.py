"""Random feedback slopes across therapists: who gains most from routine progress feedback?

The model (lme4: ``y ~ x + feedback + (1 + feedback | therapist)``), fitted with statsmodels'
``MixedLM``::

    y_i = x_i' b + b_f feedback_i + a_t + s_t feedback_i + e_i,
    (a_t, s_t) ~ N(0, [[s2_a, c], [c, s2_s]]),   e_i ~ N(0, s2)

``a_t`` (intercept) is therapist t's effect without feedback, ``s_t`` (slope) how much feedback
changes the therapist's patients' outcomes beyond the average feedback effect ``b_f``. A negative
intercept-slope correlation on an outcome where higher is worse (PHQ-9) means therapists whose
patients do worse without feedback gain more from it: feedback *narrows the gap*.

For a 0/1 feedback indicator the model is the correlated arm-specific model of
:mod:`therapist_effects.arm` re-parameterised (control effect ``a_t``, feedback effect
``a_t + s_t``), so its exact criterion from per-(therapist, arm) sums is used for
profile-likelihood intervals and for the parametric bootstrap (fast refits), and to check the
statsmodels optimum.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .arm import _Engine, _G_from_theta, _minimise, _profile_limits, arm_design
from .design import group_codes
from .exceptions import ConvergenceWarning, ModelError, SingularFitWarning, StatisticalWarning

__all__ = ["RandomSlopeModel", "RandomSlopeResults"]

_A = np.array([[1.0, 0.0], [1.0, 1.0]])  # (intercept, slope) -> (control effect, feedback effect)


class RandomSlopeModel:
    """``outcome ~ covariates + feedback + (1 + feedback | therapist)`` (statsmodels MixedLM).

    Parameters
    ----------
    endog : outcome per patient.
    exog : fixed-effects design including the intercept and the feedback indicator.
    therapist : therapist of each patient.
    feedback : 0/1 feedback indicator per patient (the random slope's variable).
    exog_names : names of the fixed effects; ``slope_name`` names the feedback term.
    method : ``"REML"`` (default) or ``"ML"``.
    """

    def __init__(self, endog, exog, therapist, feedback, *, exog_names: Sequence[str] | None = None,
                 slope_name: str = "feedback", method: str = "REML"):
        method = str(method).upper()
        if method not in ("REML", "ML"):
            raise ModelError(f"method must be 'REML' or 'ML', got {method!r}")
        self.y = np.asarray(endog, dtype=float).reshape(-1)
        X = np.asarray(exog, dtype=float)
        self.X = X[:, None] if X.ndim == 1 else X
        self.feedback = np.asarray(feedback, dtype=float).reshape(-1)
        if not np.isin(self.feedback, (0.0, 1.0)).all():
            raise ModelError("the random-slope variable must be a 0/1 feedback indicator")
        self.therapist = np.asarray(therapist, dtype=object)
        if not (len(self.therapist) == len(self.y) == len(self.feedback) == self.X.shape[0]):
            raise ModelError("outcome, design, therapist and feedback must have one entry per patient")
        self.exog_names = list(exog_names) if exog_names is not None else [f"x{j}" for j in range(self.X.shape[1])]
        self.slope_name = slope_name
        self.method = method
        self.tcode, self.therapist_labels = group_codes(self.therapist)
        acode = self.feedback.astype(np.int64)
        self._eng = _Engine(self.y, self.X, self.tcode, acode, len(self.therapist_labels), 2)
        both = (self._eng.n > 0).all(axis=1).sum()
        if both < 3:
            raise ModelError("a random feedback slope needs at least three therapists with patients in both arms")

    @classmethod
    def from_frame(cls, df: pd.DataFrame, outcome: str, covariates: Sequence[str] = (), *,
                   therapist: str = "therapist", arm: str = "feedback", feedback_level=1,
                   method: str = "REML") -> RandomSlopeModel:
        """Build from a patient table; the arm column becomes the 0/1 feedback indicator (fixed
        effect and random slope), named like :meth:`ArmVarianceModel.from_frame` names it."""
        y, X, names, indicator, name = arm_design(
            df, outcome, covariates, therapist=therapist, arm=arm, feedback_level=feedback_level,
        )
        return cls(y, X, df[therapist].to_numpy(), indicator, exog_names=names, slope_name=name, method=method)

    def fit(self) -> RandomSlopeResults:
        import statsmodels.api as sm
        from statsmodels.tools.sm_exceptions import ConvergenceWarning as SMConvergenceWarning

        exog = pd.DataFrame(self.X, columns=self.exog_names)
        exog_re = pd.DataFrame({"(Intercept)": 1.0, self.slope_name: self.feedback})
        msgs = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = sm.MixedLM(self.y, exog, groups=self.therapist.astype(str), exog_re=exog_re)
            res = model.fit(reml=self.method == "REML", method=["lbfgs"])
        for w in caught:
            if issubclass(w.category, (SMConvergenceWarning, UserWarning, RuntimeWarning)):
                msgs.append(str(w.message).splitlines()[0])
        return RandomSlopeResults(self, res, msgs)


class RandomSlopeResults:
    """Fitted random-slope model: statsmodels estimates plus exact profile/bootstrap intervals."""

    def __init__(self, model: RandomSlopeModel, sm_result, sm_messages):
        self.model = model
        self.sm_result = sm_result
        self.warnings: list[str] = []
        self.method = model.method
        self.fe_params = pd.Series(np.asarray(sm_result.fe_params), index=model.exog_names, name="estimate")
        self.bse = pd.Series(np.asarray(sm_result.bse_fe), index=model.exog_names, name="se")
        cov = np.asarray(sm_result.cov_re, dtype=float)
        self.cov_re = pd.DataFrame(cov, index=["(Intercept)", model.slope_name], columns=["(Intercept)", model.slope_name])
        self.scale = float(sm_result.scale)
        sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
        self.correlation = float(cov[0, 1] / (sd[0] * sd[1])) if np.all(sd > 0) else float("nan")
        self.vcomp = {"therapist": float(cov[0, 0]), "therapist_slope": float(cov[1, 1]), "residual": self.scale}
        self.loglik = float(sm_result.llf)
        self.n_patients = len(model.y)
        self.n_therapists = len(model.therapist_labels)
        self.converged = bool(sm_result.converged)
        for msg in sm_messages:
            self._warn(f"statsmodels MixedLM: {msg}", ConvergenceWarning)
        # relative parameters (theta_a, theta_s, rho) of the statsmodels optimum, and the exact optimum
        th = sd / math.sqrt(self.scale)
        rho = 0.0 if not np.isfinite(self.correlation) else float(np.clip(self.correlation, -1.0, 1.0))
        self._z_hat = np.array([th[0], th[1], rho])
        self._opt_cache: dict = {}
        self._cache: dict = {}
        exact = self._optimum(self.method)
        if exact[1] < -2 * self.loglik - 0.01:
            self.converged = False
            self._warn(
                f"statsmodels' optimum (logLik {self.loglik:.4f}) is below the exact optimum "
                f"({-0.5 * exact[1]:.4f}); estimates may be off",
                ConvergenceWarning,
            )
        self.singular = bool(th.min() < 1e-4 or abs(rho) > 1 - 1e-6)
        if self.singular:
            self._warn("singular fit: a slope/intercept variance is ~0 or the correlation is at -1/+1",
                       SingularFitWarning)

    def _warn(self, msg, category):
        self.warnings.append(msg)
        warnings.warn(msg, category, stacklevel=3)

    # -- exact criterion in the slope parameterisation ---------------------------------------
    def _dev(self, theta, rho, method, sigma2=None):
        G = _A @ _G_from_theta(theta, rho) @ _A.T
        return self.model._eng.deviance(G, np.ones(2), False, method, sigma2=sigma2)

    def _optimum(self, method):
        """Exact optimum (deviance) over (theta_a, theta_s, rho), started at statsmodels' estimate."""
        if method not in self._opt_cache:
            f = lambda z: self._dev(z[:2], z[2], method)  # noqa: E731
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                z, fz, _ = _minimise(f, self._z_hat, [(0.0, None), (0.0, None), (-1.0, 1.0)])
            self._opt_cache[method] = (z, fz)
        return self._opt_cache[method]

    def _profile(self, name, level, deviance):
        key = ("profile", name, level, deviance)
        if key in self._cache:
            return self._cache[key]
        z_opt, dev_min = self._optimum(deviance)
        eng = self.model._eng
        nu = eng.N - eng.p if deviance == "REML" else eng.N
        # sigma2 at the optimum of this criterion
        G = _A @ _G_from_theta(z_opt[:2], z_opt[2]) @ _A.T
        s2 = eng.evaluate(G, np.ones(2), False).Q / nu
        th, rho = z_opt[:2], z_opt[2]
        bnd = (0.0, None)
        if name == "correlation":
            def pdev(c, z):
                return self._inner(lambda zz: self._dev(zz[:2], c, deviance), z, [bnd, bnd])
            z0, est, scale = th, rho, "atanh"
        elif name in ("therapist", "therapist_slope"):
            k = 0 if name == "therapist" else 1

            def pdev(c, z, k=k):
                def f(zz):
                    s2_ = math.exp(zz[0])
                    t = [0.0, 0.0]
                    t[k] = math.sqrt(max(c, 0.0) / s2_)
                    t[1 - k] = zz[1]
                    return self._dev(t, zz[2], deviance, sigma2=s2_)
                return self._inner(f, z, [(-50, 50), bnd, (-1.0, 1.0)])
            z0, est, scale = np.array([math.log(s2), th[1 - k], rho]), s2 * th[k] ** 2, "log"
        elif name == "residual":
            def pdev(c, z):
                return self._inner(lambda zz: self._dev(zz[:2], zz[2], deviance, sigma2=c), z, [bnd, bnd, (-1.0, 1.0)])
            z0, est, scale = np.array([th[0], th[1], rho]), s2, "log"
        else:
            raise ModelError(f"cannot profile {name!r}; choose therapist, therapist_slope, residual or correlation")
        out = _profile_limits(pdev, est, dev_min, z0, scale, level)
        self._cache[key] = out
        return out

    @staticmethod
    def _inner(f, z, bounds):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            zz, fz, _ = _minimise(f, z, bounds)
        return fz, zz

    def _bootstrap(self, n_boot, seed):
        key = ("boot", n_boot, seed)
        if key in self._cache:
            return self._cache[key]
        if seed is None:
            raise ModelError("the parametric bootstrap needs an explicit seed (seed=...) to be reproducible")
        m = self.model
        eng = m._eng
        rng = np.random.default_rng(seed)
        mu = m.X @ self.fe_params.to_numpy()
        cov = self.cov_re.to_numpy()
        w, V = np.linalg.eigh(cov)
        Lre = V * np.sqrt(np.maximum(w, 0.0))
        T = len(m.therapist_labels)
        y0 = eng.y
        rows = []
        chol_bounds = [(0.0, None), (None, None), (0.0, None)]
        z_opt, _ = self._optimum(self.method)
        l0 = z_opt[0]
        start = np.array([l0, z_opt[2] * z_opt[1], z_opt[1] * math.sqrt(max(1 - z_opt[2] ** 2, 0.0))])
        try:
            for _ in range(n_boot):
                ab = rng.standard_normal((T, 2)) @ Lre.T
                ystar = mu + ab[m.tcode, 0] + ab[m.tcode, 1] * m.feedback + rng.standard_normal(len(mu)) * math.sqrt(self.scale)
                eng.set_y(ystar)

                def f(x):
                    L = np.array([[x[0], 0.0], [x[1], x[2]]])
                    return eng.deviance(_A @ (L @ L.T) @ _A.T, np.ones(2), False, self.method)

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    x, _, _ = _minimise(f, start, chol_bounds, polish=False)
                L = np.array([[x[0], 0.0], [x[1], x[2]]])
                Gs = L @ L.T
                Garm = _A @ Gs @ _A.T
                nu = eng.N - eng.p if self.method == "REML" else eng.N
                s2 = eng.evaluate(Garm, np.ones(2), False).Q / nu
                d = np.sqrt(np.diag(Gs))
                rows.append({"therapist": s2 * Gs[0, 0], "therapist_slope": s2 * Gs[1, 1], "residual": s2,
                             "correlation": Gs[0, 1] / (d[0] * d[1]) if np.all(d > 0) else np.nan})
        finally:
            eng.set_y(y0)
        boot = pd.DataFrame(rows)
        self._cache[key] = boot
        return boot

    def interval(self, name: str, level: float = 0.95, method: str = "profile", *, n_boot: int = 1000, seed=None,
                 deviance: str = "ML") -> tuple[float, float]:
        """Interval for ``therapist``, ``therapist_slope``, ``residual`` or ``correlation``.

        ``method="profile"``: exact profile likelihood (ML deviance by default, as lme4's
        ``profile()``); ``"bootstrap"``: seeded parametric-bootstrap percentiles.
        """
        if method == "profile":
            return self._profile(name, level, deviance.upper())
        if method == "bootstrap":
            vals = self._bootstrap(n_boot, seed)[name].to_numpy(float)
            vals = vals[np.isfinite(vals)]
            a = (1 - level) / 2
            return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))
        raise ModelError(f"interval method must be 'profile' or 'bootstrap', got {method!r}")

    def correlation_interval(self, level: float = 0.95, method: str = "profile", *, n_boot: int = 1000,
                             seed=None) -> dict:
        """Intercept-slope correlation with its interval (negative: feedback narrows the gap)."""
        lo, hi = self.interval("correlation", level, method, n_boot=n_boot, seed=seed)
        return {"estimate": self.correlation, "ci_low": lo, "ci_high": hi, "ci_method": method}

    def icc(self) -> dict:
        """Therapist ICC in each arm implied by the slope model (point estimates).

        Control: ``s2_a / (s2_a + s2)``; feedback: ``v_f / (v_f + s2)`` with the therapist variance
        under feedback ``v_f = s2_a + 2 c + s2_s`` (intercept plus slope).
        """
        cov = self.cov_re.to_numpy()
        v0 = cov[0, 0]
        v1 = cov[0, 0] + 2 * cov[0, 1] + cov[1, 1]
        return {"control": float(v0 / (v0 + self.scale)), "feedback": float(v1 / (v1 + self.scale))}

    def gap_table(self) -> pd.DataFrame:
        """Per-therapist "narrowing the gap" data, ready for a scatter plot.

        One row per therapist: caseload per arm, ``intercept`` (BLUP: the therapist's effect
        without feedback, relative to the average therapist; on PHQ-9 positive = worse outcomes),
        ``slope`` (BLUP: how much feedback shifts this therapist's patients' outcomes beyond the
        average feedback effect; on PHQ-9 negative = they gain more), ``effect_control`` and
        ``effect_feedback`` (the therapist's deviation in each arm: intercept, intercept + slope)
        and ``feedback_effect`` (the average feedback effect plus the slope: the therapist's own
        feedback effect). Values are statsmodels' ``random_effects``.
        """
        m = self.model
        re = self.sm_result.random_effects
        n = m._eng.n
        rows = []
        for t, label in enumerate(m.therapist_labels):
            r = re[str(label)]
            a, s = float(r.iloc[0]), float(r.iloc[1])
            rows.append({"therapist": label, "n_patients": int(n[t].sum()), "n_control": int(n[t, 0]),
                         "n_feedback": int(n[t, 1]), "intercept": a, "slope": s, "effect_control": a,
                         "effect_feedback": a + s,
                         "feedback_effect": float(self.fe_params[m.slope_name]) + s})
        return pd.DataFrame(rows)

    def summary(self) -> str:
        m = self.model
        lines = [f"Random feedback slope across therapists ({self.method}, statsmodels MixedLM); "
                 f"{self.n_patients} patients, {self.n_therapists} therapists",
                 f"log-likelihood {self.loglik:.4f}; converged {self.converged}; singular {self.singular}", "",
                 f"{'fixed effect':<24}{'estimate':>12}{'se':>12}"]
        for nm in self.fe_params.index:
            lines.append(f"{nm:<24}{self.fe_params[nm]:>12.5f}{self.bse[nm]:>12.5f}")
        lines += ["", f"var(intercept) {self.vcomp['therapist']:.5f}; var({m.slope_name} slope) "
                      f"{self.vcomp['therapist_slope']:.5f}; residual {self.scale:.5f}; "
                      f"correlation {self.correlation:.4f}"]
        return "\n".join(lines)

    def to_contract(self, interval: str = "profile", n_boot: int = 1000, seed=None) -> dict:
        """The model's entry of ``estimates.json`` (``"type": "random_slope"``)."""
        if interval == "wald":  # no Wald intervals for variances (their sampling distribution is skewed)
            self._warn("Wald intervals are not offered for variance components, ICCs or correlations; "
                       "profile-likelihood intervals are reported instead", StatisticalWarning)
            interval = "profile"
        z = stats.norm.ppf(0.975)

        def num(v):
            v = float(v)
            return v if np.isfinite(v) else None

        fe = {nm: {"estimate": num(b), "se": num(s), "ci_low": num(b - z * s), "ci_high": num(b + z * s)}
              for nm, b, s in zip(self.fe_params.index, self.fe_params, self.bse)}
        vc = {}
        for nm, v in self.vcomp.items():
            lo, hi = self.interval(nm, 0.95, interval, n_boot=n_boot, seed=seed)
            vc[nm] = {"estimate": num(v), "ci_low": num(lo), "ci_high": num(hi)}
        cor = self.correlation_interval(0.95, interval, n_boot=n_boot, seed=seed)
        return {
            "type": "random_slope",
            "family": "gaussian",
            "method": self.method,
            "slope": self.model.slope_name,
            "fixed_effects": fe,
            "variance_components": vc,
            "correlation": {"estimate": num(cor["estimate"]), "ci_low": num(cor["ci_low"]),
                            "ci_high": num(cor["ci_high"]), "ci_method": interval},
            "loglik": num(self.loglik),
            "converged": bool(self.converged),
            "singular": bool(self.singular),
            "n_patients": int(self.n_patients),
            "n_therapists": int(self.n_therapists),
            "warnings": [str(w) for w in self.warnings],
        }
