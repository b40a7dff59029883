"""Service report and therapist pages: disclosure control that survives subtraction, the one
classification rule (Spiegelhalter 99.8% limits) shared by the table and the funnel, plain language.

Rendering is tested here without a browser; tests/test_service_browser.py renders in Chromium.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from disclosure import check, derivable, printed_integers, reachable
from test_report_inputs import TRUTH, _entry, _outcomes, _provenance, blup_rows, simulated_inputs
from therapist_effects.classify import (classify_funnel, expected_chance_flags, normal_funnel_limits, z_for)
from therapist_effects.report.privacy import round_to, safe_count, safe_rate
from therapist_effects.report.service import service_context, service_report, therapist_pages

KEY = "test-key-not-secret"
SB = 8  # suppress_below


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("TE_PSEUDONYM_KEY", KEY)


# -- the checker itself ------------------------------------------------------------------------------------
def test_checker_finds_the_exact_total_leak_of_the_old_report():
    # the old report: exact caseloads of the listed therapists and the exact total; the small group (3) by subtraction
    old = ('<div class="kpi"><div class="v">60</div><div class="l">patients</div></div><table>'
           "<tr><td>T-1a2b</td><td>12</td></tr><tr><td>T-3c4d</td><td>15</td></tr><tr><td>T-5e6f</td><td>30</td></tr>"
           "<tr><td>&lt;8 therapists</td><td>&lt;8</td></tr></table>")
    printed = printed_integers(old)
    assert [p.value for p in printed] == [60, 12, 15, 30]  # "<8" is a label, T-... pseudonyms are not counts
    assert derivable(printed, [3]) == [3]  # 60 - 12 - 15 - 30
    with pytest.raises(AssertionError, match=r"hidden counts \[3\]"):
        check(old, [3])


def test_checker_skips_decimals_percentages_dates_and_versions():
    html = ('<p>48.3% (<span class="r5">15 of 30</span>) 2024-01-05 to 2024-Q3, version 0.1.0, '
            '&plusmn;3.1, &minus;2.0, T-0a12bc34de, <span class="pub">10</span></p><img alt="a 99.8% limit" src="x">')
    printed = printed_integers(html)
    assert [(p.value, p.kind) for p in printed] == [(15, "rounded"), (30, "rounded"), (10, "public")]


def test_reachable_sums_with_signs():
    assert reachable([12, 15, 30]) >= {3, 27, 57, -3, 33}
    assert 1 not in reachable([10, 20, 35])


# -- rounding and suppression --------------------------------------------------------------------------
@pytest.mark.parametrize("n,shown", [(0, "0"), (1, "<8"), (7, "<8"), (8, "10"), (12, "10"), (13, "15"), (17, "15"),
                                     (18, "20"), (1234, "1,235")])
def test_counts_are_suppressed_or_rounded_to_5(n, shown):
    assert safe_count(n, SB, 5) == shown


def test_rates_round_their_counts_but_not_the_percentage():
    # 9 of 22: 40.9%; counts rounded to 10 of 20, the percentage from the unrounded counts
    assert safe_rate(9, 22, SB, 5, 0) == ("10 of 20", "41%", False)
    assert safe_rate(5, 22, SB, 5, 0) == ("<8 of 20", "suppressed", True)  # numerator small
    assert safe_rate(17, 22, SB, 5, 0)[2] is True  # complement 5 small
    assert round_to(22, 5) == 20 and round_to(23, 5) == 25


# -- randomised services -------------------------------------------------------------------------------
def make_service(seed: int, caseloads: list[int], dates: bool = True) -> dict:
    """A service with the given caseloads: patients (PHQ-9 outcomes), BLUP rows and estimates (true values)."""
    rng = np.random.default_rng(seed)
    k = len(caseloads)
    ids = [f"C{j:02d}" for j in range(k)]
    u = rng.normal(0, math.sqrt(TRUTH["tau2"]), k)
    t = np.repeat(np.arange(k), caseloads)
    n = len(t)
    baseline = np.clip(np.round(rng.normal(15, 5, n)), 0, 27)
    end = np.clip(np.round(TRUTH["b0"] + TRUTH["b_baseline"] * baseline + u[t] + rng.normal(0, 4.9, n)), 0, 27)
    p = pd.DataFrame({"patient": [f"P{i:05d}" for i in range(n)], "therapist": np.array(ids, dtype=object)[t],
                      "baseline": baseline, "end": end, "n_sessions": 4.0})
    p = _outcomes(p)
    if dates:
        start = pd.Timestamp("2023-01-01")
        p["first_occasion"] = start + pd.to_timedelta(rng.integers(0, 600, n), unit="D")
        p["last_occasion"] = p["first_occasion"] + pd.to_timedelta(rng.integers(14, 120, n), unit="D")
    fixed = {"(Intercept)": TRUTH["b0"], "phq9_pre": TRUTH["b_baseline"]}
    xb = fixed["(Intercept)"] + fixed["phq9_pre"] * p["baseline"]
    th = blup_rows("ri", p["therapist"].to_numpy(), (p["end"] - xb).to_numpy(), TRUTH["tau2"], TRUTH["sigma2"])
    est = {"dataset": "svc", "instrument": "PHQ-9", "layout": "patient",
           "models": {"ri": _entry(fixed, None, None,
                                   {"therapist": {"estimate": TRUTH["tau2"]}, "residual": {"estimate": TRUTH["sigma2"]}},
                                   "phq9_post ~ phq9_pre + (1 | therapist_id)", "phq9_post", n, k)},
           "provenance": _provenance({"patient": "patient_id", "therapist": "therapist_id", "outcome": "phq9_post",
                                      "baseline": "phq9_pre"}, "svc")}
    return {"estimates": est, "patients": p, "therapists": th}


def hidden_counts(svc: dict, min_caseload: int = 10) -> list[int]:
    """True values of every count the report shows as <8."""
    p, th = svc["patients"], svc["therapists"]
    caseload = th.set_index("therapist")["caseload"]
    small = caseload[caseload < min_caseload].index
    out = []
    if 0 < len(small) < SB:
        out.append(len(small))
    if 0 < caseload[small].sum() < SB:
        out.append(int(caseload[small].sum()))
    for col in ("recovered", "reliable_improvement"):
        d = p.dropna(subset=[col])
        g = d.groupby("therapist")[col].agg(["sum", "size"])
        groups = [g.loc[[i]] for i in caseload[caseload >= min_caseload].index if i in g.index]
        groups.append(g.reindex([i for i in small if i in g.index]))
        for gi in groups:
            kk, nn = int(gi["sum"].sum()), int(gi["size"].sum())
            if 0 < kk < SB or 0 < nn - kk < SB or 0 < nn < SB:
                out += [v for v in (kk, nn - kk, nn) if 0 < v < SB]
    return sorted(set(out))


SERVICES = [
    ("single small-caseload therapist", 11, [3] + [14, 22, 31, 12, 18, 25, 40, 11, 16, 27]),
    ("single small-caseload therapist of one", 12, [1] + [10, 13, 19, 24, 35, 12, 17]),
    ("two small", 13, [2, 5, 12, 12, 15, 20, 33, 48]),
    ("many small", 14, [1, 2, 3, 4, 5, 6, 7, 9, 9, 10, 21, 30, 44]),
    ("no small", 15, [10, 11, 12, 13, 14, 15, 16, 17]),
] + [(f"random {s}", s, list(np.random.default_rng(s).integers(1, 45, np.random.default_rng(s + 1).integers(4, 25))))
     for s in range(100, 112)]


@pytest.mark.parametrize("name,seed,caseloads", SERVICES, ids=[s[0] for s in SERVICES])
def test_no_hidden_count_follows_from_the_printed_numbers(tmp_path, name, seed, caseloads):
    svc = make_service(seed, [int(c) for c in caseloads])
    hidden = hidden_counts(svc)
    out = service_report(svc["estimates"], svc["patients"], svc["therapists"], tmp_path / "r.html")
    html = out.read_text()
    printed = check(html, hidden)
    ctx = service_context(svc["estimates"], svc["patients"], svc["therapists"])
    public_ok = {10, 1, 7, 5, ctx["n_listed"], ctx["n_flagged"], ctx["suppress_below"]}
    if ctx["funnel"]:
        public_ok |= {ctx["funnel"]["outside"], ctx["funnel"]["hidden"]}
    if ctx["runchart"]:
        public_ok |= {ctx["runchart"]["outside"], ctx["runchart"]["hidden"]}
    assert {p.value for p in printed if p.kind == "public"} <= public_ok
    if name.startswith("single"):
        # the old report printed the exact total: total - listed caseloads = the small therapist's caseload
        total = int(svc["therapists"]["caseload"].sum())
        listed = [int(c) for c in svc["therapists"]["caseload"] if c >= 10]
        assert total - sum(listed) in hidden and total - sum(listed) < 8
        assert f">{total:,}<" not in html  # ... and this report does not
    if seed in (11, 12, 13):  # the pages draw 2-3 figures each: checked on the hand-made services only
        pages = therapist_pages(svc["estimates"], svc["patients"], svc["therapists"], tmp_path / "therapists")
        assert len(pages) == ctx["n_listed"]
        for page in pages:
            check(page.read_text(), hidden)


# -- the one classification rule ------------------------------------------------------------------------
def test_z_for_and_spiegelhalter_limits_by_hand():
    assert z_for(0.998) == pytest.approx(3.090232306, abs=1e-9)  # qnorm(0.999) in R
    assert z_for(0.95) == pytest.approx(1.959963985, abs=1e-9)
    lo, hi = normal_funnel_limits(10.0, 5.0, 25, 0.998)  # 10 -+ 3.0902 * 5 / 5
    assert (float(lo), float(hi)) == pytest.approx((6.909767694, 13.090232306))
    # exactly on a limit is inside; beyond it is flagged (lower is better for PHQ-9)
    labels = classify_funnel([13.0902, 13.0903, 6.9097, 10.0], lo, hi, higher_is_better=False)
    assert list(labels) == ["not distinguishable from average", "worse than average", "better than average",
                            "not distinguishable from average"]
    assert expected_chance_flags(48, 0.998) == pytest.approx(0.096)
    assert expected_chance_flags(48, 0.95) == pytest.approx(2.4)  # the "about 2 by chance"


def test_table_and_funnel_use_the_same_rule_and_the_text_says_what_chance_gives(tmp_path):
    inp = simulated_inputs(xss=False)
    ctx = service_context(inp["estimates"], inp["patients"], inp["therapists"])
    of = ctx["outcome_funnel"]
    by_id = {r["id"]: r["key"] for r in ctx["rows"]}
    assert [by_id[i] for i in of["ids"]] == of["keys"]  # the funnel's point classes are the table's
    # recompute the rule by hand for each listed therapist: |adjusted - target| > z sigma / sqrt(n)
    z, sd = z_for(0.998), math.sqrt(TRUTH["sigma2"])
    th = inp["therapists"].set_index("therapist")
    n_all, adj = th["caseload"].astype(float), th["adjusted_mean"]
    w = n_all / (TRUTH["sigma2"] + n_all * TRUTH["tau2"])
    target = float((w * adj).sum() / w.sum())
    assert of["target"] == pytest.approx(target)
    for r in ctx["rows"]:
        flagged = abs(adj[r["id"]] - target) > z * sd / math.sqrt(r["n"])
        assert (r["key"] != "none") == flagged
        assert r["key"] in ("none", "better" if adj[r["id"]] < target else "worse")
    assert ctx["n_flagged"] >= 2  # the simulation plants two clear outliers (+-4.5 points)
    html = service_report(inp["estimates"], inp["patients"], inp["therapists"], tmp_path / "r.html").read_text()
    n = ctx["n_listed"]
    assert f"chance alone would flag about {n * 0.002:.1f} of them" in html
    assert "99.8% control limits" in html and "95%" not in html
    # a stricter or looser level from the config changes both
    ctx95 = service_context(inp["estimates"], inp["patients"], inp["therapists"], classification_level=0.95)
    assert ctx95["n_flagged"] >= ctx["n_flagged"] and ctx95["chance"] == pytest.approx(n * 0.05)
    assert [r["key"] for r in ctx95["rows"] if r["id"] in ctx95["outcome_funnel"]["ids"]] == ctx95["outcome_funnel"]["keys"]


def test_therapists_are_in_pseudonym_order_not_ranked():
    inp = simulated_inputs(xss=False)
    rows = service_context(inp["estimates"], inp["patients"], inp["therapists"])["rows"]
    assert [r["name"] for r in rows] == sorted(r["name"] for r in rows)


# -- plain language -------------------------------------------------------------------------------------
def test_plain_language_units_label_period_and_service_name(tmp_path):
    svc = make_service(21, [12, 15, 22, 30, 41, 3])
    est = svc["estimates"]
    est["provenance"]["config"]["models"] = [{"id": "ri", "type": "random_intercept",
                                              "label": "Therapist differences in end-of-treatment PHQ-9"}]
    out = service_report(est, svc["patients"], svc["therapists"], tmp_path / "r.html", service_name="Northtown Talking Therapies",
                         export_date="2024-12-31")
    html = out.read_text()
    top = html.split("</header>", 1)[0]
    assert "Northtown Talking Therapies" in top and "Therapist differences in end-of-treatment PHQ-9" in top
    first = svc["patients"]["first_occasion"].min().date().isoformat()
    last = svc["patients"]["last_occasion"].max().date().isoformat()
    assert f"from <time class=\"pub\">{first}</time> to <time class=\"pub\">{last}</time>" in top
    assert "exported <time class=\"pub\">2024-12-31</time>" in top
    assert "model ri" not in html and ">ri<" not in html
    assert "PHQ-9 points" in html
    # every adjusted score and difference is shown to 1 decimal
    shown = re.findall(r'<td class="num" data-value="[^"]*">([^<]*)</td>', html)
    assert shown and all(re.fullmatch(r"[\u2212-]?\d+\.\d", s) for s in shown)
    # without a label: a plain description, never the id
    del est["provenance"]["config"]["models"]
    html = service_report(est, svc["patients"], svc["therapists"], tmp_path / "r2.html").read_text()
    assert "Therapist differences in end-of-treatment PHQ-9 scores, adjusted for how unwell patients were" in html


def test_run_chart_p_chart_limits_by_hand():
    svc = make_service(31, [40, 35, 50, 20])
    ctx = service_context(svc["estimates"], svc["patients"], svc["therapists"])
    rc = ctx["runchart"]
    d = svc["patients"].dropna(subset=["recovered"])
    assert rc["p0"] == pytest.approx(d["recovered"].mean())
    q = d["last_occasion"].dt.to_period("Q")
    assert rc["first"] == f"{q.min().year}-Q{q.min().quarter}" and rc["last"] == f"{q.max().year}-Q{q.max().quarter}"
    # no dates: no run chart
    p = svc["patients"].drop(columns=["first_occasion", "last_occasion"])
    assert service_context(svc["estimates"], p, svc["therapists"])["runchart"] is None
