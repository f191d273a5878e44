"""itmkit workflow: datasets -> region/grid feature shards, scene graphs and vocabulary -> a
training run, its evaluation and its HTML report.

    snakemake --cores 2 demo                   # generated demo data, end to end, on CPU
    snakemake --cores 8 features_coco          # regions + grid + graphs + vocab of MS-COCO
    snakemake --cores 8 train_coco --config model=kidrr   # ... then train, evaluate, report
    snakemake --list-target-rules              # every target with its description

Settings: config/config.yaml (checked against config/schema.yaml), overridable with
--config key=value. Rules live in pipeline/rules/*.smk and call the package's CLIs.
"""

import os
import sys

from snakemake.utils import min_version

from pipeline.config import config_problems

min_version("9.0")


configfile: os.path.join(workflow.basedir, "config", "config.yaml")


# one line naming the key, not snakemake's dump of the whole schema
problems = config_problems(config, os.path.join(workflow.basedir, "config", "schema.yaml"))
if problems:
    sys.exit("\n".join(f"config error: {p}" for p in problems))


include: "pipeline/rules/common.smk"
include: "pipeline/rules/ingest.smk"
include: "pipeline/rules/features.smk"
include: "pipeline/rules/text.smk"
include: "pipeline/rules/train.smk"


rule all:
    """Features, graphs and vocabularies of every dataset in config `datasets`."""
    localrule: True
    input:
        [DONE[k].format(dataset=ds) for ds in config["datasets"] for k in ("regions", "grid")],
        [data(ds, "text", "vocab.json") for ds in config["datasets"]],


def finished_reports():
    """A line for each report the targets of this call end in (demo, train_*, a report.html):
    the report command's summary, which ends in the report's path."""
    runs = {"demo": ("demo", config["demo_model"]), "train_coco": ("coco", config["model"]),
            "train_f30k": ("f30k", config["model"])}
    for target in getattr(workflow.dag_settings, "targets", None) or []:
        if target in runs:
            ds, model = runs[target]
            log = LOGS / ds / f"report-{model}.log"
            lines = log.read_text().splitlines() if log.exists() else []
            yield lines[-1] if lines else f"report: {RUNS / f'{ds}-{model}' / 'report.html'}"
        elif str(target).endswith("report.html"):
            yield f"report: {Path(target).resolve()}"


onsuccess:
    # one handler (a second `onsuccess:` would replace this one). Printed by the snakemake process
    # the user watches: a cluster job's own output goes to its scheduler log, which the SLURM
    # plugin deletes when the job succeeds
    for line in finished_reports():
        print(line)
    # the demo's last line says how to query the run in a browser (at exit: after snakemake's
    # own summary)
    if "demo" in workflow.dag_settings.targets:
        import atexit
        import shlex

        demo_run = RUNS / f"demo-{config['demo_model']}"
        atexit.register(print, f"demo: done; query the run in a browser: itmkit serve {shlex.quote(str(demo_run))}")


rule demo:
    """Demo end to end on CPU: generate, extract (given boxes, RANDOM weights), parse, train, evaluate, report."""
    localrule: True
    input:
        str(RUNS / f"demo-{config['demo_model']}" / "report.html"),


rule train_coco:
    """MS-COCO from raw data to a report: features, graphs, vocabulary, train `model`, evaluate, report."""
    localrule: True
    input:
        str(RUNS / f"coco-{config['model']}" / "report.html"),


rule train_f30k:
    """Flickr30K from raw data to a report: features, graphs, vocabulary, train `model`, evaluate, report."""
    localrule: True
    input:
        str(RUNS / f"f30k-{config['model']}" / "report.html"),


rule features_coco:
    """MS-COCO: region and grid features, scene graphs and vocabulary."""
    localrule: True
    input:
        DONE["regions"].format(dataset="coco"),
        DONE["grid"].format(dataset="coco"),
        data("coco", "text", "vocab.json"),


rule features_f30k:
    """Flickr30K: region and grid features, scene graphs and vocabulary."""
    localrule: True
    input:
        DONE["regions"].format(dataset="f30k"),
        DONE["grid"].format(dataset="f30k"),
        data("f30k", "text", "vocab.json"),


rule text_coco:
    """MS-COCO captions, scene graphs and vocabulary (annotation file only, no images needed)."""
    localrule: True
    input:
        data("coco", "text", "vocab.json"),


rule text_f30k:
    """Flickr30K captions, scene graphs and vocabulary (annotation file only, no images needed)."""
    localrule: True
    input:
        data("f30k", "text", "vocab.json"),


rule regions_coco:
    """MS-COCO region features only."""
    localrule: True
    input:
        DONE["regions"].format(dataset="coco"),


rule regions_f30k:
    """Flickr30K region features only."""
    localrule: True
    input:
        DONE["regions"].format(dataset="f30k"),


rule grid_coco:
    """MS-COCO grid features only."""
    localrule: True
    input:
        DONE["grid"].format(dataset="coco"),


rule grid_f30k:
    """Flickr30K grid features only."""
    localrule: True
    input:
        DONE["grid"].format(dataset="f30k"),
