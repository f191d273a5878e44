# Training on a dataset's shards, its evaluation and its report: the end of the demo and of the
# train_coco / train_f30k targets. The demo trains with the demo_* settings (demo_set: model
# settings) on the CPU; real data with the model's own defaults for the dataset, unless
# train_epochs, train_batch_size or train_set say otherwise.


def train_flags(wc):
    """Flags that decide what a run learns (params: a change retrains)."""
    if wc.dataset == "demo":
        flags = [flag("--epochs", config["demo_epochs"]), flag("--batch-size", config["demo_batch_size"])]
        settings = config.get("demo_set")
    else:
        flags = [flag("--epochs", config["train_epochs"]) if config.get("train_epochs") else "",
                 flag("--batch-size", config["train_batch_size"]) if config.get("train_batch_size") else ""]
        settings = config.get("train_set")
    for key, value in (settings or {}).items():
        value = ",".join(map(str, value)) if isinstance(value, list) else value
        flags.append(flag("--set", f"{key}={value}"))
    return " ".join(f for f in flags if f)


def train_device(wc):
    return config["demo_device"] if wc.dataset == "demo" else config["train_device"]


def train_workers(wc):
    return 0 if wc.dataset == "demo" else config["train_workers"]


@functools.cache
def model_problem(model):
    """Why `itmkit train` refuses ``--model model`` ("" when it takes it): its own argument check,
    which lists the registered models (`--help` exits before anything is read)."""
    r = subprocess.run([ITMKIT, "train", "--model", model, "--help"], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    return "" if r.returncode == 0 else (lines[-1] if lines else f"exit {r.returncode}")


def train_threads(wc):
    """Cores of a train or evaluate job: its DataLoader workers and the main process."""
    return train_workers(wc) + 1


def known_model(wc):
    """A real dataset's run comes after hours of extraction: a model name the registry does not
    know stops the workflow before anything runs (the demo's `itmkit train` says it within seconds)."""
    if wc.dataset in REAL and (problem := model_problem(wc.model)):
        raise WorkflowError(f"unknown model '{wc.model}' (--config model=...): {problem}")
    return []


rule train:
    """Train one model on a dataset's region/grid shards and vocabulary."""
    input:
        DONE["regions"],
        DONE["grid"],
        data("{dataset}", "text", "vocab.json"),
        known_model,
    output:
        # every file a run starts with: Snakemake removes them before a rerun, so the new run
        # starts fresh instead of refusing an existing run folder
        best=str(RUNS / "{dataset}-{model}" / "best.pt"),
        last=str(RUNS / "{dataset}-{model}" / "last.pt"),
        config=str(RUNS / "{dataset}-{model}" / "config.json"),
        metrics=str(RUNS / "{dataset}-{model}" / "metrics.csv"),
    params:
        out=lambda wc: run_dir(wc.dataset, wc.model),
        flags=train_flags,
        device=train_device,
    threads: train_threads
    resources:
        gpu=lambda wc: int(train_device(wc).startswith("cuda")),
        **job_size("train"),
        workers=train_workers,   # not a param: a changed worker count must not retrain
        # the demo's small model on the CPU: one thread (two are many times slower on a shared
        # machine, docs/BENCHMARKS.md); 0: torch's choice
        torch_threads=lambda wc: 1 if wc.dataset == "demo" else 0,
    log:
        str(LOGS / "{dataset}" / "train-{model}.log"),
    benchmark:
        str(BENCH / "{dataset}" / "train-{model}.tsv")
    shell:
        "{ITMKIT:q} train --model {wildcards.model} --dataset {wildcards.dataset} --root {ROOT:q}"
        " --out {params.out:q} {params.flags} --device {params.device:q} --workers {resources.workers}"
        " --threads {resources.torch_threads}"
        " > {log:q} 2>&1"


rule evaluate:
    """Recall@K (and hard-negative accuracy where the dataset has pairs) of a trained run on the
    test split; the similarity matrix is kept for the report."""
    input:
        str(RUNS / "{dataset}-{model}" / "best.pt"),
    output:
        eval=str(RUNS / "{dataset}-{model}" / "eval.json"),
        sims=str(RUNS / "{dataset}-{model}" / "sims-test.npz"),
    params:
        run=lambda wc: run_dir(wc.dataset, wc.model),
        device=train_device,
    threads: train_threads
    resources:
        gpu=lambda wc: int(train_device(wc).startswith("cuda")),
        **job_size("evaluate"),
        workers=train_workers,
    log:
        str(LOGS / "{dataset}" / "evaluate-{model}.log"),
    benchmark:
        str(BENCH / "{dataset}" / "evaluate-{model}.tsv")
    shell:
        "{ITMKIT:q} evaluate {params.run:q} --root {ROOT:q} --hard-negatives --save-sims --device {params.device:q}"
        " --workers {resources.workers} > {log:q} 2>&1"


rule report:
    """One self-contained HTML report of a trained run (`itmkit report`); its path is printed
    when the workflow ends (the Snakefile's onsuccess)."""
    input:
        str(RUNS / "{dataset}-{model}" / "eval.json"),
        str(RUNS / "{dataset}-{model}" / "sims-test.npz"),
    output:
        str(RUNS / "{dataset}-{model}" / "report.html"),
    params:
        run=lambda wc: run_dir(wc.dataset, wc.model),
        device=train_device,
    resources:
        gpu=lambda wc: int(train_device(wc).startswith("cuda")),
        **job_size("evaluate"),
    log:
        str(LOGS / "{dataset}" / "report-{model}.log"),
    benchmark:
        str(BENCH / "{dataset}" / "report-{model}.tsv")
    shell:
        "{ITMKIT:q} report {params.run:q} --root {ROOT:q} --out {output:q} --device {params.device:q} --workers 0"
        " > {log:q} 2>&1"
