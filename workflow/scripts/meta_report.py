# Thin wrapper: see therapist_effects.pipeline.meta_report_step.
from therapist_effects.pipeline import meta_report_step, run

run(
    meta_report_step,
    snakemake.log[0],
    pooled_paths=list(snakemake.input.pooled),
    table_paths=list(snakemake.input.tables),
    studies_path=snakemake.input.studies[0] if snakemake.input.studies else None,
    cfg=snakemake.params.cfg,
    out_html=snakemake.output.html,
    out_json=snakemake.output.pooled,
    out_csv=snakemake.output.studies,
)
