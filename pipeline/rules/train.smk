# A short training run on a dataset's shards and its evaluation (used by the demo target).


rule train:
    """Train one model on a dataset's region/grid shards and vocabulary."""
    input:
        DONE["regions"],
        DONE["grid"],
        data("{dataset}", "text", "vocab.json"),
    output:
        # every file a run starts with: Snakemake removes them before a rerun, so the new run
        # starts fresh instead of refusing an existing run folder
        best=str(RUNS / "{dataset}-{model}" / "best.pt"),
        last=str(RUNS / "{dataset}-{model}" / "last.pt"),
        config=str(RUNS / "{dataset}-{model}" / "config.json"),
        metrics=str(RUNS / "{dataset}-{model}" / "metrics.csv"),
    params:
        out=lambda wc: run_dir(wc.dataset, wc.model),
        flags=f"--epochs {config['demo_epochs']} --batch-size {config['demo_batch_size']}",
        device=config["demo_device"],
    threads: 2
    resources:
        gpu=lambda wc: int(config["demo_device"].startswith("cuda")),
    log:
        str(LOGS / "{dataset}" / "train-{model}.log"),
    benchmark:
        str(BENCH / "{dataset}" / "train-{model}.tsv")
    shell:
        "{PY} {TRAIN} --model {wildcards.model} --dataset {wildcards.dataset} --root {ROOT}"
        " --out {params.out} {params.flags} --device {params.device} --workers 0 > {log} 2>&1"


rule evaluate:
    """Recall@K (and hard-negative accuracy on the demo) of a trained run on the test split."""
    input:
        str(RUNS / "{dataset}-{model}" / "best.pt"),
    output:
        str(RUNS / "{dataset}-{model}" / "eval.json"),
    params:
        run=lambda wc: run_dir(wc.dataset, wc.model),
        flags=lambda wc: "--hard-negatives" if wc.dataset == "demo" else "",
        device=config["demo_device"],
    log:
        str(LOGS / "{dataset}" / "evaluate-{model}.log"),
    benchmark:
        str(BENCH / "{dataset}" / "evaluate-{model}.tsv")
    shell:
        "{PY} {EVALUATE} {params.run} --root {ROOT} {params.flags} --device {params.device}"
        " --workers 0 > {log} 2>&1"
