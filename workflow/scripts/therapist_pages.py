# Thin wrapper: see therapist_effects.pipeline.therapist_pages_step.
from therapist_effects.pipeline import run, therapist_pages_step

run(
    therapist_pages_step,
    snakemake.log[0],
    estimates_path=snakemake.input.estimates,
    patients_path=snakemake.input.patients,
    therapists_path=snakemake.input.therapists,
    dataset=snakemake.params.dataset,
    cfg=snakemake.params.cfg,
    out_dir=snakemake.output[0],
)
