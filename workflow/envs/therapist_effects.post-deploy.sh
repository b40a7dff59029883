#!/usr/bin/env bash
# Run by Snakemake (`--use-conda`) once, right after it creates the rule environment of
# therapist_effects.yaml, with that environment active: installs this package into it from the source
# tree of the running workflow. workflow/rules/common.smk exports THERAPIST_EFFECTS_SOURCE (the
# directory of the Snakefile) before any environment is built, so this works with any --directory.
# Editable (-e): the environment follows the checkout it was built from, so a code change needs no
# rebuild. --no-deps: every dependency comes from the conda environment, which also has the build
# backend (setuptools >= 70.1 builds wheels itself), so nothing is downloaded; elsewhere pip fetches
# the build backend (pyproject's build-system) as usual.
set -euo pipefail
if [ -z "${THERAPIST_EFFECTS_SOURCE:-}" ] || [ ! -f "${THERAPIST_EFFECTS_SOURCE}/pyproject.toml" ]; then
    echo "therapist_effects.post-deploy.sh: THERAPIST_EFFECTS_SOURCE='${THERAPIST_EFFECTS_SOURCE:-}' is not the repository root (set by workflow/rules/common.smk)" >&2
    exit 1
fi
isolation=()
if ! python - <<'PY' 2>/dev/null; then isolation=(--no-build-isolation); fi
import sys, setuptools
major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
sys.exit(1 if (major, minor) >= (70, 1) else 0)
PY
python -m pip install --quiet --no-deps "${isolation[@]}" -e "${THERAPIST_EFFECTS_SOURCE}"
python -c "import therapist_effects"
