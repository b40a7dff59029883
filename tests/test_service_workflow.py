"""End to end: a session export with PHQ-9 and GAD-7 in the same rows (columns.scores) through the
workflow, as a service runs it: paired outcomes in patients.csv, the model label in the report, one
feedback page per listed therapist."""

from __future__ import annotations

import numpy as np
import pandas as pd
import yaml

from test_workflow import check_contract, run_snakemake
from therapist_effects.io.scores import paired_outcomes


def service_export(path, seed=5):
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(14):
        caseload = 3 if t == 0 else int(rng.integers(10, 26))  # one small-caseload therapist
        u = rng.normal(0, 1.2)
        for i in range(caseload):
            p0, g0 = int(rng.integers(6, 27)), int(rng.integers(4, 21))
            n = int(rng.integers(2, 7))
            start = pd.Timestamp("2024-01-01") + pd.Timedelta(days=int(rng.integers(0, 300)))
            for s in range(n):
                frac = s / max(n - 1, 1)
                phq = int(np.clip(round(p0 - frac * (6 + u) + rng.normal(0, 2)), 0, 27))
                gad = int(np.clip(round(g0 - frac * (4 + u) + rng.normal(0, 2)), 0, 21))
                rows.append({"referral": f"R{t:02d}{i:03d}", "clinician": f"clin{t:02d}",
                             "appt_date": (start + pd.Timedelta(weeks=s)).date().isoformat(), "phq9": phq, "gad7": gad})
    pd.DataFrame(rows).to_csv(path, index=False)
    return pd.DataFrame(rows)


def test_multi_instrument_service_export_end_to_end(tmp_path):
    raw = service_export(tmp_path / "export.csv")
    label = "Therapist differences in end-of-treatment PHQ-9"
    cfg = {"datasets": {"svc": {"path": str(tmp_path / "export.csv"), "layout": "session", "export_date": "2025-06-30",
                                "columns": {"patient": "referral", "therapist": "clinician", "occasion": "appt_date",
                                            "scores": {"PHQ-9": "phq9", "GAD-7": "gad7"}},
                                "primary": "PHQ-9"}},
           "models": [{"id": "ri", "type": "random_intercept", "label": label}],
           "report": {"service_name": "Northtown Talking Therapies"}}
    path = tmp_path / "svc.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_snakemake(tmp_path, "--configfile", str(path))
    res = tmp_path / "results" / "svc"
    est = check_contract(res / "estimates.json")
    assert est["models"]["ri"]["outcome"] == "phq9_end"
    assert est["models"]["ri"]["formula"].startswith("phq9_end ~ phq9_baseline + (1 | clinician)")
    pt = pd.read_csv(res / "patients.csv", dtype={"patient": str})
    for c in ("phq9", "gad7"):
        for s in ("baseline", "end", "change", "reliable_improvement", "reliable_deterioration"):
            assert f"{c}_{s}" in pt.columns
    # the paired outcomes recomputed from the raw export's first and last rows of each referral
    g = raw.sort_values(["referral", "appt_date"]).groupby("referral")
    first, last = g.first().loc[pt["patient"]], g.last().loc[pt["patient"]]
    want = paired_outcomes(first["phq9"], last["phq9"], first["gad7"], last["gad7"], g.size().loc[pt["patient"]])
    for k in ("recovered", "reliable_improvement", "reliable_deterioration", "reliable_recovery"):
        assert np.array_equal(pt[k].to_numpy(float), want[k], equal_nan=True), k
    html = (res / "therapist_report.html").read_text()
    assert label in html and "Northtown Talking Therapies" in html and "PHQ-9 points" in html
    pages = sorted((res / "therapists").glob("*.html"))
    assert len(pages) == 13  # every therapist but the one with 3 patients
    assert (tmp_path / "logs" / "svc" / "therapist_pages.log").is_file()
