# Region and grid features: one job per shard (scatter), then one job per dataset and kind that
# removes the shards of an older plan and checks that every shard of this one is registered
# (gather, `python -m pipeline prune`).


rule extract_regions:
    """Region features of one shard of one split."""
    input:
        images=data("{dataset}", "images.parquet"),
        extractor=extractor_inputs,
    output:
        SHARD["regions"],
    params:
        flags=extract_flags("regions"),
        device=lambda wc: setting(wc.dataset, "device"),
        workers=lambda wc: 0 if wc.dataset == "demo" else config["extract_workers"],
    threads: config["extract_threads"]
    resources:
        gpu=gpus,
    log:
        str(LOGS / "{dataset}" / "regions-{split}-{chunk}.log"),
    benchmark:
        str(BENCH / "{dataset}" / "regions-{split}-{chunk}.tsv")
    shell:
        "{PY} -m features extract --dataset {wildcards.dataset} --root {ROOT} --kind regions"
        " --split {wildcards.split} --chunk {wildcards.chunk} {params.flags} --device {params.device}"
        " --batch-size {config[extract_batch_size]} --workers {params.workers} --threads {threads}"
        " --no-progress > {log} 2>&1"


rule extract_grid:
    """Grid features of one shard of one split."""
    input:
        images=data("{dataset}", "images.parquet"),
        extractor=extractor_inputs,
    output:
        SHARD["grid"],
    params:
        flags=extract_flags("grid"),
        device=lambda wc: setting(wc.dataset, "device"),
        workers=lambda wc: 0 if wc.dataset == "demo" else config["extract_workers"],
    threads: config["extract_threads"]
    resources:
        gpu=gpus,
    log:
        str(LOGS / "{dataset}" / "grid-{split}-{chunk}.log"),
    benchmark:
        str(BENCH / "{dataset}" / "grid-{split}-{chunk}.tsv")
    shell:
        "{PY} -m features extract --dataset {wildcards.dataset} --root {ROOT} --kind grid"
        " --split {wildcards.split} --chunk {wildcards.chunk} {params.flags} --device {params.device}"
        " --batch-size {config[extract_batch_size]} --workers {params.workers} --threads {threads}"
        " --no-progress > {log} 2>&1"


rule gather_regions:
    """All region shards of a dataset: shards of an older plan removed, the plan checked in shards.json."""
    input:
        extract_shards("regions"),
    output:
        touch(DONE["regions"]),
    params:
        dir=lambda wc: data(wc.dataset),
        size=lambda wc: setting(wc.dataset, "shard_size"),
    log:
        str(LOGS / "{dataset}" / "regions.log"),
    shell:
        "{PY} -m pipeline prune {params.dir} --kind regions --shard-size {params.size} > {log} 2>&1"


rule gather_grid:
    """All grid shards of a dataset: shards of an older plan removed, the plan checked in shards.json."""
    input:
        extract_shards("grid"),
    output:
        touch(DONE["grid"]),
    params:
        dir=lambda wc: data(wc.dataset),
        size=lambda wc: setting(wc.dataset, "shard_size"),
    log:
        str(LOGS / "{dataset}" / "grid.log"),
    shell:
        "{PY} -m pipeline prune {params.dir} --kind grid --shard-size {params.size} > {log} 2>&1"
