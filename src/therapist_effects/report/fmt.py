"""How numbers are written in the reports (one rule, used everywhere and checked by the tests).

- Estimates: 3 decimals (``0.052``, ``24.611``); magnitudes below 0.01 get 3 significant digits
  (``0.00523``, at most 6 decimals); magnitudes of 1,000 or more get 1 decimal (``-6278.9``);
  exactly zero is ``0``.
- Intervals: ``estimate (low to high)``, all three with the estimate's number of decimals (the bounds'
  largest when the estimate is zero or missing, at least 1): ``0.052 (0.031 to 0.081)``.
- p-values: 3 decimals, ``< 0.001`` below that.
- Counts: integers with thousands separators (``4,059``). Percentages: 1 decimal (``52.3%``).
- Missing values (None, NaN): an en dash.

Every number written into a table cell also carries its unrounded value in ``data-value`` so that
readers (and tests) can check the displayed text against the estimate.
"""

from __future__ import annotations

import math
from typing import Any

MISSING = "\u2013"


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def decimals(x: Any) -> int:
    """Number of decimals the rule gives ``x`` (0 for missing values)."""
    v = _finite(x)
    if v is None or v == 0:
        return 0
    a = abs(v)
    if a >= 1000:
        return 1
    if a >= 0.01:
        return 3
    return min(6, 2 - math.floor(math.log10(a)))


def num(x: Any, digits: int | None = None) -> str:
    """One estimate, written by the rule (or with ``digits`` decimals)."""
    v = _finite(x)
    if v is None:
        return MISSING
    if v == 0 and digits is None:
        return "0"
    d = decimals(v) if digits is None else digits
    s = f"{v:,.{d}f}" if abs(v) >= 10000 else f"{v:.{d}f}"
    if s.startswith("-") and float(s.replace(",", "")) == 0:
        s = s[1:]
    return s.replace("-", "\u2212")


def interval(est: Any, low: Any, high: Any) -> str:
    """``estimate (low to high)`` with a common number of decimals; the estimate alone if no bounds."""
    if _finite(low) is None or _finite(high) is None:
        return num(est)
    d = decimals(est) or max(decimals(low), decimals(high), 1)
    return f"{num(est, d)} ({num(low, d)} to {num(high, d)})"


def pval(p: Any) -> str:
    v = _finite(p)
    if v is None:
        return MISSING
    return "< 0.001" if v < 0.001 else f"{v:.3f}"


def count(n: Any) -> str:
    v = _finite(n)
    if v is None:
        return MISSING
    return f"{int(round(v)):,}"


def pct(x: Any) -> str:
    """A proportion (0..1) as a percentage with 1 decimal."""
    v = _finite(x)
    if v is None:
        return MISSING
    return f"{100 * v:.1f}%"


def parse(text: str) -> float:
    """Inverse of :func:`num` (for tests and readers): the displayed value as a float."""
    return float(text.replace("\u2212", "-").replace(",", ""))
