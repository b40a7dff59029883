"""Tests added after mutation testing (``tools/mutation.sh``, issue 16): each pins behaviour that a
surviving mutant showed to be untested. Expected values are worked by hand from the documented rules.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from therapist_effects.classify import NOT_DISTINGUISHABLE, classify_effects
from therapist_effects.io.csvsafe import neutralise_frame, safe_csv
from therapist_effects.meta import pool
from therapist_effects.report.privacy import (
    is_small,
    pseudonym,
    pseudonymise_ids,
    safe_count,
    safe_rate,
    suppressed_label,
)


# ---- csvsafe ---------------------------------------------------------------------------------
def test_neutralise_frame_leaves_numeric_and_bool_columns_numeric_and_treats_every_text_column():
    """A numeric column before a text column must not stop the scan (``continue``, not ``break``);
    numeric and bool columns keep their dtypes ("numbers untouched"); column names are neutralised."""
    df = pd.DataFrame({"n": [-1.5, 2.0], "flag": [True, False], "=cmd": ["=1+1", "ok"], 3: ["-x", "y"]})
    out = neutralise_frame(df)
    assert out["n"].dtype == np.float64 and out["flag"].dtype == bool
    assert list(out.columns) == ["n", "flag", "'=cmd", 3]
    assert out["'=cmd"].tolist() == ["'=1+1", "ok"]
    assert out[3].tolist() == ["'-x", "y"]
    assert df.columns[2] == "=cmd" and df["=cmd"][0] == "=1+1"  # the input is not modified


def test_safe_csv_writes_exact_text(tmp_path):
    """No index column, no quoting without carriage returns, parent folders created, text cells next
    to missing values and numbers in one object column handled."""
    df = pd.DataFrame({"id": ["=A", None, "c"], "v": [-1, 2, 3], "mixed": ["@x", 5, None]})
    path = safe_csv(df, tmp_path / "new" / "deeper" / "x.csv")
    assert path.read_text() == "id,v,mixed\n'=A,-1,'@x\n,2,5\nc,3,\n"


def test_safe_csv_quotes_only_when_a_cell_has_a_carriage_return(tmp_path):
    df = pd.DataFrame({"id": ["a\rb", "c"], "v": [1, 2]})
    assert safe_csv(df, tmp_path / "r.csv").read_bytes() == b'"id","v"\n"a\rb",1\n"c",2\n'
    assert safe_csv(df, tmp_path / "i.csv", index=True).read_bytes().startswith(b'"","id","v"\n0,')



def test_safe_csv_neutralises_category_columns_and_writes_durations_and_periods_as_text(tmp_path):
    """A category column (its categories are text) is neutralised like any other text column and a
    carriage return in a category is quoted; durations, periods and nullable integers are written as
    pandas writes them, and the input frame is left as it was."""
    df = pd.DataFrame({"c": pd.Categorical(["=x", "y", "=x", None]), "r": pd.Categorical(["a\rb", "c", "c", "c"]),
                       "td": pd.to_timedelta([1, 2, None, 4], unit="h"),
                       "p": pd.period_range("2020-01", periods=4, freq="M"),
                       "k": pd.array([1, None, -3, 4], dtype="Int64")})
    before = df.copy()
    assert safe_csv(df, tmp_path / "c.csv").read_bytes() == (
        b'"c","r","td","p","k"\n"\'=x","a\rb","0 days 01:00:00","2020-01",1\n"y","c","0 days 02:00:00","2020-02",""\n'
        b'"\'=x","c","","2020-03",-3\n"","c","0 days 04:00:00","2020-04",4\n')
    assert neutralise_frame(df)["c"].tolist()[:3] == ["'=x", "y", "'=x"]
    pd.testing.assert_frame_equal(df, before)


# ---- classify --------------------------------------------------------------------------------
@pytest.mark.parametrize(("hib", "up", "down"), [
    (None, "above average", "below average"),
    (True, "better than average", "worse than average"),
    (False, "worse than average", "better than average"),
])
def test_classify_effects_by_interval_and_direction(hib, up, down):
    """Interval strictly above 0 -> up, strictly below -> down, touching or covering 0 -> not
    distinguishable (an end exactly at 0 does not exclude 0)."""
    lo = [0.1, -2.0, -1.0, 0.0, -0.5]
    hi = [2.0, -0.1, 1.0, 1.0, 0.0]
    got = classify_effects(lo, hi, higher_is_better=hib).tolist()
    assert got == [up, down, NOT_DISTINGUISHABLE, NOT_DISTINGUISHABLE, NOT_DISTINGUISHABLE]


# ---- privacy ---------------------------------------------------------------------------------
def test_small_count_boundaries():
    assert [is_small(n, 8) for n in (-1, 0, 1, 7, 8, 9)] == [False, False, True, True, False, False]
    assert [is_small(n, 5) for n in (4, 5)] == [True, False]
    assert is_small(None, 8) is False and is_small("x", 8) is False
    assert is_small("3", 8) is True
    assert suppressed_label(10) == "<10"
    assert safe_count(None, 8) == "\u2013" and safe_count(12345, 8) == "12,345" and safe_count(3, 5) == "<5"


def test_safe_rate_boundaries():
    # complement exactly at the threshold is shown; one less is suppressed
    assert safe_rate(12, 20, 8) == ("12 of 20", "60.0%", False)
    assert safe_rate(13, 20, 8) == ("<8 of 20", "suppressed", True)
    assert safe_rate(8, 8, 8) == ("8 of 8", "100.0%", False)
    assert safe_rate(20, 20, 8) == ("20 of 20", "100.0%", False)  # complement 0 is not disclosive
    assert safe_rate(0, 0, 8) == ("\u2013", "\u2013", False) and safe_rate(1, None, 8)[2] is False
    assert safe_rate(1500, 2000, 8) == ("1,500 of 2,000", "75.0%", False)
    assert safe_rate(2, 7, 8) == ("<8", "suppressed", True)


def test_pseudonyms_are_stable_and_lengthen_only_on_collision():
    key = b"k"
    m = pseudonymise_ids(["b", "a", "a", 3], key)
    assert list(m) == ["3", "a", "b"]
    assert m["a"] == pseudonym("a", key) and len(m["a"]) == 2 + 10 and m["a"].startswith("T-")
    assert pseudonym(3, key) == pseudonym("3", key)


def test_pseudonym_key_reads_the_documented_variable_as_utf8(monkeypatch):
    from therapist_effects.report.privacy import pseudonym_key

    monkeypatch.setenv("TE_PSEUDONYM_KEY", "caf\u00e9-key-of-16-chars")
    assert pseudonym_key() == "caf\u00e9-key-of-16-chars".encode("utf-8")
    monkeypatch.setenv("OTHER_KEY", "another-key-of-16-chars")
    assert pseudonym_key("OTHER_KEY") == b"another-key-of-16-chars"


def test_pseudonyms_lengthen_by_two_hex_digits_until_they_differ(monkeypatch):
    """A collision at 10 hex digits lengthens every pseudonym to 12 (then 14, ...); if they collide even
    at the full 64 digits a one-line PseudonymisationError says so."""
    from therapist_effects.exceptions import PseudonymisationError
    from therapist_effects.report import privacy

    real = privacy.pseudonym
    seen = []

    def colliding_below_12(i, key, n_hex=privacy.PSEUDONYM_HEX):
        seen.append(n_hex)
        return "T-" + "0" * n_hex if n_hex < 12 else real(i, key, n_hex)

    monkeypatch.setattr(privacy, "pseudonym", colliding_below_12)
    m = privacy.pseudonymise_ids(["a", "b"], b"k")
    assert sorted(set(seen)) == [10, 12]
    assert m == {"a": real("a", b"k", 12), "b": real("b", b"k", 12)}

    monkeypatch.setattr(privacy, "pseudonym", lambda i, key, n_hex=10: "T-" + "0" * n_hex)
    with pytest.raises(PseudonymisationError, match="^pseudonyms collide even at full HMAC length$"):
        privacy.pseudonymise_ids(["a", "b"], b"k")


def test_classify_effects_treats_a_missing_interval_as_not_distinguishable():
    """Missing ends (None, as read from JSON, or NaN) are converted to NaN, which compares false: a
    missing end never decides, the other end still can."""
    got = classify_effects([None, 0.5, np.nan], [None, 1.0, -0.2]).tolist()
    assert got == [NOT_DISTINGUISHABLE, "above average", "below average"]
    got = classify_effects([-1.0, 0.5], [None, None]).tolist()
    assert got == [NOT_DISTINGUISHABLE, "above average"]


# ---- meta: the study table -------------------------------------------------------------------
def _studies():
    return pd.DataFrame({"study": ["A", "B", "C", "D"], "icc": [0.05, 0.02, 0.08, 0.0],
                         "n_patients": [400, 900, 250, 60], "n_therapists": [20, 45, 12, 2]})


IMPOSSIBLE = "expected n_therapists >= 2 and n_patients > n_therapists (columns 'n_therapists', 'n_patients')"
NO_VARIANCE = ("no variance: give 'var_icc', an interval ('ci_low', 'ci_high'), 'n_patients' and "
               "'n_therapists', or 'yi' and 'vi'")


@pytest.mark.parametrize(("change", "row", "reason"), [
    ({"n_therapists": [20, 1, 12, 2]}, 2, IMPOSSIBLE),        # fewer than 2 therapists
    ({"n_patients": [400, 900, 12, 60]}, 3, IMPOSSIBLE),      # as many patients as therapists
    ({"n_patients": [400, None, 250, 60]}, 2, NO_VARIANCE),   # missing caseload total: no variance at all
    ({"n_therapists": [None, 45, 12, 2]}, 1, NO_VARIANCE),    # missing number of therapists
])
def test_study_table_rejects_impossible_counts_with_row_and_study(change, row, reason):
    from therapist_effects.exceptions import InputError
    from therapist_effects.meta import pool_study_table

    bad = _studies().assign(**change)
    study = "ABCD"[row - 1]
    with pytest.raises(InputError) as err:
        pool_study_table(bad, source="published.csv")
    assert str(err.value) == f"published.csv: row {row} (study '{study}'): {reason}"


def test_study_table_accepts_the_boundary_counts_and_rejects_icc_one():
    """2 therapists and n = k + 1 patients are allowed; an ICC of exactly 1 is not (logit infinite)."""
    from therapist_effects.exceptions import InputError
    from therapist_effects.meta import pool_study_table

    ok = _studies().assign(n_patients=[400, 900, 250, 3])
    assert pool_study_table(ok)["k"] == 4
    with pytest.raises(InputError, match=r"study table: row 3 \(study 'C'\), column 'icc': expected a value in \[0, 1\), got 1\.0"):
        pool_study_table(_studies().assign(icc=[0.05, 0.02, 1.0, 0.0]))


def test_study_table_passes_level_and_prediction_and_reports_weights_by_hand():
    from therapist_effects.meta import donner_var_icc, logit_icc, pool_study_table

    t = _studies()
    var = donner_var_icc(t["icc"], t["n_patients"], t["n_therapists"])
    yi, vi = logit_icc(t["icc"], var)
    for method, level, prediction in (("REML", 0.9, "t"), ("DL", 0.99, "normal")):
        out = pool_study_table(t, method, level=level, prediction=prediction, scale="logit")
        direct = pool(yi, vi, method, level=level, prediction=prediction)
        for key in ("estimate", "ci_low", "ci_high", "pi_low", "pi_high", "tau2", "I2"):
            assert out[key] == pytest.approx(direct[key], rel=1e-12, abs=0), key
        s = pd.DataFrame(out["studies"])
        np.testing.assert_allclose(s["yi"], yi, rtol=1e-12)
        np.testing.assert_allclose(s["vi"], vi, rtol=1e-12)
        w = 1.0 / (vi + direct["tau2"])
        np.testing.assert_allclose(s["weight_percent"], 100 * w / w.sum(), rtol=1e-12)
        assert list(s["study"]) == list(t["study"])


def test_pool_accepts_integer_and_list_inputs():
    out = pool([0, 1, 3], [1, 1, 2], "DL")
    w = np.array([1.0, 1.0, 0.5])
    y = np.array([0.0, 1.0, 3.0])
    mu = (w * y).sum() / w.sum()
    q = (w * (y - mu) ** 2).sum()
    assert out["Q"] == pytest.approx(q, rel=1e-12)


# ---- instruments: one-line config errors naming the key ------------------------------------------
_GOOD = {"min": 0, "max": 40, "higher_is_better": False, "cutoff": 15, "rci": 5}


@pytest.mark.parametrize(("entry", "message"), [
    ({**_GOOD, "colour": 1, "aliases": []},
     "instruments.MYSCALE: unknown key(s) 'colour'; allowed keys are cutoff, higher_is_better, max, min, "
     "rci, reliability, sd, source"),
    ({k: v for k, v in _GOOD.items() if k != "cutoff"}, "instruments.MYSCALE: missing required key 'cutoff'"),
    ({**_GOOD, "min": "0"}, "instruments.MYSCALE.min: expected a finite number, got '0'"),
    ({**_GOOD, "max": float("inf")}, "instruments.MYSCALE.max: expected a finite number, got inf"),
    ({**_GOOD, "cutoff": True}, "instruments.MYSCALE.cutoff: expected a finite number, got True"),
    ({**_GOOD, "min": 40}, "instruments.MYSCALE: min (40) must be smaller than max (40)"),
    ({**_GOOD, "higher_is_better": "no"}, "instruments.MYSCALE.higher_is_better: expected true or false, got 'no'"),
    ({**_GOOD, "cutoff": 41}, "instruments.MYSCALE.cutoff: 41 is outside the score range 0-40"),
    ({**_GOOD, "sd": 5}, "instruments.MYSCALE: give either rci or (sd and reliability), not both"),
    ({**_GOOD, "rci": 0}, "instruments.MYSCALE.rci: expected a positive number of points, got 0"),
    ({**{k: v for k, v in _GOOD.items() if k != "rci"}, "sd": 5},
     "instruments.MYSCALE: instrument 'MYSCALE' needs rci, or sd and reliability for the Jacobson-Truax reliable "
     "change 1.96*sd*sqrt(2*(1-reliability)); set them under instruments.MYSCALE in the config"),
    ({**{k: v for k, v in _GOOD.items() if k != "rci"}, "sd": -1, "reliability": 0.8},
     "instruments.MYSCALE.sd: expected a positive standard deviation, got -1"),
    ({**{k: v for k, v in _GOOD.items() if k != "rci"}, "sd": 5, "reliability": 1},
     "instruments.MYSCALE.reliability: expected a value in [0, 1), got 1"),
])
def test_user_instrument_errors_name_the_key(entry, message):
    from therapist_effects.exceptions import ConfigError
    from therapist_effects.io.instruments import get_instrument

    with pytest.raises(ConfigError) as err:
        get_instrument("MYSCALE", {"MYSCALE": entry})
    assert str(err.value) == message


def test_user_instrument_built_from_sd_and_reliability():
    """Jacobson & Truax (1991): RCI = 1.96 * sd * sqrt(2 (1 - r)); 1.96 * 5 * sqrt(0.4) = 6.1980642."""
    from therapist_effects.io.instruments import get_instrument

    inst = get_instrument("my-scale", {"MYSCALE": {**{k: v for k, v in _GOOD.items() if k != "rci"},
                                                    "sd": 5, "reliability": 0.8, "source": " a\n  b "}})
    assert inst.rci == pytest.approx(6.1980642, rel=1e-7)
    assert (inst.min, inst.max, inst.cutoff, inst.sd, inst.reliability) == (0.0, 40.0, 15.0, 5.0, 0.8)
    assert inst.source == "a b" and inst.higher_is_better is False


# ---- outcomes: feedback coding ----------------------------------------------------------------
def _feedback_of(arm_values, feedback_level=None):
    from therapist_effects.io.ingest import ingest_frame
    from therapist_effects.io.outcomes import derive_patient_outcomes

    table = pd.DataFrame({"pid": [f"P{i}" for i in range(len(arm_values))], "tid": ["T1", "T2"] * (len(arm_values) // 2)
                          + ["T1"] * (len(arm_values) % 2), "post": range(5, 5 + len(arm_values)), "arm": arm_values})
    spec = {"layout": "patient", "feedback_level": feedback_level,
            "columns": {"patient": "pid", "therapist": "tid", "outcome": "post", "arm": "arm"}}
    patients, _ = derive_patient_outcomes(ingest_frame(table, spec).rows, spec)
    return patients["feedback"].tolist()


def test_numeric_arm_levels_sort_numerically_and_labels_alphabetically():
    """Module docstring: "the second level in sorted order (numbers numerically, labels alphabetically)":
    2 < 10 numerically (as text "10" < "2"); "arm10" < "arm2" as labels."""
    assert _feedback_of([2, 10, 10]) == [0.0, 1.0, 1.0]
    assert _feedback_of([10, 2, 2]) == [1.0, 0.0, 0.0]
    assert _feedback_of(["arm2", "arm10", "arm10"]) == [1.0, 0.0, 0.0]
    assert _feedback_of([2, 10, 10], feedback_level="2") == [1.0, 0.0, 0.0]


def test_single_arm_level_warns_and_codes_zero():
    from therapist_effects.exceptions import DataWarning

    with pytest.warns(DataWarning, match="the arm column has a single level 'ROM'; feedback set to 0"):
        assert _feedback_of(["ROM", "ROM", "ROM"]) == [0.0, 0.0, 0.0]


_NO_RCI = {k: v for k, v in _GOOD.items() if k != "rci"}


@pytest.mark.parametrize(("entry", "message"), [
    ({**_GOOD, "colour": 1, "shade": 2},
     "instruments.MYSCALE: unknown key(s) 'colour', 'shade'; allowed keys are cutoff, higher_is_better, max, "
     "min, rci, reliability, sd, source"),
    ({**_GOOD, "rci": "5"}, "instruments.MYSCALE.rci: expected a finite number, got '5'"),
    ({**_NO_RCI, "sd": "5", "reliability": 0.8}, "instruments.MYSCALE.sd: expected a finite number, got '5'"),
    ({**_NO_RCI, "sd": 5, "reliability": None}, None),
    ({**_NO_RCI, "sd": 5, "reliability": "high"},
     "instruments.MYSCALE.reliability: expected a finite number, got 'high'"),
])
def test_more_user_instrument_errors(entry, message):
    from therapist_effects.exceptions import ConfigError
    from therapist_effects.io.instruments import get_instrument

    with pytest.raises(ConfigError) as err:
        get_instrument("MYSCALE", {"MYSCALE": entry})
    if message is not None:
        assert str(err.value) == message
    else:
        assert "needs rci, or sd and reliability" in str(err.value)


def test_user_instrument_boundaries_are_allowed():
    """A cutoff at the ends of the range and an RCI below one point are valid."""
    from therapist_effects.io.instruments import get_instrument

    assert get_instrument("A", {"A": {**_GOOD, "cutoff": 0}}).cutoff == 0.0
    assert get_instrument("B", {"B": {**_GOOD, "cutoff": 40}}).cutoff == 40.0
    assert get_instrument("C", {"C": {**_GOOD, "rci": 0.5}}).rci == 0.5


def test_instrument_functions_return_scalars_for_scalars_and_arrays_for_arrays():
    from therapist_effects.io.instruments import get_instrument

    phq = get_instrument("PHQ-9")
    assert type(phq.improvement(20, 8)) is float and phq.improvement(20, 8) == 12.0
    got = phq.improvement(20, np.array([8, 25]))
    assert isinstance(got, np.ndarray) and got.dtype == float and got.tolist() == [12.0, -5.0]
    got = phq.improvement(np.array([20, 10]), 8)
    assert isinstance(got, np.ndarray) and got.tolist() == [12.0, 2.0]
    assert type(phq.is_case(12)) is float and phq.is_case(12) == 1.0
    assert np.isnan(phq.is_case(np.nan))
    assert phq.is_case(np.array([9, 10, np.nan])).tolist()[:2] == [0.0, 1.0]
    assert type(phq.reliable_improvement(20, 8)) is float
    assert np.isnan(phq.reliable_deterioration(np.nan, 8))


# ---- meta: pool's checks and Cochran's Q under every estimator --------------------------------
def test_pool_q_is_cochrans_q_for_every_method_and_inputs_are_checked():
    from therapist_effects.exceptions import ModelError

    y = np.array([-3.1, -3.9, -2.6, -3.4])
    v = np.array([0.10, 0.30, 0.05, 0.20])
    w = 1 / v
    mu = (w * y).sum() / w.sum()
    q = (w * (y - mu) ** 2).sum()
    for method in ("DL", "PM", "REML"):
        out = pool(y, v, method)
        assert out["Q"] == pytest.approx(q, rel=1e-12) and out["Q_df"] == 3, method
        assert out["Q_p_value"] == pytest.approx(float(stats.chi2.sf(q, 3)), rel=1e-12)
    assert pool(y[:2], v[:2], "DL")["k"] == 2  # two studies suffice
    assert pool(y[:3], v[:3], "DL", prediction="t")["k"] == 3  # the t interval needs k >= 3
    with pytest.raises(ModelError, match=r"^a t-based prediction interval needs at least three studies$"):
        pool(y[:2], v[:2], "DL", prediction="t")
    with pytest.raises(ModelError, match=r"^pool needs at least two studies with one effect and one variance each$"):
        pool([0.1], [0.2])
    with pytest.raises(ModelError, match=r"^pool needs at least two studies"):
        pool([0.1, 0.2], [0.2, 0.3, 0.4])
    for bad_y, bad_v in (([0.1, np.inf], [0.2, 0.3]), ([0.1, 0.2], [0.2, np.nan]), ([0.1, 0.2], [0.2, 0.0])):
        with pytest.raises(ModelError, match=r"^pool: effects must be finite and variances finite and positive$"):
            pool(bad_y, bad_v)
    with pytest.raises(ModelError, match=r"^pool method must be one of \['REML', 'DL', 'PM'\], got 'FE'$"):
        pool(y, v, "FE")
    with pytest.raises(ModelError, match=r"^prediction must be 'normal' or 't', got 'z'$"):
        pool(y, v, "DL", prediction="z")
