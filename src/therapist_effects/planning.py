"""Design planning for therapist-effects studies: how precisely will a design estimate the ICC?

:func:`plan` simulates the design with the exact REML engines, seeded, and reports

* ``expected_ci_width``: the mean width of the 95% profile-likelihood interval of the therapist ICC
  (:class:`~therapist_effects.models.reml.RandomInterceptModel`, ``y ~ 1 + (1 | therapist)``);
* ``p_singular``: the share of fits with the therapist variance at 0 (a singular fit);
* ``power`` (when a ``reduction`` R is given): the probability of detecting a relative ICC reduction
  of R between arms, ``ICC_feedback = (1 - R) ICC_control``: each therapist's patients are randomised
  1:1 to the two arms and the data are fitted by
  :class:`~therapist_effects.models.arm.ArmVarianceModel` (a therapist variance per arm); a replicate
  detects the reduction when the likelihood-ratio test of equal variances has p < 1 - ``level``
  and the feedback ICC is the smaller (a directional test).

Caseloads: ``caseload`` patients per therapist, or with ``dispersion`` D > 0 caseloads drawn from a
gamma distribution with mean ``caseload`` and coefficient of variation D (rounded, at least 2).

:func:`large_sample_width` is the large-sample counterpart: ``2 z sqrt(var(ICC))`` with Donner's
variance (:func:`therapist_effects.meta.donner_var_icc`, unbalanced n0 from the expected caseloads).
:func:`plan_grid` runs :func:`plan` over a grid of designs (the workflow's ``plan`` rules run one
job per design).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .models.arm import ArmVarianceModel
from .exceptions import ModelError
from .meta import donner_var_icc
from .progress import track
from .models.reml import RandomInterceptModel

__all__ = ["caseloads", "simulate_design", "plan", "large_sample_width", "plan_grid", "grid_cells"]


def _check(therapists: int, caseload: float, icc: float, dispersion: float, reduction: float | None, reps: int):
    if int(therapists) != therapists or therapists < 3:
        raise ModelError(f"--therapists: expected an integer of at least 3, got {therapists}")
    if not caseload >= 2:
        raise ModelError(f"--caseload: expected at least 2 patients per therapist, got {caseload}")
    if not 0 <= icc < 1:
        raise ModelError(f"--icc: expected a value in [0, 1), got {icc}")
    if not dispersion >= 0:
        raise ModelError(f"--dispersion: expected a coefficient of variation >= 0, got {dispersion}")
    if reduction is not None and not 0 <= reduction < 1:
        raise ModelError(f"--reduction: expected a relative reduction in [0, 1), got {reduction}")
    if int(reps) != reps or reps < 10:
        raise ModelError(f"--reps: expected an integer of at least 10, got {reps}")


def caseloads(rng: np.random.Generator, therapists: int, caseload: float, dispersion: float = 0.0) -> np.ndarray:
    """Caseloads of ``therapists`` therapists: all ``round(caseload)``, or gamma with mean ``caseload``
    and coefficient of variation ``dispersion`` (rounded, at least 2)."""
    if dispersion <= 0:
        return np.full(therapists, max(int(round(caseload)), 2))
    shape = 1.0 / dispersion**2
    return np.maximum(np.rint(rng.gamma(shape, caseload / shape, therapists)), 2).astype(int)


def simulate_design(rng: np.random.Generator, therapists: int, caseload: float, icc: float,
                    dispersion: float = 0.0, reduction: float | None = None) -> pd.DataFrame:
    """One data set of the design: ``therapist, y`` and, with a ``reduction``, ``arm`` (0/1, each
    patient randomised 1:1) with therapist variance ``icc`` (control) and the variance giving
    ``ICC_feedback = (1 - reduction) icc`` (feedback) over a common residual variance ``1 - icc``."""
    n = caseloads(rng, therapists, caseload, dispersion)
    th = np.repeat(np.arange(therapists), n)
    resid = 1.0 - icc
    if reduction is None:
        u = rng.normal(0.0, math.sqrt(icc), therapists)
        y = u[th] + rng.normal(0.0, math.sqrt(resid), th.size)
        return pd.DataFrame({"therapist": th, "y": y})
    rho_f = (1.0 - reduction) * icc
    s2 = np.array([icc, rho_f * resid / (1.0 - rho_f)])
    u = rng.normal(0.0, 1.0, (therapists, 2)) * np.sqrt(s2)
    arm = rng.integers(0, 2, th.size)
    y = u[th, arm] + rng.normal(0.0, math.sqrt(resid), th.size)
    return pd.DataFrame({"therapist": th, "arm": arm, "y": y})


def large_sample_width(therapists: int, caseload: float, icc: float, level: float = 0.95,
                       dispersion: float = 0.0) -> float:
    """Large-sample width of the ICC interval, ``2 z sqrt(var(ICC))`` with Donner's variance.

    With ``dispersion`` > 0 the expected n0 of gamma caseloads is used: ``E sum n_i^2 / N`` is
    ``caseload (1 + dispersion^2)``, so ``n0 = (K caseload - caseload (1 + D^2)) / (K - 1)``."""
    k = therapists
    if dispersion > 0:
        n0 = (k * caseload - caseload * (1.0 + dispersion**2)) / (k - 1)
        loads = None
        var = 2.0 * (1 - icc) ** 2 * (1 + (n0 - 1) * icc) ** 2 / (n0 * (n0 - 1) * (k - 1))
    else:
        loads = np.full(k, caseload)
        var = float(donner_var_icc(icc, loads.sum(), k, caseloads=loads))
    return 2.0 * float(stats.norm.ppf(0.5 + level / 2.0)) * math.sqrt(var)


def plan(therapists: int, caseload: float, icc: float, *, dispersion: float = 0.0, reduction: float | None = None,
         reps: int = 200, seed: int = 20261121, level: float = 0.95) -> dict:
    """Simulate a design ``reps`` times (seeded) and summarise: see the module docstring.

    Returns ``{"therapists", "caseload", "icc", "dispersion", "reduction", "reps", "seed", "level",
    "expected_ci_width", "median_ci_width", "mc_se_width", "p_singular", "mean_icc", "large_sample_width",
    "power", "mc_se_power"}`` (``power`` None without a ``reduction``).
    """
    _check(therapists, caseload, icc, dispersion, reduction, reps)
    rng = np.random.default_rng(seed)
    widths, singular, est = [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in track(range(reps), f"planning: {reps} simulated designs (interval width, singular fits)"):
            d = simulate_design(rng, therapists, caseload, icc, dispersion)
            fit = RandomInterceptModel(d["y"].to_numpy(), np.ones((len(d), 1)), d["therapist"].to_numpy()).fit()
            lo, hi = fit.icc_interval(level=level, method="profile")
            widths.append(hi - lo)
            singular.append(fit.singular)
            est.append(fit.icc())
    widths = np.asarray(widths)
    out = {"therapists": int(therapists), "caseload": float(caseload), "icc": float(icc),
           "dispersion": float(dispersion), "reduction": None if reduction is None else float(reduction),
           "reps": int(reps), "seed": int(seed), "level": float(level),
           "expected_ci_width": float(widths.mean()), "median_ci_width": float(np.median(widths)),
           "mc_se_width": float(widths.std(ddof=1) / math.sqrt(reps)),
           "p_singular": float(np.mean(singular)), "mean_icc": float(np.mean(est)),
           "large_sample_width": large_sample_width(therapists, caseload, icc, level, dispersion),
           "power": None, "mc_se_power": None}
    if reduction is not None:
        alpha = 1.0 - level
        hits = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in track(range(reps), f"planning: {reps} simulated designs (power)"):
                d = simulate_design(rng, therapists, caseload, icc, dispersion, reduction)
                try:
                    fit = ArmVarianceModel(d["y"].to_numpy(), np.column_stack([np.ones(len(d)), d["arm"]]),
                                           d["therapist"].to_numpy(), d["arm"].to_numpy(),
                                           exog_names=["(Intercept)", "arm"], feedback_level=1).fit()
                except ModelError:
                    continue  # an arm without two therapists: no test, counts as not detected
                icc_arm = fit.icc_point()
                hits += bool(icc_arm[1] < icc_arm[0] and fit.lrt_equal_variances()["p_value"] < alpha)
        p = hits / reps
        out["power"] = float(p)
        out["mc_se_power"] = float(math.sqrt(p * (1 - p) / reps))
    return out


def grid_cells(grid: dict) -> dict[str, dict]:
    """The designs of a ``plan:`` config grid, by a readable id (``K20_N15_icc0.02_D0_R0.5``)."""
    cells = {}
    for k, n, rho, d, r in itertools.product(grid["therapists"], grid["caseload"], grid["icc"],
                                             grid.get("dispersion", [0]), grid.get("reduction", [None])):
        cid = f"K{k}_N{n:g}_icc{rho:g}_D{d:g}" + ("" if r is None else f"_R{r:g}")
        cells[cid] = {"therapists": int(k), "caseload": float(n), "icc": float(rho), "dispersion": float(d),
                      "reduction": None if r is None else float(r)}
    return cells


def plan_grid(results: Sequence[dict]) -> pd.DataFrame:
    """One row per design, sorted (what ``results/plan/grid.csv`` holds)."""
    cols = ["therapists", "caseload", "icc", "dispersion", "reduction", "reps", "seed", "expected_ci_width",
            "mc_se_width", "large_sample_width", "p_singular", "power", "mc_se_power"]
    t = pd.DataFrame([{c: r.get(c) for c in cols} for r in results], columns=cols)
    return t.sort_values(["icc", "dispersion", "reduction", "caseload", "therapists"], na_position="first",
                         kind="mergesort").reset_index(drop=True)


def grid_figure(table: pd.DataFrame, out_png: str) -> None:
    """Expected CI width (and power, where computed) against the number of therapists, one line per
    caseload and ICC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_power = table["power"].notna().any()
    fig, axes = plt.subplots(1, 2 if has_power else 1, figsize=(11 if has_power else 6, 4), squeeze=False)
    for (n, rho, d, r), g in table.groupby(["caseload", "icc", "dispersion", "reduction"], dropna=False, sort=True):
        lab = f"N={n:g}, ICC={rho:g}" + (f", D={d:g}" if d else "") + ("" if pd.isna(r) else f", R={r:g}")
        axes[0, 0].plot(g["therapists"], g["expected_ci_width"], marker="o", label=lab)
        if has_power and g["power"].notna().any():
            axes[0, 1].plot(g["therapists"], g["power"], marker="o", label=lab)
    axes[0, 0].set_xlabel("therapists")
    axes[0, 0].set_ylabel("expected 95% CI width of the ICC")
    axes[0, 0].legend(frameon=False, fontsize=8)
    if has_power:
        axes[0, 1].set_xlabel("therapists")
        axes[0, 1].set_ylabel("power to detect the ICC reduction")
        axes[0, 1].set_ylim(0, 1)
        axes[0, 1].axhline(0.8, color="grey", lw=0.8, ls=":")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100, metadata={"Software": None})
    plt.close(fig)
