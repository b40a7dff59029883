"""Plain-language classification of therapist effects, shared by every engine."""

from __future__ import annotations

import numpy as np

NOT_DISTINGUISHABLE = "not distinguishable from average"


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
