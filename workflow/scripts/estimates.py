# Thin wrapper: see therapist_effects.pipeline.collect_step.
from therapist_effects.pipeline import collect_step, run

run(
    collect_step,
    snakemake.log[0],
    dataset_name=snakemake.wildcards.dataset,
    dataset=snakemake.params.dataset,
    cfg=snakemake.params.cfg,
    patients_path=snakemake.input.patients,
    accounting_path=snakemake.input.accounting,
    model_jsons=list(snakemake.input.models),
    therapist_csvs=list(snakemake.input.therapists),
    out_estimates=snakemake.output.estimates,
    out_therapists=snakemake.output.therapists,
    meta_json=snakemake.input.meta[0] if snakemake.input.meta else None,
    configfiles=snakemake.params.configfiles,
)
