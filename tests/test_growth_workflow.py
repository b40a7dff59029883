"""Growth models in the workflow: config, estimates.json entry, not_on_track.csv, and the report
sections (rendered in headless Chromium).

The data are simulated by ``simulate_growth(20, 12, deteriorate=0.08, seed=2)`` (session numbers as
the occasion, no instrument), so the truth is known: the true therapist slope variance is 0.4 and the
flags should find the deteriorating patients.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pandas as pd
import pytest
import yaml

from browser import render, require_chromium
from therapist_effects.config import load_config
from therapist_effects.exceptions import ConfigError
from therapist_effects.models.growth import simulate_growth
from therapist_effects.report.privacy import pseudonymise_ids

REPO = Path(__file__).resolve().parents[1]
KEY = "growth-test-key-not-secret"  # >= 16 characters


@pytest.fixture(scope="module")
def growth_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("growth")
    d = simulate_growth(20, 12, deteriorate=0.08, seed=2)
    d[["patient", "therapist", "session", "score"]].to_csv(work / "sessions.csv", index=False)
    cfg = {
        "datasets": {"sim": {"path": str(work / "sessions.csv"), "layout": "session",
                             "columns": {"patient": "patient", "therapist": "therapist", "score": "score",
                                         "occasion": "session"}}},
        "models": [{"id": "ri", "type": "random_intercept"}, {"id": "g", "type": "growth", "time": "log"}],
    }
    (work / "my.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "2",
           "--directory", str(work), "--configfile", str(work / "my.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TE_PSEUDONYM_KEY": KEY},
                          timeout=1500)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return work, d, proc


def test_growth_entry_and_not_on_track(growth_run):
    work, d, proc = growth_run
    res = work / "results" / "sim"
    est = json.loads((res / "estimates.json").read_text())
    with open(REPO / "workflow" / "schemas" / "estimates.schema.yaml", encoding="utf-8") as fh:
        jsonschema.validate(est, yaml.safe_load(fh))
    g = est["models"]["g"]
    assert g["type"] == "growth" and g["time"] == "log"
    assert set(g["variance_components"]) == {"therapist", "therapist_slope", "patient", "patient_slope", "residual"}
    for v in g["variance_components"].values():
        assert v["ci_low"] <= v["estimate"] <= v["ci_high"]
    assert "(1 + log_session | therapist)" in g["formula"] and "(1 + log_session | therapist:patient)" in g["formula"]
    assert g["slope_share"]["ci_low"] < g["slope_share"]["estimate"] < g["slope_share"]["ci_high"]
    assert set(g["correlations"]) == {"therapist", "patient"}
    assert g["n_sessions"] == len(d)
    # not_on_track.csv: the contract's columns, one row per session
    t = pd.read_csv(res / "not_on_track.csv", dtype={"patient": str, "therapist": str})
    assert list(t.columns) == ["patient", "therapist", "session", "score", "expected", "upper", "flag"]
    assert len(t) == len(d) and set(t["flag"]) <= {0, 1}
    assert ((t["score"] > t["upper"]).astype(int) == t["flag"]).all()
    assert (t.loc[t["session"] == 1, "flag"] == 0).all()
    # the deteriorating patients (truth) are flagged far more often than the others
    flagged = t.groupby("patient")["flag"].max()
    det = d.groupby("patient")["deteriorating"].first().reindex(flagged.index)
    assert flagged[det == 1].mean() > 0.7 > 0.3 > flagged[det == 0].mean()
    # the early-flag validity is printed by the rule and stored in the entry
    v = g["early_flag_validation"]
    assert v["folds"] == 5 and v["n_patients"] > 100
    assert "early flag (by session 4, 5-fold cross-validation" in (work / "logs" / "sim" / "fit_g.log").read_text()


def test_growth_config_errors(tmp_path):
    base = {"datasets": {"p": {"path": "x.csv", "layout": "patient",
                               "columns": {"patient": "a", "therapist": "b", "outcome": "c"}}}}
    with pytest.raises(ConfigError, match=r"models\[0\]: a growth model needs session-layout data"):
        load_config({**base, "models": [{"id": "g", "type": "growth"}]}, source="my.yaml")
    with pytest.raises(ConfigError, match=r"models\[0\].time"):
        load_config({**base, "models": [{"id": "g", "type": "growth", "time": "days"}]}, source="my.yaml")
    cfg = load_config({**base, "models": [{"id": "ri", "type": "random_intercept"}]}, source="my.yaml")
    assert "time" not in cfg["models"][0]  # growth keys add nothing to other models' entries


def test_growth_research_report_in_chromium(growth_run, tmp_path):
    require_chromium()
    work, _, _ = growth_run
    out = work / "results" / "sim" / "report.html"
    page = render(out, tmp_path / "report.png")
    assert not page.console_errors and not page.exceptions and not page.broken_images
    assert not page.external_requests
    est = json.loads((work / "results" / "sim" / "estimates.json").read_text())
    g = est["models"]["g"]
    text = out.read_text()
    section = text.split('id="growth"', 1)[1].split("</section>", 1)[0]
    # the curves by band and the slope caterpillar are images that loaded, with alt text
    imgs = [i for i in page.images if "Expected-recovery curves" in (i.get("alt") or "")]
    assert len(imgs) == 1 and imgs[0]["loaded"] and imgs[0]["width"] > 0
    assert "4 intake-severity bands" in imgs[0]["alt"]
    cats = [i for i in page.images if "Caterpillar plot" in (i.get("alt") or "")]
    assert len(cats) == 2  # ri, and the therapist slope effects of g
    assert "rate of change per unit of log_session" in page.text  # the slope caterpillar's caption
    # the slope share and the cross-validated sensitivity / specificity, with the estimate's exact value
    assert f'data-value="{g["slope_share"]["estimate"]!r}"' in section
    v = g["early_flag_validation"]
    assert f'data-value="{v["sensitivity"]["estimate"]!r}"' in section
    assert f'data-value="{v["specificity"]["estimate"]!r}"' in section
    assert "Early not-on-track flag (by session 4)" in page.text


def test_growth_service_report_in_chromium(growth_run, tmp_path):
    require_chromium()
    work, d, _ = growth_run
    out = work / "results" / "sim" / "therapist_report.html"
    page = render(out, tmp_path / "therapist_report.png")
    assert not page.console_errors and not page.exceptions and not page.broken_images
    text = re.sub(r"data:image/[A-Za-z0-9.+-]+;base64,[A-Za-z0-9+/=]+", "data:image", out.read_text())
    section = text.split('id="not-on-track"', 1)[1].split("</section>", 1)[0]
    t = pd.read_csv(work / "results" / "sim" / "not_on_track.csv", dtype={"patient": str, "therapist": str})
    per = t.groupby(["therapist", "patient"])["flag"].max().groupby("therapist").agg(["sum", "size"])
    names = pseudonymise_ids(per.index, KEY.encode())
    assert not any(re.search(rf"\b{tid}\b", section) for tid in per.index)  # no raw therapist IDs
    assert not any(p in text for p in t["patient"].unique())  # no patient IDs
    for tid, r in per.iterrows():
        k, n = int(r["sum"]), int(r["size"])
        if n < 10:
            assert names[tid] not in section  # small caseloads only in aggregate
            continue
        row = section.split(names[tid], 1)[1].split("</tr>", 1)[0]
        r5 = lambda x: 5 * ((x + 2) // 5)  # noqa: E731  the service report's rounding to the nearest 5
        if 0 < k < 8 or 0 < n - k < 8:
            assert f"&lt;8 of {r5(n)}" in row and "suppressed" in row
        else:
            assert f"{r5(k)} of {r5(n)}" in row
    assert "Patients not on track" in page.text


def test_growth_step_is_byte_identical_on_rerun(growth_run, tmp_path):
    """Same config and data give byte-identical model entry and not-on-track table (the folds of the
    cross-validation are drawn from the config's seed)."""
    from therapist_effects.models.growth_step import fit_growth_step

    work, _, _ = growth_run
    cfg = load_config(work / "my.yaml")
    res = work / "results" / "sim"
    out = {k: tmp_path / f"g{k}" for k in (".json", "_therapists.csv", "_not_on_track.csv", "_curves.csv")}
    fit_growth_step(str(res / "validated.parquet"), str(res / "patients.parquet"), "g", cfg["datasets"]["sim"], cfg,
                    str(out[".json"]), str(out["_therapists.csv"]), str(out["_not_on_track.csv"]),
                    str(out["_curves.csv"]), higher_is_better=None)
    for suffix, path in out.items():
        assert path.read_bytes() == (res / "models" / f"g{suffix}").read_bytes(), suffix
