"""Research outputs on the demo: sensitivity.csv (sensitivity: true), publication tables, flow diagram.

The workflow runs once on the demo export with the likelihood models (no Bayesian model, to keep it
short) and ``sensitivity: true``. Each sensitivity row is checked against an independent refit
(statsmodels MixedLM, REML) of the subset built here from patients.parquet; the tables are checked by a
Markdown parser (markdown-it-py, else a GFM structural check), the LaTeX by compilation when a TeX
engine is installed and always by a balanced-environment check, and the flow diagram against the row
accounting.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
import yaml

from test_workflow import check_contract, demo_config, run_snakemake
from therapist_effects.config import load_config
from therapist_effects.sensitivity import sensitivity_table
from therapist_effects.report.tables import MINUS, apa, apa_round, flow_svg, models_table, tex_escape

MODELS = [
    {"id": "ri", "type": "random_intercept"},
    {"id": "ri_noarm", "type": "random_intercept", "covariates": ["phq9_baseline", "age", "sex"]},
    {"id": "arm", "type": "arm_variance"},
    {"id": "recovery", "type": "random_intercept", "family": "binomial", "outcome": "recovered"},
    {"id": "recovery_arm", "type": "arm_variance", "family": "binomial", "outcome": "recovered"},
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("research")
    path = demo_config(work)
    cfg = yaml.safe_load(path.read_text())
    cfg["models"] = MODELS
    cfg["sensitivity"] = True
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_snakemake(work, "results/demo/sensitivity.csv", "results/demo/tables/models.md", "results/demo/report.html",
                  "--configfile", str(path))
    res = work / "results" / "demo"
    return res, check_contract(res / "estimates.json"), load_config(cfg)


# ------------------------------------------------------------------------------------------ sensitivity
def _mixedlm_icc(df, formula):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = smf.mixedlm(formula, df, groups=df["therapist_id"]).fit(reml=True, method=["powell", "lbfgs"])
    tau2 = float(fit.cov_re.iloc[0, 0])
    return tau2 / (tau2 + fit.scale)


def test_sensitivity_csv_on_demo(demo):
    res, est, cfg = demo
    sens = pd.read_csv(res / "sensitivity.csv")
    assert list(sens.columns) == ["analysis", "model", "icc", "icc_ci_low", "icc_ci_high", "n_patients",
                                  "n_therapists"]
    assert list(sens["model"]) == ["ri"] * 4 + ["ri_noarm"] * 4  # Gaussian random intercepts only
    assert list(sens["analysis"]) == ["all", "completers", "unadjusted", "min_caseload_10"] * 2
    sens = sens[sens["model"] == "ri"]
    assert (sens["icc_ci_low"] <= sens["icc"]).all() and (sens["icc"] <= sens["icc_ci_high"]).all()
    row = sens.set_index("analysis")
    # "all" is the main analysis of estimates.json
    ri = est["models"]["ri"]
    assert row.loc["all", "icc"] == pytest.approx(ri["icc"]["estimate"], rel=1e-9)
    assert row.loc["all", "icc_ci_low"] == pytest.approx(ri["icc"]["ci_low"], rel=1e-9)
    assert row.loc["all", "n_patients"] == ri["n_patients"] and row.loc["all", "n_therapists"] == ri["n_therapists"]

    # independent subsets and fits (statsmodels MixedLM, REML)
    p = pd.read_parquet(res / "patients.parquet").rename(columns={"therapist": "therapist_id"})
    p = p.dropna(subset=["end", "baseline", "age", "sex", "arm"])
    adj = "end ~ baseline + age + C(sex) + arm"
    completers = p[p["dropout"] != 1]
    counts = p["therapist_id"].value_counts()
    big = p[p["therapist_id"].isin(counts.index[counts >= 10])]
    expected = {
        "all": (p, adj),
        "completers": (completers, adj),
        "unadjusted": (p, "end ~ arm"),
        "min_caseload_10": (big, adj),
    }
    for analysis, (df, formula) in expected.items():
        assert row.loc[analysis, "n_patients"] == len(df), analysis
        assert row.loc[analysis, "n_therapists"] == df["therapist_id"].nunique(), analysis
        assert row.loc[analysis, "icc"] == pytest.approx(_mixedlm_icc(df.reset_index(drop=True), formula),
                                                         rel=2e-3), analysis
    assert row.loc["completers", "n_patients"] < row.loc["all", "n_patients"]
    assert row.loc["min_caseload_10", "n_therapists"] < row.loc["all", "n_therapists"]


def test_sensitivity_without_ending_column_has_no_completers(demo):
    res, _, cfg = demo
    patients = pd.read_parquet(res / "patients.parquet").drop(columns=["dropout"])
    dataset = dict(cfg["datasets"]["demo"])
    dataset["columns"] = {k: v for k, v in dataset["columns"].items() if k != "ending"}
    table = sensitivity_table(patients, [{"id": "ri", "type": "random_intercept"}], dataset, cfg)
    assert list(table["analysis"]) == ["all", "unadjusted", "min_caseload_10"]


def test_sensitivity_is_off_by_default():
    cfg = load_config({"datasets": {}, "meta": {"studies": "x.csv"}})
    assert cfg["sensitivity"] is False


# ------------------------------------------------------------------------------------------ APA rounding
@pytest.mark.parametrize("x, kind, text", [
    (0.031791, "icc", ".032"), (0.0, "icc", ".000"), (-0.86301, "num", f"{MINUS}0.86"), (0.0277745, "num", "0.028"),
    (0.00045671, "num", "0.00046"), (12567.8362, "num", "12,567.84"), (0.0004, "p", "< .001"),
    (0.02701, "p", ".027"), (2070, "count", "2,070"), (None, "num", "\u2014"), (float("inf"), "num", "\u221e"),
    (-0.001, "num", f"{MINUS}0.001"), (-0.0000001, "num", f"{MINUS}0.00000010"), (1.999, "num", "2.00"),
])
def test_apa_rounding(x, kind, text):
    assert apa(x, kind) == text


# ------------------------------------------------------------------------------------------ tables
def _gfm_tables(text):
    """The GFM tables of ``text`` as lists of rows of cell texts (markdown-it-py, else a structural parse)."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # structural check: header, delimiter row, equal cell counts
        lines = [ln for ln in text.splitlines() if ln.startswith("|")]
        assert re.fullmatch(r"\|( :?-{3,}:? \|)+", lines[1]), lines[1]
        return [[[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines]]
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    tables, rows, row = [], None, None
    for tok in tokens:
        if tok.type == "table_open":
            rows = []
        elif tok.type == "tr_open":
            row = []
        elif tok.type == "inline" and row is not None:
            row.append(tok.content)
        elif tok.type == "tr_close":
            rows.append(row)
            row = None
        elif tok.type == "table_close":
            tables.append(rows)
    return tables


def test_models_markdown_parses_and_shows_the_estimates(demo):
    res, est, _ = demo
    text = (res / "tables" / "models.md").read_text()
    tables = _gfm_tables(text)
    assert len(tables) == 1
    rows = tables[0]
    assert rows[0] == ["Term", "Estimate", "SE", "95% CI"]
    assert all(len(r) == 4 for r in rows)
    # one block per model, in the order of estimates.json
    heads = [r[0] for r in rows if r[0].startswith("**Model ")]
    assert [h.split("**")[1].removeprefix("Model ") for h in heads] == list(est["models"])
    by_term = {}
    model = None
    for r in rows[1:]:
        if r[0].startswith("**Model "):
            model = r[0].split("**")[1].removeprefix("Model ")
        by_term[(model, r[0])] = r
    ri = est["models"]["ri"]
    icc = ri["icc"]
    assert by_term[("ri", "ICC (therapist)")][1] == apa(icc["estimate"], "icc")
    assert by_term[("ri", "ICC (therapist)")][3] == f"[{apa(icc['ci_low'], 'icc')}, {apa(icc['ci_high'], 'icc')}]"
    fb = ri["fixed_effects"]["feedback"]
    assert by_term[("ri", "feedback")][1:3] == [apa(fb["estimate"]), apa(fb["se"])]
    assert by_term[("ri", "AIC")][1] == apa(ri["aic"])
    assert by_term[("ri", "Patients")][1] == apa(ri["n_patients"], "count")
    arm = est["models"]["recovery_arm"]
    assert by_term[("recovery_arm", "ICC ratio (feedback / control)")][1] == apa(arm["icc_ratio"]["estimate"])
    assert "Intraclass correlation (latent scale)" in text and "profile-likelihood" in text
    assert "Model recovery_arm:" in text and "adaptive Gauss" in text


def _check_latex_balanced(tex):
    stack = []
    for m in re.finditer(r"\\(begin|end)\{([^}]*)\}", tex):
        if m.group(1) == "begin":
            stack.append(m.group(2))
        else:
            assert stack and stack.pop() == m.group(2), m.group(0)
    assert not stack, stack
    depth = 0
    for i, ch in enumerate(tex):
        if ch in "{}" and (i == 0 or tex[i - 1] != "\\"):
            depth += 1 if ch == "{" else -1
            assert depth >= 0
    assert depth == 0
    # every tabular row has as many cells as columns
    for body in re.findall(r"\\begin\{tabular\}\{(\w+)\}(.*?)\\end\{tabular\}", tex, re.S):
        ncol = len(body[0])
        for line in body[1].splitlines():
            if line.endswith(r"\\") and r"\multicolumn" not in line:
                assert len(re.split(r"(?<!\\)&", line)) == ncol, line


@pytest.mark.parametrize("name", ["models.tex", "descriptives.tex"])
def test_latex_is_balanced_and_compiles_if_tex_is_installed(demo, name, tmp_path):
    tex = (demo[0] / "tables" / name).read_text()
    _check_latex_balanced(tex)
    assert "_" not in re.sub(r"\\_", "", tex.split("\n", 1)[1])  # underscores escaped (model ids)
    engine = shutil.which("pdflatex") or shutil.which("lualatex") or shutil.which("xelatex")
    if engine:
        doc = tmp_path / "doc.tex"
        doc.write_text("\\documentclass{article}\\usepackage{booktabs}\\usepackage[T1]{fontenc}"
                       "\\begin{document}\n" + tex + "\\end{document}\n")
        proc = subprocess.run([engine, "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:]


def test_latex_balance_check_catches_errors():
    with pytest.raises(AssertionError):
        _check_latex_balanced(r"\begin{table}\begin{tabular}{ll}a & b \\\end{table}")
    with pytest.raises(AssertionError):
        _check_latex_balanced(r"\begin{tabular}{lll}a & b \\\end{tabular}")
    assert tex_escape("a_b & 5% {x}") == r"a\_b \& 5\% \{x\}"


def test_models_csv_matches_estimates(demo):
    res, est, _ = demo
    csv = pd.read_csv(res / "tables" / "models.csv")
    assert list(csv.columns) == ["model", "section", "term", "estimate", "se", "ci_low", "ci_high"]
    rows, _ = models_table(est)
    assert len(csv) == len(rows)
    ri = csv[(csv["model"] == "ri") & (csv["term"] == "ICC (therapist)")].iloc[0]
    assert ri["estimate"] == apa_round(est["models"]["ri"]["icc"]["estimate"], "icc")
    fe = csv[(csv["model"] == "ri") & (csv["term"] == "feedback")].iloc[0]
    assert fe["estimate"] == apa_round(est["models"]["ri"]["fixed_effects"]["feedback"]["estimate"])


def test_descriptives_table_by_arm(demo):
    res, est, _ = demo
    rows = _gfm_tables((res / "tables" / "descriptives.md").read_text())[0]
    assert rows[0] == ["Variable", "control (0)", "feedback (1)", "all patients"]
    counts = {r[0]: r[1:] for r in rows[1:]}
    p = pd.read_parquet(res / "patients.parquet")
    n = p.groupby("arm").size()
    assert counts["patients"] == [f"{n[0]:,}", f"{n[1]:,}", f"{len(p):,}"]


def test_flow_svg_from_row_accounting(demo):
    res, est, _ = demo
    svg = (res / "tables" / "flow.svg").read_text()
    root = ET.fromstring(svg)
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert f"Rows read: {est['rows_read']:,}" in texts
    assert f"Rows rejected: {est['rows_rejected']:,}" in texts
    assert f"Rows used: {est['rows_used']:,}" in texts
    for reason, k in est["rejected_by_reason"].items():
        assert f"  {reason}: {k:,}" in texts
    for mid, e in est["models"].items():
        assert f"Model {mid}: {e['n_patients']:,} patients analysed" in texts
    rec = est["models"]["recovery"]  # recovery is undefined below the caseness cut-off at intake
    assert rec["n_excluded"] > 0
    assert f"60 therapists; patients excluded: {rec['n_excluded']:,} (missing recovered: {rec['n_excluded']:,})" in texts
    # a broken accounting is shown as it is (no silent fixing): rows used is read from estimates.json
    bad = flow_svg({**est, "rows_used": 1})
    assert "Rows used: 1" in bad


def test_model_comparison_in_demo_estimates(demo):
    res, est, _ = demo
    mc = est["model_comparison"]
    assert {r["model"] for r in mc["models"]} == set(est["models"])
    for r in mc["models"]:
        e = est["models"][r["model"]]
        assert e["aic"] == pytest.approx(-2 * e["loglik"] + 2 * r["n_params"])
        assert e["bic"] == pytest.approx(-2 * e["loglik"] + np.log(e["n_patients"]) * r["n_params"])
    pairs = {(t["model_0"], t["model_1"]) for t in mc["tests"]}
    # only ri_noarm within ri is nested here (not ri within the arm model: see comparison.nesting)
    assert pairs == {("ri_noarm", "ri")}
    t = mc["tests"][0]
    assert t["refit_ml"] and t["criterion"] == "ML" and t["df"] == 1 and t["null_distribution"] == "chi2_1"
    # independent ML fits (statsmodels MixedLM) of the two models
    p = pd.read_parquet(res / "patients.parquet").dropna(subset=["end", "baseline", "age", "sex", "arm"])
    ll = {}
    for name, formula in (("ri", "end ~ baseline + age + C(sex) + arm"), ("ri_noarm", "end ~ baseline + age + C(sex)")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ll[name] = smf.mixedlm(formula, p, groups=p["therapist"]).fit(reml=False, method=["powell", "lbfgs"]).llf
    assert t["loglik_1"] == pytest.approx(ll["ri"], abs=1e-4) and t["loglik_0"] == pytest.approx(ll["ri_noarm"], abs=1e-4)
    assert t["statistic"] == pytest.approx(2 * (ll["ri"] - ll["ri_noarm"]), abs=2e-4)
    json.dumps(mc, allow_nan=False)
