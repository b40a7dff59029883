"""Registry of routine outcome measures (questionnaires) and the patient-level outcomes they define.

An :class:`Instrument` knows its score range, its direction (symptom measures such as the PHQ-9:
lower is better; well-being measures such as the ORS: higher is better), its clinical cut-off and its
reliable change. From a patient's intake (baseline) and end-of-treatment score it derives

- **caseness**: for a lower-is-better measure a score ``>= cutoff`` is in the clinical range (a
  "case"); for a higher-is-better measure a score ``< cutoff`` is (ORS: below 25). This is the NHS
  Talking Therapies convention (PHQ-9 >= 10, GAD-7 >= 8).
- **change** oriented so that a positive value is improvement (``baseline - end`` for symptom
  measures, ``end - baseline`` for well-being measures).
- **reliable improvement / deterioration**: an oriented change of at least ``rci`` points either
  way (``>=``: a PHQ-9 drop of exactly 6 points is reliable improvement).
- **clinically significant change** (Jacobson & Truax, 1991): reliable improvement *and* moving
  from caseness at intake to non-caseness at the end.

The published instruments live in ``data/instruments.yaml`` (one citation per entry). Users add
their own, or supply values a registry entry lacks (the BDI-II's SD and reliability), under
``config["instruments"]``: ``{NAME: {min, max, higher_is_better, cutoff, rci | (sd, reliability),
source}}``. Where ``sd`` and ``reliability`` are given the reliable change is the Jacobson-Truax
criterion ``1.96 * sd * sqrt(2 * (1 - reliability))``.

Predicates return 1.0 / 0.0 (NaN where a score is missing), as scalars for scalar input and as
float arrays otherwise, matching the 0/1 columns of the patient table. Comparisons with the
cut-off and the reliable change allow a tolerance of 1e-9 points so that scores computed as item
means (CORE-OM clinical score) are not misclassified by floating-point error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
import yaml

from ..exceptions import ConfigError

__all__ = [
    "Instrument",
    "get_instrument",
    "jacobson_truax_rci",
    "registry_names",
]

#: Tolerance (in score points) for comparisons with cut-offs and the reliable change.
TOLERANCE = 1e-9

_REQUIRED_USER_KEYS = ("min", "max", "higher_is_better", "cutoff")
_ALLOWED_KEYS = {
    "min",
    "max",
    "higher_is_better",
    "cutoff",
    "rci",
    "sd",
    "reliability",
    "source",
    "aliases",
    "name",
}


def jacobson_truax_rci(sd: float, reliability: float) -> float:
    """Jacobson-Truax reliable change: ``1.96 * sd * sqrt(2 * (1 - reliability))``.

    ``sd`` is the standard deviation of intake scores in a reference (clinical) population and
    ``reliability`` the measure's reliability (test-retest or internal consistency); the result is
    the smallest change in points that is unlikely (p < .05) to be measurement error alone.
    """
    return 1.96 * float(sd) * math.sqrt(2.0 * (1.0 - float(reliability)))


def _key(name: str) -> str:
    """Normalised lookup key: case-insensitive, ignoring spaces, hyphens, underscores and dots."""
    return re.sub(r"[\s\-_.]", "", str(name)).upper()


def _as_array(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=float)


def _out(template: Any, values: np.ndarray) -> Any:
    """Scalar in, scalar out (float); array in, float array out."""
    if np.ndim(template) == 0:
        return float(values)
    return values.astype(float)


def _indicator(condition: np.ndarray, defined: np.ndarray) -> np.ndarray:
    result = np.where(condition, 1.0, 0.0)
    return np.where(defined, result, np.nan)


@dataclass(frozen=True)
class Instrument:
    """A routine outcome measure: score range, direction, clinical cut-off and reliable change.

    ``rci`` is the reliable change in score points (published, or computed from ``sd`` and
    ``reliability`` by :func:`jacobson_truax_rci`); ``source`` cites where the values come from.
    """

    name: str
    min: float
    max: float
    higher_is_better: bool
    cutoff: float
    rci: float
    source: str
    sd: float | None = None
    reliability: float | None = None

    # -- scores ---------------------------------------------------------------------------------
    def in_range(self, score: Any) -> Any:
        """1.0 where ``min <= score <= max``, 0.0 outside, NaN where the score is missing."""
        s = _as_array(score)
        with np.errstate(invalid="ignore"):
            ok = (s >= self.min) & (s <= self.max)
        return _out(score, _indicator(ok, ~np.isnan(s)))

    def is_case(self, score: Any) -> Any:
        """Caseness: 1.0 if the score is in the clinical range, else 0.0 (NaN if missing).

        Lower-is-better measures: ``score >= cutoff``; higher-is-better measures:
        ``score < cutoff``.
        """
        s = _as_array(score)
        with np.errstate(invalid="ignore"):
            if self.higher_is_better:
                case = s < self.cutoff - TOLERANCE
            else:
                case = s >= self.cutoff - TOLERANCE
        return _out(score, _indicator(case, ~np.isnan(s)))

    # -- change ---------------------------------------------------------------------------------
    def improvement(self, baseline: Any, end: Any) -> Any:
        """Change oriented so that positive = improvement (``baseline - end`` for symptom scores)."""
        b, e = _as_array(baseline), _as_array(end)
        change = e - b if self.higher_is_better else b - e
        if np.ndim(baseline) == 0 and np.ndim(end) == 0:
            return float(change)
        return change.astype(float)

    def reliable_improvement(self, baseline: Any, end: Any) -> Any:
        """1.0 if the oriented change is at least ``rci`` points (``>=``), else 0.0."""
        change = _as_array(self.improvement(baseline, end))
        with np.errstate(invalid="ignore"):
            flag = change >= self.rci - TOLERANCE
        return _out(change, _indicator(flag, ~np.isnan(change)))

    def reliable_deterioration(self, baseline: Any, end: Any) -> Any:
        """1.0 if the score worsened by at least ``rci`` points (``>=``), else 0.0."""
        change = _as_array(self.improvement(baseline, end))
        with np.errstate(invalid="ignore"):
            flag = change <= -self.rci + TOLERANCE
        return _out(change, _indicator(flag, ~np.isnan(change)))

    def clinically_significant(self, baseline: Any, end: Any) -> Any:
        """Jacobson-Truax clinically significant change: reliable improvement and a move from
        caseness at intake to non-caseness at the end (0.0 for a patient who started outside the
        clinical range: they cannot cross the cut-off in the direction of recovery)."""
        b, e = _as_array(baseline), _as_array(end)
        ri = _as_array(self.reliable_improvement(b, e))
        crossed = (_as_array(self.is_case(b)) == 1.0) & (_as_array(self.is_case(e)) == 0.0)
        defined = ~(np.isnan(b) | np.isnan(e))
        return _out(ri, _indicator((ri == 1.0) & crossed, defined))

    @property
    def rci_method(self) -> str:
        """``"jacobson-truax"`` where ``rci`` was computed from sd and reliability, else
        ``"published"``."""
        return "jacobson-truax" if self.sd is not None else "published"


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _registry() -> dict[str, dict[str, Any]]:
    text = resources.files("therapist_effects").joinpath("data/instruments.yaml").read_text(
        encoding="utf-8"
    )
    raw = yaml.safe_load(text)
    return {str(name): dict(entry) for name, entry in raw.items()}


def registry_names() -> list[str]:
    """Names of the instruments shipped in ``data/instruments.yaml``."""
    return list(_registry())


def _registry_lookup(name: str) -> tuple[str, dict[str, Any]] | None:
    wanted = _key(name)
    for reg_name, entry in _registry().items():
        keys = {_key(reg_name), *(_key(a) for a in entry.get("aliases") or [])}
        if wanted in keys:
            return reg_name, dict(entry)
    return None


def _number(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}.{key}: expected a finite number, got {value!r}")
    return float(value)


def _build(name: str, entry: Mapping[str, Any], where: str) -> Instrument:
    """Validate a (merged) entry and build the Instrument; ``where`` names the config key."""
    unknown = sorted(set(entry) - _ALLOWED_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed keys are "
            f"{', '.join(sorted(_ALLOWED_KEYS - {'aliases', 'name'}))}"
        )
    for key in _REQUIRED_USER_KEYS:
        if entry.get(key) is None:
            raise ConfigError(f"{where}: missing required key '{key}'")
    lo = _number(where, "min", entry["min"])
    hi = _number(where, "max", entry["max"])
    if not lo < hi:
        raise ConfigError(f"{where}: min ({lo:g}) must be smaller than max ({hi:g})")
    hib = entry["higher_is_better"]
    if not isinstance(hib, bool):
        raise ConfigError(f"{where}.higher_is_better: expected true or false, got {hib!r}")
    cutoff = _number(where, "cutoff", entry["cutoff"])
    if not lo <= cutoff <= hi:
        raise ConfigError(f"{where}.cutoff: {cutoff:g} is outside the score range {lo:g}-{hi:g}")
    rci, sd, rel = entry.get("rci"), entry.get("sd"), entry.get("reliability")
    if rci is not None and (sd is not None or rel is not None):
        raise ConfigError(f"{where}: give either rci or (sd and reliability), not both")
    if rci is not None:
        rci = _number(where, "rci", rci)
        if rci <= 0:
            raise ConfigError(f"{where}.rci: expected a positive number of points, got {rci:g}")
        sd_f = rel_f = None
    else:
        if sd is None or rel is None:
            raise ConfigError(
                f"{where}: instrument '{name}' needs rci, or sd and reliability for the "
                "Jacobson-Truax reliable change 1.96*sd*sqrt(2*(1-reliability)); "
                f"set them under instruments.{name} in the config"
            )
        sd_f = _number(where, "sd", sd)
        rel_f = _number(where, "reliability", rel)
        if sd_f <= 0:
            raise ConfigError(f"{where}.sd: expected a positive standard deviation, got {sd_f:g}")
        if not 0 <= rel_f < 1:
            raise ConfigError(f"{where}.reliability: expected a value in [0, 1), got {rel_f:g}")
        rci = jacobson_truax_rci(sd_f, rel_f)
    source = entry.get("source")
    source = " ".join(str(source).split()) if source else "user-defined in the workflow config"
    return Instrument(
        name=name,
        min=lo,
        max=hi,
        higher_is_better=hib,
        cutoff=cutoff,
        rci=float(rci),
        source=source,
        sd=sd_f,
        reliability=rel_f,
    )


def get_instrument(
    name: str, user_instruments: Mapping[str, Mapping[str, Any]] | None = None
) -> Instrument:
    """The instrument called ``name`` (case, spaces and hyphens ignored: ``phq9`` is PHQ-9).

    ``user_instruments`` is ``config["instruments"]``. An entry whose name matches a registry
    instrument updates it (e.g. ``{"BDI-II": {"sd": 7.5, "reliability": 0.9}}``; giving ``sd``
    and ``reliability`` replaces a published ``rci`` and vice versa); any other entry defines a
    new instrument. Unknown names raise :class:`ConfigError` listing the known ones.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"instrument: expected an instrument name, got {name!r}")
    if user_instruments is None:
        user_instruments = {}
    if not isinstance(user_instruments, Mapping):
        raise ConfigError(
            f"instruments: expected a mapping of name -> settings, got {type(user_instruments).__name__}"
        )
    user_name, user_entry = None, None
    for uname, uentry in user_instruments.items():
        if _key(uname) == _key(name):
            user_name, user_entry = str(uname), uentry
            break
    if user_entry is not None and not isinstance(user_entry, Mapping):
        raise ConfigError(f"instruments.{user_name}: expected a mapping of settings")

    found = _registry_lookup(name)
    if found is None and user_entry is None:
        known = registry_names()
        extra = [str(u) for u in user_instruments if _registry_lookup(str(u)) is None]
        listing = ", ".join(known + extra)
        raise ConfigError(
            f"instrument: unknown instrument {name!r}; known instruments are {listing} "
            "(define others under 'instruments' in the config)"
        )
    if found is None:
        assert user_name is not None and user_entry is not None
        return _build(user_name, dict(user_entry), f"instruments.{user_name}")

    reg_name, entry = found
    entry.pop("aliases", None)
    where = f"instruments.{reg_name}"
    if user_entry is not None:
        user_entry = dict(user_entry)
        if "rci" in user_entry and user_entry["rci"] is not None:
            entry.pop("sd", None)
            entry.pop("reliability", None)
        if any(user_entry.get(k) is not None for k in ("sd", "reliability")):
            entry.pop("rci", None)
        entry.update(user_entry)
        where = f"instruments.{user_name}"
    return _build(reg_name, entry, where)
