# Thin wrapper: see therapist_effects.models.growth_step.fit_growth_step.
from therapist_effects.models.growth_step import fit_growth_step
from therapist_effects.pipeline import _higher_is_better, run

run(
    fit_growth_step,
    snakemake.log[0],
    rows_path=snakemake.input.rows,
    patients_path=snakemake.input.patients,
    model_id=snakemake.wildcards.model,
    dataset=snakemake.params.dataset,
    cfg=snakemake.params.cfg,
    out_json=snakemake.output.json,
    out_therapists=snakemake.output.therapists,
    out_track=snakemake.output.track,
    out_curves=snakemake.output.curves,
    higher_is_better=_higher_is_better(snakemake.params.dataset, snakemake.params.cfg),
)
