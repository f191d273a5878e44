# Paths, wildcards and the command-line flags each rule passes. The rules hold no logic: every
# step is an `itmkit COMMAND`, and the flags that decide what a step writes are also its `params`, so a
# changed setting reruns exactly the rules whose flags changed (Snakemake's params trigger).
#
# Quoting: no config value reaches a shell line unquoted. The rules write single values as
# {x:q}; the flag strings built here quote every value with `flag` (shlex.quote, which leaves a
# plain value such as 16 or fixed:36 as it is, so the params, and what reruns, stay the same).

import functools
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from snakemake.exceptions import WorkflowError

from pipeline import manifest as manifests
from pipeline.shards import Layout

BASE = Path(workflow.basedir)
# absolute, because shards.json keeps paths relative to the dataset folder
ROOT = Path(config["root"]).expanduser().resolve()
RUNS = Path(config["runs"]).expanduser().resolve()
LOGS = ROOT / "logs"
BENCH = ROOT / "benchmarks"
REAL = ("coco", "f30k")        # datasets read from a local copy; `demo` is generated



def itmkit_command():
    """The `itmkit` command of the Python that runs Snakemake (its environment's scripts folder),
    so that every job runs the package this workflow was read with; else the one on PATH."""
    beside = Path(sys.executable).with_name("itmkit")
    found = str(beside) if beside.is_file() else shutil.which("itmkit")
    if found is None:
        raise WorkflowError(f"no `itmkit` command beside {sys.executable} nor on PATH: install the "
                            "package in this environment (pip install -e .) and run Snakemake from it")
    return found


ITMKIT = itmkit_command()

wildcard_constraints:
    dataset="coco|f30k|demo",
    split="train|val|test",
    chunk=r"\d{4}\d*",
    model=r"[a-z0-9_]+",


def flag(name, value):
    """``--name value`` for a shell line, the value quoted."""
    return f"{name} {shlex.quote(str(value))}"


def data(ds, *parts):
    """A path under the dataset folder, as a string (patterns keep their {wildcards})."""
    return str(ROOT.joinpath(ds, *parts))


DONE = {kind: data("{dataset}", ".workflow", f"{kind}.done") for kind in ("regions", "grid", "graphs")}
# the shard files of a rule's output, with {dataset}, {split} and {chunk} wildcards: Layout names them
SHARD = {kind: Layout(ROOT, "{dataset}").pattern(kind) for kind in ("regions", "grid", "graphs")}


@functools.cache
def manifest(ds):
    """The dataset's manifest with the config's paths applied (the ingest CLI gets the same).
    Read once per snakemake call: every job of the dataset asks for it (COCO plans 250 jobs)."""
    opts = {key: config.get(f"{ds}_{key}") or None for key in ("source_root", "images", "annotations")}
    return manifests.load(BASE / "manifests" / f"{ds}.yaml", source_root=opts["source_root"],
                          images_dir=opts["images"], annotations=opts["annotations"])


def ingest_flags(wc):
    ds = wc.dataset
    if ds == "demo":
        return " ".join([flag("--set", f"demo.images={config['demo_images']}"),
                         flag("--set", f"demo.seed={config['demo_seed']}"),
                         flag("--set", f"demo.image_size={config['demo_image_size']}"),
                         flag("--set", f"demo.scenes={config.get('demo_scenes', 'flat')}"), "--set expected=null"])
    flags = [flag(f"--{opt.replace('_', '-')}", config[f"{ds}_{key}"])
             for key, opt in (("source_root", "source_root"), ("images", "images_dir"),
                              ("annotations", "annotations")) if config.get(f"{ds}_{key}")]
    if not manifest(ds).images_dir.is_dir():
        flags.append("--without-images")  # text-only copy: captions, graphs and vocab still work
    return " ".join(flags)


def annotation_files(wc):
    if wc.dataset == "demo":
        return []
    files = [a["file"] for a in manifest(wc.dataset).annotation_files()]
    for f in files:
        if not f.exists():
            raise WorkflowError(f"{wc.dataset}: annotation file {f} not found; put it there or set "
                                f"--config {wc.dataset}_source_root=DIR or {wc.dataset}_annotations=FILE")
    return [str(f) for f in files]


def extractor_inputs(wc):
    """Weights and images must be there before anything runs: checked when the DAG is built."""
    if wc.dataset == "demo":
        return []
    weights = Path(config["weights"]).expanduser()
    if not weights.is_file():
        raise WorkflowError(
            f"extractor weights {weights} not found. Put the bottom-up Faster R-CNN weights "
            f"(ResNet-101, Visual Genome, detectron2 pickle) at {weights.resolve()}, or point to "
            f"them with --config weights=PATH (docs/workflow.md says where to get them)")
    images = manifest(wc.dataset).images_dir
    if not images.is_dir():
        raise WorkflowError(f"{wc.dataset}: image folder {images} not found; set --config "
                            f"{wc.dataset}_source_root=DIR or {wc.dataset}_images=DIR")
    return [str(weights)]


def setting(ds, key):
    """The demo has its own extractor settings (small generated images, CPU)."""
    return config.get(f"demo_{key}", config.get(key)) if ds == "demo" else config[key]


def extract_flags(*kinds):
    """Flags that decide what the shards of ``kinds`` hold. Grid shards get no box settings, so
    a change of boxes reruns only jobs that write region shards (and a job that writes both
    rewrites only the region shard: the grid one is still current)."""
    def flags(wc):
        ds = wc.dataset
        out = [flag("--weights", "random" if ds == "demo" else config["weights"]),
               flag("--shard-size", setting(ds, "shard_size")),
               flag("--min-size", setting(ds, "min_size")), flag("--max-size", setting(ds, "max_size"))]
        if config["extract_amp"]:
            out.append("--amp")
        if "regions" in kinds:
            out += [flag("--boxes", setting(ds, "boxes")), flag("--min-boxes", config["min_boxes"]),
                    flag("--max-boxes", config["max_boxes"]), flag("--conf-thresh", config["conf_thresh"]),
                    flag("--proposals", config["proposals"]), flag("--region-input", setting(ds, "region_input"))]
        if "grid" in kinds:
            out.append("--grid {} {}".format(*map(shlex.quote, map(str, config["grid_size"]))))
        return " ".join(out)
    return flags


class RunFlags:
    """How a job runs (device, batch size, workers, GPU levers), for its command line. Not a
    str: Snakemake's params trigger compares only params of plain types, so changing how a job
    runs does not rerun it (were it ever to, the CLI would find its shards current)."""

    def __init__(self, flags):
        self.flags = " ".join(flags)

    def __str__(self):
        return self.flags


def run_flags(wc):
    ds = wc.dataset
    out = [flag("--device", setting(ds, "device")), flag("--batch-size", config["extract_batch_size"]),
           flag("--workers", 0 if ds == "demo" else config["extract_workers"])]
    if gpus(wc):
        out.append(flag("--gpu-locks", GPU_LOCKS))
        out += [opt for key, opt in (("extract_channels_last", "--channels-last"),
                                     ("extract_cudnn_benchmark", "--cudnn-benchmark")) if config[key]]
    return RunFlags(out)


# the command of every extraction job; the rules differ in --kind, outputs and flags
EXTRACT = ("{ITMKIT:q} extract --dataset {wildcards.dataset} --root {ROOT:q} --kind {params.kind}"
           " --split {wildcards.split} --chunk {wildcards.chunk} {params.flags} {params.run}"
           " --threads {threads} --no-progress > {log:q} 2>&1")
# With several GPUs on one machine (--resources gpu=N), each extraction job takes a free one.
# GPUs belong to a machine, so their locks live in its temporary folder (not on a shared disk).
GPU_LOCKS = Path(tempfile.gettempdir()) / f"itmkit-gpu-locks-{os.getuid()}"
# target -> (its dataset, the feature kinds it needs); other targets (all, demo, a file name)
# count as needing both kinds of every dataset
TARGET_KINDS = {f"{prefix}_{ds}": (ds, kinds) for ds in REAL for prefix, kinds in (
    ("features", {"regions", "grid"}), ("train", {"regions", "grid"}), ("regions", {"regions"}),
    ("grid", {"grid"}), ("text", set()))}


def wanted_kinds(ds):
    """The feature kinds of ``ds`` that the targets of this snakemake call need."""
    kinds = set()
    for target in getattr(workflow.dag_settings, "targets", None) or ["all"]:
        name, needs = TARGET_KINDS.get(target, (ds, {"regions", "grid"}))
        if name == ds:
            kinds |= needs
    return kinds


def one_pass(wc):
    """Input of the one-pass rule `extract`: nothing when both kinds of the dataset are wanted.
    When only one is (`snakemake regions_coco`), a file no rule makes: Snakemake then drops
    `extract` from this DAG and takes `extract_regions` / `extract_grid`, as `ruleorder` says."""
    if {"regions", "grid"} <= wanted_kinds(wc.dataset):
        return []
    return [data(wc.dataset, ".workflow", "one-kind-only")]


def parse_flags(wc):
    return f"{flag('--model', config['spacy_model'])} {flag('--chunk-size', config['parse_chunk_size'])}"


def extract_shards(kind):
    """Gather: every shard of every split, at the dataset's shard size."""
    def shards_of(wc):
        ds = wc.dataset
        extractor_inputs(wc)  # fail before ingest runs when weights or images are missing
        checkpoints.ingest.get(dataset=ds)  # the plan is read from images.parquet
        return [str(p) for p in Layout(ROOT, ds).planned(kind, setting(ds, "shard_size"))]
    return shards_of


def graph_shards(wc):
    checkpoints.ingest.get(dataset=wc.dataset)  # the plan is read from captions.parquet
    return [str(p) for p in Layout(ROOT, wc.dataset).planned("graphs", config["parse_chunk_size"])]


def gpus(wc):
    return int(setting(wc.dataset, "device").startswith("cuda"))


def job_size(kind):
    """What a job asks of a cluster besides its threads and GPUs: ``mem_mb`` (MB) and ``runtime``
    (minutes) from the config's ``<kind>_mem_mb`` / ``<kind>_runtime``; a demo job, small
    whatever its kind, asks for ``demo_mem_mb`` / ``demo_runtime``. Local runs ignore both."""
    def resource(what):
        return lambda wc: config[f"demo_{what}" if wc.dataset == "demo" else f"{kind}_{what}"]
    return {"mem_mb": resource("mem_mb"), "runtime": resource("runtime")}


def run_dir(ds, model):
    return str(RUNS / f"{ds}-{model}")
