# Thin wrapper: see therapist_effects.pipeline.fit_step (used by fit_model, fit_random_slope, fit_bayes).
from therapist_effects.pipeline import fit_step, run

run(
    fit_step,
    snakemake.log[0],
    patients_path=snakemake.input[0],
    model_id=snakemake.wildcards.model,
    dataset=snakemake.params.dataset,
    cfg=snakemake.params.cfg,
    out_json=snakemake.output.json,
    out_therapists=snakemake.output.therapists,
    out_narrowing=snakemake.output.get("narrowing"),
    out_idata=snakemake.output.get("idata"),
)
