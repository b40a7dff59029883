# Thin wrapper: see therapist_effects.pipeline.per_cluster_step.
from therapist_effects.pipeline import per_cluster_step, run

run(
    per_cluster_step,
    snakemake.log[0],
    patients_path=snakemake.input[0],
    dataset=snakemake.params.dataset,
    cfg=snakemake.params.cfg,
    out_csv=snakemake.output.table,
    out_json=snakemake.output.pooled,
)
