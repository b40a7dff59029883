"""Unit tests of the reports' building blocks: number formatting, CSV safety, pseudonyms,
small-number suppression, funnel limits and the residuals behind the diagnostic plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from therapist_effects.exceptions import PseudonymisationError
from therapist_effects.report import fmt, service_report
from therapist_effects.io.csvsafe import neutralise, safe_csv
from therapist_effects.report.privacy import pseudonym, pseudonym_key, safe_count, safe_rate
from therapist_effects.report.research import conditional_residuals
from therapist_effects.report.service import funnel_limits

from test_report_inputs import simulated_inputs


@pytest.mark.parametrize(("value", "text"), [
    (0.05213, "0.052"), (24.61118871, "24.611"), (0.00523, "0.00523"), (-6278.918133, "\u22126278.9"),
    (0, "0"), (-0.0004, "\u22120.000400"), (float("nan"), "\u2013"), (None, "\u2013"), (12345.678, "12,345.7"),
])
def test_num_follows_the_documented_rule(value, text):
    assert fmt.num(value) == text


def test_interval_uses_the_estimates_decimals():
    assert fmt.interval(0.0521, 0.0312, 0.0814) == "0.052 (0.031 to 0.081)"
    assert fmt.interval(0.0, 0.0, 0.0521) == "0.000 (0.000 to 0.052)"  # singular: bounds set the decimals
    assert fmt.interval(-1.48, -2.96, -0.00087) == "\u22121.480 (\u22122.960 to \u22120.001)"
    assert fmt.pval(0.0004) == "< 0.001" and fmt.pval(0.0456) == "0.046"
    assert fmt.count(4059) == "4,059" and fmt.pct(0.5234) == "52.3%"
    assert fmt.parse("\u22126,278.9") == -6278.9


def test_safe_csv_neutralises_formula_text_but_not_numbers(tmp_path):
    df = pd.DataFrame({"id": ["=1+1", "+cmd", "-2", "@SUM(A1)", "\tx", "\ry", "ok", "a=b", "-2+3", "+1.5e3"],
                       "value": [-1.5, 2, -3, 4, 5, 6, 7, 8, 9, 10]})
    out = pd.read_csv(safe_csv(df, tmp_path / "x.csv"), dtype={"id": str}, keep_default_na=False)
    # text that is a plain number ("-2", "+1.5e3") is a number to a spreadsheet, not a formula: left as
    # it is (issue 10, item 8); "-2+3" is a formula and is neutralised
    assert out["id"].tolist() == ["'=1+1", "'+cmd", "-2", "'@SUM(A1)", "'\tx", "'\ry", "ok", "a=b", "'-2+3",
                                  "+1.5e3"]
    assert out["value"].tolist() == [-1.5, 2, -3, 4, 5, 6, 7, 8, 9, 10]  # numbers, negative ones too, untouched
    assert neutralise(-3) == -3 and neutralise("-3") == "-3" and neutralise("-3-cmd") == "'-3-cmd"


def test_pseudonym_is_hmac_sha256_rfc4231_test_case_2():
    # RFC 4231 test case 2: HMAC-SHA256(key "Jefe", "what do ya want for nothing?")
    # = 5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843
    assert pseudonym("what do ya want for nothing?", b"Jefe") == "T-5bdcc146bf"
    assert pseudonym("what do ya want for nothing?", b"Jefe", n_hex=64).endswith("58b964ec3843")


def test_missing_key_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.delenv("TE_TEST_KEY", raising=False)
    inp = simulated_inputs()
    with pytest.raises(PseudonymisationError) as err:
        service_report(inp["estimates"], inp["patients"], inp["therapists"], tmp_path / "r.html",
                       key_env="TE_TEST_KEY")
    msg = str(err.value)
    assert "\n" not in msg and "TE_TEST_KEY" in msg and "pseudonymise=False" in msg
    assert not (tmp_path / "r.html").exists()
    monkeypatch.setenv("TE_TEST_KEY", "")
    with pytest.raises(PseudonymisationError):
        pseudonym_key("TE_TEST_KEY")


def test_small_counts_are_suppressed():
    assert [safe_count(n, 8) for n in (0, 1, 7, 8, 1234)] == ["0", "<8", "<8", "8", "1,234"]
    assert safe_rate(3, 20, 8) == ("<8 of 20", "suppressed", True)  # numerator small
    assert safe_rate(15, 20, 8) == ("<8 of 20", "suppressed", True)  # complement (5) small
    assert safe_rate(0, 20, 8) == ("0 of 20", "0.0%", False)  # zero is not disclosive
    assert safe_rate(10, 20, 8) == ("10 of 20", "50.0%", False)
    assert safe_rate(3, 5, 8)[0] == "<8"  # the denominator itself small


def test_funnel_limits_hand_worked_binomial_10_half():
    # Binomial(10, 0.5): F(1) = 11/1024, F(2) = 56/1024, F(7) = 968/1024, F(8) = 1013/1024.
    # upper, p = .975: r = 8, alpha = (1013/1024 - .975) / (45/1024) = 0.324444, limit (8 - alpha)/10
    # lower, p = .025: r = 2, alpha = (56/1024 - .025) / (45/1024) = 0.675556, limit (2 - alpha)/10
    lo, hi = funnel_limits(0.5, [10], 0.95)
    assert hi[0] == pytest.approx((8 - (1013 / 1024 - 0.975) / (45 / 1024)) / 10, abs=1e-12)
    assert lo[0] == pytest.approx((2 - (56 / 1024 - 0.025) / (45 / 1024)) / 10, abs=1e-12)
    assert hi[0] == pytest.approx(0.767556, abs=1e-6) and lo[0] == pytest.approx(0.132444, abs=1e-6)


def test_funnel_limits_approach_the_normal_approximation():
    n = np.array([2000, 10000])
    for level in (0.95, 0.998):
        z = stats.norm.ppf((1 + level) / 2)
        lo, hi = funnel_limits(0.3, n, level)
        half = z * np.sqrt(0.3 * 0.7 / n)
        # the exact limits differ from the normal ones by about one patient, 1/n
        assert np.all(np.abs(hi - (0.3 + half)) < 1.5 / n)
        assert np.all(np.abs(lo - (0.3 - half)) < 1.5 / n)


def test_funnel_limits_have_their_coverage_for_in_control_therapists():
    """Simulate 20,000 therapists all at the target rate: ~5% outside 95%, ~0.2% outside 99.8%."""
    rng = np.random.default_rng(7)
    n = rng.integers(10, 80, 20000)
    k = rng.binomial(n, 0.55)
    for level, lo_rate, hi_rate in ((0.95, 0.035, 0.065), (0.998, 0.0005, 0.0045)):
        lo, hi = funnel_limits(0.55, n, level)
        out = np.mean((k / n < lo) | (k / n > hi))
        assert lo_rate < out < hi_rate, (level, out)


def test_conditional_residuals_recover_the_simulated_errors():
    """With the true coefficients and the true therapist effects, residuals are the simulated errors."""
    inp = simulated_inputs(seed=3)
    truth = inp["truth"]
    therapists = pd.DataFrame({"model": "ri", "therapist": list(truth["u"]), "effect": list(truth["u"].values())})
    fitted, resid, u = conditional_residuals(inp["estimates"], "ri", inp["patients"], therapists)
    np.testing.assert_allclose(resid, truth["e"], atol=1e-9)
    assert len(u) == 60


def test_conditional_residuals_refuse_a_design_that_does_not_match():
    inp = simulated_inputs(seed=3)
    est = inp["estimates"]
    est["models"]["ri"]["fixed_effects"]["age"] = {"estimate": 0.1}
    with pytest.raises(ValueError, match="do not match"):
        conditional_residuals(est, "ri", inp["patients"], inp["therapists"])


def test_neutralise_frame_checks_distinct_values_but_keeps_every_cell_its_own():
    """Neutralising looks at each distinct value once; cells that compare equal but differ in type
    (1 and True hash alike) keep their own objects, missing cells stay missing, text columns stay
    text columns and dates stay dates."""
    from therapist_effects.io.csvsafe import neutralise_frame

    df = pd.DataFrame({"mixed": pd.Series([1, True, "=x", "=x", None], dtype=object),
                       "text": pd.Series(["=cmd", "T1", "=cmd", None, "-2"], dtype="string"),
                       "when": pd.to_datetime(["2025-01-01"] * 5)})
    out = neutralise_frame(df)
    assert out["mixed"].tolist()[:4] == [1, True, "'=x", "'=x"] and out["mixed"][4] is None
    assert type(out["mixed"][1]) is bool
    assert isinstance(out["text"].dtype, pd.StringDtype)
    assert out["text"].tolist()[:3] == ["'=cmd", "T1", "'=cmd"] and out["text"][4] == "-2"
    assert pd.isna(out["text"][3])
    assert out["when"].dtype == df["when"].dtype


def test_safe_csv_keeps_rows_of_a_frame_with_its_own_index_and_quotes_a_carriage_return(tmp_path):
    """Neutralised columns stay aligned with the frame's own index (here not 0..n-1), and a carriage
    return inside a mixed (object) column makes the writer quote text, so readers see one row."""
    from therapist_effects.io.csvsafe import safe_csv

    df = pd.DataFrame({"who": ["=a", "b"], "note": pd.Series([1, "x\ry"], dtype=object)}).set_axis([10, 11])
    path = safe_csv(df, tmp_path / "t.csv")
    back = pd.read_csv(path, keep_default_na=False)
    assert back["who"].tolist() == ["'=a", "b"]
    assert back["note"].astype(str).tolist() == ["1", "x\ry"]
    assert len(back) == 2


@pytest.mark.parametrize("sampler, words", [
    ("grid", "exact posterior of the variances on a grid"),
    ("nutpie", "No-U-Turn sampler"),
    ("pymc", "No-U-Turn sampler"),
    (None, "No-U-Turn sampler"),
])
def test_bayes_method_is_described_by_the_sampler_that_ran(sampler, words):
    from therapist_effects.report.common import method_words
    from therapist_effects.report.tables import _method

    entry = {"method": "bayes", "engine": "bayes", "sampler": sampler}
    assert words in method_words(entry)
    table = _method(entry)
    assert ("grid" in table) == (sampler == "grid") and ("NUTS" in table) == (sampler != "grid")
