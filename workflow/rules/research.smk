# Research outputs: sensitivity analyses (sensitivity: true) and publication tables.


rule sensitivity:
    """Refit the Gaussian random-intercept models under the sensitivity analyses (all, completers,
    unadjusted, min_caseload_10)."""
    input:
        "results/{dataset}/patients.parquet",
    output:
        report(
            "results/{dataset}/sensitivity.csv",
            caption="../report/sensitivity.rst",
            category="Estimates",
            subcategory="{dataset}",
        ),
    params:
        dataset=lambda wc: DATASETS[wc.dataset],
        cfg=CFG,
    conda:
        "../envs/therapist_effects.yaml"
    benchmark:
        "logs/benchmarks/{dataset}/sensitivity.tsv"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=60,
    log:
        "logs/{dataset}/sensitivity.log",
    script:
        "../scripts/sensitivity.py"


rule tables:
    """Publication tables of every model (Markdown, LaTeX, CSV), descriptives by arm, participant flow (SVG)."""
    input:
        estimates="results/{dataset}/estimates.json",
        patients="results/{dataset}/patients.parquet",
    output:
        md="results/{dataset}/tables/models.md",
        tex="results/{dataset}/tables/models.tex",
        csv=report(
            "results/{dataset}/tables/models.csv",
            caption="../report/tables.rst",
            category="Tables",
            subcategory="{dataset}",
        ),
        desc_md="results/{dataset}/tables/descriptives.md",
        desc_tex="results/{dataset}/tables/descriptives.tex",
        desc_csv="results/{dataset}/tables/descriptives.csv",
        flow="results/{dataset}/tables/flow.svg",
    conda:
        "../envs/therapist_effects.yaml"
    benchmark:
        "logs/benchmarks/{dataset}/tables.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    log:
        "logs/{dataset}/tables.log",
    script:
        "../scripts/tables.py"
