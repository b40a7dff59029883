# Thin wrapper: see therapist_effects.pipeline.research_report_step.
from therapist_effects.pipeline import research_report_step, run

run(
    research_report_step,
    snakemake.log[0],
    estimates_path=snakemake.input.estimates,
    patients_path=snakemake.input.patients,
    therapists_path=snakemake.input.therapists,
    rejects_path=snakemake.input.rejects,
    narrowing_paths=list(snakemake.input.narrowing),
    idata_paths=list(snakemake.input.idata),
    cfg=snakemake.params.cfg,
    out_html=snakemake.output[0],
    sensitivity_paths=list(snakemake.input.get("sensitivity", [])),
    growth_curves=list(snakemake.input.growth_curves),
)
