"""Plain-language classification of therapist effects, shared by every engine."""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

NOT_DISTINGUISHABLE = "not distinguishable from average"

#: Default level of the service report's classification: Spiegelhalter's 99.8% control limits
#: (Spiegelhalter DJ, 2005, Funnel plots for comparing institutional performance, Stat Med 24:1185-1202).
CLASSIFICATION_LEVEL = 0.998


def classify_effects(ci_low, ci_high, higher_is_better: bool | None = None) -> np.ndarray:
    """Classify therapists by whether their effect's interval excludes zero (the average therapist).

    With a known direction of the outcome (``higher_is_better`` True or False, e.g. False for PHQ-9
    end scores) the labels are "better than average" / "worse than average"; without one, "above
    average" / "below average". An interval that includes zero gives "not distinguishable from average".
    """
    if higher_is_better is None:
        up, down = "above average", "below average"
    elif higher_is_better:
        up, down = "better than average", "worse than average"
    else:
        up, down = "worse than average", "better than average"
    lo, hi = np.asarray(ci_low, dtype=float), np.asarray(ci_high, dtype=float)
    return np.where(lo > 0, up, np.where(hi < 0, down, NOT_DISTINGUISHABLE))


def z_for(level: float) -> float:
    """Two-sided normal critical value of ``level`` (0.998 -> 3.090, 0.95 -> 1.960)."""
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")
    return float(norm.ppf(0.5 + float(level) / 2.0))


def normal_funnel_limits(target: float, sd: float, n, level: float = CLASSIFICATION_LEVEL):
    """Spiegelhalter's funnel limits for a mean of ``n`` patients: ``target -+ z * sd / sqrt(n)``."""
    n = np.asarray(n, dtype=float)
    half = z_for(level) * float(sd) / np.sqrt(n)
    return target - half, target + half


def classify_funnel(value, low, high, higher_is_better: bool | None = None) -> np.ndarray:
    """The one classification rule of the service report, used for its table and its funnel plots:
    a therapist whose value lies outside the control limits ``(low, high)`` at the classification
    level (99.8% by default, :data:`CLASSIFICATION_LEVEL`) is flagged; on a limit is inside.

    Labels as :func:`classify_effects` (``higher_is_better`` gives better / worse); ``NaN`` values
    (no estimate) are "not distinguishable from average".
    """
    v = np.asarray(value, dtype=float)
    lo, hi = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    with np.errstate(invalid="ignore"):
        # a value above the upper limit is like an interval entirely above zero, and vice versa
        return classify_effects(np.where(v > hi, 1.0, -1.0), np.where(v < lo, -1.0, 1.0), higher_is_better)


def expected_chance_flags(n_therapists: int, level: float = CLASSIFICATION_LEVEL) -> float:
    """How many of ``n_therapists`` would be flagged by chance alone if none differed: n (1 - level)."""
    return float(n_therapists) * (1.0 - float(level))
