"""Typed errors and warnings.

Errors carry one clear line for the user (file, row/key/column, what was expected); warnings are
typed (in the style of lifelines) so that callers and tests can filter or assert on them instead of
parsing printed messages.
"""

from __future__ import annotations


class TherapistEffectsError(Exception):
    """Base class of the package's errors. ``str(err)`` is a single line meant for the user."""


class ConfigError(TherapistEffectsError):
    """The workflow configuration is invalid (names the file and key, and what was expected)."""


class InputError(TherapistEffectsError):
    """An input file cannot be read or lacks what the configuration says it holds."""


class ModelError(TherapistEffectsError):
    """A model cannot be fitted to the data as specified (e.g. too few therapists, no variation)."""


class PseudonymisationError(TherapistEffectsError):
    """Pseudonymisation is on but the key is missing."""


class TherapistEffectsWarning(UserWarning):
    """Base class of the package's warnings."""


class ConvergenceWarning(TherapistEffectsWarning):
    """An optimiser did not converge; estimates may not be at the optimum."""


class SingularFitWarning(TherapistEffectsWarning):
    """A variance component was estimated at the boundary (zero): a singular fit."""


class SamplerWarning(TherapistEffectsWarning):
    """MCMC diagnostics failed: divergences, R-hat > 1.01 or too small an effective sample size."""


class StatisticalWarning(TherapistEffectsWarning):
    """A statistical caveat the user should know about (few therapists, approximate interval, ...)."""


class DataWarning(TherapistEffectsWarning):
    """Rows were rejected or recoded during ingestion."""
