"""Shared test configuration.

Tests marked ``slow`` (long simulation studies) are skipped in the default run and run with
``pytest -m slow`` (or any ``-m`` expression that names ``slow``); likewise tests marked ``slurm``
(the demo through a local SLURM cluster) run with ``pytest -m slurm``.

No silent skips in CI: when the environment variable ``CI`` is set (to anything but ``""``, ``0``,
``false`` or ``no``), every skip -- a missing fixture file, a missing ``Rscript``, Chromium,
an ``importorskip`` -- is reported as a failure, at run time and at collection. The only skips that
stay skips are the deliberate opt-outs of the slow simulation studies and of the SLURM test (reasons
:data:`OPT_OUT_REASONS`), which are run by ``pytest -m slow`` and ``pytest -m slurm``.
"""

from __future__ import annotations

import os

import pytest

SLOW_REASON = "slow simulation study: run with `pytest -m slow`"
SLURM_REASON = "runs the demo on a local SLURM cluster: run with `pytest -m slurm`"
#: skips that stay skips in CI: the deliberate opt-outs of the default run
OPT_OUT_REASONS = (SLOW_REASON, SLURM_REASON)


def ci_is_set() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_collection_modifyitems(config, items):
    _skip_unless_named(config, items, "slow", SLOW_REASON)
    _skip_unless_named(config, items, "slurm", SLURM_REASON)


def _skip_unless_named(config, items, marker: str, reason: str) -> None:
    if marker in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if marker in item.keywords:
            item.add_marker(skip)


def _skip_reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail_skip(report, what: str) -> None:
    reason = _skip_reason(report.longrepr)
    if any(r in reason for r in OPT_OUT_REASONS):
        return
    report.outcome = "failed"
    report.longrepr = (f"{what} was skipped ({reason.removeprefix('Skipped: ')}), but CI is set: "
                       "in CI every test must run (install what it needs or commit its fixtures)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and ci_is_set() and not hasattr(report, "wasxfail"):
        _fail_skip(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and ci_is_set():
        _fail_skip(report, collector.nodeid or "collection")
