"""PyTensor settings for the Bayesian models, applied before PyMC is first imported.

pip-installed PyTensor looks for a BLAS library to link its C backend against; with NumPy's and
SciPy's wheels (whose bundled OpenBLAS exports renamed symbols) it finds none and warns, on every run,
"PyTensor could not link to a BLAS installation. Operations that might benefit from BLAS will be
severely degraded". The warning comes from a graph rewrite that reads ``blas__ldflags``, whatever
backend then runs the graph.

This package samples with nutpie, which compiles the model with Numba; Numba's linear algebra calls
SciPy's OpenBLAS, so nothing runs through PyTensor's C BLAS. :func:`configure` therefore selects the
Numba backend for every PyTensor function (``mode=NUMBA``: PyMC's own NUTS, initial points and
posterior computations then also run through Numba and OpenBLAS, not the degraded C fallback) and
states explicitly that the C backend has no BLAS to link (``blas__ldflags=`` empty), so the search
and its warning never happen. Settings a user gave in ``PYTENSOR_FLAGS`` for these keys win.

It also keeps ArviZ's import-time notes ("arviz_base not installed", level INFO, logger
``arviz.preview``: optional preview packages this package does not use) out of the rule logs.
"""

from __future__ import annotations

import logging
import os
import sys

#: the settings applied unless PYTENSOR_FLAGS already sets the key
SETTINGS = {"mode": "NUMBA", "blas__ldflags": ""}


def _user_keys(flags: str) -> set[str]:
    return {item.split("=", 1)[0].strip() for item in flags.split(",") if "=" in item}


def configure() -> dict[str, str]:
    """Apply :data:`SETTINGS` (those the user did not set); returns what was applied."""
    logging.getLogger("arviz.preview").setLevel(logging.WARNING)
    flags = os.environ.get("PYTENSOR_FLAGS", "")
    applied = {k: v for k, v in SETTINGS.items() if k not in _user_keys(flags)}
    if not applied:
        return {}
    if "pytensor" in sys.modules:  # already imported (e.g. by the caller): set the live config
        import pytensor

        for key, value in applied.items():
            try:
                setattr(pytensor.config, key, value)
            except Exception:  # noqa: BLE001 - a value that can no longer change stays as it is
                pass
        return applied
    extra = ",".join(f"{k}={v}" for k, v in applied.items())
    os.environ["PYTENSOR_FLAGS"] = f"{flags},{extra}" if flags else extra
    return applied
