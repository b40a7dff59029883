"""therapist_effects: measure therapist effects in practice-based psychotherapy outcome data.

The package holds all the logic of the Snakemake workflow in this repository; the workflow's
scripts only unpack ``snakemake.input/output/params`` and call functions defined here.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("therapist-effects")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
