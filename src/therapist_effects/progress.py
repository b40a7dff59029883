"""Progress of long steps (bootstrap refits, profile intervals, simulation studies, sampling) in the log,
with an estimated time to completion.

    for b in track(range(n_boot), "bootstrap of model ri"):
        ...

logs (logger ``therapist_effects.progress``, level INFO) at most every ``every`` seconds and at the end::

    bootstrap of model ri: 120/1000 (12%), 6.0 s elapsed, ETA 44 s
    bootstrap of model ri: 1000/1000 done in 49.8 s

Nothing is logged for a step that finishes within ``quiet`` seconds, so short runs keep short logs.
The messages go to the rule's log file through :func:`therapist_effects.pipeline.step`; they never go
into outputs, so outputs stay byte-identical.
"""

from __future__ import annotations

import logging
import time
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger("therapist_effects.progress")

#: default seconds between two progress lines
EVERY = 10.0
#: steps shorter than this log nothing
QUIET = 2.0


def format_seconds(s: float) -> str:
    """``42 s``, ``3 min 5 s``, ``1 h 02 min``."""
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    if s < 3600:
        m, sec = divmod(int(round(s)), 60)
        return f"{m} min {sec} s"
    h, rem = divmod(int(round(s)), 3600)
    return f"{h} h {rem // 60:02d} min"


class Progress:
    """Counts finished units of a step of known size and logs the rate and the ETA.

    ``clock`` is injectable (tests); the ETA is the elapsed time per finished unit times the units left.
    """

    def __init__(self, total: int, label: str, *, every: float | None = None, quiet: float | None = None,
                 logger: logging.Logger | None = None, clock=time.monotonic):
        self.total = int(total)
        self.label = label
        self.every = float(EVERY if every is None else every)
        self.quiet = float(QUIET if quiet is None else quiet)
        self.log = logger or log
        self.clock = clock
        self.start = clock()
        self.done = 0
        self._last = self.start
        self._logged = False

    def eta(self) -> float | None:
        """Seconds left at the current rate (None before the first unit is finished)."""
        if self.done <= 0:
            return None
        elapsed = self.clock() - self.start
        return elapsed / self.done * max(self.total - self.done, 0)

    def message(self) -> str:
        elapsed = self.clock() - self.start
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = self.eta()
        eta_s = "ETA unknown" if eta is None else f"ETA {format_seconds(eta)}"
        return f"{self.label}: {self.done}/{self.total} ({pct:.0f}%), {format_seconds(elapsed)} elapsed, {eta_s}"

    def update(self, n: int = 1) -> None:
        self.set(self.done + n)

    def set(self, done: int) -> None:
        """Record that ``done`` units are finished (logs when ``every`` seconds have passed)."""
        self.done = int(done)
        now = self.clock()
        if now - self._last >= self.every and now - self.start >= self.quiet and self.done < self.total:
            self.log.info("%s", self.message())
            self._last = now
            self._logged = True

    def finish(self) -> None:
        elapsed = self.clock() - self.start
        if self._logged or elapsed >= self.quiet:
            self.log.info("%s: %d/%d done in %s", self.label, self.done, self.total, format_seconds(elapsed))


def track(iterable: Iterable[T], label: str, total: int | None = None, **kwargs) -> Iterator[T]:
    """Iterate over ``iterable`` and log progress with an ETA (see :class:`Progress`)."""
    if total is None:
        total = len(iterable)  # type: ignore[arg-type]
    prog = Progress(total, label, **kwargs)
    for item in iterable:
        yield item
        prog.update()
    prog.finish()


@contextmanager
def nutpie_progress(label: str, *, every: float | None = None, quiet: float | None = None):
    """Log nutpie's sampling progress (draws finished, warm-up included, over all chains) with an ETA.

    Yields the ``progress_bar`` argument to pass to ``nutpie.sample`` inside the block. nutpie reports
    progress to a terminal bar or, in notebooks, through a template callback; here its terminal bar is
    swapped for that callback for the duration of the block, rendering only the two counts. Where that
    interface is missing (another nutpie version) the block yields ``False``: sampling without progress.
    """
    try:
        import nutpie.sample  # noqa: F401

        mod = sys.modules["nutpie.sample"]
        real = mod._lib
        real.ProgressType.template_callback  # noqa: B018 - present in the supported versions
    except Exception:  # noqa: BLE001
        yield False
        return
    state: dict[str, Progress] = {}

    def callback(text: str) -> None:
        try:
            done, total = (int(x) for x in text.split())
        except ValueError:
            return
        prog = state.get("p")
        if prog is None:
            prog = state["p"] = Progress(total, label, every=every, quiet=quiet)
        prog.set(done)

    class _ProgressType:
        none = staticmethod(real.ProgressType.none)

        @staticmethod
        def indicatif(rate):
            return real.ProgressType.template_callback(
                int(min(rate, 1000)), "{{ total_finished_draws }} {{ total_draws }}", 1, callback)

    class _Lib:
        ProgressType = _ProgressType

        def __getattr__(self, name):
            return getattr(real, name)

    mod._lib = _Lib()
    try:
        yield True
    finally:
        mod._lib = real
    if "p" in state:  # sampling returned: every draw is done, whether or not a last report came
        state["p"].done = state["p"].total
        state["p"].finish()
