"""The package's top-level Python API (usable outside Snakemake)."""

from __future__ import annotations

import sys

import pytest

import therapist_effects as te
from therapist_effects.simulate import simulate_random_intercept


def test_public_names_resolve_and_unknown_names_fail():
    for name in te.__all__:
        assert getattr(te, name) is not None
    with pytest.raises(AttributeError):
        te.no_such_thing  # noqa: B018


def test_random_intercept_api_recovers_simulated_truth():
    # 300 therapists x 40 patients, ICC .08: the profile interval contains the truth (seeded data)
    df = simulate_random_intercept(300, 40, 0.08, seed=11)
    res = te.RandomInterceptModel.from_frame(df, "y", ["x"]).fit()
    lo, hi = res.icc_interval()
    assert lo < 0.08 < hi
    assert set(res.conf_int().index) >= {"(Intercept)", "x", "therapist", "residual"}
    assert "ICC" in res.summary()


def test_import_does_not_load_pymc():
    """Importing the package (as every workflow script does) does not pull in PyMC."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", "import sys, therapist_effects; print('pymc' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
