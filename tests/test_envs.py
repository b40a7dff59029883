"""Pinned and conda environments.

- requirements.lock pins (==, with hashes) every runtime and test dependency of pyproject.toml;
- workflow/envs/therapist_effects.yaml lists the same runtime dependencies and no path to this
  repository (Snakemake reads the file from its own copy, so a relative path cannot work);
- its post-deploy script installs the package from $THERAPIST_EFFECTS_SOURCE into the active
  environment, run from an unrelated working directory (as `--use-conda --directory WORKDIR` runs it;
  conda itself is not needed for this check: a venv stands in for the created environment);
- the workflow exports THERAPIST_EFFECTS_SOURCE (the repository root) before environments are built.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ENV_FILE = REPO / "workflow" / "envs" / "therapist_effects.yaml"
POST_DEPLOY = REPO / "workflow" / "envs" / "therapist_effects.post-deploy.sh"


def _name(req: str) -> str:
    return re.split(r"[ <>=!\[;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_lock_pins_every_dependency():
    project = _project()
    wanted = {_name(r) for r in project["dependencies"]}
    for extra in ("test", "slurm"):
        wanted |= {_name(r) for r in project["optional-dependencies"][extra]}
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    assert wanted <= set(pins), wanted - set(pins)
    text = (REPO / "requirements.lock").read_text()
    # every pin carries hashes (pip then installs with --require-hashes semantics)
    assert text.count("==") <= text.count("--hash=sha256:")


def test_conda_env_lists_the_dependencies_and_no_repository_path():
    env = yaml.safe_load(ENV_FILE.read_text())
    deps = [d for d in env["dependencies"] if isinstance(d, str)]
    assert not [d for d in env["dependencies"] if isinstance(d, dict)], "no pip section: the package comes from post-deploy"
    names = {_name(d) for d in deps}
    runtime = {_name(r) for r in _project()["dependencies"]} - {"snakemake"}  # snakemake runs outside the env
    runtime = {"matplotlib-base" if n == "matplotlib" else n for n in runtime}
    assert runtime <= names, runtime - names
    assert "python =3.11" in deps
    assert "../" not in ENV_FILE.read_text().split("dependencies:")[1]


def test_post_deploy_installs_the_package_from_any_directory(tmp_path):
    venv = tmp_path / "env"
    # the deps come from this interpreter's site-packages, as they come from conda in a real env
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True, timeout=120)
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    env["VIRTUAL_ENV"] = str(venv)
    env["THERAPIST_EFFECTS_SOURCE"] = str(REPO)
    proc = subprocess.run(["bash", str(POST_DEPLOY)], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import therapist_effects; print(therapist_effects.__file__)"],
                           cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve() == (REPO / "src" / "therapist_effects" / "__init__.py").resolve()


def test_post_deploy_fails_loudly_without_a_source(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "THERAPIST_EFFECTS_SOURCE"}
    proc = subprocess.run(["bash", str(POST_DEPLOY)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "therapist_effects.post-deploy.sh: THERAPIST_EFFECTS_SOURCE='' is not the repository root "
        "(set by workflow/rules/common.smk)"]


def test_workflow_exports_its_source_directory(tmp_path):
    """The Snakefile's process environment carries THERAPIST_EFFECTS_SOURCE = the repository root (a
    run-directive rule, run with --directory elsewhere, writes what it sees)."""
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(
        f'include: "{REPO / "workflow" / "rules" / "common.smk"}"\n\n'
        "rule probe:\n    output: 'probe.txt'\n    log: 'probe.log'\n"
        "    run:\n        Path(output[0]).write_text(os.environ['THERAPIST_EFFECTS_SOURCE'])\n"
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"meta": {"studies": "x.csv"}}))
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--cores", "1",
                           "--directory", str(work), "probe.txt", "--configfile", str(cfg)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "probe.txt").read_text() == str(tmp_path)
