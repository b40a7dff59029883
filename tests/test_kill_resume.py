"""Fault test (issue 10): the workflow killed in the middle of a model fit, then rerun as a user would
(``snakemake --unlock``, then ``--rerun-incomplete``), gives a byte-identical ``estimates.json``.

The killed fit is a parametric bootstrap (seeded, several seconds), killed with SIGKILL to the whole
process group once its log says it has started and before its output exists.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-not-secret-0001"


def _env() -> dict:
    env = {**os.environ, "TE_PSEUDONYM_KEY": KEY}
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cmd(work: Path, cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "1",
            "--directory", str(work), *extra, "results/demo/estimates.json", "--configfile", str(cfg)]


def _config(tmp: Path) -> Path:
    cfg = {
        "seed": 11,
        "datasets": {"demo": {
            "path": str(REPO / "data" / "demo_sessions.csv"), "layout": "session", "instrument": "PHQ-9",
            "export_date": "2025-12-31",
            "columns": {"patient": "patient_id", "therapist": "therapist_id", "score": "phq9",
                        "occasion": "session_date", "arm": "feedback"}}},
        "models": [{"id": "ri", "type": "random_intercept", "interval": "wald"},
                   {"id": "boot", "type": "random_intercept", "interval": "bootstrap"}],
        "intervals": {"bootstrap_replicates": 800},
    }
    path = tmp / "config.yaml"  # one config path for both runs: it is part of provenance.command
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_kill_mid_fit_and_rerun_is_byte_identical(tmp_path):
    cfg = _config(tmp_path)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir()
    killed.mkdir()
    proc = subprocess.run(_cmd(clean, cfg), capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = subprocess.Popen(_cmd(killed, cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                           start_new_session=True)
    log = killed / "logs" / "demo" / "fit_boot.log"
    out = killed / "results" / "demo" / "models" / "boot.json"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and run.poll() is None:
            if log.exists() and "fit_step: start" in log.read_text(errors="replace"):
                break
            time.sleep(0.05)
        assert run.poll() is None, "the workflow ended before the bootstrap fit started"
        time.sleep(0.5)  # inside the fit (imports done, bootstrap running)
        os.killpg(run.pid, signal.SIGKILL)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=60)
    assert not out.exists(), "the fit finished before the kill: not a mid-fit kill"
    assert not (killed / "results" / "demo" / "estimates.json").exists()

    unlock = subprocess.run(_cmd(killed, cfg, "--unlock"), capture_output=True, text=True, env=_env(), timeout=300)
    assert unlock.returncode == 0, unlock.stderr[-2000:]
    proc = subprocess.run(_cmd(killed, cfg, "--rerun-incomplete"), capture_output=True, text=True, env=_env(),
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = (clean / "results" / "demo" / "estimates.json").read_bytes()
    b = (killed / "results" / "demo" / "estimates.json").read_bytes()
    assert a == b
