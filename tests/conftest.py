"""Shared test configuration.

Tests marked ``slow`` (long simulation studies) are skipped in the default run and run with
``pytest -m slow`` (or any ``-m`` expression that names ``slow``).
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow simulation study: run with `pytest -m slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
