# Thin wrapper: see therapist_effects.pipeline.outcomes_step.
from therapist_effects.pipeline import outcomes_step, run

run(
    outcomes_step,
    snakemake.log[0],
    rows_path=snakemake.input.rows,
    ingest_rejects=snakemake.input.rejects,
    ingest_summary=snakemake.input.summary,
    dataset=snakemake.params.dataset,
    cfg=snakemake.params.cfg,
    out_parquet=snakemake.output.parquet,
    out_csv=snakemake.output.csv,
    out_rejects=snakemake.output.rejects,
    out_accounting=snakemake.output.accounting,
)
