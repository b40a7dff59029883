# Thin wrapper: see therapist_effects.pipeline.tables_step.
from pathlib import Path

from therapist_effects.pipeline import run, tables_step

run(
    tables_step,
    snakemake.log[0],
    estimates_path=snakemake.input.estimates,
    patients_path=snakemake.input.patients,
    out_dir=str(Path(snakemake.output.md).parent),
)
