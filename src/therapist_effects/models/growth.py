"""Session-by-session growth model: sessions nested in patients nested in therapists.

The model (lme4: ``score ~ time + covariates + (1 + time | therapist) + (1 + time | therapist:patient)``)::

    y_pst = x_pst' b + z_pst' u_t + z_pst' v_p + e_pst,   z = (1, time)
    u_t ~ N(0, s2 L_T L_T'),   v_p ~ N(0, s2 L_P L_P'),   e ~ N(0, s2)

with lower-triangular relative covariance factors ``L_T``, ``L_P`` whose entries (column-major
lower triangle, as lme4's ``theta``) are the parameters; their diagonals are bounded below by 0 so
that singular fits (a zero variance, or a correlation of +-1) are reached exactly and flagged as
lme4's ``isSingular`` does (a diagonal theta below 1e-4). With ``arm_slopes`` the therapist block is
``(1 + time:arm0 + time:arm1 | therapist)``: one therapist slope variance per arm.

**Exact criterion from block statistics.** With ``U = [X, y]`` (``m`` columns) and, per patient,
``S_p = U_p' U_p``, the relative marginal covariance of a patient's scores is
``V_p = I + Z_p L_P L_P' Z_p'`` and by Woodbury ``U_p' V_p^{-1} U_p = S_p - K_p A_p^{-1} K_p'`` with
``K_p = S_p M_P L_P``, ``A_p = I + L_P' M_P' S_p M_P L_P`` (``Z_p = U_p M_P``), ``|V_p| = |A_p|``.
Summing these within a therapist and applying Woodbury once more for the therapist block gives
``U_t' V_t^{-1} U_t`` and ``|V_t| = prod |A_p| |C_t|``; their sum over therapists holds
``X'V^{-1}X``, ``X'V^{-1}y`` and ``y'V^{-1}y``. ``b`` and ``s2`` are profiled out, so each
evaluation costs O(patients m^2) whatever the number of sessions, and the criterion is exactly
lme4's ``deviance`` (ML) / ``REMLcrit`` (REML) as a function of ``theta``.

The therapist share of the variance in rate of change is
``therapist_slope / (therapist_slope + patient_slope)``; its profile-likelihood interval, and those
of the variance components, are computed by re-parameterising the criterion so that the profiled
quantity is held fixed (see :meth:`GrowthResults.profile_interval`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, stats

from ..classify import classify_effects
from .design import fixed_effects_matrix, group_codes
from ..exceptions import ConvergenceWarning, ModelError, SingularFitWarning

__all__ = ["GrowthModel", "GrowthResults", "session_time", "simulate_growth", "TIME_KINDS"]

LOG2PI = math.log(2.0 * math.pi)
#: lme4's ``isSingular`` tolerance on the diagonal of theta
SINGULAR_TOL = 1e-4
TIME_KINDS = ("log", "session", "weeks")


# ------------------------------------------------------------------------------------- helpers
def _tri_index(q: int) -> tuple[np.ndarray, np.ndarray]:
    """Column-major lower-triangle indices of a q x q matrix (lme4's theta order)."""
    rows, cols = [], []
    for j in range(q):
        for i in range(j, q):
            rows.append(i)
            cols.append(j)
    return np.array(rows), np.array(cols)


def _lambda(theta: np.ndarray, q: int) -> np.ndarray:
    L = np.zeros((q, q))
    r, c = _tri_index(q)
    L[r, c] = theta
    return L


def _diag_positions(q: int) -> list[int]:
    r, c = _tri_index(q)
    return [k for k in range(len(r)) if r[k] == c[k]]


def _woodbury_stage(S: np.ndarray, ML: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Woodbury step on a batch of cross-product matrices stored "structure of arrays"
    (``S[i, j]`` is a vector over blocks): with ``K = S M L`` and ``A = I + (M L)' K`` returns
    ``S - K A^{-1} K'``, ``log|A|`` and ``A^{-1}`` (shape (q, q, N)). Written as loops over the
    small dimensions with vector operations over the blocks, which is much faster than numpy's
    matmul on a stack of tiny matrices."""
    m, _, N = S.shape
    q = ML.shape[1]
    K = np.zeros((m, q, N))
    for i in range(m):
        for r in range(q):
            for j in range(m):
                if ML[j, r] != 0.0:
                    K[i, r] += S[i, j] * ML[j, r]
    A = np.zeros((q, q, N))
    for a in range(q):
        A[a, a] += 1.0
        for b in range(a, q):
            for j in range(m):
                if ML[j, a] != 0.0:
                    A[a, b] += ML[j, a] * K[j, b]
            if b != a:
                A[b, a] = A[a, b]
    if q == 1:
        Ainv = 1.0 / A
        logdet = np.log(A[0, 0])
    elif q == 2:
        det = A[0, 0] * A[1, 1] - A[0, 1] * A[0, 1]
        Ainv = np.empty_like(A)
        Ainv[0, 0] = A[1, 1] / det
        Ainv[1, 1] = A[0, 0] / det
        Ainv[0, 1] = Ainv[1, 0] = -A[0, 1] / det
        logdet = np.log(det)
    else:
        At = np.moveaxis(A, 2, 0)
        logdet = 2.0 * np.log(np.diagonal(np.linalg.cholesky(At), axis1=-2, axis2=-1)).sum(axis=-1)
        Ainv = np.moveaxis(np.linalg.inv(At), 0, 2)
    W = np.zeros((m, q, N))
    for i in range(m):
        for b in range(q):
            for a in range(q):
                W[i, b] += K[i, a] * Ainv[a, b]
    out = np.empty_like(S)
    for i in range(m):
        for j in range(i, m):
            v = S[i, j].copy()
            for b in range(q):
                v -= W[i, b] * K[j, b]
            out[i, j] = v
            if j != i:
                out[j, i] = v
    return out, logdet, Ainv


def session_time(occasion: pd.Series, patient: pd.Series, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Session number (1-based) and the model's time variable for each row.

    Session numbers are the occasion itself when it is a number, else the rank of the date within
    the patient (1 = first measured session). ``kind``: ``log`` = log(session number), ``session``
    = session number, ``weeks`` = weeks since the patient's first session (needs dates).
    """
    if kind not in TIME_KINDS:
        raise ModelError(f"time: expected one of {list(TIME_KINDS)}, got {kind!r}")
    is_date = pd.api.types.is_datetime64_any_dtype(occasion)
    if is_date:
        session = occasion.groupby(patient.to_numpy()).rank(method="first").to_numpy(dtype=float)
    else:
        session = pd.to_numeric(occasion).to_numpy(dtype=float)
    if kind == "log":
        if np.nanmin(session) < 1:
            raise ModelError("time: log needs session numbers from 1 (the occasion column has values below 1)")
        return session, np.log(session)
    if kind == "session":
        return session, session.copy()
    if not is_date:
        raise ModelError("time: weeks needs session dates in the occasion column (it holds session numbers)")
    first = occasion.groupby(patient.to_numpy()).transform("min")
    weeks = (occasion - first).dt.total_seconds().to_numpy(dtype=float) / (7 * 86400.0)
    return session, weeks


# ------------------------------------------------------------------------------------- engine
class _Engine:
    """Per-patient block statistics and the exact profiled criterion as a function of theta."""

    def __init__(self, U: np.ndarray, pcode: np.ndarray, tcode_p: np.ndarray, MT: np.ndarray,
                 MP: np.ndarray, p: int):
        self.P = int(pcode.max()) + 1
        self.n = U.shape[0]
        self.m = U.shape[1]
        self.p = p
        self.MT, self.MP = MT, MP
        self.qT, self.qP = MT.shape[1], MP.shape[1]
        m = self.m
        S = np.empty((m, m, self.P))  # S[i, j, p] = sum over patient p's rows of U_i U_j
        for i in range(m):
            for j in range(i, m):
                s = np.bincount(pcode, weights=U[:, i] * U[:, j], minlength=self.P)
                S[i, j] = s
                S[j, i] = s
        self.S = S
        # patients are numbered therapist by therapist: start index of each therapist's block
        order = np.argsort(tcode_p, kind="stable")
        if not np.array_equal(order, np.arange(self.P)):
            raise ValueError("patients must be numbered in therapist order")
        self.tstart = np.flatnonzero(np.r_[True, np.diff(tcode_p) != 0])
        self.T = len(self.tstart)
        self.ntheta_T = self.qT * (self.qT + 1) // 2
        self.ntheta_P = self.qP * (self.qP + 1) // 2
        self.nevals = 0

    def split(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (_lambda(theta[: self.ntheta_T], self.qT), _lambda(theta[self.ntheta_T:], self.qP))

    def blocks(self, theta: np.ndarray) -> dict[str, Any]:
        """Everything the criterion and the BLUPs need at ``theta``."""
        self.nevals += 1
        LT, LP = self.split(np.asarray(theta, dtype=float))
        S1, logdetA, _ = _woodbury_stage(self.S, self.MP @ LP)
        Tt = np.add.reduceat(S1, self.tstart, axis=2)  # (m, m, T): sums within therapists
        S2, logdetC, Cinv = _woodbury_stage(Tt, self.MT @ LT)
        Q = S2.sum(axis=2)
        return {"LT": LT, "LP": LP, "Q": Q, "S2": S2, "Cinv": Cinv,
                "logdetV": float(logdetA.sum() + logdetC.sum())}

    def criterion(self, theta: np.ndarray, reml: bool, sigma2: float | None = None,
                  parts: dict | None = None) -> float:
        """-2 logLik (ML) or the REML criterion at ``theta``; ``sigma2`` None = profiled out."""
        b = parts if parts is not None else self.blocks(theta)
        Q, p, n = b["Q"], self.p, self.n
        XtX, Xty, yty = Q[:p, :p], Q[:p, p], Q[p, p]
        try:
            cf = np.linalg.cholesky(XtX)
        except np.linalg.LinAlgError:
            return np.inf
        w = np.linalg.solve(cf, Xty)
        r2 = float(yty - w @ w)
        if not (r2 > 0):
            return np.inf
        dof = n - p if reml else n
        out = b["logdetV"]
        if reml:
            out += 2.0 * float(np.log(np.diag(cf)).sum())
        if sigma2 is None:
            return out + dof * (1.0 + math.log(2.0 * math.pi * r2 / dof))
        return out + dof * math.log(2.0 * math.pi * sigma2) + r2 / sigma2

    def beta_sigma(self, theta: np.ndarray, reml: bool, parts: dict | None = None):
        b = parts if parts is not None else self.blocks(theta)
        Q, p = b["Q"], self.p
        XtX, Xty, yty = Q[:p, :p], Q[:p, p], Q[p, p]
        beta = np.linalg.solve(XtX, Xty)
        r2 = float(yty - beta @ Xty)
        sigma2 = r2 / ((self.n - p) if reml else self.n)
        return beta, sigma2, np.linalg.inv(XtX) * sigma2, b


def _num_grad(f: Callable[[np.ndarray], float], x: np.ndarray, lower: np.ndarray, h: float = 1e-6,
              f0: float | None = None) -> np.ndarray:
    """Central differences (one-sided at a lower bound); forward differences when ``f0`` = f(x)
    is given (half the evaluations, for the inner optimisations of profiles)."""
    g = np.empty_like(x)
    for k in range(len(x)):
        e = np.zeros_like(x)
        e[k] = h
        if f0 is not None:
            g[k] = (f(x + e) - f0) / h
        elif x[k] - h < lower[k]:
            g[k] = (f(x + e) - f(x)) / h
        else:
            g[k] = (f(x + e) - f(x - e)) / (2 * h)
    return g


def _minimise(f: Callable[[np.ndarray], float], x0: np.ndarray, lower: np.ndarray, *, fast: bool = False
              ) -> tuple[np.ndarray, float, bool]:
    """Bounded quasi-Newton minimisation (L-BFGS-B, central-difference gradients), restarted once
    from its own answer, then a check of every bounded coordinate at its bound. ``fast``: forward
    differences, one run and looser tolerances (profile points, where ~1e-6 in the criterion is
    plenty against the chi-square quantile)."""
    bounds = [(lo if np.isfinite(lo) else None, None) for lo in lower]

    def fg_forward(x):
        fx = f(x)
        return fx, _num_grad(f, x, lower, h=1e-7, f0=fx)

    def fg_central(x):
        return f(x), _num_grad(f, x, lower)

    x = np.maximum(np.asarray(x0, dtype=float), lower)
    ok = True
    # a first run with forward differences (half the evaluations) gets close; a second one with
    # central differences and strict tolerances polishes (fast: the first run only)
    runs = ([(fg_forward, {"maxiter": 500, "ftol": 1e-12, "gtol": 1e-5, "maxls": 30})] if fast else
            [(fg_forward, {"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-6, "maxls": 50}),
             (fg_central, {"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-7, "maxls": 50})])
    for fg, opts in runs:
        res = optimize.minimize(fg, x, jac=True, method="L-BFGS-B", bounds=bounds, options=opts)
        x = res.x
        ok = bool(res.success) or "ABNORMAL" in str(res.message)
    fx = f(x)
    for k in np.flatnonzero(np.isfinite(lower)):
        if 0 < x[k] - lower[k] < 1e-3:
            xb = x.copy()
            xb[k] = lower[k]
            fb = f(xb)
            if fb <= fx + 1e-9:
                x, fx = xb, fb
    return x, fx, ok


# ------------------------------------------------------------------------------------- model
class GrowthModel:
    """``score ~ time + covariates + (1 + time | therapist) + (1 + time | therapist:patient)``.

    Parameters
    ----------
    y : score per session row.
    X : fixed-effects design per row; columns 0 and 1 must be the intercept and the time variable.
    names : names of the columns of ``X``.
    patient, therapist : IDs per row (each patient nested in one therapist).
    method : ``REML`` (default) or ``ML``.
    arm_slope_columns : with arm-specific therapist slopes, the column index of ``time:arm`` in X
        (the therapist block is then ``(1, time * (1 - arm), time * arm)``) and the two arm labels.
    """

    def __init__(self, y, X, names: Sequence[str], patient, therapist, *, method: str = "REML",
                 arm_slope_column: int | None = None, arm_levels: Sequence[str] = ("0", "1"),
                 time_name: str = "time"):
        method = str(method).upper()
        if method not in ("REML", "ML"):
            raise ModelError(f"method must be 'REML' or 'ML', got {method!r}")
        self.method = method
        y = np.asarray(y, dtype=float)
        X = np.asarray(X, dtype=float)
        if X.shape[0] != len(y) or X.shape[1] < 2:
            raise ModelError("the growth design needs an intercept and a time column, one row per session")
        self.names = list(names)
        self.time_name = time_name
        self.covariate_terms: list[str] = []
        self.arm_name: str | None = None
        tcode, tlabels = group_codes(np.asarray(therapist, dtype=object))
        # patients numbered therapist by therapist, then by label (factorize once, then work on codes)
        raw, plabels = pd.factorize(pd.Series(np.asarray(patient, dtype=object)).astype(str))
        t_of_p = np.full(len(plabels), -1, dtype=np.int64)
        t_of_p[raw] = tcode
        if not np.array_equal(t_of_p[raw], tcode):
            raise ModelError("each patient must be nested in one therapist (a patient has sessions with several therapists)")
        lab_rank = np.argsort(np.argsort(np.asarray(plabels, dtype=object), kind="stable"), kind="stable")
        order = np.lexsort((lab_rank, t_of_p))
        new_code = np.empty(len(plabels), dtype=np.int64)
        new_code[order] = np.arange(len(plabels))
        pcode = new_code[raw]
        pt = pd.DataFrame({"p": np.asarray(plabels, dtype=object)[order], "t": t_of_p[order]})
        self.patient_labels = pt["p"].to_numpy(dtype=object)
        self.therapist_labels = np.asarray(tlabels, dtype=object)
        self.tcode_p = pt["t"].to_numpy()
        self.pcode = pcode
        self.tcode = tcode
        self.y, self.X = y, X
        self.n_obs, self.p = X.shape
        self.n_patients = len(pt)
        self.n_therapists = len(tlabels)
        if np.linalg.matrix_rank(X) < self.p:
            raise ModelError(f"fixed-effects design {self.names} is rank deficient")
        if self.n_therapists < 3:
            raise ModelError("a growth model needs at least three therapists")
        m = self.p + 1
        MP = np.zeros((m, 2))
        MP[0, 0] = MP[1, 1] = 1.0
        if arm_slope_column is None:
            MT = MP.copy()
            self.re_names_T = ["therapist", "therapist_slope"]
        else:
            MT = np.zeros((m, 3))
            MT[0, 0] = 1.0
            MT[1, 1], MT[arm_slope_column, 1] = 1.0, -1.0
            MT[arm_slope_column, 2] = 1.0
            self.re_names_T = ["therapist"] + [f"therapist_slope[{a}]" for a in arm_levels]
        self.arm_slope_column = arm_slope_column
        self.arm_levels = [str(a) for a in arm_levels]
        self.re_names_P = ["patient", "patient_slope"]
        U = np.column_stack([X, y])
        self._eng = _Engine(U, pcode, self.tcode_p, MT, MP, self.p)
        e = self._eng
        self.lower = np.full(e.ntheta_T + e.ntheta_P, -np.inf)
        self.diag_idx = _diag_positions(e.qT) + [e.ntheta_T + k for k in _diag_positions(e.qP)]
        self.lower[self.diag_idx] = 0.0
        self.U = U

    @property
    def reml(self) -> bool:
        return self.method == "REML"

    def criterion(self, theta) -> float:
        return self._eng.criterion(np.asarray(theta, dtype=float), self.reml)

    def start(self) -> np.ndarray:
        th = np.zeros(len(self.lower))
        th[self.diag_idx] = 1.0
        return th

    def _escape_starts(self, theta: np.ndarray) -> list[np.ndarray]:
        """Starts that leave a boundary trap of the Cholesky parameterisation: when a diagonal
        entry of L is 0 while entries below it are not, the sign of those entries cannot change
        through the bound (a correlation stuck at the wrong sign); restart with them negated and
        the diagonal moved off the bound."""
        e = self._eng
        out = []
        for off, q in ((0, e.qT), (e.ntheta_T, e.qP)):
            r, c = _tri_index(q)
            for j in range(q):
                kd = off + [k for k in range(len(r)) if r[k] == j and c[k] == j][0]
                below = [off + k for k in range(len(r)) if c[k] == j and r[k] > j]
                if theta[kd] < SINGULAR_TOL and below and np.any(np.abs(theta[below]) > 1e-6):
                    th = theta.copy()
                    th[below] = -th[below]
                    th[kd] = max(0.5 * float(np.max(np.abs(theta[below]))), 0.05)
                    out.append(th)
        return out

    #: above this many patients the optimiser is started from a fit to a subset of therapists
    WARM_START_PATIENTS = 20000

    def _subset_start(self) -> np.ndarray:
        """theta fitted to every k-th therapist (about WARM_START_PATIENTS / 2 patients): a start
        close to the optimum, so that the full-data optimisation needs few iterations."""
        k = int(math.ceil(self.n_patients / (self.WARM_START_PATIENTS / 2)))
        keep = (self.tcode % k) == 0
        sub = GrowthModel(self.y[keep], self.X[keep], self.names, self.patient_labels[self.pcode[keep]],
                          self.therapist_labels[self.tcode[keep]], method=self.method,
                          arm_slope_column=self.arm_slope_column, arm_levels=self.arm_levels,
                          time_name=self.time_name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sub.fit().theta

    def fit(self, start: np.ndarray | None = None) -> GrowthResults:
        if start is None and self.n_patients > self.WARM_START_PATIENTS:
            try:
                start = self._subset_start()
            except (ModelError, np.linalg.LinAlgError):
                start = None
        x0 = self.start() if start is None else np.asarray(start, dtype=float)
        best = _minimise(self.criterion, x0, self.lower)
        tried = 0
        queue = self._escape_starts(best[0])
        while queue and tried < 6:
            cand = _minimise(self.criterion, queue.pop(0), self.lower)
            tried += 1
            if cand[1] < best[1] - 1e-9:
                best = cand
                queue = self._escape_starts(best[0])
        theta, fval, ok = best
        return GrowthResults(self, theta, fval, ok)

    # ----------------------------------------------------------------- construction from data
    @classmethod
    def from_frame(cls, df: pd.DataFrame, outcome: str, time: str, covariates: Sequence[str] = (), *,
                   patient: str = "patient", therapist: str = "therapist", method: str = "REML",
                   arm: str | None = None, feedback_level=None, arm_slopes: bool = False
                   ) -> GrowthModel:
        """From a session table: ``outcome`` and ``time`` columns, patient-level ``covariates``;
        with ``arm`` the 0/1 feedback indicator and its interaction with time enter the fixed
        part, and ``arm_slopes`` gives one therapist slope variance per arm."""
        terms = [time, *[c for c in covariates if c != arm]]
        X, names = fixed_effects_matrix(df, terms)
        arm_col = None
        levels = ("0", "1")
        if arm is not None:
            values = df[arm]
            lv = sorted(pd.unique(values.dropna()), key=str)
            fb = feedback_level if feedback_level is not None else lv[-1]
            ind = (values.astype(str) == str(fb)).to_numpy(dtype=float)
            other = [v for v in lv if str(v) != str(fb)]
            levels = (str(other[0]) if other else "0", str(fb))
            X = np.column_stack([X, ind, ind * X[:, 1]])
            names = names + [arm, f"{time}:{arm}"]
            arm_col = X.shape[1] - 1 if arm_slopes else None
        elif arm_slopes:
            raise ModelError("arm-specific therapist slopes need an arm column")
        model = cls(df[outcome].to_numpy(dtype=float), X, names, df[patient].to_numpy(),
                    df[therapist].to_numpy(), method=method, arm_slope_column=arm_col,
                    arm_levels=levels, time_name=time)
        model.covariate_terms = list(terms[1:])
        model.arm_name = arm
        return model


@dataclass
class GrowthResults:
    model: GrowthModel
    theta: np.ndarray
    criterion_value: float
    optimizer_ok: bool
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        m = self.model
        e = m._eng
        self.beta, self.sigma2, self.vcov, self._parts = e.beta_sigma(self.theta, m.reml)
        self.se = np.sqrt(np.diag(self.vcov))
        self.LT, self.LP = e.split(self.theta)
        self.cov_T = self.sigma2 * self.LT @ self.LT.T
        self.cov_P = self.sigma2 * self.LP @ self.LP.T
        self.loglik = -0.5 * self.criterion_value
        self.singular = bool(np.any(self.theta[m.diag_idx] < SINGULAR_TOL))
        # convergence: the Newton step of every free coordinate (gradient over the diagonal of the
        # Hessian, both by central differences) is below 1e-4 in theta units
        f = m.criterion
        h = 1e-4
        steps = np.zeros(len(self.theta))
        for k in range(len(self.theta)):
            e_k = np.zeros(len(self.theta))
            e_k[k] = h
            if self.theta[k] - h < m.lower[k]:
                fp = f(self.theta + e_k)
                if fp >= self.criterion_value:  # at its bound and rising into the interior
                    continue
                steps[k] = np.inf
                continue
            fp, fm = f(self.theta + e_k), f(self.theta - e_k)
            g = (fp - fm) / (2 * h)
            hkk = (fp - 2 * self.criterion_value + fm) / (h * h)
            steps[k] = abs(g / hkk) if hkk > 0 else np.inf
        self.gradient_max = float(np.max(steps)) if len(steps) else 0.0
        self.converged = bool(self.optimizer_ok and np.isfinite(self.criterion_value) and self.gradient_max < 1e-4)
        if self.singular:
            zero = [n for n, k in zip(self.theta_names(), range(len(self.theta)))
                    if k in m.diag_idx and self.theta[k] < SINGULAR_TOL]
            msg = (f"singular fit: the growth model's random-effects covariance is at the boundary "
                   f"(theta {', '.join(zero)} < {SINGULAR_TOL:g}); a variance is zero or a correlation is +-1")
            self.warnings.append(msg)
            warnings.warn(msg, SingularFitWarning, stacklevel=2)
        if not self.converged:
            msg = (f"the growth model's optimiser did not converge (largest Newton step {self.gradient_max:.2g} "
                   "in theta at the reported optimum)")
            self.warnings.append(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=2)

    # ------------------------------------------------------------------------- parameters
    def theta_names(self) -> list[str]:
        m = self.model
        out = []
        for block, names in (("therapist", m.re_names_T), ("patient", m.re_names_P)):
            r, c = _tri_index(len(names))
            out += [f"{block}:{names[i]}" if i == j else f"{block}:{names[i]}~{names[j]}" for i, j in zip(r, c)]
        return out

    @property
    def fe_params(self) -> pd.Series:
        return pd.Series(self.beta, index=self.model.names)

    @property
    def bse(self) -> pd.Series:
        return pd.Series(self.se, index=self.model.names)

    def variance_components(self) -> dict[str, float]:
        m = self.model
        out = {n: float(self.cov_T[i, i]) for i, n in enumerate(m.re_names_T)}
        out.update({n: float(self.cov_P[i, i]) for i, n in enumerate(m.re_names_P)})
        out["residual"] = float(self.sigma2)
        return out

    def correlations(self) -> dict[str, float | None]:
        m = self.model
        out: dict[str, float | None] = {}
        for cov, names in ((self.cov_T, m.re_names_T), (self.cov_P, m.re_names_P)):
            for i in range(len(names)):
                for j in range(i):
                    d = cov[i, i] * cov[j, j]
                    out[f"{names[j]}~{names[i]}"] = float(cov[i, j] / math.sqrt(d)) if d > 0 else None
        return out

    def slope_share(self, theta: np.ndarray | None = None) -> float:
        """Therapist share of the variance in rate of change (therapist / (therapist + patient) slope
        variance); with arm-specific slopes, the mean of the arms' therapist slope variances."""
        th = self.theta if theta is None else theta
        LT, LP = self.model._eng.split(th)
        dT = (LT @ LT.T).diagonal()[1:].mean()
        dP = (LP @ LP.T)[1, 1]
        return float(dT / (dT + dP)) if dT + dP > 0 else float("nan")

    # ------------------------------------------------------------------------- profiles
    def _full_criterion(self, theta: np.ndarray, sigma2: float) -> float:
        return self.model._eng.criterion(theta, self.model.reml, sigma2=sigma2)

    def _rows(self, block: str, i: int) -> tuple[int, list[int]]:
        """theta positions of row ``i`` of L_T or L_P."""
        e = self.model._eng
        q = e.qT if block == "T" else e.qP
        off = 0 if block == "T" else e.ntheta_T
        r, c = _tri_index(q)
        return off, [off + k for k in range(len(r)) if r[k] == i]

    def _two_starts(self, f, warm: np.ndarray) -> tuple[np.ndarray, float]:
        """Minimise a profile's inner criterion from the previous profile point and, when that
        lands far above the optimum's neighbourhood, also from the estimate; the better answer."""
        best = _minimise(f, warm, self.model.lower, fast=True)
        return best[0], best[1]

    def _profile_fn(self, name: str) -> tuple[Callable[[float], float], float, float | None]:
        """(profiled criterion at value v, the estimate, an upper limit of v or None) for ``name``:
        a variance component or ``slope_share``."""
        m = self.model
        e = m._eng
        # warm starts: each profile point starts from the nearest point already profiled (starting
        # from a far one can land in a worse local optimum and break the root bracketing)
        starts: dict[float, np.ndarray] = {}

        def nearest(v: float) -> np.ndarray:
            return starts[min(starts, key=lambda u: abs(u - v))].copy()

        if name == "slope_share":
            if m.arm_slope_column is not None:
                raise ModelError("the slope-share profile is for models without arm-specific slopes")
            _, rowT = self._rows("T", 1)
            _, rowP = self._rows("P", 1)

            def project(th: np.ndarray, s: float) -> np.ndarray | None:
                a = float(np.sum(th[rowT] ** 2))
                b = float(np.sum(th[rowP] ** 2))
                if a + b <= 0:
                    return None
                tot = a + b
                out = th.copy()
                out[rowT] = th[rowT] * (math.sqrt(s * tot / a) if a > 0 else 0.0)
                out[rowP] = th[rowP] * (math.sqrt((1 - s) * tot / b) if b > 0 else 0.0)
                if a == 0 and s > 0:
                    out[rowT[-1]] = math.sqrt(s * tot)
                if b == 0 and s < 1:
                    out[rowP[-1]] = math.sqrt((1 - s) * tot)
                return out

            def prof(s: float) -> float:
                def f(th):
                    t2 = project(th, s)
                    return np.inf if t2 is None else m.criterion(t2)
                x, fx = self._two_starts(f, nearest(s))
                t2 = project(x, s)
                if t2 is not None:
                    starts[s] = t2
                return fx

            starts[self.slope_share()] = self.theta.copy()
            return prof, self.slope_share(), 1.0

        if name == "residual":
            def prof(v: float) -> float:
                x0 = nearest(v)
                x0 = x0 * math.sqrt(self.sigma2 / v)  # the other variances start at their estimates
                x, fx = self._two_starts(lambda th: self._full_criterion(th, v), x0)
                starts[v] = x
                return fx

            starts[self.sigma2] = self.theta.copy()
            return prof, self.sigma2, None
        if name in m.re_names_T:
            block, i = "T", m.re_names_T.index(name)
        elif name in m.re_names_P:
            block, i = "P", m.re_names_P.index(name)
        else:
            raise ModelError(f"no variance component {name!r}")
        _, row = self._rows(block, i)
        diag = row[-1]

        def prof(v: float) -> float:
            # hold sigma2 * (L L')_ii = v: sigma2 follows from theta's row i
            def f(th):
                d = float(np.sum(th[row] ** 2))
                if v == 0.0:
                    th2 = th.copy()
                    th2[row] = 0.0
                    b = e.blocks(th2)
                    return e.criterion(th2, m.reml, parts=b)
                if d <= 1e-300:
                    return np.inf
                return self._full_criterion(th, v / d)

            x0 = nearest(v)
            if v > 0 and float(np.sum(x0[row] ** 2)) < 1e-12:
                x0[diag] = max(x0[diag], 1e-3)
            d0 = float(np.sum(x0[row] ** 2))
            if v > 0 and d0 > 0:
                # rescale the row so that sigma2 starts at its estimate: only the component moves
                x0[row] = x0[row] * math.sqrt(v / (self.sigma2 * d0))
            x, fx = self._two_starts(f, x0)
            starts[v] = x
            return fx

        est = self.variance_components()[name]
        starts[est] = self.theta.copy()
        return prof, est, None

    def profile_interval(self, name: str, level: float = 0.95) -> tuple[float, float]:
        """Profile-likelihood interval of a variance component or of ``slope_share`` (the deviance
        rises by the chi-square(1) quantile of ``level`` at each end; a boundary estimate keeps 0
        as its lower end when the deviance at 0 is within the quantile)."""
        prof, est, upper_limit = self._profile_fn(name)
        q = float(stats.chi2.ppf(level, 1))
        f0 = self.criterion_value

        cache: dict[float, float] = {}

        def excess(v: float) -> float:
            if v not in cache:
                cache[v] = prof(v) - f0
            return cache[v]

        ends = []
        for direction in (-1, 1):
            # walk away from the estimate (warm starts follow the walk), then Brent on the bracket
            prev = est
            found = None
            if direction < 0:
                if est <= 0:
                    ends.append(0.0)
                    continue
                steps = [est * math.exp(-0.25 * 2 ** k) for k in range(6)] + [0.0]
            else:
                if upper_limit is not None:
                    base = est if est > 0 else 1e-4
                    steps = [min(upper_limit, base + (upper_limit - base) * (1 - math.exp(-0.25 * 2 ** k)))
                             for k in range(7)] + [upper_limit]
                else:
                    base = est if est > 0 else self.sigma2 * 1e-3
                    steps = [base * math.exp(0.25 * 2 ** k) for k in range(8)]
            for v in steps:
                ex = excess(v)
                if ex >= q:
                    found = (prev, v)
                    break
                prev = v
            if found is None:
                ends.append(steps[-1] if (direction < 0 or upper_limit is not None) else float("inf"))
                continue
            start_theta = None
            a, b = sorted(found)
            root = optimize.brentq(lambda v: excess(v) - q, a, b, xtol=1e-8 * max(abs(est), 1e-8), rtol=1e-6,
                                   maxiter=100)
            del start_theta
            ends.append(float(root))
        return ends[0], ends[1]

    # ------------------------------------------------------------------------- random effects
    def therapist_effects(self, level: float = 0.95, higher_is_better: bool | None = None) -> pd.DataFrame:
        """Conditional modes (BLUPs) of the therapists' intercept and slope effects with conditional
        intervals (``sigma2 L_T C_t^{-1} L_T'``, lme4's ``condVar``). ``classification`` is that of
        the slope effect: a therapist whose patients' scores fall faster (negative slope effect on a
        lower-is-better score) is "better than average" when the interval excludes 0. Columns:
        ``therapist``, ``caseload``, ``sessions``, ``intercept_effect`` (``_se``, ``_ci_low``,
        ``_ci_high``), ``effect``/``effect_se``/``ci_low``/``ci_high`` (the slope), ``classification``."""
        m = self.model
        e = m._eng
        b = self._parts
        c = np.r_[-self.beta, 1.0]
        LT = self.LT
        # u_t = L_T C_t^{-1} L_T' M_T' (U_t' V_bar^-1 U_t) c ; equivalently D M_T' S2_t c
        r = np.einsum("ijt,j->ti", b["S2"], c)  # (T, m): U_t' V_t^{-1} r_t
        u = (LT @ LT.T @ e.MT.T @ r.T).T  # (T, qT)
        Cinv = b["Cinv"]
        cv = self.sigma2 * np.einsum("ij,jkt,lk->til", LT, Cinv, LT)
        z = float(stats.norm.ppf(0.5 + level / 2))
        n_pat = np.bincount(m.tcode_p, minlength=m.n_therapists)
        n_ses = np.bincount(m.tcode, minlength=m.n_therapists)
        out = pd.DataFrame({"therapist": m.therapist_labels, "caseload": n_pat, "sessions": n_ses})
        # the slope effect is the therapist's effect ("effect", "ci_low", ...; what the reports plot),
        # the intercept effect is "intercept_effect", ...; arm-specific slopes "slope_effect[<arm>]"
        for k, nm in enumerate(m.re_names_T):
            se = np.sqrt(np.maximum(cv[:, k, k], 0.0))
            if k == 0:
                cols = ("intercept_effect", "intercept_se", "intercept_ci_low", "intercept_ci_high")
            elif nm == "therapist_slope":
                cols = ("effect", "effect_se", "ci_low", "ci_high")
            else:
                a = nm[len("therapist_slope["):-1]
                cols = (f"slope_effect[{a}]", f"slope_effect_se[{a}]", f"slope_ci_low[{a}]", f"slope_ci_high[{a}]")
            out[cols[0]] = u[:, k]
            out[cols[1]] = se
            out[cols[2]] = u[:, k] - z * se
            out[cols[3]] = u[:, k] + z * se
        if "ci_low" in out.columns:
            out["classification"] = classify_effects(out["ci_low"], out["ci_high"], higher_is_better)
        return out

    # ------------------------------------------------------------------------- predictions
    def marginal_moments(self, X: np.ndarray, idx_first: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Mean, variance, and covariance with the patient's first row, per row of ``X`` (design
        rows in the model's column order); ``idx_first[i]`` is the row index of row i's intake."""
        e = self.model._eng
        mu = X @ self.beta
        ZT = X @ e.MT[:-1]
        ZP = X @ e.MP[:-1]
        ZT1, ZP1 = ZT[idx_first], ZP[idx_first]
        var = (np.einsum("ni,ij,nj->n", ZT, self.cov_T, ZT) + np.einsum("ni,ij,nj->n", ZP, self.cov_P, ZP)
               + self.sigma2)
        cov1 = (np.einsum("ni,ij,nj->n", ZT, self.cov_T, ZT1) + np.einsum("ni,ij,nj->n", ZP, self.cov_P, ZP1))
        cov1 = cov1 + np.where(np.arange(len(X)) == idx_first, self.sigma2, 0.0)
        return mu, var, cov1, mu[idx_first]

    def summary(self) -> str:
        lines = [f"Growth model ({self.model.method}), {self.model.n_obs} sessions, "
                 f"{self.model.n_patients} patients, {self.model.n_therapists} therapists",
                 f"logLik {self.loglik:.4f}  converged {self.converged}  singular {self.singular}"]
        for k, v in self.variance_components().items():
            lines.append(f"  {k:24s} {v:.6g}")
        for k, v in self.fe_params.items():
            lines.append(f"  {k:24s} {v:.6g} (se {self.bse[k]:.4g})")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------- simulation
def simulate_growth(n_therapists: int = 40, caseload: float = 20.0, *, sessions: tuple[int, int] = (4, 12),
                    beta: tuple[float, float] = (16.0, -3.0), cov_T: Sequence[Sequence[float]] = ((1.0, -0.2), (-0.2, 0.4)),
                    cov_P: Sequence[Sequence[float]] = ((16.0, -2.0), (-2.0, 4.0)), residual: float = 4.0,
                    deteriorate: float = 0.0, deterioration_slope: float = 3.0, seed: int = 1) -> pd.DataFrame:
    """Simulated session data from the growth model (time = log session number) with known truth.

    Caseloads are Poisson(``caseload``) (at least 2), sessions per patient uniform on ``sessions``.
    A share ``deteriorate`` of patients follow a deteriorating course instead: their patient slope is
    ``+deterioration_slope`` (on log session) plus their own slope deviation, against the mean slope
    ``beta[1]``. Columns: ``patient``, ``therapist``, ``session``, ``lt``, ``score``, ``deteriorating``.
    """
    rng = np.random.default_rng(seed)
    cov_T = np.asarray(cov_T, dtype=float)
    cov_P = np.asarray(cov_P, dtype=float)
    nt = np.maximum(rng.poisson(caseload, size=n_therapists), 2)
    u = rng.multivariate_normal(np.zeros(2), cov_T, size=n_therapists, method="eigh")
    P = int(nt.sum())
    tp = np.repeat(np.arange(n_therapists), nt)
    v = rng.multivariate_normal(np.zeros(2), cov_P, size=P, method="eigh")
    det = rng.random(P) < deteriorate
    ns = rng.integers(sessions[0], sessions[1] + 1, size=P)
    pr = np.repeat(np.arange(P), ns)
    s = np.concatenate([np.arange(1, k + 1) for k in ns]).astype(float)
    lt = np.log(s)
    slope = beta[1] + u[tp[pr], 1] + v[pr, 1] + np.where(det[pr], deterioration_slope - beta[1], 0.0)
    y = beta[0] + u[tp[pr], 0] + v[pr, 0] + slope * lt + rng.normal(0.0, math.sqrt(residual), size=len(pr))
    width_t = len(str(n_therapists))
    width_p = len(str(P))
    return pd.DataFrame({
        "patient": [f"P{k:0{width_p}d}" for k in pr],
        "therapist": [f"T{k:0{width_t}d}" for k in tp[pr]],
        "session": s.astype(int), "lt": lt, "score": y, "deteriorating": det[pr].astype(int),
    })
