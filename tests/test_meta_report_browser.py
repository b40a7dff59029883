"""The meta-analysis report in headless Chromium: the two-stage and one-stage estimates side by side,
the weights, the leave-one-out table, the per-arm / ratio estimates, one number of decimals.

Inputs: the six trials of tests/reference/therapy_trials.csv through the workflow's own step
(``pipeline.meta_report_step`` on ``meta.dataset_meta``'s per-cluster table and meta.json).
"""

from __future__ import annotations

import html as htmllib
import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest

from browser import render, require_chromium
from refdata import REFERENCE_DIR
from test_report_browser import assert_clean, assert_shown, cells
from therapist_effects.meta import dataset_meta
from therapist_effects.models.fitting import write_json
from therapist_effects.pipeline import meta_report_step

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def trials_report(tmp_path_factory):
    require_chromium()
    tmp = tmp_path_factory.mktemp("meta")
    df = pd.read_csv(REFERENCE_DIR / "therapy_trials.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table, meta = dataset_meta(df, "phq9_post", ["phq9_pre", "feedback"], therapist="therapist_id",
                                   cluster="trial_id", arm="feedback", feedback_level=1)
    d = tmp / "results" / "trials"
    d.mkdir(parents=True)
    table.to_csv(d / "per_cluster.csv", index=False)
    write_json(meta, d / "meta.json")
    cfg = {"meta": {"method": "REML", "test": "z", "scale": "fisher_z", "columns": {}}, "intervals": {"level": 0.95}}
    out = tmp / "report.html"
    meta_report_step([str(d / "meta.json")], [str(d / "per_cluster.csv")], None, cfg, str(out),
                     out_json=str(tmp / "pooled.json"), out_csv=str(tmp / "studies.csv"))
    return out, table, meta, json.loads((tmp / "pooled.json").read_text())


def _section(text: str, sid: str) -> str:
    return text.split(f'id="{sid}"', 1)[1].split("</section>", 1)[0]


def test_meta_report_shows_both_estimates_weights_and_leave_one_out(tmp_path, trials_report):
    out, table, meta, pooled = trials_report
    page = render(out, tmp_path / "meta.png")
    assert_clean(page, min_images=2)  # the ICC forest plot and the ratio forest plot
    text = out.read_text()
    p = pooled["pooled"]
    # pooled.json carries the contract's keys
    assert {"estimate", "se", "ci_low", "ci_high", "tau2", "I2", "pi_low", "pi_high", "icc"} <= set(p)
    # both estimates, side by side: the two-stage pooled ICC (tanh of the pooled Fisher z) and the
    # one-stage nested model's ICC (lme4: 0.4235489072 / (0.4235489072 + 0.05726135832 + 26.31745758))
    est = dict((lab, (dv, shown)) for lab, dv, shown in cells(_section(text, "one-stage")))
    assert_shown(float(np.tanh(p["estimate"])), *est["two-stage (pooled study ICCs)"])
    assert_shown(meta["one_stage"]["estimate"], *est["one-stage: trials"])
    assert meta["one_stage"]["estimate"] == pytest.approx(0.4235489072 / (0.4235489072 + 0.05726135832 + 26.31745758),
                                                          rel=1e-4)
    # the weights: 100 w / sum w with w = 1 / (vi + tau2), from the per-cluster table
    w = 1 / (table["vi"] + p["tau2"])
    weights = 100 * w / w.sum()
    rows = re.findall(r"<tr><td>([^<]*)</td>(.*?)</tr>", _section(text, "studies"))
    assert [r[0] for r in rows] == list(table["cluster"])
    for (study, cellhtml), wt in zip(rows, weights):
        vals = re.findall(r'data-value="([^"]*)"[^>]*>([^<]*)</td>', cellhtml)
        assert float(vals[1][0]) == pytest.approx(wt, rel=1e-9)
        assert vals[1][1] == f"{wt:.1f}%"
    # a singular trial keeps a weight of its neighbours' size (the issue's defect on the logit scale)
    assert weights.min() > 0.5 * weights.max()
    # leave-one-out: one row per trial, the pooled ICC without it
    loo = re.findall(r"<tr><td>([^<]*)</td>(.*?)</tr>", _section(text, "leave-one-out"))
    assert [r[0] for r in loo] == list(table["cluster"])
    first = re.findall(r'data-value="([^"]*)"', loo[0][1])
    assert float(first[0]) == pytest.approx(pooled["leave_one_out"][0]["icc"], rel=1e-12)
    # the feedback meta-analysis: per-arm pooled ICCs, the ratio two-stage and one-stage
    arms = dict((lab, (dv, shown)) for lab, dv, shown in cells(_section(text, "arms")))
    assert any(k.startswith("pooled ICC, control arm") for k in arms)
    assert_shown(pooled["arms"]["ratio"]["ratio"]["estimate"], *arms["ICC ratio, two-stage (pooled log ratio)"])
    assert_shown(meta["one_stage_arms"]["ratio"]["estimate"], *arms["ICC ratio, one-stage: trials"])
    # one number of decimals for every ICC-scale interval in the report
    shown = [htmllib.unescape(s) for s in re.findall(r'data-low="[^"]*" data-high="[^"]*">([^<]*)</td>', text)]
    decimals = {len(x.split(".")[1]) for s in shown for x in re.split(r" \(| to |\)", s) if "." in x}
    assert len(decimals) == 1 and decimals <= {3, 4}, decimals  # 4 here: interval limits below 0.01
    assert "Fisher's z" in page.text and "singular" not in est["one-stage: trials"][1]
