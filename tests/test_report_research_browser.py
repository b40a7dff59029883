"""Research-report fixes in headless Chromium: the arm caterpillar as one labelled panel per arm,
priors as a table, table rows sized to their content, model comparison and sensitivity sections.

The arm model is fitted to tests/reference/therapy_feedback.csv by the package (its therapist table
has one row per therapist and arm); the therapist table goes through a CSV as in the workflow.
"""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest

from browser import render, require_chromium
from refdata import REFERENCE_DIR
from therapist_effects.config import load_config
from therapist_effects.exceptions import TherapistEffectsWarning
from therapist_effects.models.fitting import fit_model
from therapist_effects.report import research_report

pytestmark = pytest.mark.browser

PRIORS = {"intercept": {"dist": "normal", "mu": 10.5, "sigma": 12.25},
          "slopes": {"phq9_pre": {"dist": "normal", "mu": 0.0, "sigma": 2.5}},
          "sigma_therapist": {"dist": "halfstudentt", "nu": 3.0, "sigma": 4.9}}

PAGE_JS = """(() => ({
  panels: Array.from(document.querySelectorAll('.arm-panel')).map(p => ({
    arm: p.dataset.arm, label: p.querySelector('.panel-label').textContent.trim(),
    alt: p.querySelector('img').alt})),
  priors: Array.from(document.querySelectorAll('table.priors tbody tr')).map(
    r => Array.from(r.cells).map(c => c.textContent.trim())),
  priorHead: Array.from(document.querySelectorAll('table.priors thead th')).map(c => c.textContent.trim()),
  rows: Array.from(document.querySelectorAll('table.fixed tbody tr, table.variances tbody tr, table.icc tbody tr'))
    .map(r => ({h: r.getBoundingClientRect().height,
                line: parseFloat(getComputedStyle(r.cells[0]).lineHeight) || 20})),
  sensitivity: Array.from(document.querySelectorAll('#sensitivity-table tbody tr')).map(r => r.cells[0].textContent),
  ic: Array.from(document.querySelectorAll('#information-criteria tbody tr')).map(r => r.cells[0].textContent),
}))()"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    require_chromium()
    tmp = tmp_path_factory.mktemp("armreport")
    raw = pd.read_csv(REFERENCE_DIR / "therapy_feedback.csv", dtype={"patient_id": str, "therapist_id": str})
    patients = raw.rename(columns={"patient_id": "patient", "therapist_id": "therapist", "phq9_post": "end",
                                   "phq9_pre": "baseline", "feedback": "arm"})
    patients["feedback"] = patients["arm"].astype(float)
    dataset = {"path": str(REFERENCE_DIR / "therapy_feedback.csv"), "layout": "patient",
               "columns": {"patient": "patient_id", "therapist": "therapist_id", "outcome": "phq9_post",
                           "baseline": "phq9_pre", "arm": "feedback"}}
    cfg = load_config({"datasets": {"d": dataset}, "models": [{"id": "arm", "type": "arm_variance"}]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TherapistEffectsWarning)
        entry, table, _ = fit_model(patients, cfg["models"][0], dataset, cfg)
    table.to_csv(tmp / "therapists.csv", index=False)  # the arm is read back as a number, as in the workflow
    bayes = {"type": "random_intercept", "family": "gaussian", "method": "bayes", "engine": "bayes",
             "outcome": "phq9_post", "fixed_effects": {"(Intercept)": {"estimate": 1.0, "se": 0.1,
                                                                      "ci_low": 0.8, "ci_high": 1.2}},
             "variance_components": {}, "icc": {"estimate": 0.03, "ci_low": 0.01, "ci_high": 0.06, "ci_method": "hdi"},
             "priors": PRIORS, "converged": True, "singular": False, "n_patients": 2070, "n_therapists": 60}
    est = {"dataset": "therapy_feedback", "n_patients": len(patients), "n_therapists": 60, "n_clusters": None,
           "rows_read": len(patients), "rows_rejected": 0, "rows_used": len(patients), "rejected_by_reason": {},
           "instrument": None, "layout": "patient",
           "models": {"arm": entry, "ri_bayes": bayes},
           "model_comparison": {"models": [{"model": "arm", "criterion": "REML", "loglik": entry["loglik"],
                                            "n_params": 6, "n_obs": 2070, "aic": 1.0, "bic": 2.0}], "tests": []}}
    sens = pd.DataFrame({"analysis": ["all", "completers", "unadjusted", "min_caseload_10"], "model": "ri",
                         "icc": [0.034, 0.04, 0.02, 0.035], "icc_ci_low": [0.01, 0.012, 0.004, 0.011],
                         "icc_ci_high": [0.07, 0.08, 0.05, 0.072], "n_patients": [2070, 1700, 2070, 2000],
                         "n_therapists": [60, 60, 60, 55]})
    out = research_report(est, patients, tmp / "therapists.csv", None, tmp / "report.html", sensitivity=sens)
    page = render(out, evaluate=PAGE_JS)
    return {"entry": entry, "table": table, "page": page, "html": out.read_text()}


def test_page_is_clean(inputs):
    page = inputs["page"]
    assert page.console_errors == [] and page.exceptions == [] and page.broken_images == []
    assert page.external_requests == []


def test_arm_caterpillar_has_one_labelled_panel_per_arm(inputs):
    page, table = inputs["page"], inputs["table"]
    panels = page.evaluated["panels"]
    n = table.groupby("arm").size()
    assert [p["arm"] for p in panels] == ["0", "1"]
    assert panels[0]["label"] == f"Panel A: control arm (0) ({n['0']} therapists)"
    assert panels[1]["label"] == f"Panel B: feedback arm (1) ({n['1']} therapists)"
    assert panels[0]["alt"].startswith("Panel A, control arm (0) of model arm: caterpillar plot of 60 therapists")
    assert panels[1]["alt"].startswith("Panel B, feedback arm (1) of model arm: caterpillar plot of 60 therapists")
    # no single plot ranks the 120 therapist x arm pairs as therapists
    assert not any("120 therapist effects" in i["alt"] for i in page.images)


def test_priors_are_a_table(inputs):
    ev = inputs["page"].evaluated
    assert ev["priorHead"] == ["parameter", "distribution", "arguments"]
    assert ev["priors"] == [
        ["intercept", "normal", "mu = 10.500, sigma = 12.250"],
        ["coefficient of phq9_pre", "normal", "mu = 0, sigma = 2.500"],
        ["therapist SD", "halfstudentt", "nu = 3.000, sigma = 4.900"],
    ]
    assert '"dist"' not in inputs["page"].text and "&#34;dist&#34;" not in inputs["html"]


def test_table_rows_are_sized_to_their_content(inputs):
    rows = inputs["page"].evaluated["rows"]
    assert len(rows) >= 8
    # one line of text plus padding: no row stretched to the height of the neighbouring column
    for r in rows:
        assert r["h"] <= 2.2 * r["line"], rows


def test_sensitivity_and_comparison_sections(inputs):
    ev, page = inputs["page"].evaluated, inputs["page"]
    assert ev["sensitivity"] == ["all patients (main analysis)", "completers (dropouts excluded)",
                                 "unadjusted (no case-mix covariates)", "therapists with \u2265 10 patients"]
    assert any(i["alt"].startswith("Forest plot of the therapist ICC under the sensitivity analyses") for i in page.images)
    assert ev["ic"] == ["arm"]
    assert "Information criteria" in page.text
    json.dumps(ev)
