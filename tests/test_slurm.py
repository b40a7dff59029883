"""The demo workflow through a real SLURM cluster (`pytest -m slurm`; excluded from the default run).

The fixture starts a single-node cluster with tools/slurm_local.sh when none answers (Debian packages,
root), runs the demo through workflow/profiles/slurm, runs it again locally, and compares the two
estimates.json byte for byte. The local cluster has no accounting database, so job states come from
squeue (`--slurm-status-command squeue`; the script's slurm.conf keeps finished jobs for 600 s).
Snakemake's slurm executor ignores SIGTERM while it waits for a job, so every run has a hard kill
timeout (SIGKILL of its process group), after which the test fails with the tail of its log.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_workflow import ENV, REPO, check_contract, demo_config

pytestmark = pytest.mark.slurm

SCRIPT = REPO / "tools" / "slurm_local.sh"
PROFILE = REPO / "workflow" / "profiles" / "slurm"
HARD_TIMEOUT = 900  # seconds, per snakemake run


def _run(cmd: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    """Run in a new process group and SIGKILL the whole group on timeout."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... killed after {timeout} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.fixture(scope="module")
def slurm_cluster():
    if shutil.which("sbatch") is None or subprocess.run([str(SCRIPT), "status"]).returncode != 0:
        proc = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"could not start the local SLURM cluster:\n{proc.stderr[-3000:]}"
    return True


def _snakemake(workdir: Path, cfg: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(cfg), *extra]
    proc = _run(cmd, workdir, HARD_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc


def test_demo_through_slurm_equals_local_run(slurm_cluster, tmp_path):
    cfg = demo_config(tmp_path, bayes_draws=300)
    on_slurm = tmp_path / "slurm"
    local = tmp_path / "local"
    on_slurm.mkdir()
    local.mkdir()
    proc = _snakemake(on_slurm, cfg, "--profile", str(PROFILE), "--slurm-status-command", "squeue",
                      "--slurm-init-seconds-before-status-checks", "2", "--slurm-keep-successful-logs",
                      "--jobs", "4")
    # the jobs really went through sbatch: one SLURM log per job, by rule
    slurm_logs = on_slurm / ".snakemake" / "slurm_logs"
    for rule in ("rule_ingest", "rule_fit_model", "rule_fit_bayes", "rule_estimates", "rule_meta_report"):
        assert list((slurm_logs / rule).rglob("*.log")), f"no SLURM job log for {rule}:\n{proc.stdout[-3000:]}"
    _snakemake(local, cfg, "--cores", "2")
    a = on_slurm / "results" / "demo" / "estimates.json"
    b = local / "results" / "demo" / "estimates.json"
    check_contract(a)
    assert a.read_bytes() == b.read_bytes()
    # every rule also wrote its benchmark file on the cluster
    assert (on_slurm / "logs" / "benchmarks" / "demo" / "fit_ri.tsv").is_file()
