# Design planning grid (config key plan:): one simulation job per design, then the table and plot.
# Included by the Snakefile only when the config has a plan: grid.
from therapist_effects.planning import grid_cells

PLAN_CELLS = grid_cells(CFG["plan"])


wildcard_constraints:
    cell="|".join(PLAN_CELLS) or "__none__",


rule plan_cell:
    """Simulate one design of the planning grid (therapist_effects.planning.plan, seeded)."""
    output:
        "results/plan/cells/{cell}.json",
    params:
        design=lambda wc: PLAN_CELLS[wc.cell],
        cfg=CFG,
    conda:
        "../envs/therapist_effects.yaml"
    benchmark:
        "logs/benchmarks/plan/{cell}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    log:
        "logs/plan/{cell}.log",
    script:
        "../scripts/plan_cell.py"


rule plan_grid:
    """The planning grid's table (expected CI width, P(singular), power per design) and plot."""
    input:
        expand("results/plan/cells/{cell}.json", cell=list(PLAN_CELLS)),
    output:
        table=report("results/plan/grid.csv", caption="../report/plan_grid.rst", category="Design planning"),
        plot=report("results/plan/grid.png", caption="../report/plan_grid.rst", category="Design planning"),
    conda:
        "../envs/therapist_effects.yaml"
    benchmark:
        "logs/benchmarks/plan/grid.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    log:
        "logs/plan/grid.log",
    script:
        "../scripts/plan_grid.py"
