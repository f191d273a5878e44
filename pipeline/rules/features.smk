# Region and grid features: one job per shard (scatter), then one job per dataset and kind that
# removes the shards of an older plan and checks that every shard of this one is registered
# (gather, `itmkit prune`).
#
# When both kinds of a dataset are wanted (features_*, all, demo), one `extract` job per shard
# writes both from one backbone pass; regions_* / grid_* targets take `extract_regions` /
# `extract_grid` instead (see `one_pass`). Outputs are `update()`d, not deleted before a job
# runs: the CLI rewrites only the shards that are not current, so a changed box setting makes
# an `extract` job rewrite the region shard and leave the grid shard as it was.

ruleorder: extract > extract_regions
ruleorder: extract > extract_grid


rule extract:
    """Region and grid features of one shard of one split, from one backbone pass."""
    input:
        images=data("{dataset}", "images.parquet"),
        extractor=extractor_inputs,
        one_pass=one_pass,
    output:
        regions=update(SHARD["regions"]),
        grid=update(SHARD["grid"]),
    params:
        kind="both",
        flags=extract_flags("regions", "grid"),
        run=run_flags,
    threads: lambda wc: setting(wc.dataset, "extract_threads")
    resources:
        gpu=gpus,
        **job_size("extract"),
    log:
        str(LOGS / "{dataset}" / "features-{split}-{chunk}.log"),
    benchmark:
        str(BENCH / "{dataset}" / "features-{split}-{chunk}.tsv")
    shell:
        EXTRACT


rule extract_regions:
    """Region features of one shard of one split."""
    input:
        images=data("{dataset}", "images.parquet"),
        extractor=extractor_inputs,
    output:
        update(SHARD["regions"]),
    params:
        kind="regions",
        flags=extract_flags("regions"),
        run=run_flags,
    threads: lambda wc: setting(wc.dataset, "extract_threads")
    resources:
        gpu=gpus,
        **job_size("extract"),
    log:
        str(LOGS / "{dataset}" / "regions-{split}-{chunk}.log"),
    benchmark:
        str(BENCH / "{dataset}" / "regions-{split}-{chunk}.tsv")
    shell:
        EXTRACT


rule extract_grid:
    """Grid features of one shard of one split."""
    input:
        images=data("{dataset}", "images.parquet"),
        extractor=extractor_inputs,
    output:
        update(SHARD["grid"]),
    params:
        kind="grid",
        flags=extract_flags("grid"),
        run=run_flags,
    threads: lambda wc: setting(wc.dataset, "extract_threads")
    resources:
        gpu=gpus,
        **job_size("extract"),
    log:
        str(LOGS / "{dataset}" / "grid-{split}-{chunk}.log"),
    benchmark:
        str(BENCH / "{dataset}" / "grid-{split}-{chunk}.tsv")
    shell:
        EXTRACT


rule gather_regions:
    """All region shards of a dataset: shards of an older plan removed, the plan checked in shards.json."""
    input:
        extract_shards("regions"),
    output:
        touch(DONE["regions"]),
    params:
        dir=lambda wc: data(wc.dataset),
        size=lambda wc: setting(wc.dataset, "shard_size"),
    resources:
        **job_size("job"),
    log:
        str(LOGS / "{dataset}" / "regions.log"),
    shell:
        "{ITMKIT:q} prune {params.dir:q} --kind regions --shard-size {params.size:q} > {log:q} 2>&1"


rule gather_grid:
    """All grid shards of a dataset: shards of an older plan removed, the plan checked in shards.json."""
    input:
        extract_shards("grid"),
    output:
        touch(DONE["grid"]),
    params:
        dir=lambda wc: data(wc.dataset),
        size=lambda wc: setting(wc.dataset, "shard_size"),
    resources:
        **job_size("job"),
    log:
        str(LOGS / "{dataset}" / "grid.log"),
    shell:
        "{ITMKIT:q} prune {params.dir:q} --kind grid --shard-size {params.size:q} > {log:q} 2>&1"
