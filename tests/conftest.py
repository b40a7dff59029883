"""Shared test configuration.

Tests marked ``slow`` (long simulation studies) are skipped in the default run and run with
``pytest -m slow`` (or any ``-m`` expression that names ``slow``); likewise tests marked ``slurm``
(the demo through a local SLURM cluster) run with ``pytest -m slurm``.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    _skip_unless_named(config, items, "slow", "slow simulation study: run with `pytest -m slow`")
    _skip_unless_named(config, items, "slurm", "runs the demo on a local SLURM cluster: run with `pytest -m slurm`")


def _skip_unless_named(config, items, marker: str, reason: str) -> None:
    if marker in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if marker in item.keywords:
            item.add_marker(skip)
