# Thin wrapper: see therapist_effects.pipeline.service_report_step.
from therapist_effects.pipeline import run, service_report_step

run(
    service_report_step,
    snakemake.log[0],
    estimates_path=snakemake.input.estimates,
    patients_path=snakemake.input.patients,
    therapists_path=snakemake.input.therapists,
    dataset=snakemake.params.dataset,
    cfg=snakemake.params.cfg,
    out_html=snakemake.output[0],
    not_on_track_path=(list(snakemake.input.not_on_track) or [None])[0],
)
