# Configuration: validated against workflow/schemas/config.schema.yaml (with defaults filled) by
# therapist_effects.config.load_config, which also checks what a schema cannot express. A broken
# config stops the workflow with one line naming the file and key.
import os
import sys
from pathlib import Path

from therapist_effects.config import load_config
from therapist_effects.exceptions import ConfigError, TherapistEffectsError
from therapist_effects.models.fitting import applicable_models
from therapist_effects.safety import check_before_run, check_paths


def _config_source():
    files = [str(f) for f in (workflow.overwrite_configfiles or workflow.configfiles or [])]
    return ", ".join(files) or "config"


try:
    CFG = load_config(dict(config), source=_config_source())
    check_paths(CFG, os.getcwd(), source=_config_source())
except ConfigError as exc:
    sys.exit(f"config error: {exc}")

DATASETS = CFG["datasets"]
CONFIGFILES = [str(f) for f in (workflow.overwrite_configfiles or workflow.configfiles or [])]


wildcard_constraints:
    dataset="|".join(DATASETS) or "__none__",


def models_of(dataset, kind=None):
    """Ids of the models fitted to a dataset (optionally only those handled by one rule)."""
    fitted, _ = applicable_models(CFG, DATASETS[dataset])
    out = []
    for m in fitted:
        rule_kind = "bayes" if m.get("engine") == "bayes" else ("slope" if m["type"] == "random_slope" else "likelihood")
        if m["type"] == "growth":
            rule_kind = "growth"
        if kind is None or kind == rule_kind:
            out.append(m["id"])
    return out


def model_ids(kind):
    ids = sorted({m for ds in DATASETS for m in models_of(ds, kind)})
    return "|".join(ids) if ids else "__none__"


def has_clusters(dataset):
    return "cluster" in DATASETS[dataset]["columns"]


def meta_inputs():
    """Per-cluster summaries pooled in the meta-analysis report."""
    return [f"results/{ds}/meta.json" for ds in DATASETS if has_clusters(ds)]


def all_outputs():
    out = []
    for ds in DATASETS:
        out += [
            f"results/{ds}/estimates.json",
            f"results/{ds}/therapists.csv",
            f"results/{ds}/report.html",
            f"results/{ds}/therapist_report.html",
            f"results/{ds}/therapists",
            f"results/{ds}/tables/models.md",
        ]
        if CFG.get("sensitivity"):
            out.append(f"results/{ds}/sensitivity.csv")
    for ds in DATASETS:
        if models_of(ds, "growth"):
            out.append(f"results/{ds}/not_on_track.csv")
    if meta_inputs() or CFG["meta"]["studies"]:
        out.append("results/meta/report.html")
    if CFG.get("plan"):
        out += ["results/plan/grid.csv", "results/plan/grid.png"]
    return out


def slope_narrowing(wc):
    return [f"results/{wc.dataset}/models/{m}_narrowing.csv" for m in models_of(wc.dataset, "slope")]


def bayes_idata(wc):
    return [f"results/{wc.dataset}/models/{m}.nc" for m in models_of(wc.dataset, "bayes")]


onstart:
    # before the first job: the pseudonymisation key (and the paths again), one line and no work done
    try:
        check_before_run(CFG, os.getcwd(), source=_config_source())
    except TherapistEffectsError as exc:
        sys.exit(f"error: {exc}")
# `--use-conda`: workflow/envs/therapist_effects.post-deploy.sh installs this package into the rule
# environment from here (the repository root, where the Snakefile is), whatever --directory is.
os.environ.update(THERAPIST_EFFECTS_SOURCE=str(Path(workflow.main_snakefile).resolve().parent))


def growth_outputs(wc, kind):
    """Per-model outputs of the growth models of a dataset: kind = curves | not_on_track | therapists."""
    suffix = {"curves": "_curves.csv", "not_on_track": "_not_on_track.csv", "therapists": "_therapists.csv"}[kind]
    return [f"results/{wc.dataset}/models/{m}{suffix}" for m in models_of(wc.dataset, "growth")]
