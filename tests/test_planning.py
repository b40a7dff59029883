"""Design planning (``python -m therapist_effects plan``): the simulated interval width against a direct
simulation and the large-sample formula, singular-fit probability, power, determinism, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

from therapist_effects.cli import main
from therapist_effects.planning import grid_cells, large_sample_width, plan
from therapist_effects.models.reml import RandomInterceptModel
from therapist_effects.simulate import simulate_random_intercept


def test_width_within_10_percent_of_a_direct_simulation():
    # direct simulation: the package's independent generator (simulate_random_intercept: a covariate x,
    # other seeds) and the engine's public API, y ~ x + (1 | therapist), profile interval of the ICC
    k, n, rho, reps = 30, 20, 0.05, 150
    widths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(reps):
            df = simulate_random_intercept(k, n, rho, seed=10_000 + r)
            fit = RandomInterceptModel.from_frame(df, "y", ["x"], therapist="therapist").fit()
            lo, hi = fit.icc_interval(level=0.95)
            widths.append(hi - lo)
    direct = float(np.mean(widths))
    planned = plan(k, n, rho, reps=reps, seed=7)
    assert planned["expected_ci_width"] == pytest.approx(direct, rel=0.10)


def test_width_against_the_large_sample_formula():
    # Donner: var = 2 (1 - rho)^2 (1 + (n - 1) rho)^2 / (n (n - 1) (k - 1)); width = 2 * 1.959964 * sqrt(var)
    k, n, rho = 100, 20, 0.1
    var = 2 * 0.9**2 * (1 + 19 * 0.1) ** 2 / (20 * 19 * 99)
    assert large_sample_width(k, n, rho) == pytest.approx(2 * 1.959963985 * math.sqrt(var), rel=1e-9)
    res = plan(k, n, rho, reps=100, seed=3)
    # a large design: the simulated profile-interval width is the large-sample width (2.5% here)
    assert res["expected_ci_width"] == pytest.approx(res["large_sample_width"], rel=0.05)
    assert res["p_singular"] == 0.0
    # unequal caseloads widen the interval (Donner's n0 falls below the mean caseload)
    assert large_sample_width(k, n, rho, dispersion=0.8) > large_sample_width(k, n, rho)


def test_singular_fits_seeded_and_power():
    small = plan(10, 8, 0.01, reps=60, seed=1)
    assert small["p_singular"] > 0.3  # few therapists, small ICC: many fits at 0
    assert plan(10, 8, 0.01, reps=60, seed=1) == small  # seeded: identical
    assert plan(10, 8, 0.01, reps=60, seed=2) != small
    null = plan(30, 20, 0.05, reduction=0.0, reps=150, seed=4)
    # no reduction: a directional test at alpha .05 rejects about 2.5% of the time
    assert null["power"] <= 0.06
    big = plan(80, 30, 0.1, reduction=0.7, reps=40, seed=5)
    assert big["power"] >= 0.6 and big["mc_se_power"] == pytest.approx(
        math.sqrt(big["power"] * (1 - big["power"]) / 40))


def test_cli_json_and_errors(capsys):
    assert main(["plan", "--therapists", "12", "--caseload", "10", "--icc", "0.05", "--reps", "20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"expected_ci_width", "p_singular", "power"} <= set(out) and out["power"] is None
    assert out == plan(12, 10, 0.05, reps=20)  # the CLI's default seed is plan()'s
    assert main(["plan", "--therapists", "2", "--caseload", "10", "--icc", "0.05"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: --therapists: expected an integer of at least 3, got 2"
    proc = subprocess.run([sys.executable, "-m", "therapist_effects", "plan", "--therapists", "12", "--caseload", "10",
                           "--icc", "0.05", "--reps", "10", "--reduction", "0.5"], capture_output=True, text=True)
    assert proc.returncode == 0 and "expected_ci_width" in proc.stdout and "power" in proc.stdout


def test_grid_cells_ids():
    cells = grid_cells({"therapists": [10, 20], "caseload": [15], "icc": [0.02], "dispersion": [0],
                        "reduction": [None, 0.5]})
    assert list(cells) == ["K10_N15_icc0.02_D0", "K10_N15_icc0.02_D0_R0.5", "K20_N15_icc0.02_D0",
                           "K20_N15_icc0.02_D0_R0.5"]
    assert cells["K20_N15_icc0.02_D0_R0.5"] == {"therapists": 20, "caseload": 15.0, "icc": 0.02, "dispersion": 0.0,
                                                "reduction": 0.5}


def test_planning_grid_as_snakemake_jobs(tmp_path):
    """A config with only a plan: grid runs one job per design, then the table and the plot."""
    import pandas as pd
    import yaml
    from test_workflow import run_snakemake

    grid = {"therapists": [8, 12], "caseload": [10], "icc": [0.05], "reduction": [None, 0.5], "reps": 10}
    cfg = tmp_path / "plan.yaml"
    cfg.write_text(yaml.safe_dump({"seed": 11, "plan": grid}))
    work = tmp_path / "work"
    work.mkdir()
    proc = run_snakemake(work, "--configfile", str(cfg))
    assert proc.stderr.count("rule plan_cell:") == 4 and "rule plan_grid:" in proc.stderr
    table = pd.read_csv(work / "results" / "plan" / "grid.csv")
    assert len(table) == 4 and (work / "results" / "plan" / "grid.png").stat().st_size > 1000
    assert (work / "logs" / "benchmarks" / "plan" / "grid.tsv").is_file()
    row = table[(table["therapists"] == 12) & (table["reduction"] == 0.5)].iloc[0]
    direct = plan(12, 10, 0.05, reduction=0.5, reps=10, seed=11)  # the config's seed
    assert row["expected_ci_width"] == pytest.approx(direct["expected_ci_width"], rel=1e-12)
    assert row["power"] == pytest.approx(direct["power"]) and row["p_singular"] == pytest.approx(direct["p_singular"])
    assert not (work / "results" / "demo").exists()  # the demo config was not merged in
