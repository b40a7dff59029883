"""The three reports rendered in headless Chromium: no console errors, every figure loaded, no
network fetches, the key numbers equal to the estimates, hostile text shown as text, and the
service report's privacy rules. Run: ``pytest tests/test_report_browser.py -m browser -q``.

Numbers are checked in two ways (formatting rule: ``therapist_effects/report/fmt.py``): each table
cell's ``data-value`` attribute must equal the estimate, and its displayed text must round to it
(|shown - value| <= half a unit in the last displayed decimal).
"""

from __future__ import annotations

import html as htmllib
import json
import re

import numpy as np
import pandas as pd
import pytest

from browser import render, require_chromium
from test_report_inputs import REFERENCE, XSS, feedback_inputs, simulated_inputs
from therapist_effects.report import fmt, meta_report, research_report, service_report
from therapist_effects.report.privacy import pseudonymise_ids, round_to, safe_count

pytestmark = pytest.mark.browser
KEY = "test-key-not-secret"


@pytest.fixture(autouse=True)
def _chromium():
    require_chromium()


def assert_clean(page, min_images: int):
    assert page.console_errors == [] and page.exceptions == [] and page.dialogs == []
    assert page.external_requests == []  # self-contained: nothing but the file and data: URIs
    assert len(page.images) >= min_images
    assert page.broken_images == []
    assert all(len(i["alt"]) > 40 for i in page.images)  # every figure has a real alt text
    assert page.scripts == 0


def cells(text: str) -> list[tuple[str, str, str]]:
    """(row label, data-value, shown text) of each numeric cell following a label cell."""
    pat = re.compile(r'<t[dh][^>]*>([^<]*)</t[dh]>\s*<td class="num" data-value="([^"]*)"[^>]*>([^<]*)</td>')
    return [(htmllib.unescape(a), b, htmllib.unescape(c)) for a, b, c in pat.findall(text)]


def assert_shown(value: float, data_value: str, shown: str):
    assert float(data_value) == pytest.approx(value, rel=1e-12, abs=1e-15)
    first = shown.split(" (")[0]
    decimals = len(first.split(".")[1]) if "." in first else 0
    assert abs(fmt.parse(first) - value) <= 0.5 * 10 ** -decimals + 1e-12, (value, shown)


def model_block(text: str, mid: str) -> str:
    return text.split(f'id="model-{mid}"', 1)[1].split("</article>", 1)[0]


def test_research_report_shows_lme4_estimates(tmp_path):
    inp = feedback_inputs()
    ref = inp["ref"]
    out = research_report(inp["estimates"], inp["patients"], inp["therapists"], None, tmp_path / "report.html")
    page = render(out, tmp_path / "report.png")
    assert_clean(page, min_images=4)  # caseload, caterpillar, ICC by arm, residuals
    text = out.read_text()
    ri = dict((lab, (dv, shown)) for lab, dv, shown in cells(model_block(text, "ri")))
    # lme4: lmer(phq9_post ~ phq9_pre + feedback + (1 | therapist_id), REML = TRUE) on therapy_feedback.csv
    for name, value in ref["ri_REML"]["fixed"].items():
        assert_shown(value, *ri[name])
    assert_shown(ref["ri_REML"]["variance"]["therapist_id:(Intercept)"], *ri["therapist"])  # 0.8629748692
    assert_shown(ref["ri_REML"]["variance"]["Residual"], *ri["residual"])  # 24.61118871
    tau2, s2 = ref["ri_REML"]["variance"]["therapist_id:(Intercept)"], ref["ri_REML"]["variance"]["Residual"]
    assert_shown(tau2 / (tau2 + s2), *ri["ICC (therapist share of variance)"])
    # fixed-effect intervals: lme4 confint(..., method = "profile") bounds, shown after the estimate
    lo, hi = ref["ri_REML"]["fixed_ci"]["phq9_pre"]
    assert f"({fmt.num(lo, 3)} to {fmt.num(hi, 3)})" in ri["phq9_pre"][1]
    arm = dict((lab, (dv, shown)) for lab, dv, shown in cells(model_block(text, "arm")))
    v = ref["arm_REML"]["variance"]  # lmer(... + (0 + control | therapist_id) + (0 + feedback | therapist_id))
    assert_shown(v["therapist_id:control"], *arm["therapist[0]"])
    assert_shown(v["therapist_id.1:feedback"] / (v["therapist_id.1:feedback"] + v["Residual"]), *arm["ICC, arm 1"])
    # sample flow: the counts of the reference file
    assert 'data-value="2070.0">2,070</b>patients' in text and "60</b>therapists" in text
    # loglik shown with the rule's 1 decimal for |x| >= 1000: -6278.918133 -> "-6278.9"
    assert "log-likelihood \u22126278.9" in page.text


def test_research_report_escapes_hostile_text_and_flags_problems(tmp_path):
    inp = simulated_inputs()
    est = inp["estimates"]
    est["dataset"] = "<img src=x onerror=alert(2)>"
    est["rejected_by_reason"] = {"<b>bold</b> reason": 3}
    est["models"]["ri"]["singular"] = True
    est["models"]["ri"]["warnings"] = ["SingularFitWarning: therapist variance at zero"]
    out = research_report(est, inp["patients"], inp["therapists"], inp["rejects"], tmp_path / "report.html")
    page = render(out, tmp_path / "report.png")
    assert_clean(page, min_images=3)
    text = out.read_text()
    assert XSS not in text and htmllib.escape(XSS) in text
    assert XSS in page.text  # the hostile therapist ID is listed (a clear outlier), as text
    assert "<img src=x" not in text and "<img src=x onerror=alert(2)>" in page.text
    assert "<b>bold</b> reason" in page.text
    assert "Singular fit" in page.text and 'class="badge singular"' in text and 'role="alert"' in text
    # the residual plot was drawn (the design could be rebuilt from the formula)
    assert any("Diagnostic plots for model ri" in i["alt"] for i in page.images)


def test_research_report_omits_sections_without_inputs(tmp_path):
    inp = simulated_inputs()
    est = {k: v for k, v in inp["estimates"].items() if k != "provenance"}
    est["models"]["bayes_ri"] = {"type": "random_intercept", "method": "bayes", "outcome": "phq9_post",
                                 "diagnostics": {"max_rhat": 1.08, "min_ess_bulk": 95, "min_ess_tail": 80,
                                                 "divergences": 12, "failed": True,
                                                 "advice": "raise target_accept to 0.95 and draw more"}}
    empty = tmp_path / "empty.nc"
    empty.touch()  # what the workflow leaves for a model without a posterior
    out = research_report(est, None, None, None, tmp_path / "report.html", narrowing=tmp_path / "none.csv",
                          idata_paths={"bayes_ri": empty})
    page = render(out)
    assert page.console_errors == [] and page.broken_images == []
    for note in ("caterpillar plot omitted", "Narrowing-the-gap plot omitted", "No provenance",
                 "Sampler diagnostics failed", "raise target_accept to 0.95", "could not be read"):
        assert note in page.text


def test_service_report_privacy(tmp_path, monkeypatch):
    monkeypatch.setenv("TE_PSEUDONYM_KEY", KEY)
    inp = simulated_inputs()
    p, t = inp["patients"], inp["therapists"]
    out = service_report(inp["estimates"], p, t, tmp_path / "therapist_report.html")
    page = render(out, tmp_path / "therapist_report.png")
    assert_clean(page, min_images=1)
    # embedded images are base64 text, in which a short ID can occur by chance: search outside them
    text = re.sub(r"data:image/[A-Za-z0-9.+-]+;base64,[A-Za-z0-9+/=]+", "data:image", out.read_text())
    assert not any(pid in text for pid in p["patient"])  # no patient IDs anywhere
    assert not any(tid in text or htmllib.escape(tid) in text for tid in t["therapist"])  # no raw therapist IDs
    names = pseudonymise_ids(t["therapist"], KEY.encode())
    caseload = t.set_index("therapist")["caseload"]
    small = caseload[caseload < 10].index
    assert {"T000", "T001", "T002"} <= set(small)  # the simulation gives them 3, 5 and 9 patients
    assert not any(names[i] in text for i in small)  # ... and not by pseudonym either
    assert all(names[i] in page.text for i in caseload[caseload >= 10].index)
    # the aggregate row: their number (suppressed if 1-7) and their patients together, rounded to 5
    row = text.split('id="small-caseloads"', 1)[1].split("</tr>", 1)[0]
    assert (f'<td><span class="r5">{safe_count(len(small), 8, 5)}</span> therapists, caseload &lt; '
            .replace("<8", "&lt;8") in row)
    assert f'<span class="r5">{safe_count(int(caseload[small].sum()), 8, 5)}</span>' in row
    # suppression: every listed therapist whose recovered count (or its complement) is 1-7 shows "<8 of n"
    rec = p.dropna(subset=["recovered"]).groupby("therapist")["recovered"].agg(["sum", "size"])
    small_k = [i for i in caseload[caseload >= 10].index
               if 0 < rec.loc[i, "sum"] < 8 or 0 < rec.loc[i, "size"] - rec.loc[i, "sum"] < 8]
    assert small_k, "the simulation should produce some small counts"
    rows = {re.search(r'<td class="id"><a href="[^"]*">([^<]*)</a></td>', r).group(1): r
            for r in text.split("<tr>")[1:] if '<td class="id">' in r}
    for i in small_k:
        n = int(rec.loc[i, "size"])
        assert f"&lt;8 of {round_to(n, 5)}" in rows[names[i]] and "%" not in rows[names[i]].split("</td>")[-3]
    big = next(i for i in caseload[caseload >= 10].index if i not in small_k)
    k, n = int(rec.loc[big, "sum"]), int(rec.loc[big, "size"])
    assert f"{100 * k / n:.0f}%" in rows[names[big]]
    assert f'(<span class="r5">{round_to(k, 5)} of {round_to(n, 5)}</span>)' in rows[names[big]]
    # the adjusted score shown for a listed therapist is its row of therapists.csv
    r = t.set_index("therapist").loc[big]
    assert f'data-value="{float(r["adjusted_mean"])!r}"' in rows[names[big]]
    # the overall recovery rate (funnel target) is the pooled rate
    assert fmt.pct(rec["sum"].sum() / rec["size"].sum()) in page.text


def test_service_report_without_pseudonyms_escapes_ids(tmp_path):
    inp = simulated_inputs()
    out = service_report(inp["estimates"], inp["patients"], inp["therapists"], tmp_path / "r.html",
                         pseudonymise=False)
    page = render(out)
    assert page.dialogs == [] and page.scripts == 0
    assert XSS in page.text and XSS not in out.read_text()


@pytest.fixture
def trials_meta():
    ref = json.loads((REFERENCE / "lme4_reference.json").read_text())["therapy_trials"]
    pt = ref["per_trial"]
    se = np.sqrt([r["var_icc"] for r in pt])  # Donner's large-sample variance, from the R reference
    icc = np.array([r["icc"] for r in pt])
    table = pd.DataFrame({"study": [r["trial"] for r in pt], "icc": icc, "ci_low": np.clip(icc - 1.96 * se, 0, None),
                          "ci_high": icc + 1.96 * se, "n_patients": [r["n"] for r in pt],
                          "n_therapists": [r["k"] for r in pt]})
    dl = ref["pooled_logit_icc"]["DL"][0]
    expit = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    # metafor: rma(yi, vi, method = "DL") on logit(ICC), back-transformed; tau^2 = 0 so PI = CI
    pooled = {"method": "DL", "estimate": expit(dl["estimate"]), "ci_low": expit(dl["ci.lb"]),
              "ci_high": expit(dl["ci.ub"]), "tau2": ref["pooled_logit_icc"]["tau2_DL"], "I2": 0.0,
              "pi_low": expit(dl["ci.lb"]), "pi_high": expit(dl["ci.ub"])}
    return table, pooled


def test_meta_report_shows_metafor_pooling(tmp_path, trials_meta):
    table, pooled = trials_meta
    ratios = pd.DataFrame({"study": table["study"], "icc_ratio": [0.5, 0.7, 0.4, 0.9, 1.1, 0.6],
                           "ci_low": [0.2, 0.3, 0.1, 0.4, 0.5, 0.2], "ci_high": [1.2, 1.5, 1.1, 2.0, 2.3, 1.4]})
    out = meta_report(table, pooled, tmp_path / "meta.html", per_arm=ratios)
    page = render(out, tmp_path / "meta.png")
    assert_clean(page, min_images=2)
    text = out.read_text()
    found = dict((lab, (dv, shown)) for lab, dv, shown in cells(text.split('id="arms"')[0]))
    assert_shown(pooled["estimate"], *found["pooled ICC (95% CI)"])  # expit(-3.629806538) = 0.02584...
    assert "(0.013 to 0.052)" in found["pooled ICC (95% CI)"][1]  # expit(-4.357091196), expit(-2.90252188)
    assert_shown(0.03129817086, *found["S00"])  # per-trial ICC of S00 from lme4
    assert "3,597 patients" in page.text and "6 studies" in page.text
    meta_report(table, {}, tmp_path / "bare.html")  # no pooled estimate: a note, no crash
    assert "No pooled estimate" in render(tmp_path / "bare.html").text
