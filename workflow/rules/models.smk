rule fit_model:
    """Maximum-likelihood models: random intercept (gaussian: exact REML from sufficient statistics;
    binomial: adaptive Gauss-Hermite), nested, arm-specific therapist variances."""
    input:
        "results/{dataset}/patients.parquet",
    output:
        json="results/{dataset}/models/{model}.json",
        therapists="results/{dataset}/models/{model}_therapists.csv",
    wildcard_constraints:
        model=model_ids("likelihood"),
    params:
        dataset=lambda wc: DATASETS[wc.dataset],
        cfg=CFG,
    conda:
        "../envs/therapist_effects.yaml"
    benchmark:
        "logs/benchmarks/{dataset}/fit_{model}.tsv"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=120,
    log:
        "logs/{dataset}/fit_{model}.log",
    script:
        "../scripts/fit_model.py"


rule fit_random_slope:
    """Random slope of feedback across therapists (statsmodels MixedLM) and the narrowing-the-gap data."""
    input:
        "results/{dataset}/patients.parquet",
    output:
        json="results/{dataset}/models/{model}.json",
        therapists="results/{dataset}/models/{model}_therapists.csv",
        narrowing="results/{dataset}/models/{model}_narrowing.csv",
    wildcard_constraints:
        model=model_ids("slope"),
    params:
        dataset=lambda wc: DATASETS[wc.dataset],
        cfg=CFG,
    conda:
        "../envs/therapist_effects.yaml"
    benchmark:
        "logs/benchmarks/{dataset}/fit_{model}.tsv"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=120,
    log:
        "logs/{dataset}/fit_{model}.log",
    script:
        "../scripts/fit_model.py"


rule fit_bayes:
    """Bayesian (PyMC) models on sufficient statistics; the posterior is saved as NetCDF."""
    input:
        "results/{dataset}/patients.parquet",
    output:
        json="results/{dataset}/models/{model}.json",
        therapists="results/{dataset}/models/{model}_therapists.csv",
        idata="results/{dataset}/models/{model}.nc",
    wildcard_constraints:
        model=model_ids("bayes"),
    params:
        dataset=lambda wc: DATASETS[wc.dataset],
        cfg=CFG,
    threads: 2
    conda:
        "../envs/therapist_effects.yaml"
    benchmark:
        "logs/benchmarks/{dataset}/fit_{model}.tsv"
    resources:
        mem_mb=4000,
        runtime=240,
    log:
        "logs/{dataset}/fit_{model}.log",
    script:
        "../scripts/fit_model.py"


rule fit_growth:
    """Growth model: sessions in patients in therapists, exact REML/ML from per-patient block statistics;
    not-on-track flags against expected-recovery curves, cross-validated early-flag validity."""
    input:
        rows="results/{dataset}/validated.parquet",
        patients="results/{dataset}/patients.parquet",
    output:
        json="results/{dataset}/models/{model}.json",
        therapists="results/{dataset}/models/{model}_therapists.csv",
        track="results/{dataset}/models/{model}_not_on_track.csv",
        curves="results/{dataset}/models/{model}_curves.csv",
    wildcard_constraints:
        model=model_ids("growth"),
    params:
        dataset=lambda wc: DATASETS[wc.dataset],
        cfg=CFG,
    benchmark:
        "logs/benchmarks/{dataset}/fit_{model}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/therapist_effects.yaml"
    log:
        "logs/{dataset}/fit_{model}.log",
    script:
        "../scripts/fit_growth.py"


rule not_on_track:
    """results/<dataset>/not_on_track.csv: one row per patient session (the first growth model's flags)."""
    input:
        lambda wc: growth_outputs(wc, "not_on_track")[0],
    output:
        report(
            "results/{dataset}/not_on_track.csv",
            caption="../report/not_on_track.rst",
            category="Estimates",
            subcategory="{dataset}",
        ),
    benchmark:
        "logs/benchmarks/{dataset}/not_on_track.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/therapist_effects.yaml"
    log:
        "logs/{dataset}/not_on_track.log",
    script:
        "../scripts/not_on_track.py"


rule per_cluster:
    """Per-cluster (service / trial) ICCs and their random-effects pooling (two-stage meta-analysis)."""
    input:
        "results/{dataset}/patients.parquet",
    output:
        table=report(
            "results/{dataset}/per_cluster.csv",
            caption="../report/per_cluster.rst",
            category="Meta-analysis",
            subcategory="{dataset}",
        ),
        pooled="results/{dataset}/meta.json",
    params:
        dataset=lambda wc: DATASETS[wc.dataset],
        cfg=CFG,
    conda:
        "../envs/therapist_effects.yaml"
    benchmark:
        "logs/benchmarks/{dataset}/per_cluster.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    log:
        "logs/{dataset}/per_cluster.log",
    script:
        "../scripts/per_cluster.py"


rule estimates:
    """Assemble estimates.json (the public contract) and the combined therapist table."""
    input:
        patients="results/{dataset}/patients.parquet",
        accounting="results/{dataset}/accounting.json",
        models=lambda wc: expand("results/{{dataset}}/models/{model}.json", model=models_of(wc.dataset)),
        therapists=lambda wc: expand(
            "results/{{dataset}}/models/{model}_therapists.csv", model=models_of(wc.dataset)
        ),
        meta=lambda wc: ([f"results/{wc.dataset}/meta.json"] if has_clusters(wc.dataset) else []),
    output:
        estimates=report(
            "results/{dataset}/estimates.json",
            caption="../report/estimates.rst",
            category="Estimates",
            subcategory="{dataset}",
        ),
        therapists=report(
            "results/{dataset}/therapists.csv",
            caption="../report/therapists.rst",
            category="Estimates",
            subcategory="{dataset}",
        ),
    params:
        dataset=lambda wc: DATASETS[wc.dataset],
        cfg=CFG,
        configfiles=CONFIGFILES,
    conda:
        "../envs/therapist_effects.yaml"
    benchmark:
        "logs/benchmarks/{dataset}/estimates.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    log:
        "logs/{dataset}/estimates.log",
    script:
        "../scripts/estimates.py"
