"""Tests that kill the mutants of ``instruments.py`` that survived the earlier tests (issue 16).

Each expected value comes from the instrument definitions (module docstring, ``data/instruments.yaml``),
the Jacobson-Truax formula worked by hand, or the documented one-line error texts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from therapist_effects.io import instruments
from therapist_effects.exceptions import ConfigError
from therapist_effects.io.instruments import TOLERANCE, get_instrument, registry_names


# ---- the 1e-9 tolerance is inclusive: a score exactly TOLERANCE short of the cut-off counts as at it -------------
def test_a_score_exactly_the_tolerance_below_the_cutoff_is_at_the_cutoff():
    """PHQ-9 caseness is score >= 10 and ORS caseness score < 25, each with a tolerance of 1e-9 points."""
    assert get_instrument("PHQ-9").is_case(10 - TOLERANCE) == 1.0
    assert get_instrument("ORS").is_case(25 - TOLERANCE) == 0.0


def test_a_change_exactly_the_tolerance_short_of_the_rci_is_reliable():
    """PHQ-9 reliable change: 6 points either way, with the same tolerance."""
    phq = get_instrument("PHQ-9")
    assert phq.reliable_improvement(6 - TOLERANCE, 0.0) == 1.0
    assert phq.reliable_deterioration(0.0, 6 - TOLERANCE) == 1.0


# ---- missing scores given as None, and array output ---------------------------------------------------------------
def test_none_is_a_missing_score():
    """A list from JSON or an object column holds None for a missing score: NaN out, as for NaN in."""
    phq = get_instrument("PHQ-9")
    got = phq.is_case([12, None, 3])
    assert got[0] == 1.0 and math.isnan(got[1]) and got[2] == 0.0
    got = phq.reliable_improvement([20, None], [8, 8])
    assert got[0] == 1.0 and math.isnan(got[1])


def test_deterioration_and_clinically_significant_change_return_arrays_for_arrays():
    """PHQ-9: 5 -> 12 is +7 (reliably worse); 16 -> 9 is -7 and crosses 10 (clinically significant);
    12 -> 11 neither; a missing baseline or end is NaN."""
    phq = get_instrument("PHQ-9")
    b = np.array([5.0, 16.0, 12.0, np.nan, 16.0])
    e = np.array([12.0, 9.0, 11.0, 9.0, np.nan])
    rd = phq.reliable_deterioration(b, e)
    assert isinstance(rd, np.ndarray) and rd[:3].tolist() == [1.0, 0.0, 0.0] and np.isnan(rd[3:]).all()
    cs = phq.clinically_significant(b, e)
    assert isinstance(cs, np.ndarray) and cs[:3].tolist() == [0.0, 1.0, 0.0] and np.isnan(cs[3:]).all()


def test_clinically_significant_change_is_missing_when_one_score_is():
    phq = get_instrument("PHQ-9")
    assert math.isnan(phq.clinically_significant(np.nan, 5.0))
    assert math.isnan(phq.clinically_significant(16.0, np.nan))


# ---- Jacobson-Truax from sd and reliability: the ends of the allowed ranges ---------------------------------------
_SCALE = {"min": 0, "max": 40, "higher_is_better": False, "cutoff": 15}


def test_reliability_zero_is_allowed_and_sd_zero_is_not():
    """reliability in [0, 1): at 0 the RCI is 1.96 * sd * sqrt(2) = 1.96 * 5 * 1.41421356 = 13.8592929;
    sd must be positive."""
    inst = get_instrument("S", {"S": {**_SCALE, "sd": 5, "reliability": 0}})
    assert inst.rci == pytest.approx(13.8592929, rel=1e-8)
    with pytest.raises(ConfigError) as err:
        get_instrument("S", {"S": {**_SCALE, "sd": 0, "reliability": 0.8}})
    assert str(err.value) == "instruments.S.sd: expected a positive standard deviation, got 0"


# ---- get_instrument's own errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [None, "", "   ", 9])
def test_a_missing_instrument_name_is_a_config_error(name):
    with pytest.raises(ConfigError) as err:
        get_instrument(name)
    assert str(err.value) == f"instrument: expected an instrument name, got {name!r}"


def test_instruments_setting_must_be_a_mapping_of_mappings():
    with pytest.raises(ConfigError) as err:
        get_instrument("PHQ-9", ["PHQ-9"])
    assert str(err.value) == "instruments: expected a mapping of name -> settings, got list"
    with pytest.raises(ConfigError) as err:
        get_instrument("phq9", {"PHQ 9": 6})
    assert str(err.value) == "instruments.PHQ 9: expected a mapping of settings"


def test_unknown_instrument_lists_the_registry_then_the_user_defined_ones_once():
    """A user entry that updates a registry instrument (PHQ-9) is not listed a second time."""
    with pytest.raises(ConfigError) as err:
        get_instrument("HADS", {"PHQ-9": {"cutoff": 11}, "WSAS": {}})
    listing = ", ".join([*registry_names(), "WSAS"])
    assert str(err.value) == (f"instrument: unknown instrument 'HADS'; known instruments are {listing} "
                              "(define others under 'instruments' in the config)")


# ---- updating a registry instrument from the config ---------------------------------------------------------------
def test_errors_in_an_update_of_a_registry_instrument_name_the_users_key():
    """The config key as the user wrote it ('phq9'), or the registry name when there is no user entry."""
    with pytest.raises(ConfigError) as err:
        get_instrument("PHQ-9", {"phq9": {"cutoff": 99}})
    assert str(err.value) == "instruments.phq9.cutoff: 99 is outside the score range 0-27"
    with pytest.raises(ConfigError) as err:
        get_instrument("BDI-II")
    assert str(err.value).startswith("instruments.BDI-II: instrument 'BDI-II' needs rci, or sd and reliability")


def test_a_user_rci_replaces_a_published_one():
    """PHQ-9's published rci (6) replaced by the user's 5 (no sd/reliability keys to drop)."""
    inst = get_instrument("PHQ-9", {"PHQ-9": {"rci": 5}})
    assert (inst.rci, inst.rci_method, inst.sd, inst.reliability) == (5.0, "published", None, None)


def test_user_sd_and_reliability_replace_a_published_rci():
    """PHQ-9 with sd 5, reliability 0.8: 1.96 * 5 * sqrt(0.4) = 6.1980642."""
    inst = get_instrument("PHQ-9", {"PHQ-9": {"sd": 5, "reliability": 0.8}})
    assert inst.rci == pytest.approx(6.1980642, rel=1e-7) and inst.rci_method == "jacobson-truax"


@pytest.mark.parametrize("given", [{"sd": 5}, {"reliability": 0.8}])
def test_half_of_sd_and_reliability_drops_the_published_rci_and_asks_for_the_other_half(given):
    """Giving sd or reliability replaces the published rci: the entry then lacks the other half."""
    with pytest.raises(ConfigError) as err:
        get_instrument("PHQ-9", {"PHQ-9": given})
    assert str(err.value).startswith("instruments.PHQ-9: instrument 'PHQ-9' needs rci, or sd and reliability")


def test_a_user_rci_replaces_a_registry_sd_and_reliability(monkeypatch):
    """A registry entry given by sd and reliability (no rci key, no aliases: both optional in the YAML format):
    the user's rci replaces them; the user's sd replaces the registry's."""
    entry = {"min": 0, "max": 63, "higher_is_better": False, "cutoff": 14, "sd": 7.5, "reliability": 0.9,
             "source": "test registry"}
    monkeypatch.setattr(instruments, "_registry", lambda: {"BDI-T": dict(entry)})
    inst = get_instrument("bdi t", {"BDI-T": {"rci": 8}})
    assert (inst.rci, inst.sd, inst.reliability, inst.rci_method) == (8.0, None, None, "published")
    # registry alone: 1.96 * 7.5 * sqrt(0.2) = 14.7 * 0.4472136 = 6.5740398
    assert get_instrument("BDI-T").rci == pytest.approx(6.5740398, rel=1e-7)
    # the user's sd with the registry's reliability: 1.96 * 10 * sqrt(0.2) = 19.6 * 0.4472136 = 8.7653865
    inst = get_instrument("BDI-T", {"BDI-T": {"sd": 10}})
    assert inst.rci == pytest.approx(8.7653865, rel=1e-7) and inst.reliability == 0.9
