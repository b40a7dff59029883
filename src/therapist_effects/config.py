"""Load and validate the workflow configuration.

The JSON schema (``data/config.schema.yaml``, linked from ``workflow/schemas/``) defines every key,
its type and default; :func:`load_config` validates a config dict against it, fills the defaults and
then checks what a schema cannot express (layout-specific columns, model requirements). Every problem
is raised as a :class:`~therapist_effects.exceptions.ConfigError` whose message is one line naming
the config file and the key, and saying what was expected.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .exceptions import ConfigError

#: Patient outcomes the workflow derives; a model's ``outcome`` may name one of these.
DERIVED_OUTCOMES = {
    "change": "gaussian",
    "recovered": "binomial",
    "reliable_improvement": "binomial",
    "reliable_deterioration": "binomial",
    "reliable_recovery": "binomial",
    "clinically_significant": "binomial",
    "dropout": "binomial",
}
#: Derived outcomes that need an instrument (cut-off / reliable change).
INSTRUMENT_OUTCOMES = {
    "recovered",
    "reliable_improvement",
    "reliable_deterioration",
    "reliable_recovery",
    "clinically_significant",
}

#: The models fitted when the config has no ``models`` key, each where the data allow it.
DEFAULT_MODELS: list[dict[str, Any]] = [
    {"id": "ri", "type": "random_intercept"},
    {"id": "arm", "type": "arm_variance"},
    {"id": "nested", "type": "nested"},
    {"id": "recovery", "type": "random_intercept", "family": "binomial", "outcome": "recovered"},
]


def schema_path() -> Path:
    return Path(str(resources.files("therapist_effects") / "data" / "config.schema.yaml"))


def load_schema() -> dict:
    with open(schema_path(), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _path_of(error: jsonschema.ValidationError) -> str:
    parts = []
    for p in error.absolute_path:
        parts.append(f"[{p}]" if isinstance(p, int) else (("." if parts else "") + str(p)))
    return "".join(parts) or "(top level)"


def _fill_defaults(instance: Any, schema: dict, root: dict) -> Any:
    """Fill ``default`` values of object properties, recursively (after successful validation)."""
    if "$ref" in schema:
        ref = schema["$ref"].split("/")[-1]
        schema = root["$defs"][ref]
    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                instance[key] = _fill_defaults(instance[key], sub, root)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in instance:
                if key not in schema.get("properties", {}):
                    instance[key] = _fill_defaults(instance[key], extra, root)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        return [_fill_defaults(item, schema["items"], root) for item in instance]
    return instance


def load_config(config: dict | str | Path, *, source: str | None = None) -> dict:
    """Validate a configuration (a dict, or the path of a YAML file) and return it with defaults filled.

    ``source`` names the config file in error messages (defaults to the path given, or "config").
    """
    if isinstance(config, (str, Path)):
        source = source or str(config)
        try:
            with open(config, encoding="utf-8") as fh:
                config = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read the config file ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{source}:{where} is not valid YAML") from None
    source = source or "config"
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: expected a mapping of keys (datasets, models, ...)")
    cfg = copy.deepcopy(config)
    schema = load_schema()
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    error = jsonschema.exceptions.best_match(validator.iter_errors(cfg))
    if error is not None:
        msg = error.message.replace("\n", " ")
        if len(msg) > 200:
            msg = msg[:197] + "..."
        raise ConfigError(f"{source}: {_path_of(error)}: {msg}")
    cfg = _fill_defaults(cfg, schema, schema)
    explicit_models = "models" in config
    if not explicit_models:
        cfg["models"] = _fill_defaults(copy.deepcopy(DEFAULT_MODELS), schema["properties"]["models"], schema)
    cfg["_explicit_models"] = explicit_models
    if not cfg["datasets"] and not cfg["meta"]["studies"] and not cfg.get("plan"):
        raise ConfigError(
            f"{source}: datasets: expected at least one dataset (or meta.studies, a study-level table to pool)"
        )
    _check_datasets(cfg, source)
    _check_models(cfg, source, explicit_models)
    from .safety import check_dataset_names

    check_dataset_names(cfg, source)
    return cfg


def _check_datasets(cfg: dict, source: str) -> None:
    for name, ds in cfg["datasets"].items():
        cols = ds["columns"]
        key = f"datasets.{name}"
        if cols.get("scores"):
            _resolve_scores(ds, cfg, source, key)
        elif ds.get("primary") is not None:
            raise ConfigError(f"{source}: {key}.primary: needs columns.scores (several instruments per row)")
        if ds["layout"] == "session":
            for role in ("score", "occasion"):
                if role not in cols:
                    raise ConfigError(
                        f"{source}: {key}.columns.{role} is missing: the session layout needs the column of the "
                        f"{'instrument score' if role == 'score' else 'session number or date'}"
                    )
        else:
            if "outcome" not in cols:
                raise ConfigError(
                    f"{source}: {key}.columns.outcome is missing: the patient layout needs the end-of-treatment score column"
                )
        roles = [v for k, v in cols.items() if k != "covariates"]
        for cov in cols.get("covariates", []):
            if cov in roles:
                raise ConfigError(f"{source}: {key}.columns.covariates: {cov!r} already has another role")
        if ds.get("instrument"):
            from .io.instruments import get_instrument

            try:
                get_instrument(ds["instrument"], cfg.get("instruments") or {})
            except ConfigError as exc:
                raise ConfigError(f"{source}: {key}.instrument: {exc}") from None


def _resolve_scores(ds: dict, cfg: dict, source: str, key: str) -> None:
    """``columns.scores`` (several instruments per row): the primary instrument becomes the dataset's
    ``instrument`` and its column ``columns.score`` (see :mod:`therapist_effects.io.scores`)."""
    from .io.scores import primary_of, single_score_spec

    if ds["layout"] != "session":
        raise ConfigError(f"{source}: {key}.columns.scores: several instruments per row need layout: session")
    try:
        spec, insts, primary = single_score_spec(ds, cfg.get("instruments") or {}, key.split(".", 1)[1])
        primary = primary_of(ds, key.split(".", 1)[1])
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    # a config loaded before (score and instrument already resolved) passes again unchanged
    if ds["columns"].get("score", insts[primary][1]) != insts[primary][1] or ds.get("instrument") not in (None, primary):
        raise ConfigError(f"{source}: {key}.columns.scores: give either scores (and primary) or score + instrument, not both")
    ds["primary"] = primary
    ds["instrument"] = primary
    ds["columns"]["score"] = insts[primary][1]


def _check_models(cfg: dict, source: str, explicit: bool) -> None:
    seen = set()
    for i, model in enumerate(cfg["models"]):
        key = f"models[{i}]"
        if model["id"] in seen:
            raise ConfigError(f"{source}: {key}.id: {model['id']!r} is used twice; model ids must be unique")
        seen.add(model["id"])
        method = model.get("method")
        family = model.get("family", "gaussian")
        if method in ("laplace", "agq") and family != "binomial":
            raise ConfigError(f"{source}: {key}.method: {method!r} is for binomial models; use REML or ML")
        if method in ("REML", "ML") and family == "binomial":
            raise ConfigError(f"{source}: {key}.method: binomial models are fitted by 'laplace' or 'agq'")
        if family == "binomial" and model["type"] == "arm_variance" and model.get("engine") != "bayes":
            for opt in ("correlated", "arm_residual"):
                if model.get(opt):
                    raise ConfigError(f"{source}: {key}.{opt}: binomial arm_variance models have independent "
                                      "arm effects and the latent residual pi^2/3; remove this key")
            if model.get("cluster_effect") == "random":
                raise ConfigError(f"{source}: {key}.cluster_effect: 'random' is not available for binomial "
                                  "arm_variance models; use 'fixed'")
        if family == "binomial" and model["type"] not in ("random_intercept", "arm_variance", "random_slope") \
                and model.get("engine") != "bayes":
            raise ConfigError(
                f"{source}: {key}: binomial {model['type']} models need engine: bayes "
                "(the likelihood engine fits binomial random_intercept, arm_variance and random_slope models)"
            )
        if model["type"] == "random_slope" and model.get("engine") == "bayes":
            raise ConfigError(f"{source}: {key}.engine: random_slope models are fitted by the likelihood engine only")
        if model["type"] == "growth":
            _check_growth_model(model, cfg, source, key, explicit)
        if explicit:
            for name, ds in cfg["datasets"].items():
                cols = ds["columns"]
                if (model["type"] == "arm_variance" or (model["type"] == "random_slope" and not model.get("slope"))) \
                        and "arm" not in cols:
                    raise ConfigError(
                        f"{source}: {key}: a {model['type']} model needs datasets.{name}.columns.arm"
                    )
                if model["type"] == "nested" and "cluster" not in cols:
                    raise ConfigError(f"{source}: {key}: a nested model needs datasets.{name}.columns.cluster")
                outcome = model.get("outcome")
                if outcome == "dropout" and "ending" not in cols:
                    raise ConfigError(
                        f"{source}: {key}.outcome: 'dropout' needs datasets.{name}.columns.ending"
                    )
                # Without an instrument, an outcome such as 'recovered' must be a column of the file
                # (checked when the file is read).


def _check_growth_model(model: dict, cfg: dict, source: str, key: str, explicit: bool) -> None:
    """Growth models: gaussian, likelihood engine, session-layout data (time: weeks needs dates,
    checked when the data are read)."""
    if model.get("family", "gaussian") != "gaussian":
        raise ConfigError(f"{source}: {key}.family: growth models are gaussian")
    if model.get("engine", "reml") != "reml":
        raise ConfigError(f"{source}: {key}.engine: growth models are fitted by the exact likelihood engine (reml)")
    if model.get("outcome") is not None:
        raise ConfigError(f"{source}: {key}.outcome: a growth model's outcome is the session score (columns.score)")
    for name, ds in cfg["datasets"].items():
        if explicit and ds["layout"] != "session":
            raise ConfigError(f"{source}: {key}: a growth model needs session-layout data (datasets.{name}.layout: session)")
        if explicit and model.get("arm_slopes") and "arm" not in ds["columns"]:
            raise ConfigError(f"{source}: {key}.arm_slopes: needs datasets.{name}.columns.arm")


def model_applies(model: dict, dataset: dict) -> str | None:
    """Why ``model`` cannot be fitted to ``dataset`` (None if it can). Used to skip default models."""
    cols = dataset["columns"]
    if model["type"] == "growth" and dataset.get("layout") != "session":
        return "a growth model needs the session layout"
    if (model["type"] == "arm_variance" or (model["type"] == "random_slope" and not model.get("slope"))) \
            and "arm" not in cols:
        return "no arm column configured"
    if model["type"] == "nested" and "cluster" not in cols:
        return "no cluster column configured"
    outcome = model.get("outcome")
    if outcome in INSTRUMENT_OUTCOMES and not dataset.get("instrument"):
        return f"outcome {outcome!r} needs an instrument"
    if outcome == "dropout" and "ending" not in cols:
        return "outcome 'dropout' needs an ending column"
    return None
