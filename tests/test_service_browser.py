"""The service report, its A4 print, its run chart and the per-therapist pages in headless Chromium.

The PDF checks read the printed file with poppler's ``pdfinfo`` / ``pdftotext`` (``apt-get install
poppler-utils``) and are skipped without them (failed when CI is set, like the browser tests).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from browser import render, require_chromium
from test_report_inputs import simulated_inputs
from therapist_effects.report.browser import print_to_pdf
from therapist_effects.report.privacy import pseudonymise_ids
from therapist_effects.report.service import page_name, service_context, service_report, therapist_pages

pytestmark = pytest.mark.browser
KEY = "test-key-not-secret"


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    require_chromium()
    monkeypatch.setenv("TE_PSEUDONYM_KEY", KEY)


def require_poppler():
    if shutil.which("pdftotext") is None or shutil.which("pdfinfo") is None:
        if os.environ.get("CI"):
            pytest.fail("poppler-utils (pdftotext, pdfinfo) not installed; CI is set")
        pytest.skip("poppler-utils not installed (apt-get install poppler-utils)")


def dated_inputs():
    """The report tests' simulated service, with session dates over two years (seeded)."""
    inp = simulated_inputs(xss=False)
    p = inp["patients"]
    rng = np.random.default_rng(7)
    p["first_occasion"] = pd.Timestamp("2023-01-02") + pd.to_timedelta(rng.integers(0, 640, len(p)), unit="D")
    p["last_occasion"] = p["first_occasion"] + pd.to_timedelta(rng.integers(14, 90, len(p)), unit="D")
    return inp


def assert_clean(page, min_images):
    assert page.console_errors == [] and page.exceptions == [] and page.dialogs == []
    assert page.external_requests == [] and page.broken_images == [] and page.scripts == 0
    assert len(page.images) >= min_images and all(len(i["alt"]) > 40 for i in page.images)


def pdf_pages(pdf) -> list[str]:
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True).stdout
    n = int(re.search(r"Pages:\s+(\d+)", info).group(1))
    size = re.search(r"Page size:\s+([\d.]+) x ([\d.]+) pts", info)
    assert (float(size.group(1)), float(size.group(2))) == pytest.approx((595.3, 841.9), abs=2)  # A4 in points
    return [subprocess.run(["pdftotext", "-f", str(i), "-l", str(i), "-layout", str(pdf), "-"],
                           capture_output=True, text=True, check=True).stdout for i in range(1, n + 1)]


def test_service_report_run_chart_and_links(tmp_path):
    inp = dated_inputs()
    out = service_report(inp["estimates"], inp["patients"], inp["therapists"], tmp_path / "therapist_report.html",
                         service_name="Northtown Talking Therapies", export_date="2025-01-31")
    page = render(out, tmp_path / "r.png")
    assert_clean(page, min_images=3)  # adjusted-outcome funnel, recovery funnel, run chart
    run = [i for i in page.images if i["alt"].startswith("Run chart")]
    assert len(run) == 1 and run[0]["width"] > 600
    assert "Recovery over time" in page.text and "Quarters 2023-Q1 to 2024-Q4" in page.text
    assert page.text.lstrip().startswith("Therapist outcomes in Northtown Talking Therapies")
    head = page.text.split("How to read", 1)[0]
    first = inp["patients"]["first_occasion"].min().date().isoformat()
    last = inp["patients"]["last_occasion"].max().date().isoformat()
    assert f"Data: sessions from {first} to {last}; exported 2025-01-31" in head
    # every listed therapist links to their page
    html = out.read_text()
    ctx = service_context(inp["estimates"], inp["patients"], inp["therapists"])
    for r in ctx["rows"]:
        assert f'href="therapists/{page_name(r["name"])}"' in html


def test_a4_print_page_count_and_no_table_cut_across_pages(tmp_path):
    require_poppler()
    inp = dated_inputs()
    out = service_report(inp["estimates"], inp["patients"], inp["therapists"], tmp_path / "therapist_report.html")
    print_to_pdf(out, tmp_path / "r.pdf")  # chromium --headless --print-to-pdf
    pages = pdf_pages(tmp_path / "r.pdf")
    # 51 listed therapists in three tables of 22, 22 and 7 rows: page 1 the text, 2 the first table, 3 the other
    # two, 4 the two funnels, 5 the run chart (a table that does not fit moves to the next page whole)
    assert len(pages) == 5
    ctx = service_context(inp["estimates"], inp["patients"], inp["therapists"])
    names = [r["name"] for r in ctx["rows"]]
    where = {n: [i for i, text in enumerate(pages) if n in text] for n in names}
    assert all(len(v) == 1 for v in where.values())  # each therapist printed once
    for start in range(0, len(names), 22):
        chunk = names[start:start + 22]
        on = {where[n][0] for n in chunk}
        assert len(on) == 1, f"table {start // 22 + 1} is cut across pages {sorted(on)}"
        assert re.search(r"therapist\s+caseload", pages[on.pop()])  # its header row is on the same page
    # the figures' captions are printed beside them (a figure is not split from its caption), text legible
    joined = "\n".join(pages)
    for caption in ("Each point is a listed therapist's case-mix-adjusted end score",
                    "The service's recovery rate in each quarter"):
        assert sum(caption in p for p in pages) == 1, caption
    assert "Flags." in joined and "PHQ-9 points" in joined


def test_therapist_pages_show_only_their_own_pseudonym(tmp_path):
    inp = dated_inputs()
    paths = therapist_pages(inp["estimates"], inp["patients"], inp["therapists"], tmp_path / "therapists")
    ctx = service_context(inp["estimates"], inp["patients"], inp["therapists"])
    assert len(paths) == ctx["n_listed"] == len(list((tmp_path / "therapists").glob("*.html")))
    names = pseudonymise_ids(inp["therapists"]["therapist"], KEY.encode())
    th = inp["therapists"].set_index("therapist")
    outlier = "T010"  # planted: 4.5 PHQ-9 points worse than average, 40 patients
    path = tmp_path / "therapists" / page_name(names[outlier])
    page = render(path, tmp_path / "page.png")
    assert_clean(page, min_images=2)
    alts = " ".join(i["alt"] for i in page.images)
    assert "Caterpillar plot" in alts and "Funnel plot" in alts and "star" in alts
    assert f"Feedback for {names[outlier]}" in page.text
    others = [v for k, v in names.items() if k != outlier]
    assert not any(o in page.text or o in path.read_text() for o in others)  # the others are unlabelled
    own = page.text.split("Your figures", 1)[1].split("Where you are", 1)[0]
    assert f"{th.loc[outlier, 'adjusted_mean']:.1f}" in own and "poorer than average" in own
    # no raw IDs (outside the images' base64, where a 4-character ID such as T023 turns up by chance)
    html = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", path.read_text())
    assert not any(tid in html for tid in th.index)
    require_poppler()
    print_to_pdf(path, tmp_path / "page.pdf")
    printed = pdf_pages(tmp_path / "page.pdf")
    assert 1 <= len(printed) <= 3
    assert sum("Your figures" in p and "reliable improvement" in p for p in printed) == 1  # the table on one page
