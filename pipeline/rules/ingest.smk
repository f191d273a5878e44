# Ingest: the dataset's manifest (and annotation file) -> images.parquet + text/captions.parquet.
# A checkpoint, because the number of feature and graph shards is known only from its output.


checkpoint ingest:
    """Read a dataset (or generate the demo) into images.parquet and captions.parquet."""
    input:
        manifest=str(BASE / "manifests" / "{dataset}.yaml"),
        annotations=annotation_files,
    output:
        images=data("{dataset}", "images.parquet"),
        captions=data("{dataset}", "text", "captions.parquet"),
    params:
        flags=ingest_flags,
    resources:
        **job_size("job"),
    log:
        str(LOGS / "{dataset}" / "ingest.log"),
    benchmark:
        str(BENCH / "{dataset}" / "ingest.tsv")
    shell:
        "{ITMKIT:q} ingest --manifest {input.manifest:q} --root {ROOT:q} {params.flags} --quiet > {log:q} 2>&1"
