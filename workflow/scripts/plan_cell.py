# Thin wrapper: see therapist_effects.pipeline.plan_cell_step.
from therapist_effects.pipeline import plan_cell_step, run

run(
    plan_cell_step,
    snakemake.log[0],
    design=snakemake.params.design,
    cfg=snakemake.params.cfg,
    out_json=snakemake.output[0],
)
