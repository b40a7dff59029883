"""Progress of long steps with an ETA (therapist_effects.progress), and clean Bayes logs.

- Progress: the ETA is elapsed time per finished unit times the units left (checked with a fake clock),
  lines come at most every ``every`` seconds, steps shorter than ``quiet`` log nothing;
- the bootstrap loops of the engines and nutpie's sampling report through it;
- a Bayesian fit, run as a workflow rule runs it (pipeline.step writing the log file, in a fresh
  interpreter), logs no PyTensor BLAS warning, and PyTensor runs its graphs with Numba (see
  therapist_effects.pytensor_setup), not the degraded C fallback.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from refdata import REFERENCE_DIR

from therapist_effects import progress
from therapist_effects.progress import Progress, format_seconds, track

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_eta_is_elapsed_per_unit_times_units_left(caplog):
    clock = FakeClock()
    p = Progress(10, "boot", every=3, quiet=0, clock=clock)
    assert p.eta() is None
    with caplog.at_level(logging.INFO, logger="therapist_effects.progress"):
        for _ in range(10):
            clock.t += 2.0  # 2 s per unit
            p.update()
            if p.done == 4:
                # 8 s for 4 units: 6 left at 2 s each
                assert p.eta() == pytest.approx(12.0)
        p.finish()
    msgs = [r.getMessage() for r in caplog.records]
    # a line every >= 3 s: after units 2 (4 s), 4 (8 s), 6 (12 s), 8 (16 s); unit 10 is the final line
    assert msgs[:4] == [
        "boot: 2/10 (20%), 4.0 s elapsed, ETA 16 s",
        "boot: 4/10 (40%), 8.0 s elapsed, ETA 12 s",
        "boot: 6/10 (60%), 12 s elapsed, ETA 8.0 s",
        "boot: 8/10 (80%), 16 s elapsed, ETA 4.0 s",
    ]
    assert msgs[4:] == ["boot: 10/10 done in 20 s"]


def test_short_steps_stay_quiet(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="therapist_effects.progress"):
        for _ in track(range(5), "quick", every=0, quiet=10, clock=clock):
            clock.t += 1.0
    assert caplog.records == []


def test_format_seconds():
    assert format_seconds(4.25) == "4.2 s"
    assert format_seconds(42) == "42 s"
    assert format_seconds(185) == "3 min 5 s"
    assert format_seconds(3725) == "1 h 02 min"


def test_bootstrap_reports_progress(monkeypatch, caplog):
    from therapist_effects.models.reml import RandomInterceptModel

    monkeypatch.setattr(progress, "EVERY", 0.0)
    monkeypatch.setattr(progress, "QUIET", 0.0)
    rng = np.random.default_rng(1)
    t = np.repeat(np.arange(20), 10)
    y = rng.standard_normal(20)[t] * 0.5 + rng.standard_normal(t.size)
    res = RandomInterceptModel(y, np.ones((t.size, 1)), t).fit()
    with caplog.at_level(logging.INFO, logger="therapist_effects.progress"):
        res.bootstrap(5, seed=1)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[-1].startswith("parametric bootstrap (5 refits): 5/5 done in ")
    assert any(m.startswith("parametric bootstrap (5 refits): 1/5 (20%)") and "ETA" in m for m in msgs)


BAYES_SCRIPT = """
import sys
import pandas as pd
from therapist_effects import progress
from therapist_effects.pipeline import step

progress.EVERY = 0.0
progress.QUIET = 0.0
with step(sys.argv[1], "fit_ri_bayes"):
    from therapist_effects.models.bayes import BayesConfig, fit_bayes
    import pytensor
    df = pd.read_csv(sys.argv[2])
    fit_bayes("random_intercept", df, "phq9_post", ["phq9_pre"], therapist="therapist_id",
              config=BayesConfig(chains=2, draws=200, tune=200, seed=3, sampler="nutpie"))
    print("MODE", pytensor.config.mode)
"""


def test_bayes_log_has_no_blas_warning_and_reports_sampling_progress(tmp_path):
    log = tmp_path / "fit.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTENSOR_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", BAYES_SCRIPT, str(log), str(REFERENCE_DIR / "therapy_feedback.csv")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = log.read_text()
    assert "blas" not in text.lower(), text
    assert "arviz.preview" not in text, text
    assert "MODE NUMBA" in proc.stdout
    assert "sampling (2 chains x 200 + 200 draws): 800/800 done in" in text, text


def test_profile_intervals_report_progress(monkeypatch, caplog):
    from therapist_effects.models.reml import RandomInterceptModel

    monkeypatch.setattr(progress, "EVERY", 0.0)
    monkeypatch.setattr(progress, "QUIET", 0.0)
    rng = np.random.default_rng(2)
    t = np.repeat(np.arange(20), 10)
    x = rng.standard_normal(t.size)
    y = 0.5 * x + rng.standard_normal(20)[t] * 0.5 + rng.standard_normal(t.size)
    res = RandomInterceptModel(y, np.column_stack([np.ones(t.size), x]), t).fit()
    with caplog.at_level(logging.INFO, logger="therapist_effects.progress"):
        res.conf_int(method="profile")
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("profile intervals of the fixed effects: 2/2 done in ") for m in msgs), msgs
    assert any(m.startswith("profile intervals of the variance components: 1/1 done in ") for m in msgs), msgs
