# Thin wrapper: see therapist_effects.models.growth_step.not_on_track_copy_step.
from therapist_effects.models.growth_step import not_on_track_copy_step
from therapist_effects.pipeline import run

run(not_on_track_copy_step, snakemake.log[0], track_path=snakemake.input[0], out_csv=snakemake.output[0])
