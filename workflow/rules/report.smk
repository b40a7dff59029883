rule research_report:
    """Self-contained HTML research report: methods, sample flow, model table, plots, provenance."""
    input:
        estimates="results/{dataset}/estimates.json",
        patients="results/{dataset}/patients.parquet",
        therapists="results/{dataset}/therapists.csv",
        rejects="results/{dataset}/rejects.csv",
        narrowing=slope_narrowing,
        idata=bayes_idata,
        sensitivity=lambda wc: [f"results/{wc.dataset}/sensitivity.csv"] if CFG.get("sensitivity") else [],
        growth_curves=lambda wc: growth_outputs(wc, "curves"),
    output:
        report(
            "results/{dataset}/report.html",
            caption="../report/research_report.rst",
            category="Reports",
            subcategory="{dataset}",
        ),
    params:
        cfg=CFG,
    conda:
        "../envs/therapist_effects.yaml"
    benchmark:
        "logs/benchmarks/{dataset}/research_report.tsv"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=60,
    log:
        "logs/{dataset}/research_report.log",
    script:
        "../scripts/research_report.py"


rule service_report:
    """Therapist-level report for service managers: pseudonymised, small numbers suppressed."""
    input:
        estimates="results/{dataset}/estimates.json",
        patients="results/{dataset}/patients.parquet",
        therapists="results/{dataset}/therapists.csv",
        not_on_track=lambda wc: growth_outputs(wc, "not_on_track")[:1],
    output:
        report(
            "results/{dataset}/therapist_report.html",
            caption="../report/therapist_report.rst",
            category="Reports",
            subcategory="{dataset}",
        ),
    params:
        cfg=CFG,
        dataset=lambda wc: DATASETS[wc.dataset],
    conda:
        "../envs/therapist_effects.yaml"
    benchmark:
        "logs/benchmarks/{dataset}/service_report.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    log:
        "logs/{dataset}/service_report.log",
    script:
        "../scripts/service_report.py"


rule therapist_pages:
    """One feedback page per listed therapist (results/<dataset>/therapists/<pseudonym>.html) for supervision."""
    input:
        estimates="results/{dataset}/estimates.json",
        patients="results/{dataset}/patients.parquet",
        therapists="results/{dataset}/therapists.csv",
    output:
        directory("results/{dataset}/therapists"),
    params:
        cfg=CFG,
        dataset=lambda wc: DATASETS[wc.dataset],
    conda:
        "../envs/therapist_effects.yaml"
    log:
        "logs/{dataset}/therapist_pages.log",
    benchmark:
        "logs/benchmarks/{dataset}/therapist_pages.tsv"
    threads: 1
    resources:
        mem_mb=1500,
        runtime=20,
    script:
        "../scripts/therapist_pages.py"


rule meta_report:
    """Meta-analysis report: per-study table, forest plot, pooled ICC, tau^2, I^2, prediction interval."""
    input:
        pooled=meta_inputs(),
        tables=[p.replace("meta.json", "per_cluster.csv") for p in meta_inputs()],
        studies=[CFG["meta"]["studies"]] if CFG["meta"]["studies"] else [],
    output:
        html=report(
            "results/meta/report.html",
            caption="../report/meta_report.rst",
            category="Reports",
            subcategory="meta-analysis",
        ),
        pooled="results/meta/pooled.json",
        studies="results/meta/studies.csv",
    params:
        cfg=CFG,
    conda:
        "../envs/therapist_effects.yaml"
    benchmark:
        "logs/benchmarks/meta/meta_report.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    log:
        "logs/meta/meta_report.log",
    script:
        "../scripts/meta_report.py"
