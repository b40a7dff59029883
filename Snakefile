# Therapist effects in practice-based psychotherapy outcome data.
#
#   snakemake --cores 2                                   # the built-in demo (config/config.yaml)
#   snakemake --cores 2 --configfile my.yaml --directory WORKDIR
#
# All logic lives in the Python package under src/therapist_effects; the rules call thin scripts.
from snakemake.utils import min_version

min_version("8.0")


# The demo config is read only when no config with datasets or a meta-analysis was given, so that a user's own config is not
# merged with the demo's datasets.
if not (config.get("datasets") or config.get("meta") or config.get("plan")):

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/research.smk"


# Design planning grid: only when the config has a plan: grid (one job per design).
if CFG.get("plan"):

    include: "workflow/rules/plan.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
