"""Exact REML/ML for Gaussian models with ``q`` correlated random effects per therapist.

The model (lme4: ``y ~ X + (Z | therapist)``, e.g. ``(1 + feedback | therapist)``)::

    y_i = X_i b + Z_i u_i + e_i,    u_i ~ N(0, sigma^2 Lambda Lambda'),    e_i ~ N(0, sigma^2 I)

with ``Lambda`` lower triangular: the relative Cholesky factor, parameterised as lme4's ``theta``
(its lower triangle, column by column; the diagonal is bounded below by 0). The boundary of the
parameter space — a variance of 0, a correlation of +-1 — is a diagonal element of exactly 0, so
the optimiser reaches it exactly and singular fits are flagged as lme4's ``isSingular`` flags
them (a diagonal theta below 1e-4).

Everything the criterion needs is a per-therapist sufficient statistic, computed in one vectorised
pass: ``Z_i'Z_i`` (q x q), ``Z_i'[X y]`` (q x (p+1)) and the pooled ``[X y]'[X y]``. With
``M_i = I + Lambda' Z_i'Z_i Lambda`` (Cholesky ``L_i``) and ``C_i = L_i^{-1} Lambda' Z_i'[X y]``::

    [X y]' (V / sigma^2)^{-1} [X y] = [X y]'[X y] - sum_i C_i' C_i,     log|V / sigma^2| = sum_i log|M_i|

(Woodbury), so one evaluation costs O(therapists x q^3 + therapists x q x p^2) whatever the number
of patients. ``sigma^2`` and ``b`` are profiled out analytically as in lme4, leaving the criterion
in ``theta`` only::

    ML    -2 logLik = n (1 + log(2 pi r / n)) + log|V/s2|
    REML  -2 logLik = m (1 + log(2 pi r / m)) + log|V/s2| + log|X'(V/s2)^{-1}X|,   m = n - p

(lme4's ``deviance`` / ``REMLcrit``); ``vcov = s2 (X'(V/s2)^{-1}X)^{-1}`` is lme4's ``vcov``.

Two optional extensions make every Gaussian therapist model an instance of the engine:

- a cluster level (services, sites, trials; lme4's ``(1 | cluster/therapist)``): ``V/s2 = blockdiag_c
  (blockdiag_i V_i + g_c 11')``, inverted by Woodbury once more from per-therapist sums
  ``b_i = 1'V_i^{-1}[X y]`` and ``e_i = 1'V_i^{-1}1`` summed by cluster; its theta ``sqrt(g_c)`` is the
  last element of theta;
- residual strata (arms with their own residual variance): ``e ~ N(0, s2 R)``, ``R = diag(r_s)``
  with ``r_0 = 1``; the statistics are kept per stratum and weighted by ``1 / r_s``, and
  ``log|R| = sum_s n_s log r_s`` enters ``log|V/s2|``.

``diagonal=True`` fixes the off-diagonal elements of ``Lambda`` at 0 (uncorrelated random effects:
theta is the q relative SDs). For one random intercept without strata the criterion sums over
distinct caseloads (therapists with the same caseload share their weights), not over therapists.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import numpy as np
from scipy import optimize

__all__ = ["BlockEngine", "theta_to_lambda", "theta_lower_bounds", "SINGULAR_TOL", "minimise_theta", "minimise_box",
           "newton_minimise", "newton_box", "fd_derivatives", "centre_design", "gls_from_cholesky", "psd_cholesky"]

LOG2PI = math.log(2.0 * math.pi)
#: lme4's ``isSingular`` tolerance on the diagonal of theta
SINGULAR_TOL = 1e-4


def theta_lower_bounds(q: int) -> np.ndarray:
    """lme4's lower bounds of theta (lower triangle column by column): 0 on the diagonal, else -inf."""
    lows = []
    for j in range(q):
        for i in range(j, q):
            lows.append(0.0 if i == j else -np.inf)
    return np.array(lows)


def theta_to_lambda(theta: np.ndarray, q: int) -> np.ndarray:
    """The lower-triangular ``Lambda`` from theta (lme4's order: column by column)."""
    lam = np.zeros((q, q))
    k = 0
    for j in range(q):
        for i in range(j, q):
            lam[i, j] = theta[k]
            k += 1
    return lam


def centre_design(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, int | None]:
    """``(Xc, S, k0)``: the columns of ``X`` centred at their means when ``X`` has an intercept
    column ``k0`` (``Xc = X S``, ``S = I - e_k0 mu'``: an exact reparameterisation with unit
    determinant, undone by ``b = S bc``), which keeps cross-products well conditioned."""
    n, p = X.shape
    ones = np.flatnonzero(np.all(X == 1.0, axis=0)) if n else []
    k0 = int(ones[0]) if len(ones) else None
    S = np.eye(p)
    if k0 is None:
        return X, S, None
    mu = X.mean(axis=0)
    mu[k0] = 0.0
    S[k0, :] -= mu
    return X - mu, S, k0


def gls_from_cholesky(R: np.ndarray, S: np.ndarray, k0: int | None, shift_y: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GLS fixed effects from the Cholesky factor ``R`` of ``[X y]'W[X y]`` (centred scale):
    ``(b, (X'WX)^{-1}, b_centred)`` with the centring of :func:`centre_design` undone."""
    p = R.shape[0] - 1
    Rinv = np.linalg.inv(R[:p, :p])  # p x p lower triangular; tiny, and cheaper than scipy here
    bc = Rinv.T @ R[p, :p]
    covc = Rinv.T @ Rinv
    b = S @ bc
    if k0 is not None:
        b[k0] += shift_y
    return b, S @ covc @ S.T, bc


def lambda_to_theta(lam: np.ndarray) -> np.ndarray:
    """Inverse of :func:`theta_to_lambda`."""
    q = lam.shape[0]
    return np.array([lam[i, j] for j in range(q) for i in range(j, q)])


def psd_cholesky(S: np.ndarray, rtol: float = 1e-12) -> np.ndarray:
    """Lower-triangular ``L`` with ``L L' = S`` for a positive *semi*-definite ``S`` (a pivot below
    ``rtol`` times the largest diagonal element is exactly 0, with its column), with a
    non-negative diagonal: the theta of a singular covariance sits exactly on the boundary."""
    q = S.shape[0]
    L = np.zeros((q, q))
    tol = rtol * max(float(np.max(np.abs(np.diag(S)))), 1e-300)
    for j in range(q):
        d = S[j, j] - L[j, :j] @ L[j, :j]
        if d <= tol:
            continue
        L[j, j] = math.sqrt(d)
        for i in range(j + 1, q):
            L[i, j] = (S[i, j] - L[i, :j] @ L[j, :j]) / L[j, j]
    return L


class BlockEngine:
    """Per-therapist sufficient statistics of ``y ~ X + (Z | group)`` and the profiled criterion.

    ``codes`` are group (therapist) codes 0..G-1. Covariates and outcome are centred when ``X`` has
    an intercept column (an exact reparameterisation with unit Jacobian, undone in :meth:`fixed`),
    which keeps the cross-products well conditioned. When ``Z``'s first column is the intercept its
    other columns are centred too, ``Z = Zc T`` (``T`` unit upper triangular): the random effects
    become ``T u``, an exact reparameterisation of an unstructured covariance (``Lambda_c = T
    Lambda``); the optimiser works on the well-conditioned centred scale and reports lme4's theta of
    the model as given.
    """

    def __init__(self, y: np.ndarray, X: np.ndarray, Z: np.ndarray, codes: np.ndarray, G: int, *,
                 cluster: np.ndarray | None = None, strata: np.ndarray | None = None, diagonal: bool = False):
        n, p = X.shape
        q = Z.shape[1]
        self.n, self.p, self.q, self.G = n, p, q, G
        self.codes = np.asarray(codes, dtype=np.int64)
        self.X, self.Z = X, Z
        self.diagonal = bool(diagonal)
        #: cluster code of each therapist (None: no cluster level) and the number of clusters
        self.cluster = None if cluster is None else np.asarray(cluster, dtype=np.int64)
        self.C = 0 if cluster is None else int(self.cluster.max()) + 1
        #: residual stratum of each patient (None: one residual variance) and the number of strata
        self.strata = None if strata is None else np.asarray(strata, dtype=np.int64)
        self.n_strata = 1 if strata is None else int(self.strata.max()) + 1
        self.Xc, self.S, self.k0 = centre_design(X)
        self.T = np.eye(q)
        Zc = Z
        if q > 1 and n and not self.diagonal and np.all(Z[:, 0] == 1.0):
            mz = Z.mean(axis=0)
            mz[0] = 0.0
            Zc = Z - mz
            self.T[0, 1:] = mz[1:]  # Z = Zc T
        self.Zc = Zc
        self.Tinv = np.linalg.inv(self.T)
        self.ZZ = self._group_cross(Zc, Zc)  # (G, q, q)
        self.ZX = self._group_cross(Zc, self.Xc)  # (G, q, p)
        self._zz_diagonal = bool(q == 2 and np.all(self.ZZ[:, 0, 1] == 0.0))
        self.n_theta = q if self.diagonal else q * (q + 1) // 2  # theta of the therapist level
        self.lows = np.zeros(q) if self.diagonal else theta_lower_bounds(q)
        if self.C:
            self.lows = np.append(self.lows, 0.0)
        if self.strata is not None:
            self._key = self.strata * G + self.codes
            self.n_stratum = np.bincount(self.strata)  # (n_strata = the largest stratum code + 1 entries)
            self.ZZs = self._stratum_cross(Zc, Zc)  # (strata, G, q, q)
            self.ZXs = self._stratum_cross(Zc, self.Xc)
            self.XXs = np.stack([self.Xc[self.strata == s].T @ self.Xc[self.strata == s]
                                 for s in range(self.n_strata)])
        # one random intercept, one residual variance: sums over distinct caseloads
        self._caseloads = bool(q == 1 and self.strata is None and n and np.all(Z[:, 0] == 1.0))
        if self._caseloads:
            self.ni = self.ZZ[:, 0, 0].copy()
            self._nu, self._ninv = np.unique(self.ni, return_inverse=True)
            self._cnt_u = np.bincount(self._ninv)  # therapists per distinct caseload
            self.xbar = self.ZX[:, 0, :] / self.ni[:, None]
            self.Dx = self.Xc - self.xbar[self.codes]
            self.WXX = self.Dx.T @ self.Dx
        else:
            self.XX = self.Xc.T @ self.Xc
        self.set_y(y)

    def _group_cross(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        out = np.empty((self.G, A.shape[1], B.shape[1]))
        a_ones = [bool(np.all(A[:, i] == 1.0)) for i in range(A.shape[1])]  # (no products with 1)
        b_ones = [bool(np.all(B[:, j] == 1.0)) for j in range(B.shape[1])]
        for i in range(A.shape[1]):
            for j in range(B.shape[1]):
                if a_ones[i] and b_ones[j]:
                    w = None
                else:
                    w = B[:, j] if a_ones[i] else A[:, i] if b_ones[j] else A[:, i] * B[:, j]
                out[:, i, j] = np.bincount(self.codes, weights=w, minlength=self.G)
        return out

    def _stratum_cross(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        """Per-(stratum, therapist) cross-products ``A'B``: (strata, G, a, b)."""
        m = self.n_strata * self.G
        out = np.empty((m, A.shape[1], B.shape[1]))
        for i in range(A.shape[1]):
            for j in range(B.shape[1]):
                out[:, i, j] = np.bincount(self._key, weights=A[:, i] * B[:, j], minlength=m)
        return out.reshape(self.n_strata, self.G, A.shape[1], B.shape[1])

    def set_y(self, y: np.ndarray) -> None:
        """(Re)compute the outcome's statistics (the design's are kept: used by the bootstrap)."""
        y = np.asarray(y, dtype=float)
        self.shift_y = float(y.mean()) if self.k0 is not None else 0.0
        yc = y - self.shift_y
        self.yc = yc
        p = self.p
        self.ZA = np.concatenate([self.ZX, self._group_cross(self.Zc, yc[:, None])], axis=2)
        if self._caseloads:  # (the random intercept needs nothing else)
            self._set_y_caseloads(yc)
            return
        AA = np.empty((p + 1, p + 1))
        AA[:p, :p] = self.XX
        AA[:p, p] = AA[p, :p] = self.Xc.T @ yc
        AA[p, p] = yc @ yc
        self.AA = AA
        if self.q <= 2:  # per-therapist outer products of Z'A rows, for the closed-form Gram sums
            Z0 = self.ZA[:, 0, :]
            self.P00 = (Z0[:, :, None] * Z0[:, None, :]).reshape(self.G, -1)
            if self.q == 2:
                Z1 = self.ZA[:, 1, :]
                self.P11 = (Z1[:, :, None] * Z1[:, None, :]).reshape(self.G, -1)
                P01 = Z0[:, :, None] * Z1[:, None, :]
                self.P01 = (P01 + P01.transpose(0, 2, 1)).reshape(self.G, -1)
        A1 = np.column_stack([self.Xc, yc])
        if self.C:  # the cluster level's per-therapist sums of 1 (h: Z'1, o: 1'[X y], counts)
            ones = np.ones(self.n)[:, None]
            self._h = self._group_cross(ones, self.Zc)[:, 0, :]
            self._o = self._group_cross(ones, A1)[:, 0, :]
            self._cnt = np.bincount(self.codes, minlength=self.G)
        if self.strata is not None:
            self.ZAs = np.concatenate([self.ZXs, self._stratum_cross(self.Zc, yc[:, None])], axis=3)
            self.AAs = np.stack([A1[self.strata == s].T @ A1[self.strata == s] for s in range(self.n_strata)])
            if self.C:
                ones = np.ones(self.n)[:, None]
                self._hs = self._stratum_cross(ones, self.Zc)[:, :, 0, :]
                self._os = self._stratum_cross(ones, A1)[:, :, 0, :]
                self._cnts = np.bincount(self._key, minlength=self.n_strata * self.G).reshape(self.n_strata, self.G)

    def _set_y_caseloads(self, yc: np.ndarray) -> None:
        """Within-therapist cross-products and the therapists' means summed by caseload (and by
        cluster): ``[X y]'W[X y] = within + sum_u a_u sum_{n_i = u} m_i m_i'`` with
        ``a_u = u / (1 + u g)``, as well conditioned as the data whatever ``g``."""
        p, k = self.p, self.p + 1
        ybar = self.ZA[:, 0, p] / self.ni
        dy = yc - ybar[self.codes]
        within = np.empty((k, k))
        within[:p, :p] = self.WXX
        within[:p, p] = within[p, :p] = self.Dx.T @ dy
        within[p, p] = dy @ dy
        self.within = within
        self.means = np.column_stack([self.xbar, ybar])
        U = len(self._nu)
        mm = (self.means[:, :, None] * self.means[:, None, :]).reshape(self.G, -1)
        self._mm_u = np.stack([np.bincount(self._ninv, weights=mm[:, j], minlength=U) for j in range(k * k)], axis=1)
        if self.C:
            idx = self.cluster * U + self._ninv
            self._cnt_cu = np.bincount(idx, minlength=self.C * U).reshape(self.C, U)
            m_cu = np.stack([np.bincount(idx, weights=self.means[:, j], minlength=self.C * U)
                             for j in range(k)], axis=1).reshape(self.C, U, k)
            self._m_cku = np.ascontiguousarray(m_cu.transpose(0, 2, 1).reshape(self.C * k, U))

    def crit_many(self, thetas: np.ndarray, reml: bool) -> np.ndarray:
        """:meth:`crit` at each row of ``thetas``: one vectorised pass over the batch for the random
        intercept (caseload sums; the optimiser's grids), a loop otherwise."""
        thetas = np.asarray(thetas)
        if not self._caseloads:
            return np.array([self.crit(t, reml) for t in thetas])
        p, k, B = self.p, self.p + 1, len(thetas)
        ng = np.outer(thetas[:, 0] ** 2, self._nu)  # (B, distinct caseloads)
        au = self._nu / (1.0 + ng)
        ldv = np.log1p(ng) @ self._cnt_u
        A = self.within + (au @ self._mm_u).reshape(B, k, k)
        if self.C:
            gc = thetas[:, 1:] ** 2
            tau = au @ self._cnt_cu.T  # (B, C)
            sm = (au @ self._m_cku.T).reshape(B, self.C, k)
            A = A - np.einsum("bck,bc,bcl->bkl", sm, gc / (1.0 + gc * tau), sm)
            ldv = ldv + np.log1p(gc * tau).sum(axis=1)
        try:
            R = np.linalg.cholesky(A)
        except np.linalg.LinAlgError:
            return np.array([self.crit(t, reml) for t in thetas])
        d = np.diagonal(R, axis1=1, axis2=2)
        with np.errstate(all="ignore"):
            r = d[:, p] ** 2
            nu, extra = (self.n - p, ldv + 2.0 * np.log(d[:, :p]).sum(axis=1)) if reml else (self.n, ldv)
            out = nu * (1.0 + LOG2PI + np.log(r / nu)) + extra
        return np.where(np.isfinite(out), out, np.inf)  # (finite only if r > 0)

    def with_y(self, y: np.ndarray) -> BlockEngine:
        """A copy with another outcome (the design's statistics shared): the bootstrap's refits."""
        new = copy.copy(self)
        new.set_y(y)
        return new

    # -- criterion ----------------------------------------------------------------------------
    def _gram(self, lam: np.ndarray) -> tuple[np.ndarray, float]:
        """``(sum_i C_i'C_i, sum_i log|M_i|)``; closed form for q <= 2 (vectorised over therapists:
        batched LAPACK calls on 2 x 2 blocks cost more than the arithmetic)."""
        q = self.q
        if q > 2:
            _, C, ldv = self._blocks(lam)
            Cf = C.reshape(-1, C.shape[2])
            return Cf.T @ Cf, ldv
        ZZ = self.ZZ
        k = self.p + 1
        if q == 1:
            m11 = 1.0 + lam[0, 0] ** 2 * ZZ[:, 0, 0]
            return ((lam[0, 0] ** 2 / m11) @ self.P00).reshape(k, k), float(np.log(m11).sum())
        if self.diagonal and self._zz_diagonal:  # (arm indicators: K_i diagonal too)
            m0 = 1.0 + lam[0, 0] ** 2 * ZZ[:, 0, 0]
            m1 = 1.0 + lam[1, 1] ** 2 * ZZ[:, 1, 1]
            CC = ((lam[0, 0] ** 2 / m0) @ self.P00 + (lam[1, 1] ** 2 / m1) @ self.P11).reshape(k, k)
            return CC, float(np.log(m0).sum() + np.log(m1).sum())
        # sum_i C_i'C_i = sum_i (Z'A)_i' K_i (Z'A)_i with K_i = Lambda M_i^{-1} Lambda' (2 x 2):
        # three length-G dot products with the precomputed outer products
        k00, k01, k11, det = _kernel_q2_zdiag(lam, ZZ) if self._zz_diagonal else _kernel_q2(lam, ZZ)
        CC = (k00 @ self.P00 + k01 @ self.P01 + k11 @ self.P11).reshape(k, k)
        return CC, float(np.log(det).sum())

    def _blocks(self, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """``(chol M_i, C_i, sum log|M_i|)``."""
        q = self.q
        M = lam.T @ self.ZZ @ lam
        M += np.eye(q)
        Lm = np.linalg.cholesky(M)
        W = lam.T @ self.ZA  # Lambda' Z'A per therapist
        C = np.linalg.solve(Lm, W)
        ldv = float(2.0 * np.log(np.diagonal(Lm, axis1=1, axis2=2)).sum())
        return Lm, C, ldv

    def core(self, theta: np.ndarray, centred: bool = False, ratios: np.ndarray | None = None
             ) -> tuple[float, float, float, np.ndarray]:
        """``(r, log|X'WX|, log|V/s2|, cholesky factor of [X y]'W[X y])`` with ``W = (V/s2)^-1``
        (``centred``: theta of the centred random effects ``T u``; ``ratios``: the residual
        variance ratios of the strata, None for all 1)."""
        if ratios is not None and np.all(np.asarray(ratios) == 1.0):
            ratios = None
        if ratios is None and self._caseloads:  # (the random intercept: no matrices of theta)
            t0 = float(theta[0])
            A, ldv = self._system_caseloads(t0 * t0, float(theta[1]) ** 2 if self.C else 0.0)
        else:
            lam, gc = self._split(theta)
            if not centred and self.Zc is not self.Z:
                lam = self.T @ lam
            A, ldv = self._system(lam, gc, ratios)
        R = np.linalg.cholesky(A)
        d = np.diag(R)
        p = self.p
        return float(d[p] ** 2), float(2.0 * np.log(d[:p]).sum()), ldv, R

    def _split(self, theta: np.ndarray) -> tuple[np.ndarray, float]:
        """``(Lambda, g_c)`` from theta (the therapist level's, then the cluster level's)."""
        theta = np.asarray(theta, dtype=float)
        th = theta[: self.n_theta]
        lam = np.diag(th) if self.diagonal else theta_to_lambda(th, self.q)
        return lam, float(theta[self.n_theta] ** 2) if self.C else 0.0

    def _system(self, lam: np.ndarray, gc: float, ratios: np.ndarray | None) -> tuple[np.ndarray, float]:
        """``([X y]'W[X y], log|V/s2|)`` at ``Lambda``, ``g_c`` and the residual ratios (None: all 1)."""
        if ratios is None and not self.C:
            CC, ldv = self._gram(lam)
            return self.AA - CC, ldv
        if ratios is None:
            ZZ, ZA, AA, ldr = self.ZZ, self.ZA, self.AA, 0.0
        else:
            w = 1.0 / np.asarray(ratios, dtype=float)
            ZZ, ZA, AA = (self._by_stratum(w, s) for s in (self.ZZs, self.ZAs, self.AAs))
            ldr = -float(self.n_stratum @ np.log(w))
        K, ldv = self._kernels(lam, ZZ)
        KZA = K @ ZA  # (G, q, p + 1)
        k = self.p + 1
        A = AA - ZA.reshape(-1, k).T @ KZA.reshape(-1, k)
        if self.C and gc > 0.0:
            if ratios is None:
                h, o, nw = self._h, self._o, self._cnt
            else:
                h, o, nw = (self._by_stratum(w, s) for s in (self._hs, self._os, self._cnts))
            bt = o - np.einsum("gi,gir->gr", h, KZA)  # 1'V_i^{-1}[X y]
            et = nw - np.einsum("gi,gij,gj->g", h, K, h)  # 1'V_i^{-1}1
            A, ldc = self._woodbury_cluster(A, bt, et, gc)
            ldv += ldc
        return A, ldv + ldr

    @staticmethod
    def _by_stratum(w: np.ndarray, stats: np.ndarray) -> np.ndarray:
        """``sum_s w_s stats[s]`` (one mat-vec: cheaper than tensordot on small arrays)."""
        return (w @ stats.reshape(len(w), -1)).reshape(stats.shape[1:])

    def _woodbury_cluster(self, A: np.ndarray, bt: np.ndarray, et: np.ndarray, gc: float
                          ) -> tuple[np.ndarray, float]:
        """``A - sum_c g_c / (1 + g_c e_c) b_c b_c'`` and ``sum_c log(1 + g_c e_c)``, with the
        therapists' ``b_i``, ``e_i`` summed by cluster."""
        bs = np.stack([np.bincount(self.cluster, weights=bt[:, j]) for j in range(bt.shape[1])], axis=1)
        es = np.bincount(self.cluster, weights=et)  # (C = the largest cluster code + 1 entries)
        A = A - bs.T @ (bs * (gc / (1.0 + gc * es))[:, None])
        return A, float(np.log1p(gc * es).sum())

    def _system_caseloads(self, gt: float, gc: float) -> tuple[np.ndarray, float]:
        """The random intercept's system from sums over distinct caseloads: ``a_u = n_u / (1 + n_u
        g_t)`` is ``1'V_i^{-1}1`` of a therapist with ``n_u`` patients; with a cluster level
        ``b_i = a_i m_i``, ``e_i = a_i`` (the outcome and covariates are centred, so the
        subtraction loses no more than the between-cluster share)."""
        nu = self._nu
        au = nu / (1.0 + nu * gt)
        ldv = float(self._cnt_u @ np.log1p(nu * gt))
        k = self.p + 1
        A = self.within + (au @ self._mm_u).reshape(k, k)
        if not self.C:
            return A, ldv
        tau = self._cnt_cu @ au
        sm = (self._m_cku @ au).reshape(self.C, k)
        A = A - sm.T @ (sm * (gc / (1.0 + gc * tau))[:, None])
        return A, ldv + float(np.log1p(gc * tau).sum())

    def _kernels(self, lam: np.ndarray, ZZ: np.ndarray) -> tuple[np.ndarray, float]:
        """``K_i = Lambda M_i^{-1} Lambda'`` (G, q, q) and ``sum_i log|M_i|``."""
        q = self.q
        if q == 1:
            m11 = 1.0 + lam[0, 0] ** 2 * ZZ[:, 0, 0]
            return (lam[0, 0] ** 2 / m11)[:, None, None], float(np.log(m11).sum())
        if q == 2 and self.diagonal and self._zz_diagonal:  # (arm indicators: K_i diagonal)
            m0 = 1.0 + lam[0, 0] ** 2 * ZZ[:, 0, 0]
            m1 = 1.0 + lam[1, 1] ** 2 * ZZ[:, 1, 1]
            K = np.zeros((len(m0), 2, 2))
            K[:, 0, 0], K[:, 1, 1] = lam[0, 0] ** 2 / m0, lam[1, 1] ** 2 / m1
            return K, float(np.log(m0).sum() + np.log(m1).sum())
        if q == 2:
            k00, k01, k11, det = _kernel_q2_zdiag(lam, ZZ) if self._zz_diagonal else _kernel_q2(lam, ZZ)
            K = np.empty((len(det), 2, 2))
            K[:, 0, 0], K[:, 1, 1] = k00, k11
            K[:, 0, 1] = K[:, 1, 0] = k01
            return K, float(np.log(det).sum())
        M = lam.T @ ZZ @ lam
        M += np.eye(q)
        Lm = np.linalg.cholesky(M)
        Y = np.linalg.solve(Lm, np.broadcast_to(lam.T, M.shape))  # L_i^{-1} Lambda'
        return Y.transpose(0, 2, 1) @ Y, float(2.0 * np.log(np.diagonal(Lm, axis1=1, axis2=2)).sum())

    def to_centred(self, theta: np.ndarray) -> np.ndarray:
        lam = theta_to_lambda(theta, self.q)
        return lambda_to_theta(psd_cholesky(self.T @ lam @ lam.T @ self.T.T))

    def from_centred(self, theta_c: np.ndarray) -> np.ndarray:
        lam = theta_to_lambda(theta_c, self.q)
        return lambda_to_theta(psd_cholesky(self.Tinv @ lam @ lam.T @ self.Tinv.T))

    def crit(self, theta: np.ndarray, reml: bool, centred: bool = False, ratios: np.ndarray | None = None,
             sigma2: float | None = None) -> float:
        """-2 x profiled (RE)ML log-likelihood at theta (lme4's deviance / REMLcrit); with
        ``sigma2``, at that residual variance (the fixed effects still profiled out)."""
        try:
            r, ldx, ldv, _ = self.core(theta, centred, ratios)
        except np.linalg.LinAlgError:
            return math.inf
        if not (0.0 < r < math.inf and math.isfinite(ldv + ldx)):
            return math.inf  # (also for theta so large that the blocks overflow)
        nu, extra = (self.n - self.p, ldv + ldx) if reml else (self.n, ldv)
        if sigma2 is None:
            return nu * (1.0 + LOG2PI + math.log(r / nu)) + extra
        return nu * (LOG2PI + math.log(sigma2)) + r / sigma2 + extra if sigma2 > 0.0 else math.inf

    def dev_ml(self, theta: np.ndarray, sigma2: float) -> float:
        """ML deviance at relative theta and residual variance ``sigma2`` (b profiled out)."""
        try:
            r, _, ldv, _ = self.core(np.asarray(theta, dtype=float))
        except np.linalg.LinAlgError:
            return math.inf
        if not (math.isfinite(r) and math.isfinite(ldv) and sigma2 > 0.0):
            return math.inf
        return self.n * (LOG2PI + math.log(sigma2)) + ldv + r / sigma2

    def scale(self, theta: np.ndarray, reml: bool, ratios: np.ndarray | None = None) -> float:
        r, _, _, _ = self.core(theta, ratios=ratios)
        return r / (self.n - self.p) if reml else r / self.n

    def fixed(self, theta: np.ndarray, ratios: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
        """GLS fixed effects, ``(X'WX)^{-1}`` (unscaled), ``r`` and the centred-scale effects."""
        r, _, _, R = self.core(theta, ratios=ratios)
        b, cov, bc = gls_from_cholesky(R, self.S, self.k0, self.shift_y)
        return b, cov, r, bc

    def blups(self, theta: np.ndarray, bc: np.ndarray, sigma2: float) -> tuple[np.ndarray, np.ndarray]:
        """Conditional modes ``E[u_i | y]`` (G x q) and conditional covariances (G x q x q), as
        lme4's ``ranef(condVar = TRUE)``: ``u_i = Lambda M_i^{-1} Lambda' Z_i'(y_i - X_i b)``
        (models without a cluster level and residual strata)."""
        if self.C or self.strata is not None:
            raise ValueError("blups: the engine has a cluster level or residual strata")
        lam = self.T @ theta_to_lambda(theta, self.q)  # of the centred effects T u
        M = lam.T @ self.ZZ @ lam + np.eye(self.q)
        Minv = np.linalg.inv(M)
        resid = self.ZA[:, :, self.p] - self.ZA[:, :, : self.p] @ bc  # Zc'(y - X b), centred scale
        K = lam @ Minv @ lam.T  # (G, q, q)
        u = np.einsum("ij,gjk,gk->gi", self.Tinv, K, resid)
        cov = sigma2 * (self.Tinv @ K @ self.Tinv.T)
        return u, cov

    # -- optimisation --------------------------------------------------------------------------
    def fit(self, reml: bool, theta0: np.ndarray | None = None) -> tuple[np.ndarray, float, bool]:
        """Optimum ``(theta, crit_min, converged)``: the interior optimum and the optimum on every
        face of the boundary (subsets of the diagonal at exactly 0); the boundary wins ties."""
        if self.diagonal or self.C:  # (centring Z is for the unstructured therapist level alone)
            t0 = np.where(self.lows == 0.0, 1.0, 0.0) if theta0 is None else theta0
            return minimise_theta(lambda t: self.crit(t, reml), t0, self.q, lows=self.lows)
        if theta0 is None:
            tc0 = np.where(self.lows == 0.0, 1.0, 0.0)  # lme4's start: Lambda = I
        else:
            tc0 = self.to_centred(theta0)
        tc, fmin, ok = minimise_theta(lambda t: self.crit(t, reml, centred=True), tc0, self.q)
        return self.from_centred(tc), fmin, ok


def _kernel_q2_zdiag(lam: np.ndarray, ZZ: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_kernel_q2` when every ``Z_i'Z_i`` is diagonal (arm indicators): with ``G = Lambda
    Lambda'`` and ``D_i = Z_i'Z_i``, ``K_i = (I + G D_i)^{-1} G`` and ``|M_i| = |I + G D_i|``."""
    G = lam @ lam.T
    g00, g01, g11 = G[0, 0], G[0, 1], G[1, 1]
    d0, d1 = ZZ[:, 0, 0], ZZ[:, 1, 1]
    det = (1.0 + g00 * d0) * (1.0 + g11 * d1) - (g01 * g01) * (d0 * d1)
    detg = g00 * g11 - g01 * g01
    inv = 1.0 / det
    return (g00 + detg * d1) * inv, g01 * inv, (g11 + detg * d0) * inv, det


def _kernel_q2(lam: np.ndarray, ZZ: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``K_i = Lambda M_i^{-1} Lambda'`` for q = 2 in closed form, vectorised over therapists
    (batched LAPACK calls on 2 x 2 blocks cost more than the arithmetic): ``(k00, k01, k11, |M_i|)``."""
    (p0, q0), (r0, s0) = lam
    z00, z01, z11 = ZZ[:, 0, 0], ZZ[:, 0, 1], ZZ[:, 1, 1]
    # M = I + Lambda' ZZ Lambda for any 2 x 2 Lambda = [[p0, q0], [r0, s0]]
    a = 1.0 + p0 * p0 * z00 + 2.0 * p0 * r0 * z01 + r0 * r0 * z11
    b = p0 * q0 * z00 + (p0 * s0 + r0 * q0) * z01 + r0 * s0 * z11
    c = 1.0 + q0 * q0 * z00 + 2.0 * q0 * s0 * z01 + s0 * s0 * z11
    det = a * c - b * b
    inv = 1.0 / det
    k00 = (p0 * p0 * c - 2.0 * p0 * q0 * b + q0 * q0 * a) * inv
    k01 = (p0 * r0 * c - (p0 * s0 + q0 * r0) * b + q0 * s0 * a) * inv
    k11 = (r0 * r0 * c - 2.0 * r0 * s0 * b + s0 * s0 * a) * inv
    return k00, k01, k11, det


def _nm(f: Callable[[np.ndarray], float], x0: np.ndarray, lows: np.ndarray, xatol: float,
        fatol: float, ups: np.ndarray | None = None) -> tuple[np.ndarray, float, bool]:
    """Bounded Nelder-Mead, restarted from its own answer until it stops improving."""
    ups = np.full(len(lows), np.inf) if ups is None else np.asarray(ups, dtype=float)
    bounds = [(lo if np.isfinite(lo) else None, up if np.isfinite(up) else None) for lo, up in zip(lows, ups)]
    x = np.minimum(np.maximum(np.asarray(x0, dtype=float), lows), ups)
    fx = f(x)
    ok = True
    for _ in range(6):
        step = np.maximum(0.1 * np.abs(x), 0.05)
        sgn = np.where(x + step > ups, -1.0, 1.0)
        sim = np.vstack([x] + [x + np.eye(len(x))[k] * step[k] * sgn[k] for k in range(len(x))])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = optimize.minimize(f, x, method="Nelder-Mead", bounds=bounds,
                                    options={"xatol": xatol, "fatol": fatol, "maxfev": 20000,
                                             "initial_simplex": sim, "adaptive": len(x) > 2})
        ok = bool(res.success)
        improved = fx - res.fun
        if res.fun <= fx:
            x, fx = np.minimum(np.maximum(res.x, lows), ups), float(res.fun)
        if improved < 1e-11:
            break
    return x, float(fx), ok


def fd_derivatives(f: Callable[[np.ndarray], float], x: np.ndarray, h: np.ndarray,
                    free: list[int], fx: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gradient and Hessian of ``f`` in the coordinates ``free`` by finite differences: the
    gradient from central differences at ``h`` and ``h/2`` combined by Richardson (error O(h^4)),
    so that the criterion's rounding noise, not the step, limits the precision. The Hessian's
    diagonal reuses the gradient's points (second difference at ``h``; ``fx = f(x)`` when the
    caller has it), its off-diagonal takes four points per pair: ``4 n + n (n - 1) / 2 * 4``
    evaluations for ``n`` coordinates (was ``4 n + 2 n (n + 1)``)."""
    n = len(free)
    E = np.zeros((n, len(x)))
    for a, k in enumerate(free):
        E[a, k] = h[k]
    hf = h[free]
    fp = np.array([f(x + e) for e in E])
    fm = np.array([f(x - e) for e in E])
    d1 = (fp - fm) / 2
    d2 = np.array([(f(x + e / 2) - f(x - e / 2)) for e in E])
    g = (4 * d2 - d1) / 3 / hf
    f0 = float(f(x)) if fx is None else float(fx)
    H = np.empty((n, n))
    for a in range(n):
        H[a, a] = (fp[a] - 2.0 * f0 + fm[a]) / (hf[a] * hf[a])
        for b in range(a + 1, n):
            ea, eb = E[a], E[b]
            H[a, b] = H[b, a] = ((f(x + ea + eb) - f(x + ea - eb) - f(x - ea + eb) + f(x - ea - eb))
                                 / (4 * hf[a] * hf[b]))
    return g, H


def _newton_polish(f: Callable[[np.ndarray], float], x0: np.ndarray, lows: np.ndarray,
                   ups: np.ndarray | None = None) -> tuple[np.ndarray, float, bool]:
    """Newton steps (central-difference gradient and Hessian) on the coordinates off their bounds,
    from a Nelder-Mead answer: the smooth criteria here are polished to ~1e-9 in theta."""
    ups = np.full(len(lows), np.inf) if ups is None else np.asarray(ups, dtype=float)
    x = np.minimum(np.maximum(np.asarray(x0, dtype=float), lows), ups)

    fx = float(f(x))
    f_at_x = fx  # f at x exactly (fx may keep a lower value within rounding)
    ok = True
    for _ in range(8):  # Newton polish on the free coordinates
        h = 1e-3 * np.maximum(np.abs(x), 0.1)
        free = [k for k in range(len(x)) if x[k] - 2 * h[k] >= lows[k] and x[k] + 2 * h[k] <= ups[k]]
        if not free:
            break
        g, H = fd_derivatives(f, x, h, free, f_at_x)
        if not np.all(np.linalg.eigvalsh(H) > 0):  # (NaN eigenvalues too: an infinite criterion nearby)
            break
        step = -np.linalg.solve(H, g)
        if not np.all(np.isfinite(step)):
            break
        xn = x.copy()
        xn[free] += step
        xn = np.minimum(np.maximum(xn, lows), ups)
        fn = float(f(xn))
        if fn <= fx + 1e-13 * abs(fx):  # (a step within the criterion's rounding is taken)
            x, fx, f_at_x = xn, min(fn, fx), fn
            if np.max(np.abs(step)) < 1e-11:
                break
        else:
            break
    return x, fx, ok


def minimise_theta(f: Callable[[np.ndarray], float], theta0: np.ndarray, q: int, *,
                   xatol: float = 1e-10, fatol: float = 1e-12, boundary_tol: float = 1e-9,
                   lows: np.ndarray | None = None) -> tuple[np.ndarray, float, bool]:
    """Global minimiser of ``f(theta)`` over lme4's theta space for ``q`` random effects: the
    interior optimum (bounded Nelder-Mead from ``theta0``, restarted) and the optimum on each face
    of the boundary where a subset of the diagonal is exactly 0 (the columns below a zero diagonal
    then enter only through the other columns, so they are dropped with it); a boundary optimum
    within ``boundary_tol`` of the best wins, so singular fits are exactly singular. ``lows``: the
    lower bounds of another theta layout (diagonal, cluster level), 0 where an SD sits."""
    lows = theta_lower_bounds(q) if lows is None else np.asarray(lows, dtype=float)
    diag = [int(k) for k in np.flatnonzero(lows == 0.0)]
    x, fx, ok = _nm(f, theta0, lows, 1e-7, 1e-10)
    x, fx, _ = _newton_polish(f, x, lows)
    best = (fx, x, ok)
    near = [k for k, d in enumerate(diag) if x[d] < 1e-2]
    # faces: one diagonal element of theta at 0 (and, for the last, nothing else to drop)
    for k in near:
        d = diag[k]
        free = [i for i in range(len(x)) if i != d]

        def g(z: np.ndarray, d: int = d, free: list = free) -> float:
            t = np.zeros(len(x))
            t[free] = z
            return f(t)

        z, fz, okz = _nm(g, x[free], lows[free], 1e-7, 1e-10)
        z, fz, _ = _newton_polish(g, z, lows[free])
        if fz <= best[0] + boundary_tol:
            t = np.zeros(len(x))
            t[free] = z
            best = (fz, t, okz)
    return best[1], best[0], best[2]


def minimise_box(f: Callable[[np.ndarray], float], x0: np.ndarray, lows: np.ndarray,
                 ups: np.ndarray | None = None, xatol: float = 1e-9,
                 fatol: float = 1e-11) -> tuple[np.ndarray, float, bool]:
    """Minimise ``f`` over the box ``lows <= x <= ups`` from a warm start (the inner problems of
    profiles): Nelder-Mead, then Newton polish of the coordinates off their bounds."""
    x, fx, ok = _nm(f, x0, lows, xatol, fatol, ups)
    x, fx, _ = _newton_polish(f, x, lows, ups)
    return x, fx, ok


def _fd_gradient(f: Callable[[np.ndarray], float], x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """The gradient of :func:`fd_derivatives` alone (Richardson-extrapolated central differences)."""
    g = np.empty(len(x))
    for k in range(len(x)):
        e = np.zeros(len(x))
        e[k] = h[k]
        d1 = (f(x + e) - f(x - e)) / 2
        d2 = f(x + e / 2) - f(x - e / 2)
        g[k] = (4 * d2 - d1) / 3 / h[k]
    return g


def newton_minimise(f: Callable[[np.ndarray], float], x0: np.ndarray, lows: np.ndarray,
                    ups: np.ndarray | float = math.inf, max_iter: int = 12, hess: dict | None = None
                    ) -> tuple[np.ndarray, float, bool]:
    """Damped (quasi-)Newton from a warm start: central-difference gradient with Richardson
    extrapolation; a finite-difference Hessian at the first iterate, or the one handed over in
    ``hess["H"]`` (the Hessian of a neighbouring problem, e.g. the previous point of a profile),
    then BFGS updates from the gradients; a fresh finite-difference Hessian whenever a
    quasi-Newton step fails. Backtracking line search. Returns ``(x, f, ok)``; ``ok`` is False
    when it cannot vouch for its answer (a Hessian that is not positive definite, a step that
    meets a bound, no convergence): the caller then falls back to :func:`minimise_box`. With
    ``hess``, the last Hessian is written back to ``hess["H"]``."""
    x = np.asarray(x0, dtype=float)
    if np.any(x < lows) or np.any(x > ups):
        return x, math.inf, False
    fx = float(f(x))
    f_at_x = fx
    m = len(x)
    H = None
    if hess is not None and hess.get("H") is not None and np.shape(hess["H"]) == (m, m):
        H = np.array(hess["H"])  # (a copy)
    g_prev = x_prev = None
    for _ in range(max_iter):
        h = 1e-3 * np.maximum(np.abs(x), 0.1)
        if np.any(x - 2 * h < lows) or np.any(x + 2 * h > ups):
            return x, fx, False
        fresh = H is None
        if fresh:
            g, H = fd_derivatives(f, x, h, list(range(m)), f_at_x)
        else:
            g = _fd_gradient(f, x, h)
            if g_prev is not None:  # BFGS update with the last step
                sv, yv = x - x_prev, g - g_prev
                sy = float(sv @ yv)
                if sy > 1e-12 * float(np.linalg.norm(sv) * np.linalg.norm(yv)):
                    Hs = H @ sv
                    H = H + np.outer(yv, yv) / sy - np.outer(Hs, Hs) / float(sv @ Hs)
        step = None
        for attempt in range(2):
            if np.all(np.isfinite(H)) and np.all(np.linalg.eigvalsh(H) > 0):
                step = -np.linalg.solve(H, g)
                t = 1.0
                for _ in range(12):
                    xn = x + t * step
                    if np.any(xn < lows) or np.any(xn > ups):
                        return x, fx, False
                    fn = float(f(xn))
                    if fn <= fx + 1e-13 * abs(fx):
                        break
                    t /= 2
                else:
                    step = None
            if step is not None or fresh:
                break
            fresh = True  # the quasi-Newton step failed: one retry with a fresh Hessian
            g, H = fd_derivatives(f, x, h, list(range(m)), f_at_x)
        if step is None:
            return x, fx, False
        g_prev, x_prev = g, x
        x, fx, f_at_x = xn, min(fn, fx), fn
        if np.max(np.abs(t * step)) < 1e-9:
            if hess is not None:
                hess["H"] = H
            return x, fx, True
    return x, fx, False


def newton_box(fgh: Callable[[np.ndarray], tuple[float, np.ndarray, np.ndarray]], x0: np.ndarray,
               lows: np.ndarray, ups: np.ndarray, max_iter: int = 100, tol: float = 1e-11,
               max_step: float = 3.0
               ) -> tuple[np.ndarray, float, bool]:
    """Projected Newton on the box ``lows <= x <= ups`` with the analytic value, gradient and
    Hessian ``fgh(x)`` (e.g. :func:`therapist_effects.engine.derivatives.slope_deviance`).

    A coordinate at a bound whose gradient points out of the box is held there (so an inner optimum
    on the boundary, a correlation of +-1, is reached exactly); the others take the Newton step,
    with the absolute values of the Hessian's eigenvalues (a descent step along a direction of
    negative curvature), at most ``max_step`` in any coordinate, projected onto the box and halved
    until the criterion does not increase. A coordinate that keeps drifting by at least ``0.5`` a
    step (a log SD whose optimum is an SD of 0: Newton only halves the distance in the criterion
    there) takes further steps of doubling length while the criterion decreases. Converged (``ok``) when the Newton
    decrement ``g' H^-1 g`` of the free coordinates is below ``tol`` (criterion units) at a positive
    semi-definite Hessian, or the criterion cannot decrease further within its rounding at a
    decrement below ``1e3 tol``; otherwise ``ok`` is False and the caller falls back to
    :func:`minimise_box`."""
    x = np.minimum(np.maximum(np.asarray(x0, dtype=float), lows), ups)
    f, g, H = fgh(x)
    if not math.isfinite(f):
        return x, f, False
    drift = np.zeros(len(x))
    for _ in range(max_iter):
        free = ~(((x <= lows) & (g > 0)) | ((x >= ups) & (g < 0)))
        if not free.any():
            return x, f, True
        Hf, gf = H[np.ix_(free, free)], g[free]
        eig, vec = np.linalg.eigh(Hf)
        scale = max(abs(eig[-1]), 1.0)
        psd = eig[0] > -1e-9 * scale
        # negative or vanishing curvature: |eigenvalue| (a descent step along that direction)
        eig = np.maximum(np.abs(eig), 1e-12 * scale)
        step = np.zeros(len(x))
        step[free] = -vec @ ((vec.T @ gf) / eig)
        dec = float(-gf @ step[free])
        if psd and dec < tol:
            return x, f, True
        if np.max(np.abs(step)) > max_step:  # a trust region: the quadratic model is local
            step *= max_step / np.max(np.abs(step))
        t = 1.0
        for _ in range(40):
            xn = np.minimum(np.maximum(x + t * step, lows), ups)
            fn, gn, Hn = fgh(xn)
            if fn <= f + 1e-15 * abs(f):
                break
            t /= 2
        else:
            return x, f, psd and dec < 1e3 * tol
        moved = xn - x
        drift = np.where(np.sign(moved) * np.sign(drift) > 0, drift + moved, moved)
        ext = np.where((np.abs(drift) >= 1.0) & (np.abs(moved) >= 0.5), moved, 0.0)
        mult = 1.0
        while ext.any():  # drifting coordinates: further steps of doubling length while f decreases
            xj = np.minimum(np.maximum(xn + mult * ext, lows), ups)
            if np.array_equal(xj, xn):
                break
            fj, gj, Hj = fgh(xj)
            if not fj < fn:
                break
            xn, fn, gn, Hn = xj, fj, gj, Hj
            mult *= 2.0
        if np.array_equal(xn, x):
            return x, f, psd and dec < 1e3 * tol
        x, f, g, H = xn, fn, gn, Hn
    return x, f, False
