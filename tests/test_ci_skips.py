"""The conftest turns skips into failures when CI is set (issue 16): checked by running pytest on a
throw-away test directory that uses this repository's conftest, with and without CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

CASES = '''
import pytest

def test_needs_fixture(tmp_path):
    pytest.skip("reference file tests/reference/missing.csv not found")

@pytest.mark.slow
def test_long_study():
    pass

@pytest.mark.skipif(True, reason="Rscript not installed")
def test_needs_r():
    pass

def test_runs():
    assert True
'''

MODULE_SKIP = '''
import pytest
pytest.importorskip("a_module_that_is_not_installed_anywhere")

def test_never():
    pass
'''


def _run(tmp_path: Path, ci: str | None, source: str = CASES) -> subprocess.CompletedProcess:
    d = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    shutil.copy(HERE / "conftest.py", d / "conftest.py")
    (d / "test_cases.py").write_text(source)
    (d / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-n", "0", "-p", "no:cacheprovider", str(d)],
                          cwd=d, env=env, capture_output=True, text=True, timeout=120)


def test_skips_stay_skips_without_ci(tmp_path):
    r = _run(tmp_path, None)
    assert r.returncode == 0, r.stdout
    assert "1 passed, 3 skipped" in r.stdout
    assert "reference file tests/reference/missing.csv not found" in r.stdout  # -rs lists the reason
    r = _run(tmp_path, None, MODULE_SKIP)
    assert r.returncode == 5 and "1 skipped" in r.stdout, r.stdout  # 5: nothing ran, nothing failed


@pytest.mark.parametrize("ci", ["true", "1"])
def test_skips_fail_when_ci_is_set_except_the_slow_opt_out(tmp_path, ci):
    r = _run(tmp_path, ci)
    assert r.returncode == 1, r.stdout
    # the run-time skip (fixture) fails, the skipif (R) errors at setup; the slow study stays skipped
    assert "1 failed, 1 passed, 1 skipped, 1 error" in r.stdout, r.stdout
    assert "test_needs_fixture was skipped (reference file tests/reference/missing.csv not found), but CI is set" in r.stdout
    assert "test_needs_r was skipped (Rscript not installed), but CI is set" in r.stdout
    # a module-level importorskip is a collection error
    r = _run(tmp_path, ci, MODULE_SKIP)
    assert r.returncode == 2 and "1 error" in r.stdout, r.stdout
    assert "test_cases.py was skipped (could not import 'a_module_that_is_not_installed_anywhere'" in r.stdout


def test_ci_false_means_not_set(tmp_path):
    assert _run(tmp_path, "false").returncode == 0
