rule ingest:
    """Read one export (CSV, Parquet or Excel), validate it, and split valid rows from rejects."""
    input:
        data=lambda wc: DATASETS[wc.dataset]["path"],
    output:
        rows="results/{dataset}/validated.parquet",
        rejects="results/{dataset}/ingest_rejects.csv",
        summary="results/{dataset}/ingest.json",
    params:
        dataset=lambda wc: DATASETS[wc.dataset],
        cfg=CFG,
    conda:
        "../envs/therapist_effects.yaml"
    benchmark:
        "logs/benchmarks/{dataset}/ingest.tsv"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=60,
    log:
        "logs/{dataset}/ingest.log",
    script:
        "../scripts/ingest.py"


rule patient_outcomes:
    """One row per patient: intake and end scores, change, reliable / clinically significant change,
    NHS Talking Therapies recovery, dropout; rejects of both steps combined."""
    input:
        rows="results/{dataset}/validated.parquet",
        rejects="results/{dataset}/ingest_rejects.csv",
        summary="results/{dataset}/ingest.json",
    output:
        parquet="results/{dataset}/patients.parquet",
        csv="results/{dataset}/patients.csv",
        rejects=report(
            "results/{dataset}/rejects.csv",
            caption="../report/rejects.rst",
            category="Data",
            subcategory="{dataset}",
        ),
        accounting="results/{dataset}/accounting.json",
    params:
        dataset=lambda wc: DATASETS[wc.dataset],
        cfg=CFG,
    conda:
        "../envs/therapist_effects.yaml"
    benchmark:
        "logs/benchmarks/{dataset}/patient_outcomes.tsv"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=60,
    log:
        "logs/{dataset}/patient_outcomes.log",
    script:
        "../scripts/patient_outcomes.py"
