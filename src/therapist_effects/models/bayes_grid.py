"""Exact posterior of a Gaussian therapist-effects model's variance parameters on a grid, sampled iid.

For the Gaussian ``random_intercept`` and ``arm_variance`` models (``therapist_effects.models.bayes``)
both the therapist effects and the fixed effects can be integrated out analytically, leaving a
posterior of 2 (residual SD, therapist SD) or 3 (residual SD, one therapist SD per arm) parameters.
That posterior is evaluated on a grid and sampled directly (Gelman et al., *Bayesian Data Analysis*,
3rd ed., sections 5.4-5.5: the marginal posterior of the hierarchical variance on a grid, then
conditional draws of everything else):

1. With the fixed effects' prior ``b ~ N(m, S)`` (``S`` diagonal: the models' independent normal priors,
   standardised scale) the outcome's marginal is ``y ~ N(X m, V + X S X')`` with ``V`` block-diagonal,
   ``V_b = sigma^2 I + sd_b^2 11'``. Its log density is

       -1/2 [n log 2 pi + log|V| + log|S| + log|P| + y'V^-1 y + m'S^-1 m - r'P^-1 r],
       P = X'V^-1 X + S^-1,  r = X'V^-1 y + S^-1 m,

   and ``V_b^-1 = (I - c_b 11') / sigma^2`` with ``c_b = sd_b^2 / (sigma^2 + n_b sd_b^2)``, so
   ``X'V^-1 X = (X'X - sum_b c_b S_xb S_xb') / sigma^2`` (``S_xb``, ``S_yb`` the block sums; likewise
   ``X'V^-1 y``, ``y'V^-1 y``) and ``log|V| = (n - B) log sigma^2 + sum_b log(sigma^2 + n_b sd_b^2)``.
   ``c_b`` depends on the block only through its caseload (and arm), so the sums are kept per
   (arm, caseload): a grid point costs O(distinct caseloads x covariates^2), not O(therapists).
2. The log posterior adds the SD priors actually used (the same families and parameters as the PyMC
   model) and the Jacobian of the grid's coordinates: ``log sigma`` for the residual SD and
   ``t = asinh(sd / c)`` for a therapist SD (``c`` the SD's posterior scale at the mode: linear near
   zero, logarithmic far from it). ``t = 0`` is ``sd = 0``: a grid that reaches the boundary starts
   exactly there (the boundary is the normal case of a therapist variance, not an error).
3. The grid is centred at the posterior mode, widened until the log density on every outer face is
   ``EDGE_DROP`` below the maximum, then trimmed to where the mass is and evaluated at full resolution.
4. Cells are drawn with probability proportional to density x volume and a point is drawn uniformly
   within each (the cell-midpoint rule: the distribution function is exact to second order in the
   cell width), then ``b | variances, y ~ N(P^-1 r, P^-1)`` and the therapist effects
   ``u | b, variances, y`` exactly (``bayes._conditional_effects``).

The draws are independent; R-hat and ESS are still computed and reported. The output has the layout
of a NUTS fit of the marginal parameterisation (``beta_std``, ``sigma_std``, ``sd_therapist_std``
in the posterior; ``lp`` and ``diverging`` (always False) in ``sample_stats``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

from ..exceptions import ModelError

#: the log density on the grid's outer faces must be this far below its maximum (exp(-20) ~ 2e-9)
EDGE_DROP = 20.0
#: cells per dimension of the final grid (2 or 3 dimensions)
CELLS = {2: 320, 3: 64}
#: cells per dimension while the grid's box is searched
SEARCH_CELLS = {2: 64, 3: 24}
#: grid points evaluated at once, at most; and at most CHUNK_CELLS entries of a (points x groups) matrix
CHUNK = 16_384
CHUNK_CELLS = 2_000_000


def log_sd_prior(spec: dict, x: np.ndarray) -> np.ndarray:
    """Log density of a standard-deviation prior (standardised-scale parameters, as PyMC's)."""
    dist = spec["dist"]
    if dist == "halfnormal":
        return stats.halfnorm.logpdf(x, scale=spec["sigma"])
    if dist == "halfstudentt":
        return math.log(2.0) + stats.t.logpdf(x, spec["nu"], scale=spec["sigma"])
    if dist == "halfcauchy":
        return stats.halfcauchy.logpdf(x, scale=spec["beta"])
    if dist == "exponential":
        return stats.expon.logpdf(x, scale=1.0 / spec["lam"])
    raise ModelError(f"bayes engine: grid sampler has no density for prior {dist!r}")


def _group_sums(key: np.ndarray, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Distinct rows of ``key`` (sorted), blocks per row, and each array summed over its row's blocks."""
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.ravel()
    sums = {}
    for name, a in arrays.items():
        out = np.zeros((len(uniq),) + a.shape[1:])
        np.add.at(out, inv, a)
        sums[name] = out
    return uniq, np.bincount(inv, minlength=len(uniq)).astype(float), sums


@dataclass
class CaseloadSums:
    """The data of a Gaussian model summed per (arm, caseload) group of blocks and, for a nested model,
    per (cluster, caseload) group."""

    n: float
    n_blocks: int
    XtX: np.ndarray  # (p, p)
    Xty: np.ndarray  # (p,)
    yty: float
    caseload: np.ndarray  # (U,) caseload of each group
    arm: np.ndarray  # (U,) arm of each group
    count: np.ndarray  # (U,) blocks in each group
    SxSx: np.ndarray  # (U, p * p): sum of S_xb S_xb' over the group's blocks
    SxSy: np.ndarray  # (U, p)
    SySy: np.ndarray  # (U,)
    cl_caseload: np.ndarray | None = None  # (V,) per (cluster, caseload) group, sorted by cluster
    cl_count: np.ndarray | None = None  # (V,)
    cl_Sx: np.ndarray | None = None  # (V, p): sum of S_xb
    cl_Sy: np.ndarray | None = None  # (V,)
    cl_start: np.ndarray | None = None  # (C,) first group of each cluster

    @classmethod
    def from_statistics(cls, st: dict, arm_of_block: np.ndarray, cluster_of_block: np.ndarray | None = None
                        ) -> CaseloadSums:
        nb, Sx, Sy = st["n_b"], st["Sx_b"], st["Sy_b"]
        p = Sx.shape[1]
        outer = (Sx[:, :, None] * Sx[:, None, :]).reshape(len(nb), p * p)
        uniq, count, g = _group_sums(np.column_stack([arm_of_block.astype(float), nb]),
                                     {"SxSx": outer, "SxSy": Sx * Sy[:, None], "SySy": Sy**2})
        out = cls(
            n=float(st["n"]), n_blocks=len(nb), XtX=np.asarray(st["XtX"], float), Xty=np.asarray(st["Xty"], float),
            yty=float(st["yty"]), caseload=uniq[:, 1], arm=uniq[:, 0].astype(np.int64), count=count, **g,
        )
        if cluster_of_block is not None:
            uniq, count, g = _group_sums(np.column_stack([cluster_of_block.astype(float), nb]), {"Sx": Sx, "Sy": Sy})
            out.cl_caseload, out.cl_count, out.cl_Sx, out.cl_Sy = uniq[:, 1], count, g["Sx"], g["Sy"]
            out.cl_start = np.flatnonzero(np.r_[True, np.diff(uniq[:, 0]) != 0])
        return out

    @property
    def nested(self) -> bool:
        return self.cl_start is not None

    @property
    def width(self) -> int:
        """Groups per grid point (the columns of the per-point matrices)."""
        return len(self.caseload) + (len(self.cl_caseload) if self.nested else 0)


def cluster_terms(sigma2: np.ndarray, sd2: np.ndarray, caseload: np.ndarray, count: np.ndarray, Sx: np.ndarray,
                  Sy: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per point and cluster, with W the inverse covariance of a cluster's patients without its cluster
    effect (therapist blocks ``sigma^2 I + sd^2 11'``): ``1'W1``, ``X'W1`` and ``y'W1`` (blocks of a
    caseload n contribute n / d, S_x / d, S_y / d with d = sigma^2 + n sd^2). ``sigma2``, ``sd2``: (G, 1);
    the groups (or blocks) sorted by cluster, ``start`` the first of each cluster."""
    inv = 1.0 / (sigma2 + caseload * sd2)  # (G, V)
    a = np.add.reduceat(inv * (caseload * count), start, axis=1)
    gx = np.stack([np.add.reduceat(inv * Sx[:, j], start, axis=1) for j in range(Sx.shape[1])], axis=-1)
    gy = np.add.reduceat(inv * Sy, start, axis=1)
    return a, gx, gy


class GridPosterior:
    """Log posterior of (sigma, sd_therapist[arm], [sd_cluster]) with the fixed, therapist (and cluster)
    effects integrated out.

    ``sums``: :class:`CaseloadSums`; ``beta_mu``, ``beta_sd``: the fixed effects' normal prior;
    ``sigma_prior``: the residual SD's prior, ``sd_priors``: one per other SD (each arm's therapist SD,
    then the cluster SD of a nested model); dicts as in ``bayes.priors``, standardised scale.
    """

    def __init__(self, sums: CaseloadSums, beta_mu: np.ndarray, beta_sd: np.ndarray, sigma_prior: dict,
                 sd_priors: list[dict]):
        self.s = sums
        self.m = np.asarray(beta_mu, float)
        self.prec = 1.0 / np.asarray(beta_sd, float) ** 2
        self.sigma_prior, self.sd_priors = sigma_prior, list(sd_priors)
        self.n_sd = len(self.sd_priors)
        self.dim = 1 + self.n_sd
        self.scale = np.ones(self.n_sd)  # c of t = asinh(sd / c), set by build()

    # -- the collapsed likelihood ---------------------------------------------------------------
    def normal_equations(self, sigma: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, ...]:
        """For each point (``sigma`` (G,), ``sd`` (G, SDs)): log|V|, P (G, p, p), r (G, p), y'V^-1 y."""
        s = self.s
        p = len(self.m)
        s2 = sigma[:, None] ** 2
        t2 = sd[:, s.arm] ** 2  # (G, U)
        d = s2 + s.caseload * t2
        c = t2 / d
        logdet = (s.n - s.n_blocks) * np.log(s2[:, 0]) + np.log(d) @ s.count
        P = (s.XtX.ravel() - c @ s.SxSx).reshape(-1, p, p) / s2[:, :, None]
        r = (s.Xty - c @ s.SxSy) / s2
        q = (s.yty - c @ s.SySy) / s2[:, 0]
        if s.nested:  # Woodbury for each cluster's effect: V_c^-1 = W - k W11'W, k = g^2 / (1 + g^2 1'W1)
            g2 = sd[:, -1:] ** 2
            a, gx, gy = cluster_terms(s2, sd[:, :1] ** 2, s.cl_caseload, s.cl_count, s.cl_Sx, s.cl_Sy, s.cl_start)
            k = g2 / (1.0 + g2 * a)
            logdet = logdet + np.log1p(g2 * a).sum(axis=1)
            P -= np.einsum("gc,gcp,gcq->gpq", k, gx, gx)
            r -= np.einsum("gc,gcp->gp", k * gy, gx)
            q = q - (k * gy**2).sum(axis=1)
        P[:, np.arange(p), np.arange(p)] += self.prec
        r += self.prec * self.m
        return logdet, P, r, q

    def log_marginal(self, sigma: np.ndarray, sd: np.ndarray) -> np.ndarray:
        """log p(y | sigma, sd): fixed effects and therapist effects integrated out."""
        logdet, P, r, q = self.normal_equations(sigma, sd)
        L = np.linalg.cholesky(P)
        z = np.linalg.solve(L, r[..., None])[..., 0]
        logdet_P = 2.0 * np.log(np.diagonal(L, axis1=1, axis2=2)).sum(axis=1)
        const = self.s.n * math.log(2 * math.pi) - np.log(self.prec).sum() + self.prec @ self.m**2
        return -0.5 * (const + logdet + logdet_P + q - (z**2).sum(axis=1))

    def log_prior(self, sigma: np.ndarray, sd: np.ndarray) -> np.ndarray:
        return log_sd_prior(self.sigma_prior, sigma) + sum(
            log_sd_prior(spec, sd[:, k]) for k, spec in enumerate(self.sd_priors))

    # -- grid coordinates: x = (log sigma, asinh(sd / c)) ------------------------------------------
    def to_natural(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.exp(x[:, 0]), self.scale * np.sinh(x[:, 1:])

    def log_density(self, x: np.ndarray) -> np.ndarray:
        """Log posterior density in grid coordinates (Jacobian included), unnormalised; chunked."""
        out = np.empty(len(x))
        step = max(64, min(CHUNK, CHUNK_CELLS // self.s.width))
        for i in range(0, len(x), step):
            xc = x[i:i + step]
            sigma, sd = self.to_natural(xc)
            jac = xc[:, 0] + np.log(self.scale * np.cosh(xc[:, 1:])).sum(axis=1)
            out[i:i + step] = self.log_marginal(sigma, sd) + self.log_prior(sigma, sd) + jac
        return out

    # -- the mode and the box ---------------------------------------------------------------------
    def _neg_log_post_natural(self, v: np.ndarray) -> float:
        """-log posterior in (log sigma, sd): sd's own scale, so that sd = 0 is a bound of the search."""
        sigma, sd = np.exp(v[:1]), v[None, 1:]
        return -float(self.log_marginal(sigma, sd)[0] + self.log_prior(sigma, sd)[0] + v[0])

    def mode(self) -> np.ndarray:
        """Posterior mode in (log sigma, sd) (sd >= 0), best of an interior and a boundary start."""
        bounds = [(-12.0, 5.0)] + [(0.0, None)] * self.n_sd
        best = None
        for sd0 in (0.3, 0.0):
            v0 = np.array([math.log(0.9)] + [sd0] * self.n_sd)
            res = optimize.minimize(self._neg_log_post_natural, v0, method="L-BFGS-B", bounds=bounds)
            if best is None or res.fun < best.fun:
                best = res
        return best.x

    def _widths(self, v: np.ndarray, rise: float = 0.5) -> np.ndarray:
        """Scale of the posterior along each natural coordinate from the mode ``v``: the step up that
        coordinate after which -log posterior has risen by ``rise`` (one SD for a normal density), found
        by doubling then bisection. Robust where the density is flat (a mode at or next to sd = 0),
        where finite-difference curvature is noise."""
        f = self._neg_log_post_natural
        f0 = f(v)
        w = np.empty(len(v))
        for i in range(len(v)):
            e = np.zeros(len(v))
            e[i] = 1.0

            def risen(step: float) -> bool:
                return f(v + step * e) - f0 >= rise

            lo, hi = 0.0, 1e-3
            while not risen(hi) and hi < 1e3:
                lo, hi = hi, 2.0 * hi
            for _ in range(12):
                mid = 0.5 * (lo + hi)
                lo, hi = (lo, mid) if risen(mid) else (mid, hi)
            w[i] = hi
        return w

    def _axes(self, box: np.ndarray, cells: int) -> list[np.ndarray]:
        return [np.linspace(lo, hi, cells + 1) for lo, hi in box]

    def _evaluate(self, box: np.ndarray, cells: int) -> tuple[np.ndarray, list[np.ndarray]]:
        edges = self._axes(box, cells)
        mids = [0.5 * (e[1:] + e[:-1]) for e in edges]
        pts = np.stack(np.meshgrid(*mids, indexing="ij"), axis=-1).reshape(-1, self.dim)
        return self.log_density(pts).reshape((cells,) * self.dim), edges

    def build(self, max_rounds: int = 40) -> Grid:
        """Find the box (mode, widening, trimming) and evaluate the log density on the final grid."""
        v = self.mode()
        w = self._widths(v)
        self.scale = np.maximum(w[1:], 1e-8)
        t_hat = np.arcsinh(v[1:] / self.scale)
        half = np.concatenate([[w[0]], 1.0 / np.cosh(t_hat)]) * 8.0
        centre = np.concatenate([[v[0]], t_hat])
        box = np.column_stack([centre - half, centre + half])
        box[1:, 0] = np.maximum(box[1:, 0], 0.0)
        cells = SEARCH_CELLS[self.dim]
        for _ in range(max_rounds):
            logp, _ = self._evaluate(box, cells)
            grow = _faces_above(logp, np.max(logp) - EDGE_DROP, box)
            if not grow.any():
                break
            width = box[:, 1] - box[:, 0]
            box = box + grow * np.column_stack([-width, width]) * 0.5
            box[1:, 0] = np.maximum(box[1:, 0], 0.0)
        else:
            raise ModelError(f"bayes engine: grid sampler could not bracket the posterior in {max_rounds} widenings")
        box = _trim(box, logp, np.max(logp) - EDGE_DROP - 2.0)
        cells = CELLS[self.dim]
        logp, edges = self._evaluate(box, cells)
        edge_gap = float(np.max(logp) - _face_max(logp, box))
        return Grid(logp, edges, edge_gap)

    # -- draws ------------------------------------------------------------------------------------
    def draw(self, grid: Grid, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """``n`` independent draws of sigma, sd (per arm), the fixed effects (standardised scale) and
        each draw's log posterior density (grid coordinates)."""
        flat = grid.logp.ravel()
        prob = np.exp(flat - flat.max())
        prob /= prob.sum()
        cell = rng.choice(len(prob), size=n, p=prob)
        idx = np.unravel_index(cell, grid.logp.shape)
        x = np.column_stack([
            e[i] + rng.random(n) * (e[i + 1] - e[i]) for e, i in zip(grid.edges, idx)
        ])
        sigma, sd = self.to_natural(x)
        _, P, r, _ = self.normal_equations(sigma, sd)
        L = np.linalg.cholesky(P)
        mean = np.linalg.solve(P, r[..., None])[..., 0]
        noise = np.linalg.solve(np.swapaxes(L, 1, 2), rng.standard_normal(r.shape)[..., None])[..., 0]
        return {"sigma": sigma, "sd": sd, "beta": mean + noise, "lp": flat[cell]}


@dataclass
class Grid:
    """Log density at the cell centres (one axis per coordinate), the cells' edges, and how far (log
    units) the highest outer face lies below the maximum."""

    logp: np.ndarray
    edges: list[np.ndarray]
    edge_gap: float

    @property
    def points(self) -> int:
        return int(self.logp.size)


def _outer_faces(logp: np.ndarray, box: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """(axis, side, face values) of the faces that are not the boundary sd = 0."""
    out = []
    for ax in range(logp.ndim):
        for side, sl in ((0, 0), (1, -1)):
            if side == 0 and ax > 0 and box[ax, 0] == 0.0:
                continue
            out.append((ax, side, np.take(logp, sl, axis=ax)))
    return out


def _faces_above(logp: np.ndarray, level: float, box: np.ndarray) -> np.ndarray:
    grow = np.zeros(box.shape)
    for ax, side, face in _outer_faces(logp, box):
        grow[ax, side] = float(np.max(face) > level)
    return grow


def _face_max(logp: np.ndarray, box: np.ndarray) -> float:
    return max((float(np.max(face)) for _, _, face in _outer_faces(logp, box)), default=-np.inf)


def _trim(box: np.ndarray, logp: np.ndarray, level: float) -> np.ndarray:
    """The part of ``box`` whose cells (maximised over the other axes) reach ``level``; a box that starts
    at sd = 0 keeps starting there."""
    out = box.copy()
    cells = logp.shape[0]
    for ax in range(logp.ndim):
        others = tuple(a for a in range(logp.ndim) if a != ax)
        keep = np.flatnonzero(np.max(logp, axis=others) >= level)
        h = (box[ax, 1] - box[ax, 0]) / cells
        lo = box[ax, 0] + max(keep[0] - 1, 0) * h
        hi = box[ax, 0] + min(keep[-1] + 2, cells) * h
        out[ax] = (box[ax, 0] if keep[0] == 0 else lo, hi)
    return out
