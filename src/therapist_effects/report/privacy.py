"""Privacy safeguards of the therapist-level service report.

- Pseudonyms: a therapist's ID is replaced by ``T-`` and the first 10 hex digits of
  HMAC-SHA256(key, ID) (RFC 2104 / FIPS 198-1), the key read from an environment variable. The
  same key gives the same pseudonyms in every report, so a service can follow a therapist over time
  without the report naming them; without the key the IDs cannot be recovered by hashing guesses.
- Small-number suppression: counts from 1 to ``suppress_below - 1`` (1-7 by default, the usual NHS
  rule for published statistics) are shown as ``<8``, and so is anything from which such a count
  could be worked out (a rate whose numerator or complement is small). Zero is not suppressed.
- Rounding (``round_to=5`` in the service report and the therapist pages): every other count is
  rounded to the nearest 5, as NHS England's publications do, so that no suppressed count can be
  worked out by subtracting printed numbers (an exact total minus exact caseloads): a printed 10
  means 8 to 12. Rounded counts are wrapped in ``<span class="r5">`` by the templates.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from ..exceptions import PseudonymisationError

PSEUDONYM_PREFIX = "T-"
PSEUDONYM_HEX = 10


def pseudonym_key(key_env: str = "TE_PSEUDONYM_KEY") -> bytes:
    """The pseudonymisation key from the environment; a one-line error if it is unset, empty or
    shorter than 16 characters (see :func:`therapist_effects.safety.check_key`)."""
    from ..safety import check_key

    return check_key(key_env)


def pseudonym(therapist_id: object, key: bytes, n_hex: int = PSEUDONYM_HEX) -> str:
    """``T-`` + the first ``n_hex`` hex digits of HMAC-SHA256(key, str(therapist_id))."""
    digest = hmac.new(key, str(therapist_id).encode("utf-8"), hashlib.sha256).hexdigest()
    return PSEUDONYM_PREFIX + digest[:n_hex]


def pseudonymise_ids(ids: Iterable[object], key: bytes) -> dict[str, str]:
    """Map each ID (as a string) to its pseudonym, lengthening all pseudonyms if two collide."""
    ids = sorted({str(i) for i in ids})
    for n_hex in range(PSEUDONYM_HEX, 65, 2):
        mapping = {i: pseudonym(i, key, n_hex) for i in ids}
        if len(set(mapping.values())) == len(ids):
            return mapping
    raise PseudonymisationError("pseudonyms collide even at full HMAC length")  # pragma: no cover


def is_small(n: object, suppress_below: int) -> bool:
    """True for counts 1 .. suppress_below - 1 (the ones to suppress)."""
    try:
        v = int(n)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return 0 < v < suppress_below


def suppressed_label(suppress_below: int) -> str:
    return f"<{suppress_below}"


def round_to(n: int, base: int = 5) -> int:
    """``n`` rounded to the nearest multiple of ``base`` (halves up: 12 -> 10, 13 -> 15)."""
    return int(base * ((int(n) + base // 2) // base)) if base > 1 else int(n)


def safe_count(n: object, suppress_below: int, round_base: int = 1) -> str:
    """A count as text, ``<8`` (etc.) when it is small, else rounded to ``round_base`` (1: exact)."""
    if n is None:
        return "\u2013"
    if is_small(n, suppress_below):
        return suppressed_label(suppress_below)
    return f"{round_to(int(n), round_base):,}"  # type: ignore[arg-type]


def safe_rate(k: object, n: object, suppress_below: int, round_base: int = 1,
              pct_decimals: int = 1) -> tuple[str, str, bool]:
    """(``"k of n"``, percentage, suppressed?) for ``k`` events among ``n`` patients.

    Suppressed when ``k`` or ``n - k`` is small (either would reveal a small group of patients) or
    ``n`` itself is small; then both parts read ``<8`` (etc.). ``k`` and ``n`` are shown rounded to
    ``round_base``; the percentage (``pct_decimals`` decimals) is of the unrounded counts.
    """
    if n is None or int(n) == 0:  # type: ignore[arg-type]
        return "\u2013", "\u2013", False
    k, n = int(k), int(n)  # type: ignore[arg-type]
    if is_small(k, suppress_below) or is_small(n - k, suppress_below) or is_small(n, suppress_below):
        lab = suppressed_label(suppress_below)
        text = lab if is_small(n, suppress_below) else f"{lab} of {round_to(n, round_base):,}"
        return text, "suppressed", True
    return (f"{round_to(k, round_base):,} of {round_to(n, round_base):,}", f"{100 * k / n:.{pct_decimals}f}%",
            False)
