"""End-to-end runs of the Snakemake workflow, as a user runs it.

- the demo (the README's first command, in a scratch directory): every output exists, estimates.json
  validates against the contract's schema, the row accounting holds, and a second run from scratch gives
  a byte-identical estimates.json;
- the contract's "own data" command on tests/reference/exam.csv and therapy_feedback.csv (patient
  layout) with --configfile and --directory, no code changes;
- a broken config stops with one line naming the file and key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest
import yaml
from refdata import REFERENCE_DIR

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REFERENCE_DIR
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
ENV = {**os.environ, "TE_PSEUDONYM_KEY": "test-key-not-secret-0001"}  # >= 16 characters


def run_snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--cores", "2", "--directory", str(workdir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=1500)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def estimates_schema() -> dict:
    with open(REPO / "workflow" / "schemas" / "estimates.schema.yaml", encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def check_contract(path: Path) -> dict:
    est = json.loads(path.read_text())
    jsonschema.validate(est, estimates_schema())
    return est


def demo_config(tmp: Path, *, bayes_draws: int | None = None) -> Path:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["datasets"]["demo"]["path"] = str(REPO / "data" / "demo_sessions.csv")
    if bayes_draws is not None:
        cfg["bayes"].update(chains=2, draws=bayes_draws, tune=bayes_draws)
    path = tmp / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    cfg = demo_config(work)
    run_snakemake(work, "--configfile", str(cfg))
    return work, cfg


def test_demo_outputs_and_contract(demo_run):
    work, _ = demo_run
    res = work / "results" / "demo"
    for name in ("estimates.json", "therapists.csv", "patients.parquet", "patients.csv", "rejects.csv",
                 "per_cluster.csv", "report.html", "therapist_report.html"):
        assert (res / name).is_file(), name
    assert (work / "results" / "meta" / "report.html").is_file()
    est = check_contract(res / "estimates.json")
    rejects = pd.read_csv(res / "rejects.csv")
    # rows_read = rows used + rows_rejected, and every rejected row is listed in rejects.csv
    assert est["rows_read"] == est["rows_used"] + est["rows_rejected"]
    assert est["rows_rejected"] == len(rejects) > 0
    assert sum(est["rejected_by_reason"].values()) == est["rows_rejected"]
    raw = pd.read_csv(REPO / "data" / "demo_sessions.csv")
    assert est["rows_read"] == len(raw)
    assert set(est["models"]) == {"ri", "arm", "nested", "recovery", "slope", "ri_bayes"}
    ri = est["models"]["ri"]
    assert ri["formula"].startswith("phq9_end ~ phq9_baseline + age + sex + feedback + (1 | therapist_id)")
    assert 0 <= ri["icc"]["ci_low"] <= ri["icc"]["estimate"] <= ri["icc"]["ci_high"] < 1
    arm = est["models"]["arm"]
    assert set(arm["icc_by_arm"]) == {"0", "1"}
    assert {"therapist[0]", "therapist[1]", "residual"} <= set(arm["variance_components"])
    assert arm["icc_reduction"]["estimate"] == pytest.approx(1 - arm["icc_ratio"]["estimate"])
    assert est["models"]["recovery"]["family"] == "binomial"
    assert est["models"]["ri_bayes"]["method"] == "bayes"
    assert est["provenance"]["data_sha256"]
    therapists = pd.read_csv(res / "therapists.csv")
    assert {"model", "therapist", "caseload", "effect", "ci_low", "ci_high", "classification"} <= set(therapists.columns)


def test_demo_is_byte_identical_on_rerun(demo_run, tmp_path):
    first, cfg = demo_run
    second = tmp_path / "again"
    second.mkdir()
    run_snakemake(second, "--configfile", str(cfg))
    a = (first / "results" / "demo" / "estimates.json").read_bytes()
    b = (second / "results" / "demo" / "estimates.json").read_bytes()
    assert a == b


def _own_data_run(tmp_path: Path, name: str, dataset: dict, models: list | None = None) -> dict:
    cfg = {"datasets": {name: dataset}}
    if models is not None:
        cfg["models"] = models
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    work.mkdir()
    run_snakemake(work, "results/" + name + "/estimates.json", "--configfile", str(path))
    return check_contract(work / "results" / name / "estimates.json")


def test_exam_patient_layout(tmp_path):
    est = _own_data_run(
        tmp_path,
        "exam",
        {"path": str(REFERENCE / "exam.csv"), "layout": "patient",
         "columns": {"patient": "student", "therapist": "school", "outcome": "normexam", "baseline": "standLRT"}},
    )
    assert est["n_patients"] == 4059 and est["n_therapists"] == 65 and est["rows_rejected"] == 0
    ri = est["models"]["ri"]
    assert ri["formula"] == "normexam ~ standLRT + (1 | school)"
    # lmer(normexam ~ standLRT + (1 | school), data = Exam, REML = TRUE): school variance 0.09383898839
    assert ri["variance_components"]["therapist"]["estimate"] == pytest.approx(0.09383898839, rel=1e-4)
    assert set(est["skipped_models"]) == {"arm", "nested", "recovery"}


def test_therapy_feedback_patient_layout(tmp_path):
    est = _own_data_run(
        tmp_path,
        "fb",
        {"path": str(REFERENCE / "therapy_feedback.csv"), "layout": "patient",
         "columns": {"patient": "patient_id", "therapist": "therapist_id", "outcome": "phq9_post",
                     "baseline": "phq9_pre", "arm": "feedback"}},
        models=[{"id": "ri", "type": "random_intercept"}, {"id": "arm", "type": "arm_variance"},
                {"id": "recovery", "type": "random_intercept", "family": "binomial", "outcome": "recovered",
                 "method": "laplace"}],
    )
    assert est["n_patients"] == 2070
    # lmer(phq9_post ~ phq9_pre + feedback + (1 | therapist_id), REML = TRUE): therapist variance 0.8629748692
    assert est["models"]["ri"]["variance_components"]["therapist"]["estimate"] == pytest.approx(0.8629748692, rel=1e-4)
    # lmer(phq9_post ~ phq9_pre + feedback + (0 + control | therapist_id) + (0 + feedback | therapist_id)):
    # control 2.350000288, feedback 0.6810181182
    vc = est["models"]["arm"]["variance_components"]
    assert vc["therapist[0]"]["estimate"] == pytest.approx(2.350000288, rel=1e-3)
    assert vc["therapist[1]"]["estimate"] == pytest.approx(0.6810181182, rel=1e-3)
    # glmer(recovered ~ phq9_pre + feedback + (1 | therapist_id), family = binomial, nAGQ = 1): 0.03814374725
    rec = est["models"]["recovery"]
    assert rec["outcome"] == "recovered"
    assert rec["variance_components"]["therapist"]["estimate"] == pytest.approx(0.03814374725, rel=1e-3)


def test_broken_config_stops_with_one_line(tmp_path):
    cfg = {"datasets": {"x": {"path": "x.csv", "layout": "wide", "columns": {"patient": "p", "therapist": "t"}}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(tmp_path, "--configfile", str(path), "-n", check=False)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "config error" in ln]
    assert lines == [f"config error: {path}: datasets.x.layout: 'wide' is not one of ['patient', 'session']"]
    assert "Traceback" not in proc.stderr


def test_missing_column_stops_with_one_line(tmp_path):
    data = tmp_path / "d.csv"
    pd.DataFrame({"p": ["a", "b"], "t": ["x", "y"], "y": [1.0, 2.0]}).to_csv(data, index=False)
    cfg = {"datasets": {"d": {"path": str(data), "layout": "patient",
                              "columns": {"patient": "p", "therapist": "t", "outcome": "score"}}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "w"
    work.mkdir()
    proc = run_snakemake(work, "results/d/patients.parquet", "--configfile", str(path), check=False)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR therapist_effects")]
    assert len(errors) == 1 and "'score'" in errors[0] and str(data.name) in errors[0]
    assert "Traceback" not in proc.stderr


def test_lint_is_clean():
    proc = subprocess.run([*SNAKEMAKE, "--lint", "--snakefile", str(REPO / "Snakefile")], cwd=REPO,
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_snakemake_report_builds(demo_run):
    """`snakemake --report` collects the outputs tagged with report() and their captions."""
    work, cfg = demo_run
    proc = run_snakemake(work, "--report", "report.zip", "--configfile", str(cfg))
    assert proc.returncode == 0
    import zipfile

    with zipfile.ZipFile(work / "report.zip") as zf:
        names = zf.namelist()
    for expected in ("estimates.json", "therapists.csv", "report.html", "therapist_report.html", "rejects.csv"):
        assert any(n.endswith(expected) for n in names), expected


def test_therapy_trials_one_stage_and_two_stage(tmp_path):
    """Multi-trial data: trial fixed effects with arm-specific therapist variances, a random trial
    level, the nested model, and the per-trial (two-stage) pooling, from one config."""
    est = _own_data_run(
        tmp_path,
        "trials",
        {"path": str(REFERENCE / "therapy_trials.csv"), "layout": "patient",
         "columns": {"patient": "patient_id", "therapist": "therapist_id", "outcome": "phq9_post",
                     "baseline": "phq9_pre", "arm": "feedback", "cluster": "trial_id"}},
        models=[{"id": "nested", "type": "nested"},
                {"id": "arm_fixed", "type": "arm_variance", "cluster_effect": "fixed"},
                {"id": "arm_random", "type": "arm_variance", "cluster_effect": "random"}],
    )
    ref = json.loads((REFERENCE / "lme4_reference.json").read_text())["therapy_trials"]
    # lmer(phq9_post ~ phq9_pre + feedback + (1 | trial_id/therapist_id), REML = TRUE)
    nested = est["models"]["nested"]["variance_components"]
    assert nested["therapist"]["estimate"] == pytest.approx(ref["nested_REML"]["variance"]["therapist_id:trial_id:(Intercept)"], rel=1e-4)
    # lmer(phq9_post ~ phq9_pre + feedback + trial_id + (0 + control | therapist_id) + (0 + feedback | therapist_id))
    fixed = est["models"]["arm_fixed"]
    assert fixed["formula"] == "phq9_post ~ phq9_pre + feedback + trial_id + diag(0 + factor(feedback) | therapist_id)"
    assert fixed["variance_components"]["therapist[0]"]["estimate"] == pytest.approx(0.8311805431, rel=1e-4)
    assert fixed["variance_components"]["therapist[1]"]["estimate"] == pytest.approx(0.6893769324, rel=1e-4)
    assert fixed["fixed_effects"]["trial_idS01"]["estimate"] == pytest.approx(-0.4076579953, rel=1e-4)
    rnd = est["models"]["arm_random"]
    assert "cluster" in rnd["variance_components"] and rnd["converged"]
    # the random trial level sits between no trial term and trial fixed effects
    assert 0 < rnd["variance_components"]["therapist[0]"]["estimate"] < 1.0
    meta = est["meta"]
    assert (meta["method"], meta["test"], meta["scale"]) == ("REML", "z", "fisher_z")  # the defaults
    # two-stage: tau2 is 0 here (as metafor's REML gives on these trials, lme4_reference.json), so the
    # pooled Fisher z is the inverse-variance mean of atanh(icc_s) with v_s Donner's variance at the mean
    # ICC rho (unbalanced n0 of each trial) over (1 - rho^2)^2
    pc = pd.read_csv(tmp_path / "work" / "results" / "trials" / "per_cluster.csv")
    rho, n0, k = pc["icc"].mean(), pc["n0"], pc["n_therapists"]
    v = 2 * (1 - rho) ** 2 * (1 + (n0 - 1) * rho) ** 2 / (n0 * (n0 - 1) * (k - 1)) / (1 - rho**2) ** 2
    z = (np.arctanh(pc["icc"]) / v).sum() / (1 / v).sum()
    assert meta["pooled"]["tau2"] == 0 and meta["pooled"]["estimate"] == pytest.approx(z, rel=1e-10)
    assert meta["pooled"]["icc"]["estimate"] == pytest.approx(np.tanh(z), rel=1e-10)
    assert len(meta["leave_one_out"]) == 6 and sum(meta["pooled"]["weights"]) == pytest.approx(100)
    # one-stage: the nested model's ICC, lme4 (1 | trial_id/therapist_id) variances 0.4235489072 /
    # (0.4235489072 + 0.05726135832 + 26.31745758)
    assert meta["one_stage"]["estimate"] == pytest.approx(0.4235489072 / (0.4235489072 + 0.05726135832 + 26.31745758),
                                                          rel=1e-4)
    # the feedback meta-analysis: per-arm pooled ICCs, the two-stage log ratio and the one-stage arm model
    # with a random trial level (its ratio is the arm_random model's)
    assert meta["arms"]["control"]["k"] == 6 and "ratio" in meta["arms"]
    rnd_icc = rnd["icc_by_arm"]
    assert meta["one_stage_arms"]["ratio"]["estimate"] == pytest.approx(
        rnd_icc["1"]["estimate"] / rnd_icc["0"]["estimate"], rel=1e-4)


def test_meta_analysis_of_published_iccs_without_raw_data(tmp_path):
    """A meta-analyst's config: no datasets, only a study-level table of published ICCs."""
    ref = json.loads((REFERENCE / "lme4_reference.json").read_text())["therapy_trials"]
    studies = pd.DataFrame({
        "study": [r["trial"] for r in ref["per_trial"]], "icc": [r["icc"] for r in ref["per_trial"]],
        "n_patients": [r["n"] for r in ref["per_trial"]], "n_therapists": [r["k"] for r in ref["per_trial"]],
        "var_icc": [r["var_icc"] for r in ref["per_trial"]],
    })
    studies.to_csv(tmp_path / "published.csv", index=False)
    cfg = tmp_path / "meta.yaml"
    cfg.write_text(yaml.safe_dump({"meta": {"studies": str(tmp_path / "published.csv"), "method": "DL",
                                            "scale": "logit"}}))
    work = tmp_path / "work"
    work.mkdir()
    run_snakemake(work, "--configfile", str(cfg))
    pooled = json.loads((work / "results" / "meta" / "pooled.json").read_text())["pooled"]
    # metafor: rma(yi, vi, data = per_trial, method = "DL"): estimate -3.629806538, se 0.3710704194, tau2 0
    dl = ref["pooled_logit_icc"]["DL"][0]
    assert pooled["estimate"] == pytest.approx(dl["estimate"], rel=1e-6)
    assert pooled["se"] == pytest.approx(dl["se"], rel=1e-6)
    assert pooled["ci_low"] == pytest.approx(dl["ci.lb"], rel=1e-6)
    assert pooled["tau2"] == pytest.approx(ref["pooled_logit_icc"]["tau2_DL"], abs=1e-10)
    assert (work / "results" / "meta" / "report.html").is_file()
    assert not (work / "results" / "demo").exists()  # the demo config was not merged in


RULE_FILES = sorted((REPO / "workflow" / "rules").glob("*.smk"))


def _rule_blocks() -> dict[str, str]:
    import re

    blocks = {}
    for f in [REPO / "Snakefile", *RULE_FILES]:
        text = f.read_text()
        for m in re.finditer(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", text, re.S | re.M):
            blocks[m.group(1)] = m.group(2)
    return blocks


def test_every_rule_declares_benchmark_and_resources():
    """CONTRACT Additions: every rule writes a benchmark: file; every rule states mem_mb, runtime and
    threads so that a cluster profile can request them."""
    blocks = {k: v for k, v in _rule_blocks().items() if k != "all"}  # `all` is the target, runs nothing
    assert {"ingest", "patient_outcomes", "fit_model", "fit_bayes", "estimates", "meta_report"} <= set(blocks)
    for name, body in blocks.items():
        assert "    benchmark:\n" in body, name
        assert "    threads:" in body, name
        assert "mem_mb=" in body and "runtime=" in body, name


def test_demo_benchmark_files(demo_run):
    """Each job of the demo run wrote its Snakemake benchmark (seconds, peak RSS) under logs/benchmarks/."""
    work, _ = demo_run
    bench = work / "logs" / "benchmarks"
    expected = ["demo/ingest.tsv", "demo/patient_outcomes.tsv", "demo/estimates.tsv", "demo/per_cluster.tsv",
                "demo/research_report.tsv", "demo/service_report.tsv", "meta/meta_report.tsv",
                *[f"demo/fit_{m}.tsv" for m in ("ri", "arm", "nested", "recovery", "slope", "ri_bayes")]]
    for rel in expected:
        table = pd.read_csv(bench / rel, sep="\t")
        assert len(table) == 1, rel
        assert table["s"].iloc[0] > 0, rel
        assert {"max_rss", "max_vms"} <= set(table.columns), rel
