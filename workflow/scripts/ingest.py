# Thin wrapper: see therapist_effects.pipeline.ingest_step.
from therapist_effects.pipeline import ingest_step, run

run(
    ingest_step,
    snakemake.log[0],
    data_path=snakemake.input.data,
    dataset=snakemake.params.dataset,
    cfg=snakemake.params.cfg,
    out_rows=snakemake.output.rows,
    out_rejects=snakemake.output.rejects,
    out_summary=snakemake.output.summary,
)
