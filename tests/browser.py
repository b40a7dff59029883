"""Render HTML in headless Chromium for the tests (thin wrapper of therapist_effects.report.browser).

``render(html, png)`` returns console errors, exceptions, dialogs, requests, image load states and
the page text; ``screenshot(html, png, width=1280)`` saves a full-page PNG. ``require_chromium()``
skips a test when Chromium is absent, or fails it when the environment variable CI is set.
"""

from __future__ import annotations

import os

import pytest

from therapist_effects.report.browser import BrowserError, PageResult, find_chromium, render, screenshot

__all__ = ["BrowserError", "PageResult", "render", "require_chromium", "screenshot"]


def require_chromium() -> str:
    exe = find_chromium()
    if exe is None:
        msg = "Chromium not installed (apt-get install chromium, or set $CHROMIUM)"
        if os.environ.get("CI"):
            pytest.fail(msg + "; CI is set, so the browser tests must run")
        pytest.skip(msg)
    return exe
