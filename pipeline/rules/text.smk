# Captions -> scene graphs (one job per chunk of captions, then a gather that prunes chunks of an
# older plan) -> vocabulary of the train split.


rule parse:
    """Scene graphs of one chunk of captions (spaCy)."""
    input:
        data("{dataset}", "text", "captions.parquet"),
    output:
        SHARD["graphs"],
    params:
        flags=parse_flags,
    threads: 1   # one chunk per job: more dask workers would have nothing to parse but start up
    resources:
        **job_size("parse"),
    log:
        str(LOGS / "{dataset}" / "graphs-{chunk}.log"),
    benchmark:
        str(BENCH / "{dataset}" / "graphs-{chunk}.tsv")
    shell:
        "{ITMKIT:q} parse --dataset {wildcards.dataset} --root {ROOT:q} --chunk {wildcards.chunk}"
        " {params.flags} --workers {threads} --no-progress > {log:q} 2>&1"


rule gather_graphs:
    """All graph chunks of a dataset: chunks of an older plan removed, the plan checked in shards.json."""
    input:
        graph_shards,
    output:
        touch(DONE["graphs"]),
    params:
        dir=lambda wc: data(wc.dataset),
        size=config["parse_chunk_size"],
    resources:
        **job_size("job"),
    log:
        str(LOGS / "{dataset}" / "graphs.log"),
    shell:
        "{ITMKIT:q} prune {params.dir:q} --kind graphs --chunk-size {params.size:q} > {log:q} 2>&1"


rule vocab:
    """Vocabulary (words, predicates, attributes) of the train split."""
    input:
        DONE["graphs"],
    output:
        data("{dataset}", "text", "vocab.json"),
    params:
        # unset: the command's own default, so that the workflow and `itmkit vocab` agree
        min_count="" if config.get("min_count") is None else flag("--min-count", config["min_count"]),
    resources:
        **job_size("job"),
    log:
        str(LOGS / "{dataset}" / "vocab.log"),
    shell:
        "{ITMKIT:q} vocab --dataset {wildcards.dataset} --root {ROOT:q}"
        " {params.min_count} --no-progress > {log:q} 2>&1"
