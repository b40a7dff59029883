# Thin wrapper: see therapist_effects.pipeline.plan_grid_step.
from therapist_effects.pipeline import plan_grid_step, run

run(
    plan_grid_step,
    snakemake.log[0],
    cell_jsons=list(snakemake.input),
    out_csv=snakemake.output.table,
    out_png=snakemake.output.plot,
)
