# Region and grid features: one job per shard (scatter), then one job per dataset and kind that
# checks every shard against shards.json and removes shards of an older plan (gather).


rule extract_regions:
    """Region features of one shard of one split."""
    input:
        images=data("{dataset}", "images.parquet"),
        extractor=extractor_inputs,
    output:
        data("{dataset}", "regions", "regions-{split}-{k}.h5"),
    params:
        flags=extract_flags("regions"),
        device=lambda wc: setting(wc.dataset, "device"),
        workers=lambda wc: 0 if wc.dataset == "demo" else config["extract_workers"],
    threads: config["extract_threads"]
    resources:
        gpu=gpus,
    log:
        str(LOGS / "{dataset}" / "regions-{split}-{k}.log"),
    benchmark:
        str(BENCH / "{dataset}" / "regions-{split}-{k}.tsv")
    shell:
        "{PY} -m features extract --dataset {wildcards.dataset} --root {ROOT} --kind regions"
        " --split {wildcards.split} --chunk {wildcards.k} {params.flags} --device {params.device}"
        " --batch-size {config[extract_batch_size]} --workers {params.workers} --threads {threads}"
        " --no-progress > {log} 2>&1"


rule extract_grid:
    """Grid features of one shard of one split."""
    input:
        images=data("{dataset}", "images.parquet"),
        extractor=extractor_inputs,
    output:
        data("{dataset}", "grid", "grid-{split}-{k}.h5"),
    params:
        flags=extract_flags("grid"),
        device=lambda wc: setting(wc.dataset, "device"),
        workers=lambda wc: 0 if wc.dataset == "demo" else config["extract_workers"],
    threads: config["extract_threads"]
    resources:
        gpu=gpus,
    log:
        str(LOGS / "{dataset}" / "grid-{split}-{k}.log"),
    benchmark:
        str(BENCH / "{dataset}" / "grid-{split}-{k}.tsv")
    shell:
        "{PY} -m features extract --dataset {wildcards.dataset} --root {ROOT} --kind grid"
        " --split {wildcards.split} --chunk {wildcards.k} {params.flags} --device {params.device}"
        " --batch-size {config[extract_batch_size]} --workers {params.workers} --threads {threads}"
        " --no-progress > {log} 2>&1"


rule gather_regions:
    """All region shards of a dataset, checked against shards.json; leftovers removed."""
    input:
        extract_shards("regions"),
    output:
        touch(DONE["regions"]),
    params:
        flags=extract_flags("regions"),
    log:
        str(LOGS / "{dataset}" / "regions.log"),
    shell:
        "{PY} -m features extract --dataset {wildcards.dataset} --root {ROOT} --kind regions"
        " {params.flags} --device cpu --workers 0 --no-progress > {log} 2>&1"


rule gather_grid:
    """All grid shards of a dataset, checked against shards.json; leftovers removed."""
    input:
        extract_shards("grid"),
    output:
        touch(DONE["grid"]),
    params:
        flags=extract_flags("grid"),
    log:
        str(LOGS / "{dataset}" / "grid.log"),
    shell:
        "{PY} -m features extract --dataset {wildcards.dataset} --root {ROOT} --kind grid"
        " {params.flags} --device cpu --workers 0 --no-progress > {log} 2>&1"
