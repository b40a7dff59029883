"""Figures of the reports, drawn with matplotlib and embedded as base64 PNG ``data:`` URIs.

Colours are the Okabe-Ito palette (distinguishable with the common colour-vision deficiencies);
categories are also told apart by marker shape, not colour alone. Each function returns a
:class:`Figure` holding the image and its alt text (a sentence saying what the figure shows). The
therapist pages' figures are drawn once per dataset as a :class:`Backdrop` (everyone grey), over which
each page lays its own star as inline SVG (:meth:`Backdrop.highlight`, an :class:`Overlay`).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import matplotlib
from matplotlib.markers import MarkerStyle

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from markupsafe import Markup  # noqa: E402
from scipy import stats  # noqa: E402

OKABE_ITO = {
    "blue": "#0072B2", "vermillion": "#D55E00", "green": "#009E73", "orange": "#E69F00",
    "sky": "#56B4E9", "purple": "#CC79A7", "yellow": "#F0E442", "grey": "#6b6b6b", "black": "#000000",
}
CLASS_STYLE = {  # classification -> (colour, marker)
    "better": (OKABE_ITO["blue"], "^"),
    "worse": (OKABE_ITO["vermillion"], "v"),
    "above": (OKABE_ITO["blue"], "^"),
    "below": (OKABE_ITO["vermillion"], "v"),
    "none": (OKABE_ITO["grey"], "o"),
}
DPI = 110
_RC = {
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "axes.spines.top": False,
    "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25, "font.family": "DejaVu Sans",
    "figure.constrained_layout.use": True,
}


@dataclass(frozen=True)
class Figure:
    """An embedded figure: ``src`` is a ``data:image/png;base64,...`` URI; ``alt`` its alt text."""

    src: str
    alt: str
    caption: str = ""


def _encode(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def class_key(label: object) -> str:
    """'better'/'worse'/'above'/'below'/'none' from a classification label."""
    s = str(label).lower()
    for key in ("better", "worse", "above", "below"):
        if s.startswith(key):
            return key
    return "none"


def caterpillar(effect, low, high, classification, *, ylabel: str, title: str,
                note: str = "") -> Figure:
    """Therapist effects, sorted, each with its interval; coloured and shaped by classification."""
    effect, low, high = (np.asarray(a, dtype=float) for a in (effect, low, high))
    keys = np.array([class_key(c) for c in classification])
    order = np.argsort(effect, kind="stable")
    x = np.arange(1, len(effect) + 1)
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(9, 4.2))
        ax.axhline(0, color=OKABE_ITO["black"], lw=0.8)
        for key in ("none", "better", "worse", "above", "below"):
            m = keys[order] == key
            if not m.any():
                continue
            colour, marker = CLASS_STYLE[key]
            label = {"none": "not distinguishable from average", "better": "better than average",
                     "worse": "worse than average", "above": "above average",
                     "below": "below average"}[key]
            ax.vlines(x[m], low[order][m], high[order][m], color=colour, lw=1.1, alpha=0.8)
            ax.scatter(x[m], effect[order][m], color=colour, marker=marker, s=18, zorder=3,
                       label=f"{label} ({int(m.sum())})")
        ax.set_xlabel("therapists, ranked by estimated effect")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_xlim(0, len(effect) + 1)
        ax.legend(loc="upper left", frameon=False, fontsize=9)
        src = _encode(fig)
    counts = {k: int((keys == k).sum()) for k in CLASS_STYLE if (keys == k).any()}
    alt = (f"Caterpillar plot of {len(effect)} therapist effects ranked from lowest to highest, "
           f"each with its interval; effects range from {np.nanmin(effect):.2f} to "
           f"{np.nanmax(effect):.2f}. Classification counts: "
           + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ". " + note).strip()
    return Figure(src, alt)


def histogram(values, *, xlabel: str, title: str) -> Figure:
    values = np.asarray(values, dtype=float)
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(6, 2.8))
        bins = min(30, max(5, int(np.sqrt(len(values))) + 1))
        ax.hist(values, bins=bins, color=OKABE_ITO["sky"], edgecolor="white")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("therapists")
        ax.set_title(title)
        src = _encode(fig)
    alt = (f"Histogram of {xlabel} over {len(values)} therapists: median {np.median(values):g}, "
           f"range {np.min(values):g} to {np.max(values):g}.")
    return Figure(src, alt)


def icc_by_arm(rows: list[tuple[str, float, float | None, float | None]], *, title: str,
               xlabel: str = "ICC (therapist share of outcome variance)") -> Figure:
    """Per-arm ICCs with intervals: ``rows`` of (arm label, icc, low, high)."""
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(6, 0.7 + 0.6 * len(rows)))
        colours = [OKABE_ITO["vermillion"], OKABE_ITO["blue"], OKABE_ITO["green"], OKABE_ITO["orange"]]
        for i, (label, est, lo, hi) in enumerate(rows):
            c = colours[i % len(colours)]
            if lo is not None and hi is not None:
                ax.hlines(i, lo, hi, color=c, lw=2)
            ax.plot([est], [i], "o", color=c, ms=7)
        ax.set_yticks(range(len(rows)), [r[0] for r in rows])
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_xlim(left=0)
        ax.set_title(title)
        src = _encode(fig)
    alt = "ICC by arm with intervals: " + "; ".join(
        f"{r[0]} {r[1]:.3f}" + (f" ({r[2]:.3f} to {r[3]:.3f})" if r[2] is not None and r[3] is not None else "")
        for r in rows) + "."
    return Figure(src, alt)


def narrowing(intercept, slope, *, title: str) -> Figure:
    """Narrowing the gap: each therapist's effect without feedback and with it (left), and the
    change with feedback against the effect without it (right)."""
    a = np.asarray(intercept, dtype=float)
    b = np.asarray(slope, dtype=float)
    with plt.rc_context(_RC):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
        for ai, bi in zip(a, b, strict=True):
            ax1.plot([0, 1], [ai, ai + bi], color=OKABE_ITO["grey"], lw=0.7, alpha=0.6)
        ax1.plot(np.zeros_like(a), a, "o", color=OKABE_ITO["vermillion"], ms=3, label="control")
        ax1.plot(np.ones_like(a), a + b, "s", color=OKABE_ITO["blue"], ms=3, label="feedback")
        ax1.set_xticks([0, 1], ["control", "feedback"])
        ax1.set_xlim(-0.3, 1.3)
        ax1.set_xlabel("arm")
        ax1.set_ylabel("therapist effect")
        ax1.set_title("therapist effects by arm")
        ax2.scatter(a, b, s=14, color=OKABE_ITO["blue"])
        r = float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 and np.std(a) > 0 and np.std(b) > 0 else float("nan")
        if np.isfinite(r):
            coef = np.polyfit(a, b, 1)
            xs = np.linspace(a.min(), a.max(), 20)
            ax2.plot(xs, np.polyval(coef, xs), color=OKABE_ITO["vermillion"], lw=1.2)
        ax2.axhline(0, color="black", lw=0.6)
        ax2.set_xlabel("effect without feedback (intercept)")
        ax2.set_ylabel("change with feedback (slope)")
        ax2.set_title(f"slope against intercept (r = {r:.2f})" if np.isfinite(r) else "slope against intercept")
        fig.suptitle(title)
        src = _encode(fig)
    sd0, sd1 = float(np.std(a, ddof=1)) if len(a) > 1 else float("nan"), \
        float(np.std(a + b, ddof=1)) if len(a) > 1 else float("nan")
    alt = (f"Narrowing-the-gap plot for {len(a)} therapists: spread (SD) of therapist effects "
           f"{sd0:.2f} without feedback and {sd1:.2f} with it; correlation of slope with intercept "
           f"{r:.2f}.")
    return Figure(src, alt)


def residual_panels(fitted, residuals, effects, *, title: str) -> Figure:
    """Residuals against fitted values, normal Q-Q of residuals and of therapist effects."""
    fitted, residuals = np.asarray(fitted, float), np.asarray(residuals, float)
    effects = np.asarray(effects, float)
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.3))
        axes[0].scatter(fitted, residuals, s=5, alpha=0.35, color=OKABE_ITO["blue"], edgecolors="none")
        axes[0].axhline(0, color="black", lw=0.7)
        axes[0].set_xlabel("fitted value")
        axes[0].set_ylabel("residual")
        axes[0].set_title("residuals vs fitted")
        for ax, vals, what in ((axes[1], residuals, "patient residuals"), (axes[2], effects, "therapist effects")):
            (osm, osr), (slope, icpt, _) = stats.probplot(vals[np.isfinite(vals)], dist="norm")
            ax.scatter(osm, osr, s=6, color=OKABE_ITO["blue"], edgecolors="none")
            ax.plot(osm, slope * osm + icpt, color=OKABE_ITO["vermillion"], lw=1)
            ax.set_xlabel("theoretical normal quantile")
            ax.set_ylabel("sample quantile")
            ax.set_title(f"normal Q-Q: {what}")
        fig.suptitle(title)
        src = _encode(fig)
    alt = (f"Diagnostic plots for {title}: residuals against fitted values for {len(residuals)} patients "
           f"(residual SD {np.nanstd(residuals, ddof=1):.2f}), and normal Q-Q plots of the patient residuals "
           f"and of {len(effects)} therapist effects.")
    return Figure(src, alt)


def funnel(n, rate, p0: float, limits: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]], *,
           ylabel: str, title: str) -> Figure:
    """Funnel plot: rate against caseload with control limits ``{level: (n_grid, low, high)}``."""
    n, rate = np.asarray(n, float), np.asarray(rate, float)
    styles = {0.95: ("--", OKABE_ITO["orange"]), 0.998: ("-", OKABE_ITO["vermillion"])}
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(8, 4.2))
        for level, (grid, lo, hi) in sorted(limits.items()):
            ls, c = styles.get(level, (":", OKABE_ITO["grey"]))
            ax.plot(grid, lo, ls, color=c, lw=1.3, label=f"{100 * level:g}% limits")
            ax.plot(grid, hi, ls, color=c, lw=1.3)
        ax.axhline(p0, color=OKABE_ITO["black"], lw=0.9, label=f"service average {100 * p0:.1f}%")
        outer = max(limits) if limits else None
        out = np.zeros(len(n), bool)
        if outer is not None:
            grid, lo, hi = limits[outer]
            out = (rate < np.interp(n, grid, lo)) | (rate > np.interp(n, grid, hi))
        ax.scatter(n[~out], rate[~out], s=22, color=OKABE_ITO["blue"], label="therapist", zorder=3)
        if out.any():
            ax.scatter(n[out], rate[out], s=40, color=OKABE_ITO["vermillion"], marker="D", zorder=4,
                       label="outside 99.8% limits")
        ax.set_xlabel("caseload (patients with the outcome defined)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(-0.02, 1.02)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.set_title(title)
        fig.legend(frameon=False, fontsize=9, loc="outside lower center", ncol=5)
        src = _encode(fig)
    alt = (f"Funnel plot of {ylabel} against caseload for {len(n)} therapists, with the service "
           f"average {100 * p0:.1f}% and 95% and 99.8% control limits that narrow as caseload grows; "
           f"{int(out.sum())} therapists lie outside the 99.8% limits.")
    return Figure(src, alt)


def forest(labels, est, low, high, *, pooled: tuple[str, float, float, float] | None = None,
           prediction: tuple[float, float] | None = None, xlabel: str, title: str,
           reference: float | None = None, weights=None, log: bool = False) -> Figure:
    """Forest plot: one row per study and, below, the pooled estimate as a diamond (and the
    prediction interval as a bar)."""
    est = np.asarray(est, float)
    low = np.asarray([np.nan if v is None else v for v in low], float)
    high = np.asarray([np.nan if v is None else v for v in high], float)
    k = len(est)
    rows = k + (2 if pooled else 0)
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(8, 1.0 + 0.38 * rows))
        w = np.ones(k) if weights is None else np.asarray(weights, float)
        sizes = np.maximum(120 * (w / np.nanmax(w)), 4.0) if np.nanmax(w) > 0 else np.full(k, 40.0)  # area ~ weight
        ys = np.arange(k)
        ok = np.isfinite(low) & np.isfinite(high)
        ax.hlines(ys[ok], low[ok], high[ok], color=OKABE_ITO["blue"], lw=1.3)
        ax.scatter(est, ys, s=sizes, marker="s", color=OKABE_ITO["blue"], zorder=3)
        ticks, ticklabels = list(ys), [str(x) for x in labels]
        if pooled:
            name, pe, plo, phi = pooled
            y = k + 0.8
            if prediction is not None and all(v is not None for v in prediction):
                ax.hlines(y, prediction[0], prediction[1], color=OKABE_ITO["orange"], lw=3, alpha=0.8,
                          label="prediction interval")
            ax.fill([plo, pe, phi, pe], [y, y - 0.3, y, y + 0.3], color=OKABE_ITO["vermillion"],
                    zorder=3, label="pooled estimate")
            ax.axvline(pe, color=OKABE_ITO["vermillion"], lw=0.7, ls=":")
            ticks.append(y)
            ticklabels.append(name)
            ax.legend(frameon=False, fontsize=9, loc="lower right")
        if reference is not None:
            ax.axvline(reference, color="black", lw=0.8)
        if log:  # ratios: symmetric on the log scale
            ax.set_xscale("log")
        ax.set_yticks(ticks, ticklabels)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        src = _encode(fig)
    alt = (f"Forest plot of {xlabel} in {k} studies"
           + (f", pooled estimate {pooled[1]:.3f} ({pooled[2]:.3f} to {pooled[3]:.3f})" if pooled else "")
           + (f", prediction interval {prediction[0]:.3f} to {prediction[1]:.3f}"
              if prediction is not None and all(v is not None for v in prediction) else "") + ".")
    return Figure(src, alt)


def bayes_diagnostics(idata_path, *, title: str, max_vars: int = 4) -> Figure:
    """Trace and rank plots of the variance parameters of a Bayesian fit (InferenceData NetCDF)."""
    import arviz as az

    idata = az.from_netcdf(str(idata_path))
    post = idata.posterior
    names = [v for v in post.data_vars if post[v].ndim == 2]  # scalar parameters (chain, draw)
    preferred = [v for v in names if any(t in v.lower() for t in ("icc", "tau", "sigma", "sd", "var"))]
    names = (preferred or names)[:max_vars]
    if not names:
        raise ValueError("no scalar parameters in the posterior")
    with plt.rc_context({**_RC, "figure.constrained_layout.use": False}):
        fig, axes = plt.subplots(len(names), 2, figsize=(10, 1.9 * len(names)), squeeze=False)
        for i, v in enumerate(names):
            x = post[v].values
            for c in range(x.shape[0]):
                axes[i, 0].plot(x[c], lw=0.5, alpha=0.8,
                                color=list(OKABE_ITO.values())[c % 7])
            axes[i, 0].set_ylabel(v)
            ranks = stats.rankdata(x.ravel()).reshape(x.shape)
            bins = np.linspace(0, x.size, 21)
            for c in range(x.shape[0]):
                h, _ = np.histogram(ranks[c], bins=bins)
                axes[i, 1].step(bins[:-1], h, where="post", color=list(OKABE_ITO.values())[c % 7], lw=1)
            axes[i, 1].axhline(x.shape[1] / 20, color="black", lw=0.7, ls="--")
        axes[-1, 0].set_xlabel("draw")
        axes[-1, 1].set_xlabel("rank of the draw among all chains")
        axes[0, 1].set_ylabel("draws per rank bin")
        axes[0, 0].set_title("trace (one line per chain)")
        axes[0, 1].set_title("rank histogram (flat = chains agree)")
        fig.suptitle(title)
        fig.tight_layout()
        src = _encode(fig)
    n_chain, n_draw = post.sizes.get("chain", 0), post.sizes.get("draw", 0)
    alt = (f"Trace and rank plots for {', '.join(names)} from {n_chain} chains of {n_draw} draws "
           f"({title}).")
    return Figure(src, alt)


# -- service report and therapist pages (one classification rule: therapist_effects.classify) -------------
OTHERS = "#b9bec6"  # the other therapists on a therapist's page: grey, unlabelled
YOU = OKABE_ITO["blue"]
FUNNEL_STAR, CATERPILLAR_STAR, CATERPILLAR_LINE = 90.0, 110.0, 2.2  # star areas (points^2), interval width (points)


def _pt(points: float) -> float:
    """Points (1/72 inch) as pixels of the saved PNG."""
    return points * DPI / 72.0


def _you_proxy(ax, size: float) -> None:
    """The legend's "you" entry: an empty scatter styled as the star (it adds no data, so no limits)."""
    ax.scatter([], [], s=size, color=YOU, marker="*", label="you")


def _funnel_axes(n, value, target: float, grid, low, high, keys, *, level: float, ylabel: str, title: str,
                 page: bool, percent: bool):
    """The funnel plot's axes: on a page (``page``) every therapist grey, else coloured by classification."""
    fig, ax = plt.subplots(figsize=(8, 3.9))
    ax.plot(grid, low, "-", color=OKABE_ITO["vermillion"], lw=1.3, label=f"{100 * level:g}% control limits")
    ax.plot(grid, high, "-", color=OKABE_ITO["vermillion"], lw=1.3)
    ax.axhline(target, color=OKABE_ITO["black"], lw=0.9, label="service average")
    if page:
        ax.scatter(n, value, s=18, color=OTHERS, zorder=2, label="other therapists")
        _you_proxy(ax, FUNNEL_STAR)
    else:
        for key in ("none", "better", "worse", "above", "below"):
            m = keys == key
            if m.any():
                colour, marker = CLASS_STYLE[key]
                words = {"none": "within the limits", "better": "better than the limits",
                         "worse": "poorer than the limits", "above": "above the limits",
                         "below": "below the limits"}[key]
                ax.scatter(n[m], value[m], s=26, color=colour, marker=marker, zorder=3, label=words)
    ax.set_xlabel("caseload (patients)")
    ax.set_ylabel(ylabel)
    if percent:
        ax.set_ylim(-0.02, 1.02)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_title(title)
    fig.legend(frameon=False, fontsize=9, loc="outside lower center", ncol=4)
    return fig, ax


def _funnel_alt(ylabel: str, level: float, page: bool) -> str:
    """The funnel's alt text; it contains no counts (disclosure control)."""
    who = "this therapist (a star) among the other therapists (grey, unlabelled)" if page else "each listed therapist"
    return (f"Funnel plot of {ylabel} against caseload for {who}, with the service average and "
            f"{100 * level:g}% control limits that narrow as caseload grows; points outside the limits "
            "are unlikely to be chance alone.")


def control_funnel(n, value, target: float, grid, low, high, keys, *, level: float, ylabel: str, title: str,
                   highlight: int | None = None, percent: bool = False) -> Figure:
    """Funnel plot with the control limits of one level and each point's classification ``keys``
    ('better' / 'worse' / 'above' / 'below' / 'none', from :func:`therapist_effects.classify.classify_funnel`).

    ``highlight``: index of the one therapist to mark with a star, the others grey and unlabelled: one
    therapist's figure redrawn whole (the pages draw :func:`control_funnel_backdrop` once and overlay the star).
    """
    n, value = np.asarray(n, float), np.asarray(value, float)
    with plt.rc_context(_RC):
        fig, ax = _funnel_axes(n, value, target, grid, low, high, np.asarray(keys, dtype=object), level=level,
                               ylabel=ylabel, title=title, page=highlight is not None, percent=percent)
        if highlight is not None:
            ax.scatter(n[highlight], value[highlight], s=FUNNEL_STAR, color=YOU, marker="*", zorder=4)
        src = _encode(fig)
    return Figure(src, _funnel_alt(ylabel, level, highlight is not None))


def caterpillar_highlight(effect, low, high, highlight: int, *, ylabel: str, title: str) -> Figure:
    """Therapist effects with intervals, sorted; one therapist marked, the others grey and unlabelled: one
    therapist's figure redrawn whole (the pages draw :func:`caterpillar_backdrop` once and overlay the mark)."""
    effect, low, high = (np.asarray(a, dtype=float) for a in (effect, low, high))
    with plt.rc_context(_RC):
        fig, ax, x = _caterpillar_axes(effect, low, high, ylabel=ylabel, title=title)
        ax.vlines(x[highlight], low[highlight], high[highlight], color=YOU, lw=CATERPILLAR_LINE, zorder=3)
        ax.scatter([x[highlight]], [effect[highlight]], color=YOU, marker="*", s=CATERPILLAR_STAR, zorder=4)
        src = _encode(fig)
    return Figure(src, CATERPILLAR_ALT.format(ylabel=ylabel))


CATERPILLAR_ALT = ("Caterpillar plot of therapist effects ({ylabel}) with their intervals, sorted by size; this "
                   "therapist is marked with a star, the others are grey and unlabelled.")


def _caterpillar_axes(effect, low, high, *, ylabel: str, title: str):
    """The page caterpillar's axes (all grey) and each therapist's x position (rank of the effect, from 1)."""
    order = np.argsort(effect, kind="stable")
    x = np.empty(len(effect))
    x[order] = np.arange(1, len(effect) + 1)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.axhline(0, color=OKABE_ITO["black"], lw=0.8)
    ax.vlines(x[order], low[order], high[order], color="#c5cad1", lw=1.0)
    ax.scatter(x[order], effect[order], color="#9aa1ab", s=12, zorder=2, label="other therapists")
    _you_proxy(ax, CATERPILLAR_STAR)
    ax.set_xticks([])
    ax.set_xlabel("therapists (not a ranking: the order only makes the intervals readable)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", frameon=False, fontsize=9)
    return fig, ax, x


# -- therapist pages: each figure drawn once, each page's own mark overlaid (inline SVG over the PNG) -------
@dataclass(frozen=True)
class Overlay:
    """One therapist's mark over a :class:`Backdrop`, in the PNG's pixels (origin top left, y down): a star
    at (``x``, ``y``), optionally the interval from ``top`` to ``bottom``, a "you" label, all clipped to the
    axes box ``clip`` (x, y, width, height) as matplotlib clips its markers."""

    width: int
    height: int
    x: float
    y: float
    star: str
    stroke: float
    clip: tuple[float, float, float, float]
    label_x: float
    label_anchor: str
    top: float | None = None
    bottom: float | None = None
    line: float = 0.0
    colour: str = YOU


@dataclass(frozen=True)
class Backdrop:
    """A page figure drawn once for all therapists (every one grey and unlabelled) and where each
    therapist's mark goes: ``x``, ``y`` (and the interval ``low``, ``high``) in data coordinates, the
    linear map ``scale`` (a_x, b_x, a_y, b_y) from data to the PNG's pixels, pixel = a + b * value."""

    figure: Figure
    width: int
    height: int
    scale: tuple[float, float, float, float]
    clip: tuple[float, float, float, float]
    x: np.ndarray
    y: np.ndarray
    star: str
    stroke: float
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    def pixel(self, x: float, y: float) -> tuple[float, float]:
        """Where the data point (x, y) lands in the PNG (pixels from the top left)."""
        a_x, b_x, a_y, b_y = self.scale
        return a_x + b_x * x, a_y + b_y * y

    def highlight(self, i: int) -> Overlay:
        """Therapist ``i``'s mark, where matplotlib's Agg would draw it on the backdrop."""
        x, y = (_snap(v) for v in self.pixel(self.x[i], self.y[i]))
        right = self.clip[0] + self.clip[2]
        anchor = "start" if x < right - 60 else "end"  # "you" to the right of the star, or left at the edge
        extra = {}
        if self.low is not None and self.high is not None:  # the interval's ends are snapped the same way
            extra = {"top": _snap(self.pixel(self.x[i], self.high[i])[1]),
                     "bottom": _snap(self.pixel(self.x[i], self.low[i])[1]), "line": _pt(CATERPILLAR_LINE)}
        return Overlay(self.width, self.height, x, y, self.star, self.stroke, self.clip,
                       x + (12 if anchor == "start" else -12), anchor, **extra)


def _snap(pixel: float) -> float:
    """Agg centres a marker (and ends a snapped line) on the middle of the pixel its position rounds to."""
    return float(np.floor(pixel + 0.5)) + 0.5


def _star_path(area: float) -> str:
    """SVG path data of matplotlib's "*" marker of ``area`` points^2, centred on 0 (y down), in pixels."""
    marker = MarkerStyle("*")
    verts = marker.get_path().transformed(marker.get_transform()).vertices * _pt(np.sqrt(area))
    return "M" + "L".join(f"{vx:.2f},{-vy:.2f}" for vx, vy in verts[:-1]) + "Z"


def _backdrop(fig, ax, alt: str, x, y, star: float, low=None, high=None) -> Backdrop:
    """Encode ``fig`` once and record its data -> pixel map (after saving: the layout is done at DPI)."""
    src = _encode(fig)
    width, height = (int(v) for v in np.frombuffer(base64.b64decode(src.split(",", 1)[1])[16:24], ">u4"))
    to_fraction = ax.transData + fig.transFigure.inverted()
    (fx0, fy0), (fx1, fy1) = to_fraction.transform([(0.0, 0.0), (1.0, 1.0)])
    w_in, h_in = fig.get_size_inches() * DPI  # the figure at DPI, in pixels (Agg flips y by the PNG's height)
    scale = (fx0 * w_in, (fx1 - fx0) * w_in, height - fy0 * h_in, -(fy1 - fy0) * h_in)
    box = ax.get_position()
    clip = (box.x0 * w_in, height - box.y1 * h_in, box.width * w_in, box.height * h_in)
    # the data URI has no character that HTML escapes: marked safe once, not rescanned by every page's template
    return Backdrop(Figure(Markup(src), alt), width, height, tuple(float(v) for v in scale),
                    tuple(float(v) for v in clip), np.asarray(x, float), np.asarray(y, float), _star_path(star),
                    _pt(plt.rcParams["patch.linewidth"]), low, high)  # scatter's edge: same colour, this width


def control_funnel_backdrop(n, value, target: float, grid, low, high, *, level: float, ylabel: str, title: str,
                            percent: bool = False) -> Backdrop:
    """The therapist pages' funnel plot, drawn once: :func:`control_funnel` with ``highlight`` but no star;
    :meth:`Backdrop.highlight` gives each page its star."""
    n, value = np.asarray(n, float), np.asarray(value, float)
    with plt.rc_context(_RC):
        fig, ax = _funnel_axes(n, value, target, grid, low, high, None, level=level, ylabel=ylabel, title=title,
                               page=True, percent=percent)
        return _backdrop(fig, ax, _funnel_alt(ylabel, level, True), n, value, FUNNEL_STAR)


def caterpillar_backdrop(effect, low, high, *, ylabel: str, title: str) -> Backdrop:
    """The therapist pages' caterpillar plot, drawn once: :func:`caterpillar_highlight` without the mark."""
    effect, low, high = (np.asarray(a, dtype=float) for a in (effect, low, high))
    with plt.rc_context(_RC):
        fig, ax, x = _caterpillar_axes(effect, low, high, ylabel=ylabel, title=title)
        return _backdrop(fig, ax, CATERPILLAR_ALT.format(ylabel=ylabel), x, effect, CATERPILLAR_STAR, low, high)


def run_chart(labels, rate, center: float, lcl, ucl, *, ylabel: str, title: str) -> Figure:
    """Run chart (p-chart) of a rate by period with the centre line and 3-sigma control limits."""
    rate, lcl, ucl = (np.asarray(a, float) for a in (rate, lcl, ucl))
    x = np.arange(len(rate))
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(8, 3.6))
        ax.step(np.r_[x - 0.5, x[-1] + 0.5], np.r_[ucl, ucl[-1]], where="post", color=OKABE_ITO["vermillion"],
                lw=1.2, label="control limits (3 sigma)")
        ax.step(np.r_[x - 0.5, x[-1] + 0.5], np.r_[lcl, lcl[-1]], where="post", color=OKABE_ITO["vermillion"], lw=1.2)
        ax.axhline(center, color=OKABE_ITO["black"], lw=0.9, label="average over the period")
        ok = np.isfinite(rate)
        ax.plot(x[ok], rate[ok], "-o", color=OKABE_ITO["blue"], ms=5, zorder=3, label="recovery rate")
        out = ok & ((rate > ucl) | (rate < lcl))
        if out.any():
            ax.scatter(x[out], rate[out], s=70, color=OKABE_ITO["vermillion"], marker="D", zorder=4,
                       label="outside the limits")
        ax.set_xticks(x, labels, rotation=45 if len(x) > 8 else 0, ha="right" if len(x) > 8 else "center")
        ax.set_ylim(-0.02, 1.02)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.set_ylabel(ylabel)
        ax.set_xlabel("quarter in which treatment ended (last session)")
        ax.set_title(title)
        fig.legend(frameon=False, fontsize=9, loc="outside lower center", ncol=4)
        src = _encode(fig)
    alt = (f"Run chart of the service's {ylabel} by quarter with the average over the period "
           f"({100 * center:.1f}%) and control limits; quarters outside the limits are marked with diamonds.")
    return Figure(src, alt)
