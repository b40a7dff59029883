"""The instruments registry: published ranges, cut-offs and reliable change, and the outcomes they
define, checked on hand-worked cases (arithmetic in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from therapist_effects.exceptions import ConfigError
from therapist_effects.io.instruments import (
    Instrument,
    get_instrument,
    jacobson_truax_rci,
    registry_names,
)

# (name, min, max, higher_is_better, cutoff, rci): the published values the registry must hold.
# PHQ-9: Kroenke et al. 2001 (cut-off 10); NHS Talking Therapies Manual (caseness >= 10, RC 6).
# GAD-7: Spitzer et al. 2006; NHS Talking Therapies Manual (caseness >= 8, RC 4).
# CORE-10: Barkham et al. 2013 (cut-off 11, RC 6). CORE-OM clinical score: Connell et al. 2007
# (cut-off 10, RC 5). OQ-45: Lambert et al. 2004 manual (cut-off 63/64, RCI 14).
# ORS: Miller et al. 2003 (higher is better, clinical range below 25, RC 5).
PUBLISHED = [
    ("PHQ-9", 0, 27, False, 10, 6),
    ("GAD-7", 0, 21, False, 8, 4),
    ("CORE-10", 0, 40, False, 11, 6),
    ("CORE-OM", 0, 40, False, 10, 5),
    ("OQ-45", 0, 180, False, 64, 14),
    ("ORS", 0, 40, True, 25, 5),
]


@pytest.mark.parametrize("name, lo, hi, hib, cutoff, rci", PUBLISHED)
def test_registry_holds_published_values(name, lo, hi, hib, cutoff, rci):
    inst = get_instrument(name)
    assert (inst.min, inst.max, inst.higher_is_better, inst.cutoff, inst.rci) == (
        lo, hi, hib, cutoff, rci
    )
    assert inst.rci_method == "published"
    assert len(inst.source) > 40 and "(" in inst.source  # a citation with a year


def test_every_registry_entry_has_a_source_and_bdi_ii_is_listed():
    names = registry_names()
    assert set(names) == {p[0] for p in PUBLISHED} | {"BDI-II"}
    bdi = get_instrument("BDI-II", {"BDI-II": {"sd": 10, "reliability": 0.9}})
    assert "Beck" in bdi.source and "Jacobson" in bdi.source
    # Beck, Steer & Brown 1996: 0-13 minimal depression -> caseness from 14; range 0-63
    assert (bdi.min, bdi.max, bdi.cutoff, bdi.higher_is_better) == (0, 63, 14, False)


def test_lookup_ignores_case_spaces_and_hyphens():
    assert get_instrument("phq9").name == "PHQ-9"
    assert get_instrument(" gad 7 ").name == "GAD-7"
    assert get_instrument("core_om").name == "CORE-OM"
    assert get_instrument("Outcome Rating Scale").name == "ORS"


# ----------------------------------------------------------------------------------------------
# hand-worked outcomes, one instrument at a time (lower is better unless said otherwise)
# ----------------------------------------------------------------------------------------------
def _outcomes(inst: Instrument, b: float, e: float) -> tuple:
    return (
        inst.improvement(b, e),
        inst.reliable_improvement(b, e),
        inst.reliable_deterioration(b, e),
        inst.clinically_significant(b, e),
    )


def test_phq9_hand_worked():
    phq = get_instrument("PHQ-9")
    # cut-off: 10 is a case (>= 10), 9 is not
    assert phq.is_case(10) == 1.0 and phq.is_case(9) == 0.0
    # 16 -> 10: change 16 - 10 = 6 = RC exactly -> reliable improvement; end 10 still a case
    # -> not clinically significant
    assert _outcomes(phq, 16, 10) == (6.0, 1.0, 0.0, 0.0)
    # 16 -> 11: change 5 < 6 -> not reliable
    assert _outcomes(phq, 16, 11) == (5.0, 0.0, 0.0, 0.0)
    # 15 -> 9: change 6 reliable, case (15 >= 10) -> non-case (9 < 10): clinically significant
    assert _outcomes(phq, 15, 9) == (6.0, 1.0, 0.0, 1.0)
    # 8 -> 14: change -6: reliable deterioration (exactly RC the other way)
    assert _outcomes(phq, 8, 14) == (-6.0, 0.0, 1.0, 0.0)
    # 9 -> 2: reliable improvement (7 >= 6) but started below the cut-off: not a crossing
    assert _outcomes(phq, 9, 2) == (7.0, 1.0, 0.0, 0.0)


def test_gad7_hand_worked():
    gad = get_instrument("GAD-7")
    assert gad.is_case(8) == 1.0 and gad.is_case(7) == 0.0  # caseness >= 8
    # 12 -> 8: change 4 = RC -> reliable; 8 is still a case -> not clinically significant
    assert _outcomes(gad, 12, 8) == (4.0, 1.0, 0.0, 0.0)
    # 11 -> 7: change 4 reliable, 11 case -> 7 non-case: clinically significant
    assert _outcomes(gad, 11, 7) == (4.0, 1.0, 0.0, 1.0)
    # 10 -> 7: change 3 < 4: crosses the cut-off but not reliably -> not clinically significant
    assert _outcomes(gad, 10, 7) == (3.0, 0.0, 0.0, 0.0)


def test_core10_hand_worked():
    core = get_instrument("CORE-10")
    assert core.is_case(11) == 1.0 and core.is_case(10) == 0.0  # clinical cut-off 11
    # 17 -> 11: change 6 = RC reliable; 11 still clinical
    assert _outcomes(core, 17, 11) == (6.0, 1.0, 0.0, 0.0)
    # 16 -> 10: change 6 reliable, clinical -> non-clinical
    assert _outcomes(core, 16, 10) == (6.0, 1.0, 0.0, 1.0)


def test_core_om_clinical_score_with_item_mean_arithmetic():
    core = get_instrument("CORE-OM clinical score")
    assert core.name == "CORE-OM"
    assert core.is_case(10) == 1.0 and core.is_case(9.9) == 0.0  # cut-off 10
    # clinical scores are item means x 10, so 15.3 - 10.3 is 5.000000000000002 in floating point
    # and 14.9 - 9.9 is 5.0; both are exactly the RC of 5 and must count as reliable
    assert core.reliable_improvement(15.3, 10.3) == 1.0
    # 14.9 -> 9.9: change 5 reliable, 14.9 clinical -> 9.9 non-clinical: clinically significant
    assert core.clinically_significant(14.9, 9.9) == 1.0
    # 14.9 -> 10.0: change 4.9 < 5
    assert core.reliable_improvement(14.9, 10.0) == 0.0


def test_oq45_hand_worked():
    oq = get_instrument("OQ-45")
    assert oq.is_case(64) == 1.0 and oq.is_case(63) == 0.0  # 63/64 cut-off
    # 80 -> 66: change 14 = RCI reliable; 66 >= 64 still clinical
    assert _outcomes(oq, 80, 66) == (14.0, 1.0, 0.0, 0.0)
    # 77 -> 63: change 14 reliable, 77 clinical -> 63 non-clinical
    assert _outcomes(oq, 77, 63) == (14.0, 1.0, 0.0, 1.0)
    # 60 -> 74: worse by 14: reliable deterioration
    assert _outcomes(oq, 60, 74) == (-14.0, 0.0, 1.0, 0.0)


def test_ors_higher_is_better():
    ors = get_instrument("ORS")
    # caseness is BELOW the cut-off: 24.9 is clinical, 25 is not
    assert ors.is_case(24.9) == 1.0 and ors.is_case(25) == 0.0
    # 20 -> 25: change oriented as end - baseline = +5 = RC: reliable improvement; 20 clinical ->
    # 25 non-clinical: clinically significant
    assert _outcomes(ors, 20, 25) == (5.0, 1.0, 0.0, 1.0)
    # 20 -> 24.9: change 4.9 < 5, and 24.9 still clinical
    out = _outcomes(ors, 20, 24.9)
    assert out[0] == pytest.approx(4.9) and out[1:] == (0.0, 0.0, 0.0)
    # 30 -> 25: the score fell by 5: change -5: reliable deterioration
    assert _outcomes(ors, 30, 25) == (-5.0, 0.0, 1.0, 0.0)


def test_bdi_ii_jacobson_truax_rci():
    # RCI = 1.96 * SD * sqrt(2 * (1 - r)); SD = 10, r = .9: sqrt(0.2) = 0.4472136,
    # 1.96 * 10 * 0.4472136 = 8.7653865
    bdi = get_instrument("BDI-II", {"BDI-II": {"sd": 10, "reliability": 0.9}})
    assert bdi.rci == pytest.approx(8.7653865, abs=1e-7)
    assert bdi.rci == pytest.approx(jacobson_truax_rci(10, 0.9))
    assert bdi.rci_method == "jacobson-truax"
    # SD = 7.5, r = .8: sqrt(0.4) = 0.63245553; 1.96 * 7.5 = 14.7; 14.7 * 0.63245553 = 9.2970963
    assert jacobson_truax_rci(7.5, 0.8) == pytest.approx(9.2970963, abs=1e-6)
    # 30 -> 21.3: change 8.7 < 8.765 not reliable; 30 -> 21.2: 8.8 >= 8.765 reliable
    assert bdi.reliable_improvement(30, 21.3) == 0.0
    assert bdi.reliable_improvement(30, 21.2) == 1.0
    # 22 -> 13: change 9 reliable, 22 >= 14 case -> 13 not: clinically significant
    assert bdi.clinically_significant(22, 13) == 1.0
    assert bdi.is_case(14) == 1.0 and bdi.is_case(13) == 0.0


def test_bdi_ii_without_sd_and_reliability_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        get_instrument("BDI-II")
    msg = str(err.value)
    assert "\n" not in msg
    assert "BDI-II" in msg and "sd and reliability" in msg
    # a published RCI given in the config is also accepted
    assert get_instrument("BDI-II", {"bdi-ii": {"rci": 8}}).rci == 8.0


def test_user_defined_instrument():
    user = {
        "WSAS": {"min": 0, "max": 40, "higher_is_better": False, "cutoff": 20, "rci": 8,
                 "source": "Mundt et al. (2002) Br J Psychiatry 180:461-464"},
        "Wellbeing": {"min": 14, "max": 70, "higher_is_better": True, "cutoff": 41,
                      "sd": 8, "reliability": 0.84},
    }
    wsas = get_instrument("WSAS", user)
    assert wsas.source.startswith("Mundt")
    # 30 -> 22: change 8 = rci reliable, but 22 >= 20 still a case
    assert _outcomes(wsas, 30, 22) == (8.0, 1.0, 0.0, 0.0)
    # 27 -> 19: change 8, case -> non-case
    assert _outcomes(wsas, 27, 19) == (8.0, 1.0, 0.0, 1.0)
    wb = get_instrument("wellbeing", user)
    # RCI = 1.96 * 8 * sqrt(2 * 0.16) = 15.68 * 0.56568542 = 8.8699475
    assert wb.rci == pytest.approx(8.8699475, abs=1e-6)
    assert wb.source == "user-defined in the workflow config"
    # higher is better: 35 -> 44 is +9 >= 8.87, 35 < 41 case -> 44 non-case
    assert _outcomes(wb, 35, 44) == (9.0, 1.0, 0.0, 1.0)


def test_user_entry_overrides_registry_values():
    phq = get_instrument("PHQ-9", {"PHQ-9": {"cutoff": 12}})
    assert phq.cutoff == 12 and phq.rci == 6  # other values kept
    phq_jt = get_instrument("PHQ-9", {"PHQ-9": {"sd": 5, "reliability": 0.84}})
    # 1.96 * 5 * sqrt(0.32) = 9.8 * 0.56568542 = 5.5437171
    assert phq_jt.rci == pytest.approx(5.5437171, abs=1e-6)


def test_vectorised_with_missing_scores():
    phq = get_instrument("PHQ-9")
    b = np.array([16.0, np.nan, 15.0])
    e = np.array([10.0, 5.0, np.nan])
    ri = phq.reliable_improvement(b, e)
    assert ri[0] == 1.0 and math.isnan(ri[1]) and math.isnan(ri[2])
    case = phq.is_case(np.array([9.0, 10.0, np.nan]))
    assert case[:2].tolist() == [0.0, 1.0] and math.isnan(case[2])
    assert phq.in_range(np.array([-1, 0, 27, 28])).tolist() == [0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "user, fragment",
    [
        ({"X": {"min": 10, "max": 5, "higher_is_better": False, "cutoff": 7, "rci": 2}},
         "min (10) must be smaller than max (5)"),
        ({"X": {"min": 0, "max": 5, "higher_is_better": "no", "cutoff": 3, "rci": 2}},
         "instruments.X.higher_is_better: expected true or false"),
        ({"X": {"min": 0, "max": 5, "higher_is_better": False, "cutoff": 9, "rci": 2}},
         "instruments.X.cutoff: 9 is outside the score range 0-5"),
        ({"X": {"min": 0, "max": 5, "higher_is_better": False, "cutoff": 3, "rci": 2, "sd": 1,
                "reliability": 0.8}}, "either rci or (sd and reliability)"),
        ({"X": {"min": 0, "max": 5, "higher_is_better": False, "cutoff": 3, "cut_off": 2,
                "rci": 2}}, "unknown key(s) 'cut_off'"),
        ({"X": {"min": 0, "max": 5, "higher_is_better": False, "cutoff": 3}}, "needs rci"),
        ({"X": {"min": 0, "max": 5, "higher_is_better": False, "cutoff": 3, "sd": 1,
                "reliability": 1.2}}, "instruments.X.reliability: expected a value in [0, 1)"),
        ({"X": {"max": 5, "higher_is_better": False, "cutoff": 3, "rci": 1}},
         "missing required key 'min'"),
    ],
)
def test_invalid_user_instruments_are_one_line_config_errors(user, fragment):
    with pytest.raises(ConfigError) as err:
        get_instrument("X", user)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_instrument_lists_known_ones():
    with pytest.raises(ConfigError) as err:
        get_instrument("HADS", {"WSAS": {}})
    msg = str(err.value)
    assert "unknown instrument 'HADS'" in msg
    for name in ("PHQ-9", "GAD-7", "CORE-10", "CORE-OM", "OQ-45", "ORS", "BDI-II", "WSAS"):
        assert name in msg
    assert "\n" not in msg
