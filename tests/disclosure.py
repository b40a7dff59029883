"""Disclosure checker for the rendered service report and therapist pages.

``printed_integers(html)`` enumerates every integer a reader sees: the text of the page and the alt text
of its figures (style, script and the image data are not text). An integer that is part of a decimal,
a percentage, a date, a version or a pseudonym is not a count and is skipped, as is the ``8`` of the
suppression label ``<8``. Each integer is *rounded* (inside ``<span class="r5">``: the true count lies
within +-2 of it), *public* (inside ``class="pub"``: a setting such as the minimum caseload, or the
number of listed rows, which anyone can count) or *exact* (anything else).

``derivable(printed, hidden)``: the hidden counts (the true values of the counts shown as ``<8``) that
follow by adding or subtracting printed numbers. A sum with coefficients -1, 0, +1 pins a value down
only if every term is exact (one rounded term leaves at least five possible values), so the check is
a subset sum with signs over the exact integers; every combination is tried (dynamic programming over
the reachable sums). Public integers are left out of the sums (``counts from 1 to 7`` would otherwise
"derive" every hidden 1); the tests check separately that each public integer is a setting or a
number of listed therapists. :func:`check` also fails on any exact integer at all, so that a count
printed without rounding is caught even when no hidden count happens to equal a combination. The
negative control in the tests shows the checker finding the exact-total leak of the old report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser

# an integer (with optional thousands commas) that is not part of a decimal, a percentage, a date
# ("2024-01-05", "2024-Q1"), a version ("0.1.0"), a pseudonym ("T-3a4f09..."), or the "<8" label
_INT = re.compile(r"(?<![\w.<\-\u2212#/:,])(\d{1,3}(?:,\d{3})+|\d+)(?![\w.%\-/:]|,\d)")


@dataclass(frozen=True)
class Printed:
    value: int
    kind: str  # "exact", "rounded" or "public"
    context: str


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, str]] = []  # (tag, kind)
        self.out: list[Printed] = []
        self.skip = 0

    def _kind(self) -> str:
        for _, kind in reversed(self.stack):
            if kind:
                return kind
        return "exact"

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        kind = "rounded" if "r5" in classes else ("public" if "pub" in classes else "")
        if tag in ("style", "script", "title"):
            self.skip += 1
        if tag == "img" and a.get("alt"):
            self._text(a["alt"], "exact")
        if tag not in ("img", "br", "meta", "link", "input", "hr"):
            self.stack.append((tag, kind))

    def handle_endtag(self, tag):
        if tag in ("style", "script", "title"):
            self.skip -= 1
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        if not self.skip:
            self._text(data, self._kind())

    def _text(self, data: str, kind: str):
        for m in _INT.finditer(data):
            ctx = data[max(0, m.start() - 30): m.end() + 30].strip()
            self.out.append(Printed(int(m.group(1).replace(",", "")), kind, ctx))


def printed_integers(html: str) -> list[Printed]:
    c = _Collector()
    c.feed(html)
    c.close()
    return c.out


def reachable(values: list[int]) -> set[int]:
    """Every sum of a non-empty subset of ``values`` with signs +-1."""
    sums: set[int] = set()
    for v in values:
        sums = sums | {v, -v} | {s + v for s in sums} | {s - v for s in sums}
    return sums


def derivable(printed: list[Printed], hidden: list[int]) -> list[int]:
    """The hidden counts that follow exactly from the exact and public printed integers."""
    exact = [p.value for p in printed if p.kind == "exact"]
    sums = reachable(exact)
    return sorted({h for h in hidden if h in sums})


def check(html: str, hidden: list[int], round_base: int = 5) -> list[Printed]:
    """Assert no hidden count follows from the printed integers; return them (for further checks)."""
    printed = printed_integers(html)
    leaks = derivable(printed, hidden)
    exact = [p for p in printed if p.kind == "exact"]
    assert not leaks, f"hidden counts {leaks} follow from the printed integers {[p.value for p in printed if p.kind == 'exact']}"
    assert not exact, f"unmarked (exact) integers printed: {[(p.value, p.context) for p in exact]}"
    for p in printed:
        if p.kind == "rounded":
            assert p.value % round_base == 0, f"rounded count {p.value} is not a multiple of {round_base}: {p.context!r}"
    return printed
