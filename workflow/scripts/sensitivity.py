# Thin wrapper: see therapist_effects.pipeline.sensitivity_step.
from therapist_effects.pipeline import run, sensitivity_step

run(
    sensitivity_step,
    snakemake.log[0],
    patients_path=snakemake.input[0],
    dataset=snakemake.params.dataset,
    cfg=snakemake.params.cfg,
    out_csv=snakemake.output[0],
)
