"""therapist_effects: measure therapist effects in practice-based psychotherapy outcome data.

The package holds all the logic of the Snakemake workflow in this repository; the workflow's
scripts only unpack ``snakemake.input/output/params`` and call functions defined here. The model
classes are usable on their own::

    from therapist_effects import RandomInterceptModel
    res = RandomInterceptModel.from_frame(df, "phq9_post", ["phq9_pre"], therapist="therapist_id").fit()
    res.params, res.conf_int(), res.icc(), res.icc_interval(), print(res.summary())
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("therapist-effects")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

#: Public names, imported on first use (PyMC is heavy: ``import therapist_effects`` stays fast).
_LAZY = {
    "RandomInterceptModel": "models.reml",
    "NestedModel": "models.reml",
    "LogisticRandomInterceptModel": "models.glmm",
    "ArmVarianceModel": "models.arm",
    "RandomSlopeModel": "models.slopes",
    "fit_bayes": "models.bayes",
    "BayesConfig": "models.bayes",
    "per_cluster_estimates": "meta",
    "pool": "meta",
    "pool_study_table": "meta",
    "load_config": "config",
    "ingest_dataset": "io.ingest",
    "derive_patient_outcomes": "io.outcomes",
    "get_instrument": "io.instruments",
    "simulate_practice": "simulate",
    "simulate_random_intercept": "simulate",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
