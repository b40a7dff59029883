"""Analytic gradient and Hessian of the Gaussian engine's criterion for two random effects per
therapist (``(1 + slope | therapist)``), in closed form and vectorised over therapists.

With ``D`` the relative covariance of the (centred) random effects (``Lambda Lambda'`` of
:class:`~therapist_effects.engine.gaussian.BlockEngine`), ``Z_i = Z_i'Z_i`` and ``W_i = Z_i'[X y]``::

    log|M_i| = log|I + Z_i D|,        [X y]'W[X y] = A(D) = [X y]'[X y] - sum_i W_i' D N_i W_i,

with ``N_i = (I + Z_i D)^{-1}``. In the three free elements ``d = (d00, d01, d11)`` of ``D`` (basis
``E_a``), with ``V_i = N_i W_i`` and ``P_i = N_i Z_i`` (symmetric)::

    dA / dd_a           = -sum_i V_i' E_a V_i
    d2A / dd_a dd_b     =  sum_i V_i' (E_a P_i E_b + E_b P_i E_a) V_i
    d log|M_i| / dd_a   =  tr(P_i E_a),      d2 log|M_i| / dd_a dd_b = -tr(P_i E_a P_i E_b)

so one evaluation costs a few length-``G`` products per pair, as the criterion itself does. The
residual sum of squares ``r`` (a Schur complement of ``A``) and ``log|X'WX|`` follow by the chain
rule (``u = (-b, 1)`` the GLS direction: ``dr = u' dA u``, ``d2r = u' d2A u - 2 (dA_a u)_x'
A_xx^{-1} (dA_b u)_x``). :func:`slope_deviance` maps them to the ML deviance, or the profiled ML or
REML criterion, in the parameters the profiles of :mod:`therapist_effects.models.slopes` move: log SDs,
the correlation and log sigma^2 (each a linear function of the inner coordinates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["BlockDerivatives", "block_derivatives", "slope_deviance"]

LOG2PI = math.log(2.0 * math.pi)
_E = np.array([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
_PAIRS = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]


@dataclass(frozen=True)
class BlockDerivatives:
    """``r``, ``log|X'WX|`` and ``log|V/s2|`` with their gradients (3) and Hessians (3 x 3) in
    ``d = (d00, d01, d11)``, the free elements of the relative covariance of the random effects."""

    r: float
    ldx: float
    ldv: float
    dr: np.ndarray
    dldx: np.ndarray
    dldv: np.ndarray
    hr: np.ndarray
    hldx: np.ndarray
    hldv: np.ndarray


def _centring_map(T: np.ndarray) -> np.ndarray:
    """``L`` with ``d_c = L d`` for ``D_c = T D T'`` (the engine's centred random effects)."""
    L = np.empty((3, 3))
    for a in range(3):
        Dc = T @ _E[a] @ T.T
        L[:, a] = Dc[0, 0], Dc[0, 1], Dc[1, 1]
    return L


def block_derivatives(eng, D: np.ndarray) -> BlockDerivatives:
    """Criterion pieces and their derivatives at the relative covariance ``D`` (2 x 2, of the random
    effects as given: the engine's centring ``D_c = T D T'`` is applied and undone here)."""
    if eng.q != 2:
        raise ValueError("analytic derivatives are implemented for two random effects per therapist")
    Dc = eng.T @ D @ eng.T.T
    d00, d01, d11 = Dc[0, 0], Dc[0, 1], Dc[1, 1]
    ZZ, p = eng.ZZ, eng.p
    z00, z01, z11 = ZZ[:, 0, 0], ZZ[:, 0, 1], ZZ[:, 1, 1]
    b00, b01 = 1.0 + z00 * d00 + z01 * d01, z00 * d01 + z01 * d11  # B = I + Z D
    b10, b11 = z01 * d00 + z11 * d01, 1.0 + z01 * d01 + z11 * d11
    det = b00 * b11 - b01 * b10
    n00, n01, n10, n11 = b11 / det, -b01 / det, -b10 / det, b00 / det  # N = B^{-1}
    # P = N Z (symmetric) and, per pair (a, b), S_ab = E_a P E_b + E_b P E_a, as (s00, s01, s11)
    p00, p01, p11 = n00 * z00 + n01 * z01, n00 * z01 + n01 * z11, n10 * z01 + n11 * z11
    zero = np.zeros_like(p00)
    S = [(2 * p00, zero, zero), (2 * p01, p00, zero), (zero, p01, zero),
         (2 * p11, 2 * p01, 2 * p00), (zero, p11, 2 * p01), (zero, zero, 2 * p11)]
    # every k x k sum is sum_i W_i' R_i W_i with R_i symmetric: (r00, r01, r11) weight the outer
    # products of the rows of W that the engine keeps (P00, P01, P11), as in its closed-form Gram sums

    def sandwich(s00, s01, s11):  # R = N' S N
        return (n00 * n00 * s00 + 2 * n00 * n10 * s01 + n10 * n10 * s11,
                n00 * n01 * s00 + (n00 * n11 + n10 * n01) * s01 + n10 * n11 * s11,
                n01 * n01 * s00 + 2 * n01 * n11 * s01 + n11 * n11 * s11)

    one = np.ones_like(p00)
    K = (d00 * n00 + d01 * n10, d00 * n01 + d01 * n11, d01 * n01 + d11 * n11)  # K = D N, symmetric
    R = [K, sandwich(one, zero, zero), sandwich(zero, one, zero), sandwich(zero, zero, one)]
    R += [sandwich(*sab) for sab in S]
    Wt = np.array(R)  # (10, 3, G)
    sums = Wt[:, 0] @ eng.P00 + Wt[:, 1] @ eng.P01 + Wt[:, 2] @ eng.P11
    k = p + 1
    A = eng.AA - sums[0].reshape(k, k)
    dA = -sums[1:4].reshape(3, k, k)
    hA = np.empty((3, 3, k, k))
    for (a, b), m in zip(_PAIRS, sums[4:]):
        hA[a, b] = hA[b, a] = m.reshape(k, k)
    ldv = float(np.log(det).sum())
    dldv = np.array([p00.sum(), 2.0 * p01.sum(), p11.sum()])
    hldv = np.empty((3, 3))  # -tr(P E_a P E_b) = -tr(P S_ab) / 2
    for (a, b), (s00, s01, s11) in zip(_PAIRS, S):
        hldv[a, b] = hldv[b, a] = -0.5 * float(p00 @ s00 + 2.0 * p01 @ s01 + p11 @ s11)
    # the Schur complement r and log|A_xx|
    Axx = A[:p, :p]
    Ai = np.linalg.inv(Axx)
    beta = Ai @ A[:p, p]
    u = np.append(-beta, 1.0)
    r = float(A[p, p] - A[:p, p] @ beta)
    dAu = dA @ u  # (3, k)
    dr = dAu @ u
    hr = np.einsum("i,abij,j->ab", u, hA, u) - 2.0 * np.einsum("ai,ij,bj->ab", dAu[:, :p], Ai, dAu[:, :p])
    AidA = np.einsum("ij,ajk->aik", Ai, dA[:, :p, :p])
    dldx = np.einsum("aii->a", AidA)
    hldx = (np.einsum("ij,abji->ab", Ai, hA[:, :, :p, :p]) - np.einsum("aij,bji->ab", AidA, AidA))
    sign, ldx = np.linalg.slogdet(Axx)
    L = _centring_map(eng.T)  # back to the uncentred D: grad L' g, Hessian L' H L
    return BlockDerivatives(r, float(ldx) if sign > 0 else math.nan, ldv, L.T @ dr, L.T @ dldx, L.T @ dldv,
                            L.T @ hr @ L, L.T @ hldx @ L, L.T @ hldv @ L)


def _covariance_map(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``d = (a^2, rho a b, b^2)`` of ``g = (log a, log b, rho)`` with its Jacobian (3 x 3) and
    second derivatives (3 x 3 x 3); ``log a = -inf`` is a variance of exactly 0."""
    la, lb, rho = g
    a2, b2, ab = math.exp(2.0 * la), math.exp(2.0 * lb), math.exp(la + lb)
    d01 = rho * ab
    d = np.array([a2, d01, b2])
    J = np.array([[2.0 * a2, 0.0, 0.0], [d01, d01, ab], [0.0, 2.0 * b2, 0.0]])
    H = np.zeros((3, 3, 3))
    H[0, 0, 0] = 4.0 * a2
    H[1, :2, :2] = d01
    H[1, 0, 2] = H[1, 2, 0] = H[1, 1, 2] = H[1, 2, 1] = ab
    H[2, 1, 1] = 4.0 * b2
    return d, J, H


def slope_deviance(eng, g: np.ndarray, criterion: str) -> tuple[float, np.ndarray, np.ndarray]:
    """Value, gradient and Hessian in ``g = (log a, log b, rho, log s2)`` of a criterion at the
    relative covariance ``[[a^2, rho a b], [rho a b, b^2]]``:

    - ``"ml"``: the ML deviance at residual variance ``s2`` (:meth:`BlockEngine.dev_ml`);
    - ``"profiled_ml"`` / ``"profiled_reml"``: lme4's deviance / REMLcrit with ``s2`` profiled out
      (:meth:`BlockEngine.crit`; they do not depend on ``g[3]``).

    ``inf`` (with NaN derivatives) where the criterion is not defined, as the engine's criterion."""
    bad = (math.inf, np.full(4, np.nan), np.full((4, 4), np.nan))
    try:
        d, J, Hd = _covariance_map(np.asarray(g[:3], dtype=float))
        bd = block_derivatives(eng, np.array([[d[0], d[1]], [d[1], d[2]]]))
    except (OverflowError, np.linalg.LinAlgError):
        return bad
    r = bd.r
    if not (r > 0.0 and math.isfinite(r) and math.isfinite(bd.ldv)):
        return bad
    grad, hess = np.zeros(4), np.zeros((4, 4))
    if criterion == "ml":
        ls = float(g[3])
        w = math.exp(-ls)
        f = eng.n * (LOG2PI + ls) + bd.ldv + r * w
        gd, hd = bd.dldv + w * bd.dr, bd.hldv + w * bd.hr
        grad[3] = eng.n - r * w
        hess[3, 3] = r * w
        hess[3, :3] = hess[:3, 3] = -w * (J.T @ bd.dr)
    elif criterion in ("profiled_ml", "profiled_reml"):
        m = eng.n if criterion == "profiled_ml" else eng.n - eng.p
        f = m * (1.0 + LOG2PI + math.log(r / m)) + bd.ldv
        gd = m * bd.dr / r + bd.dldv
        hd = m * (bd.hr / r - np.outer(bd.dr, bd.dr) / r ** 2) + bd.hldv
        if criterion == "profiled_reml":
            if not math.isfinite(bd.ldx):
                return bad
            f += bd.ldx
            gd, hd = gd + bd.dldx, hd + bd.hldx
    else:
        raise ValueError(f"unknown criterion {criterion!r}")
    grad[:3] = J.T @ gd
    hess[:3, :3] = J.T @ hd @ J + np.einsum("k,kab->ab", gd, Hd)
    return float(f), grad, hess
