"""The benchmarks cannot rot silently (issue 17): every ``benchmarks/*.py`` offers ``--quick`` (which
``.ci/run`` runs), and the optional R baseline says why it is skipped when R or lme4 is missing.

Running each benchmark in quick mode is left to the CI step (compilation of the Bayesian models
alone takes minutes on a busy 2-core machine); here only their command lines are checked.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def test_there_are_benchmarks():
    assert {"bench_reml.py", "bench_glmm.py", "bench_bayes.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_benchmark_has_a_quick_mode(script):
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "--quick" in r.stdout


def test_ci_runs_every_benchmark_quick_by_globbing():
    ci = (BENCH.parent / ".ci" / "run").read_text()
    assert 'for bench in benchmarks/*.py; do' in ci and 'python "$bench" --quick' in ci


def test_r_baseline_says_why_it_is_skipped(monkeypatch):
    sys.path.insert(0, str(BENCH))
    try:
        import _r_baseline
    finally:
        sys.path.remove(str(BENCH))
    _r_baseline.r_unavailable.cache_clear()
    monkeypatch.setattr(_r_baseline.shutil, "which", lambda name: None)
    try:
        msg = _r_baseline.r_unavailable()
    finally:
        _r_baseline.r_unavailable.cache_clear()
    assert msg is not None and msg.startswith("Rscript not found: R columns skipped")
