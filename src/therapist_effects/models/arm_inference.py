"""Inference of the arm-variance model (:mod:`therapist_effects.models.arm`): the profiled quantities,
their exact profile-likelihood limits, lme4's spline-interpolated profile of the variance
components, the likelihood-ratio test of equal arm variances and the parametric bootstrap.

:class:`ArmProfiles` and :class:`ArmBootstrap` are mixins of
:class:`~therapist_effects.models.arm.ArmVarianceResults`: they use its fit (``model``, ``opt``,
``fe_params``, ``cov_re``, ...) and caches, and keep every root search and bootstrap on the shared
:mod:`therapist_effects.engine.inference` (:func:`~therapist_effects.engine.inference.profile_limit`,
:func:`~therapist_effects.engine.inference.parametric_bootstrap`, one seed rule).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import optimize, stats

from ..engine.inference import chi2_cut, parametric_bootstrap, percentile_interval, profile_limit
from ..exceptions import ConvergenceWarning, ModelError, StatisticalWarning

if TYPE_CHECKING:
    from .arm import _Optimum

__all__ = ["ArmProfiles", "ArmBootstrap"]

def _r_backspline_predict(x: np.ndarray, y: np.ndarray, at: np.ndarray) -> np.ndarray:
    """R's ``predict(backSpline(interpSpline(y ~ x)), at)$y`` (splines package, R 4.2).

    ``interpSpline`` is the natural cubic interpolation spline of y on x; ``backSpline`` builds a
    piecewise cubic in y through the knots (y_i, x_i) with slopes 1/y'(x_i), natural-like ends.
    Values outside the range of ``y`` are NaN (as in R). Falls back to linear interpolation
    where the spline is not monotone (as lme4's ``confint.thpr`` does).
    """
    from scipy.interpolate import CubicSpline

    order = np.argsort(x)
    x, y = x[order], y[order]
    at = np.asarray(at, dtype=float)
    if len(x) < 4:
        return np.interp(at, y, x, left=np.nan, right=np.nan)
    spl = CubicSpline(x, y, bc_type="natural")
    knots, c1, c2 = x, y, spl(x, 1)
    adiff, kdiff = np.diff(c1), np.diff(knots)
    if not (np.all(adiff > 0) or np.all(adiff < 0)):
        ok = np.all(np.diff(y) >= 0)
        return np.interp(at, y, x, left=np.nan, right=np.nan) if ok else np.full(at.shape, np.nan)
    nk = len(knots)
    b = np.zeros((nk, 4))
    b[:, 0] = knots
    b[:, 1] = 1.0 / c2
    for i in range(nk - 1):
        A = np.array([[adiff[i] ** 2, adiff[i] ** 3], [2 * adiff[i], 3 * adiff[i] ** 2]])
        rhs = np.array([kdiff[i] - adiff[i] * b[i, 1], b[i + 1, 1] - b[i, 1]])
        b[i, 2:4] = np.linalg.solve(A, rhs)
    b[nk - 1, 1:] = np.nan
    if nk > 2:
        b[0, 3] = b[nk - 2, 3] = 0.0
        A = np.array([[adiff[0], adiff[0] ** 2], [1.0, 2 * adiff[0]]])
        b[0, 1:3] = np.linalg.solve(A, np.array([kdiff[0], 1.0 / c2[1]]))
        b[nk - 2, 2] = (kdiff[nk - 2] - adiff[nk - 2] * b[nk - 2, 1]) / adiff[nk - 2] ** 2
    if b[0, 2] > 0:
        b[0, 2] = 0.0
        b[0, 1] = kdiff[0] / adiff[0]
    if b[nk - 2, 2] < 0:
        b[nk - 2, 2] = 0.0
        b[nk - 2, 1] = kdiff[nk - 2] / adiff[nk - 2]
    bknots = c1
    if adiff[0] < 0:
        bknots, b = bknots[::-1], b[::-1]
    out = np.full(at.shape, np.nan)
    for j, v in enumerate(at):
        if v < bknots[0] or v > bknots[-1]:
            continue
        # R: i <- cut(v, knots), intervals (k_i, k_{i+1}]; v == first knot -> first interval
        i = max(int(np.searchsorted(bknots, v, side="left")) - 1, 0)
        d = v - bknots[i]
        out[j] = b[i, 0] + d * (b[i, 1] + d * (b[i, 2] + d * b[i, 3]))
    return out



def _G_from_theta(theta, rho=None):
    if rho is None:
        return np.diag(np.asarray(theta, dtype=float) ** 2)
    t0, t1 = theta
    c = rho * t0 * t1
    return np.array([[t0 * t0, c], [c, t1 * t1]])


@dataclass
class _Target:
    """A quantity to profile: maps (value c, free vector z) -> (sigma2 or None, G, r)."""

    name: str
    build: object
    z0: np.ndarray
    bounds: list
    estimate: float
    upper_limit: float = np.inf
    linear: bool = False  # the correlation: steps linearly on [-1, 1], else on the log scale from 0


#: columns of the bootstrap replicates (arms by index, 0 = control); the ICC ratio (control ICC 0)
#: and the correlation (an arm SD 0, or no correlation) may be undefined in a successful refit
_BOOT_COLUMNS = ["cluster", "therapist[0]", "therapist[1]", "residual[0]", "residual[1]", "icc[0]", "icc[1]",
                 "icc_ratio", "correlation"]
_BOOT_OPTIONAL = ("icc_ratio", "correlation")


def _trapped(z: np.ndarray, z_hat: np.ndarray, bounds: list) -> bool:
    """Whether the inner optimum ``z`` sits on a lower bound (a relative SD at 0) that the overall
    optimum ``z_hat`` is off: the signature of a local inner optimiser trapped on that boundary."""
    return any(lo is not None and z[j] <= lo and z_hat[j] > lo for j, (lo, _) in enumerate(bounds))


class _ArmTargets:
    """The profiled quantities of an arm-variance fit at the optimum of ``method`` (REML or ML):
    each maps (value c, free vector z) to (sigma2 or None, G, r[, relative cluster variance]).
    The free vector holds the other relative SDs (lme4's theta), ``log sigma2`` where the
    quantity is a variance on the natural scale, then the "extras": the arm correlation
    (``correlated``) and the log residual ratio (``arm_residual``)."""

    def __init__(self, res, method: str):
        m = self.m = res.model
        opt = res._optimum(method)
        self.gc_hat = m._gc(opt.x)
        _, self.s2hat, _ = m._eng.gls(opt.G, opt.r, method, self.gc_hat)
        self.G, self.r = opt.G, opt.r
        th = self.th = np.sqrt(np.maximum(np.diag(self.G), 0.0))
        self.rho = None
        if m.correlated:
            rho = float(self.G[0, 1] / (th[0] * th[1])) if th[0] > 0 and th[1] > 0 else 0.0
            self.rho = min(max(rho, -1.0), 1.0)
        self.logr = math.log(self.r[1]) if m.arm_residual else None
        self.icc = res._icc_from(self.G, self.r, self.gc_hat)

    def all(self) -> dict:
        targets = {**self.variances(), **self.residuals(), **self.correlation(), **self.iccs(), **self.ratio()}
        return self.with_cluster(targets) if self.m.cluster_random else targets

    def pack(self, rho_, logr_):
        """The extras' start values and bounds."""
        z, b = [], []
        if self.m.correlated:
            z.append(rho_)
            b.append((-1.0, 1.0))
        if self.m.arm_residual:
            z.append(logr_)
            b.append((-12.0, 12.0))
        return z, b

    def unpack(self, z):
        """``(rho, residual ratios)`` from the extras ``z`` (the correlation first, the log residual ratio last)."""
        rho_ = z[0] if self.m.correlated else None
        rr = np.array([1.0, math.exp(z[-1])]) if self.m.arm_residual else np.ones(2)
        return rho_, rr

    def variances(self) -> dict:
        """Therapist variance of arm a (natural scale): z = [log sigma2, theta_other, extras]."""
        m, th, s2hat, unpack = self.m, self.th, self.s2hat, self.unpack
        targets = {}
        for a, lv in enumerate(m.arm_levels):
            o = 1 - a
            ez, eb = self.pack(self.rho, self.logr)

            def build(c, z, a=a, o=o, gc=0.0):
                s2 = math.exp(z[0])
                th_ = np.zeros(2)
                th_[a] = math.sqrt(max(c, 0.0) / s2)
                th_[o] = z[1]
                rho_, rr = unpack(z[2:])
                return s2, _G_from_theta(th_, rho_), rr

            targets[f"therapist[{lv}]"] = _Target(
                f"therapist[{lv}]", build, np.array([math.log(s2hat), th[o], *ez]),
                [(-50, 50), (0.0, None), *eb], float(s2hat * self.G[a, a]),
            )
        return targets

    def residuals(self) -> dict:
        """The residual variance, or one per arm (``arm_residual``)."""
        m, th, s2hat = self.m, self.th, self.s2hat
        ez, eb = self.pack(self.rho, None)
        if not m.arm_residual:
            def build_res(c, z, gc=0.0):
                rho_ = z[2] if m.correlated else None
                return c, _G_from_theta(z[:2], rho_), np.ones(2)

            return {"residual": _Target("residual", build_res, np.array([*th, *ez]),
                                        [(0.0, None), (0.0, None), *eb], float(s2hat))}
        ez, eb = ez[: 1 if m.correlated else 0], eb[: 1 if m.correlated else 0]

        def build_r0(c, z, gc=0.0):
            rho_ = z[2] if m.correlated else None
            return c, _G_from_theta(z[:2], rho_), np.array([1.0, math.exp(z[-1])])

        def build_r1(c, z, gc=0.0):
            s2 = math.exp(z[0])
            rho_ = z[3] if m.correlated else None
            return s2, _G_from_theta(z[1:3], rho_), np.array([1.0, c / s2])

        n0, n1 = (f"residual[{lv}]" for lv in m.arm_levels)
        return {
            n0: _Target(n0, build_r0, np.array([*th, *ez, self.logr]), [(0.0, None), (0.0, None), *eb, (-12.0, 12.0)],
                        float(s2hat)),
            n1: _Target(n1, build_r1, np.array([math.log(s2hat), *th, *ez]),
                        [(-50, 50), (0.0, None), (0.0, None), *eb], float(s2hat * self.r[1])),
        }

    def correlation(self) -> dict:
        """The correlation of the two arm effects (``correlated``)."""
        m = self.m
        if not m.correlated:
            return {}
        ez, eb = self.pack(None, self.logr)
        ez, eb = ez[1:], eb[1:]

        def build_cor(c, z, gc=0.0):
            rr = np.array([1.0, math.exp(z[2])]) if m.arm_residual else np.ones(2)
            return None, _G_from_theta(z[:2], c), rr

        return {"correlation": _Target("correlation", build_cor, np.array([*self.th, *ez]),
                                       [(0.0, None), (0.0, None), *eb], float(self.rho), linear=True)}

    def iccs(self) -> dict:
        """ICC of arm a: g_a = c r_a / (1 - c); z = [theta_other, extras]."""
        unpack = self.unpack
        targets = {}
        for a, lv in enumerate(self.m.arm_levels):
            o = 1 - a
            ez, eb = self.pack(self.rho, self.logr)

            def build_icc(c, z, a=a, o=o, gc=0.0):
                rho_, rr = unpack(z[1:])
                th_ = np.zeros(2)
                th_[a] = math.sqrt(c * (rr[a] + gc) / (1.0 - c))
                th_[o] = z[0]
                return None, _G_from_theta(th_, rho_), rr

            targets[f"icc[{lv}]"] = _Target(
                f"icc[{lv}]", build_icc, np.array([self.th[o], *ez]), [(0.0, None), *eb],
                float(self.icc[a]), upper_limit=1.0,
            )
        return targets

    def ratio(self) -> dict:
        """The ICC ratio (feedback / control): z = [ICC_control, extras]."""
        unpack, icc = self.unpack, self.icc

        def build_ratio(c, z, gc=0.0):
            rho_, rr = unpack(z[1:])
            i0 = z[0]
            i1 = c * i0
            if i0 >= 1.0 or i1 >= 1.0:
                return None, None, None
            th_ = np.array([math.sqrt(i0 * (rr[0] + gc) / (1 - i0)), math.sqrt(i1 * (rr[1] + gc) / (1 - i1))])
            return None, _G_from_theta(th_, rho_), rr

        ez, eb = self.pack(self.rho, self.logr)
        ratio_hat = float(icc[1] / icc[0]) if icc[0] > 0 else float("nan")
        return {"icc_ratio": _Target("icc_ratio", build_ratio, np.array([icc[0], *ez]), [(0.0, 1.0 - 1e-9), *eb],
                                     ratio_hat)}

    def with_cluster(self, targets: dict) -> dict:
        """With a random cluster level every target gets the relative cluster SD as one more free
        parameter (last in z), and the cluster variance is a target of its own."""
        unpack, s2hat = self.unpack, self.s2hat
        thc = math.sqrt(self.gc_hat)
        out = {}
        for name, t in targets.items():
            def wrapped(c, z, _b=t.build):
                gc = float(z[-1]) ** 2
                return (*_b(c, z[:-1], gc=gc), gc)

            out[name] = _Target(t.name, wrapped, np.append(t.z0, thc), [*t.bounds, (0.0, None)],
                                t.estimate, t.upper_limit, t.linear)
        ez, eb = self.pack(self.rho, self.logr)

        def build_cluster(c, z):
            s2 = math.exp(z[0])
            rho_, rr = unpack(z[3:])
            return s2, _G_from_theta(z[1:3], rho_), rr, max(c, 0.0) / s2

        out["cluster"] = _Target(
            "cluster", build_cluster, np.array([math.log(s2hat), *self.th, *ez]),
            [(-50, 50), (0.0, None), (0.0, None), *eb], float(s2hat * self.gc_hat),
        )
        return out


class ArmProfiles:
    """Profile likelihood of the arm-variance model (mixin of ``ArmVarianceResults``)."""

    def _optimum(self, method: str) -> _Optimum:
        if method not in self._opt_cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                self._opt_cache[method] = self.model._optimise(method, start=self.opt.x)
        return self._opt_cache[method]

    def _targets(self, method: str) -> dict:
        """The quantities that can be profiled, each with its re-parameterisation
        (:class:`_ArmTargets`)."""
        return _ArmTargets(self, method).all()

    def _profile_dev(self, target: _Target, c: float, z0: np.ndarray, method: str):
        from .arm import _minimise  # arm imports this module

        m = self.model
        eng = m._eng
        bounds = list(target.bounds)
        if target.name == "icc_ratio":
            hi = min(1.0, 1.0 / c) if c > 0 else 1.0
            bounds[0] = (0.0, hi * (1 - 1e-9))

        def f(z):
            out = target.build(c, z)
            if out[1] is None:
                return np.inf
            gc = out[3] if len(out) > 3 else None
            return eng.deviance(out[1], out[2], method, sigma2=out[0], gc=gc)

        z0 = np.array(z0, dtype=float)
        for j, (lo, hi) in enumerate(bounds):
            if lo is not None and z0[j] < lo:
                z0[j] = lo
            if hi is not None and z0[j] > hi:
                z0[j] = hi
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if len(z0) == 1 and bounds[0][1] is not None:
                lo, hi = bounds[0]
                res = optimize.minimize_scalar(
                    lambda t: f(np.array([t])), bounds=(lo, hi), method="bounded",
                    options={"xatol": 1e-9 + 1e-7 * abs(z0[0])},
                )
                z, fz = np.array([res.x]), res.fun
                f0 = f(z0)
                if f0 < fz:
                    z, fz = z0, f0
            else:
                z, fz, _ = _minimise(f, z0, bounds, polish=True)
        return float(fz), z

    def profile_interval(self, name: str, level: float = 0.95, deviance: str = "ML") -> tuple[float, float]:
        """Profile-likelihood interval of a variance component, ICC, the ICC ratio or the correlation.

        ``name``: ``therapist[<level>]``, ``residual`` (``residual[<level>]``), ``correlation``,
        ``icc[<level>]`` or ``icc_ratio``. ``deviance="ML"`` profiles the ML deviance as lme4's
        ``profile()`` does (for REML fits too); ``"REML"`` profiles the restricted likelihood.
        The limits are where the signed root deviance equals the normal quantile (likelihood-ratio
        chi-square with 1 df).
        """
        deviance = deviance.upper()
        key = (name, level, deviance)
        if key in self._profile_cache:
            return self._profile_cache[key]
        targets = self._targets(deviance)
        if name not in targets:
            raise ModelError(f"cannot profile {name!r}; choose one of {sorted(targets)}")
        t = targets[name]
        dev_min = self._optimum(deviance).deviance
        if not np.isfinite(t.estimate):
            lims = (math.nan, math.nan)
        else:
            q = chi2_cut(level)
            lims = tuple(self._profile_end(t, dev_min, deviance, q, d) for d in (-1, 1))
        self._profile_cache[key] = lims
        return lims

    def _profile_end(self, t: _Target, dev_min: float, method: str, q: float, direction: int) -> float:
        """One end of the profile interval of ``t`` by the shared outward-bracketing root search
        (:func:`~therapist_effects.engine.inference.profile_limit`), the inner optimisation
        warm-started. Variances and the ICC ratio step on the log scale from their estimate (from
        ``1e-4`` residual variances, or ``1e-4``, when it is 0) with the edge 0
        evaluated exactly (not for a residual variance, whose criterion is undefined at 0); ICCs
        likewise on ``[0, 1]`` (1 approached, never evaluated); the correlation linearly on
        ``[-1, 1]`` with both edges evaluated. An end that stays below the cut-off up to an edge is
        that edge (0, 1, +-1) or ``inf``. Each inner optimisation starts from the solution at the
        nearest interior value already profiled (never from an edge, which is evaluated first), and
        also from the optimum where that gives an excess beyond the cut-off with a nuisance SD at 0
        that is not 0 at the optimum: such a start can trap the local inner optimiser on that
        boundary and fake a crossing."""
        if t.linear:
            kw = {"lower": -1.0, "upper": 1.0, "step": 0.1}
        else:
            unit = self.sigma2 if t.name.startswith(("therapist[", "residual", "cluster")) else 1.0
            kw = {"lower": 0.0, "upper": t.upper_limit, "step": 0.25, "log_scale": True, "scale": 1e-4 * unit,
                  "edge_ok": direction < 0 and not t.name.startswith("residual")}
        z_hat = np.array(t.z0, dtype=float)
        starts = {t.estimate: z_hat}

        def excess(c: float) -> float:
            near = starts[min(starts, key=lambda x: abs(x - c))]
            fz, z = self._profile_dev(t, c, near, method)
            if not fz - dev_min < q and near is not z_hat and _trapped(z, z_hat, t.bounds):
                f0, z0 = self._profile_dev(t, c, z_hat, method)
                if f0 < fz:
                    fz, z = f0, z0
            if not np.isfinite(fz):
                return math.inf  # undefined there: beyond the interval
            if kw["lower"] < c < kw["upper"]:
                starts[c] = z
            return fz - dev_min

        lim = profile_limit(excess, t.estimate, q, direction, xtol=1e-12, rtol=1e-9, **kw)
        edge = kw["lower"] if direction < 0 else kw["upper"]
        return float(edge if lim.status == "open" and math.isfinite(edge) else lim.value)

    def lme4_profile_interval(self, name: str, level: float = 0.95) -> tuple[float, float]:
        """lme4's ``confint(fit, method = "profile")`` for a variance component, step for step.

        lme4 does not solve for the interval limits: ``profile.merMod`` evaluates the ML profile
        on the standard-deviation scale at points chosen to step the signed root deviance (zeta) by
        ``delta = sqrt(qchisq(0.99, n_parameters)) / 8``, fits a natural interpolation spline of
        zeta on the parameter (``splines::interpSpline``), inverts it (``splines::backSpline``) and
        reads off zeta = -1.96 and 1.96. This replicates that algorithm on this package's exact
        profile, so that it reproduces lme4's numbers (including the spline's interpolation error,
        which is noticeable where the profile flattens towards a variance of zero);
        :meth:`profile_interval` gives the exact limits.
        """
        key = ("lme4", name, level)
        if key in self._profile_cache:
            return self._profile_cache[key]
        targets = self._targets("ML")
        var_names = [k for k in targets if k.startswith(("therapist[", "residual", "cluster"))]
        if name not in var_names:
            raise ModelError(f"lme4-style profile only for variance components {var_names}, not {name!r}")
        t = targets[name]
        base = self._optimum("ML").deviance
        nptot = len(var_names) + (1 if self.model.correlated else 0) + self.model._eng.p
        cutoff = math.sqrt(stats.chi2.ppf(0.99, nptot))
        delta = cutoff / 8.0
        pw = math.sqrt(max(t.estimate, 0.0))
        state = {"z": t.z0.copy()}

        def zeta(sd):
            fz, z = self._profile_dev(t, sd * sd, state["z"], "ML")
            state["z"] = z
            return math.copysign(math.sqrt(max(fz - base, 0.0)), sd - pw) if sd != pw else 0.0

        def fill(rows, lowcut=0.0, upcut=np.inf, maxpts=100):
            i = 1  # 0-based index of the last filled row
            while i < maxpts - 1 and lowcut < rows[i][1] < upcut and abs(rows[i][0]) <= cutoff:
                (z0, p0), (z1, p1) = rows[i - 1], rows[i]
                num, den = p1 - p0, z1 - z0
                if den == 0 or not np.isfinite(den):
                    step = 1e-6
                else:
                    step = delta * num / den
                    if step < 0:
                        step = 1e-6
                    elif abs(step) > 10 * abs(num):
                        step = math.copysign(10 * abs(num), step)
                nxt = min(upcut, max(lowcut, p1 + math.copysign(step, num)))
                rows.append((zeta(nxt), nxt))
                i += 1
            return rows

        shift = 1e-3 if pw == 0 else pw * 1.01
        zs = zeta(shift)
        up = fill([(0.0, pw), (zs, shift)])
        state["z"] = t.z0.copy()
        down = fill([(zs, shift), (0.0, pw)]) if pw > 0 else []
        pts = sorted(set(up + down), key=lambda r: r[1])
        x = np.array([p for _, p in pts])
        y = np.array([z for z, _ in pts])
        zq = stats.norm.ppf([(1 - level) / 2, (1 + level) / 2])
        sd_ci = _r_backspline_predict(x, y, zq)
        lo = 0.0 if not np.isfinite(sd_ci[0]) else sd_ci[0] ** 2
        hi = np.inf if not np.isfinite(sd_ci[1]) else sd_ci[1] ** 2
        self._profile_cache[key] = (float(lo), float(hi))
        return self._profile_cache[key]

    def lrt_equal_variances(self) -> dict:
        """Likelihood-ratio test of equal therapist variances in the two arms (s2_control = s2_feedback).

        Both models share the fixed effects, so the test uses the fit's own criterion (REML or ML);
        chi-square with 1 df (the null value is interior to the parameter space).
        """
        from .arm import _minimise  # arm imports this module

        if "lrt" in self._profile_cache:
            return self._profile_cache["lrt"]
        m = self.model
        eng = m._eng
        method = self.method

        def build(z):
            th = np.array([z[0], z[0]])
            k = 1
            rho = None
            if m.correlated:
                rho = z[k]
                k += 1
            rr = np.array([1.0, math.exp(z[k])]) if m.arm_residual else None
            return _G_from_theta(th, rho), rr

        bounds = [(0.0, None)] + ([(-1.0, 1.0)] if m.correlated else []) + ([(-12.0, 12.0)] if m.arm_residual else [])
        th = np.sqrt(np.diag(self.G_rel))
        z0 = [float(np.sqrt(np.mean(th**2)))] + ([0.0] if m.correlated else []) + (
            [math.log(self.r_rel[1])] if m.arm_residual else []
        )
        if m.cluster_random:
            bounds.append((0.0, None))
            z0.append(math.sqrt(self.gc_rel))

        def dev(z):
            gc = float(z[-1]) ** 2 if m.cluster_random else None
            return eng.deviance(*build(z), method, gc=gc)

        best = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for start in (z0, [0.3] + z0[1:]):
                _, fz, _ = _minimise(dev, start, bounds)
                if best is None or fz < best:
                    best = fz
        stat = max(float(best - self.deviance), 0.0)
        out = {"statistic": stat, "df": 1, "p_value": float(stats.chi2.sf(stat, 1))}
        self._profile_cache["lrt"] = out
        return out


class ArmBootstrap:
    """Parametric bootstrap of the arm-variance model (mixin of ``ArmVarianceResults``)."""

    def _bootstrap(self, n_boot: int, seed) -> pd.DataFrame:
        """Replicates of the variance components, ICCs, ICC ratio (and correlation) from data sets
        simulated from the fit and refitted by the same criterion
        (:func:`~therapist_effects.engine.inference.parametric_bootstrap`: ``seed=None`` is seed 0;
        failed refits are NaN rows, counted and warned about). Columns name arms by index (0 =
        control)."""
        key = (int(n_boot), 0 if seed is None else int(seed))
        if key in self._boot_cache:
            return self._boot_cache[key]
        m = self.model
        eng = m._eng
        mu = eng.X @ self.fe_params.to_numpy()
        w, V = np.linalg.eigh(self.cov_re)
        Lre = V * np.sqrt(np.maximum(w, 0.0))
        res_sd = np.sqrt(self.residual_var)
        clus_sd = math.sqrt(self.sigma2 * self.gc_rel)
        y0 = eng.y

        def simulate(rng: np.random.Generator) -> np.ndarray:
            u = rng.standard_normal((eng.T, 2)) @ Lre.T
            ystar = mu + u[eng.tcode, eng.acode] + rng.standard_normal(eng.N) * res_sd[eng.acode]
            if m.cluster_random:
                ystar = ystar + (rng.standard_normal(eng.n_clust) * clus_sd)[eng.tclust[eng.tcode]]
            return ystar

        def refit(ystar: np.ndarray) -> dict:
            eng.set_y(ystar)
            try:
                opt = m._optimise(self.method, start=self.opt.x)
                gc = m._gc(opt.x)
                _, s2, _ = eng.gls(opt.G, opt.r, self.method, gc)
            finally:
                eng.set_y(y0)
            icc = self._icc_from(opt.G, opt.r, gc)
            d = np.sqrt(np.diag(opt.G))
            return {"cluster": s2 * (gc or 0.0), "therapist[0]": s2 * opt.G[0, 0], "therapist[1]": s2 * opt.G[1, 1],
                    "residual[0]": s2 * opt.r[0], "residual[1]": s2 * opt.r[1], "icc[0]": icc[0], "icc[1]": icc[1],
                    "icc_ratio": icc[1] / icc[0] if icc[0] > 0 else math.nan,
                    "correlation": opt.G[0, 1] / (d[0] * d[1]) if np.all(d > 0) else math.nan,
                    "converged": opt.converged}

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = parametric_bootstrap(simulate, refit, n_boot, seed, _BOOT_COLUMNS, optional=_BOOT_OPTIONAL)
        if res.n_failed:
            self._warn(f"{res.n_failed} of {res.n_boot} bootstrap refits failed (did not converge); they are "
                       "left out of the percentile intervals", ConvergenceWarning)
        self._boot_cache[key] = res.draws
        return res.draws

    def _boot_interval(self, name: str, level: float, n_boot: int, seed):
        boot = self._bootstrap(n_boot, seed)
        m = self.model
        col = name
        if "[" in name:  # therapist[<level>] -> therapist[<arm index>]
            base, _, lv = name[:-1].partition("[")
            col = f"{base}[{m.arm_levels.index(lv)}]" if lv in m.arm_levels else name
        if col == "residual":
            col = "residual[0]"
        vals = boot[col].to_numpy(dtype=float)
        ok = np.isfinite(vals)
        if ok.mean() < 0.9:
            self._warn(
                f"{(~ok).sum()} of {len(vals)} bootstrap refits gave no {name} (undefined ratio or failure)",
                StatisticalWarning,
            )
        return percentile_interval(vals, level)
