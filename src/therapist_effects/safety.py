"""Checks run before any work: the pseudonymisation key, dataset names and where outputs go.

- :func:`check_key`: with ``report.pseudonymise`` on, the key (``report.key_env``, default
  ``TE_PSEUDONYM_KEY``) must be set and at least :data:`MIN_KEY_LENGTH` characters long: trying
  every one- and two-character key re-identifies every therapist of a service report at once.
- :func:`check_paths`: outputs are written only under ``results/`` and ``logs/`` of the work
  directory, one folder per dataset; no input file may lie where an output is written, so that a
  run can never overwrite its own data.

Each check raises a one-line :class:`~therapist_effects.exceptions.TherapistEffectsError`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .exceptions import ConfigError, PseudonymisationError

__all__ = ["MIN_KEY_LENGTH", "MAKE_KEY", "OUTPUT_DIRS", "check_key", "check_paths", "check_before_run"]

#: Shortest accepted pseudonymisation key (characters).
MIN_KEY_LENGTH = 16
#: How to make a good key (quoted in the error and the README).
MAKE_KEY = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
#: Folders of the work directory the workflow writes to.
OUTPUT_DIRS = ("results", "logs", "benchmarks")


def check_key(key_env: str = "TE_PSEUDONYM_KEY", *, environ: dict | None = None) -> bytes:
    """The pseudonymisation key, refused with one line if unset or shorter than 16 characters."""
    env = os.environ if environ is None else environ
    key = env.get(key_env, "")
    if not key:
        raise PseudonymisationError(
            f"pseudonymisation is on but environment variable {key_env} is not set: set it to a secret "
            f"key of at least {MIN_KEY_LENGTH} characters, e.g. {key_env}=$({MAKE_KEY}) "
            "(or turn pseudonymisation off: report.pseudonymise: false, pseudonymise=False in Python)"
        )
    if len(key) < MIN_KEY_LENGTH:
        raise PseudonymisationError(
            f"environment variable {key_env} holds a {len(key)}-character key; at least {MIN_KEY_LENGTH} "
            f"are needed (a short key lets anyone re-identify the therapists): make one with {MAKE_KEY}"
        )
    return key.encode("utf-8")


def check_dataset_names(cfg: dict, source: str = "config") -> None:
    """Dataset names become folders under results/: '.', '..', hidden names and 'meta' are refused."""
    for name in cfg.get("datasets") or {}:
        if set(name) <= {"."} or name.startswith("."):
            raise ConfigError(
                f"{source}: datasets.{name}: {name!r} cannot be a dataset name (its results folder would "
                "not be results/<name>/); use letters, digits, '_', '-' and '.' not at the start"
            )
        if name == "meta":
            raise ConfigError(
                f"{source}: datasets.meta: 'meta' is reserved for the meta-analysis (results/meta/); "
                "rename the dataset"
            )
    for i, model in enumerate(cfg.get("models") or []):
        mid = str(model.get("id", "")) if isinstance(model, dict) else ""
        if mid and (set(mid) <= {"."} or mid.startswith(".")):
            raise ConfigError(f"{source}: models[{i}].id: {mid!r} cannot be a model id; use letters, "
                              "digits, '_', '-' and '.' not at the start")


def _inputs(cfg: dict) -> list[tuple[str, str]]:
    out = [(f"datasets.{name}.path", str(ds["path"])) for name, ds in (cfg.get("datasets") or {}).items()]
    studies = (cfg.get("meta") or {}).get("studies")
    if studies:
        out.append(("meta.studies", str(studies)))
    return out


def check_paths(cfg: dict, workdir: str | Path, source: str = "config") -> None:
    """No input file lies inside an output folder (``results/``, ``logs/``, ``benchmarks/``) of ``workdir``."""
    check_dataset_names(cfg, source)
    work = Path(workdir).resolve()
    outs = [work / d for d in OUTPUT_DIRS]
    for key, path in _inputs(cfg):
        p = (work / path).resolve() if not Path(path).is_absolute() else Path(path).resolve()
        for out in outs:
            if p == out or out in p.parents:
                raise ConfigError(
                    f"{source}: {key}: the input {path} lies inside the output folder {out.name}/ of the work "
                    "directory, where the workflow writes (and may overwrite) files; move it elsewhere"
                )


def check_before_run(cfg: dict, workdir: str | Path, source: str = "config") -> None:
    """Everything checked before the first job: paths, then the key if the service report is made."""
    check_paths(cfg, workdir, source)
    rep = cfg.get("report") or {}
    if cfg.get("datasets") and rep.get("pseudonymise", True):
        check_key(rep.get("key_env", "TE_PSEUDONYM_KEY"))
