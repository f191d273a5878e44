"""Caption parsing throughput: a per-caption loop vs the itmkit pipeline vs bare ``nlp.pipe``,
and the pipeline on 1 vs 2 dask workers.

    python benchmarks/parse.py [--captions 4000] [--model en_core_web_sm] [--skip-dask]

All single-process figures run on one core (BLAS threads pinned to 1) with the same model, on
the same synthetic COCO-like captions, after the model is loaded (load time is not counted):

* ``loop, full model``: ``nlp(text)`` per caption with every component loaded, then the graph
  rules, which is how SceneGraphParser parses;
* ``loop, same components``: the same loop without the components the parser never reads;
* ``bare nlp.pipe``: batched spaCy with the parser's components, no graph rules, no output;
* ``itmkit pipeline``: ``nlp.pipe`` + graph rules + Parquet chunk writing + shards.json;
* ``dask N workers``: the pipeline's chunks on a local cluster of N worker processes (models
  loaded on every worker before timing).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import spacy  # noqa: E402

from pipeline import parse, sgparse, shards  # noqa: E402

PEOPLE = ["man", "woman", "boy", "girl", "child", "person", "skier", "surfer", "player", "chef"]
ANIMALS = ["dog", "cat", "horse", "giraffe", "elephant", "zebra", "bird", "cow", "sheep", "bear"]
THINGS = ["frisbee", "kite", "umbrella", "surfboard", "tennis racket", "pizza", "laptop",
          "skateboard", "cake", "phone", "ball", "bicycle", "teddy bear", "suitcase"]
PLACES = ["beach", "field", "street", "kitchen", "park", "table", "couch", "bench", "snow",
          "water", "road", "grass", "sidewalk", "living room", "fire hydrant"]
ADJS = ["red", "white", "black", "small", "large", "young", "old", "blue", "wooden", "brown",
        "green", "tall", "little", "yellow"]
VERBS = ["holding", "riding", "carrying", "throwing", "eating", "looking at", "playing with",
         "flying", "pulling", "watching"]
STANDS = ["sitting on", "standing in", "lying on", "walking down", "standing next to",
          "sitting in front of", "running across", "parked on", "waiting at"]
PREPS = ["on", "in", "near", "next to", "in front of", "on top of", "under", "with", "by"]
NUMS = ["two", "three", "four", "several", "a group of", "a couple of"]


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    """COCO-like captions from templates (varied length, constructions and vocabulary)."""
    rng = random.Random(seed)

    def np_(nouns, adj_p=0.4):
        adj = rng.choice(ADJS) + " " if rng.random() < adj_p else ""
        word = adj + rng.choice(nouns)
        return ("an " if word[0] in "aeiou" else "a ") + word

    subj = lambda: np_(PEOPLE + ANIMALS)  # noqa: E731
    templates = [
        lambda: f"{subj()} {rng.choice(VERBS)} {np_(THINGS)} {rng.choice(PREPS)} {np_(PLACES)}.",
        lambda: f"{subj()} {rng.choice(STANDS)} {np_(PLACES)}.",
        lambda: f"{rng.choice(NUMS)} {rng.choice(ANIMALS)}s {rng.choice(STANDS)} {np_(PLACES)}.",
        lambda: f"{subj()} and {subj()} {rng.choice(STANDS)} {np_(PLACES)} with {np_(THINGS)}.",
        lambda: f"{np_(THINGS)} {rng.choice(PREPS)} {np_(PLACES)}.",
        lambda: f"{subj()} that is {rng.choice(VERBS)} {np_(THINGS)}.",
        lambda: f"{np_(THINGS)} being held by {subj()} {rng.choice(STANDS)} {np_(PLACES)}.",
        lambda: f"there is {subj()} {rng.choice(VERBS)} {np_(THINGS)} in the {rng.choice(PLACES)}.",
    ]
    return [rng.choice(templates)().capitalize() for _ in range(n)]


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_loop(nlp, texts) -> float:
    start = time.perf_counter()
    for t in texts:
        sgparse.parse_doc(nlp(t))
    return rate(len(texts), time.perf_counter() - start)


def bench_pipe(nlp, texts, batch_size) -> float:
    start = time.perf_counter()
    for _ in nlp.pipe(texts, batch_size=batch_size):
        pass
    return rate(len(texts), time.perf_counter() - start)


def make_dataset(root: Path, texts: list[str]) -> shards.Layout:
    layout = shards.Layout(root, "bench")
    rows = [{"caption_id": i, "image_id": i // 5, "split": "train", "text": t} for i, t in enumerate(texts)]
    shards.write_table(layout.captions, rows, "captions")
    return layout


def bench_pipeline(root: Path, texts, cfg: parse.ParseConfig, client=None) -> float:
    layout = make_dataset(root, texts)
    _, todo, _, _ = parse.plan(layout, cfg)
    start = time.perf_counter()
    parse.run_tasks(todo, cfg, progress=False, client=client)
    return rate(len(texts), time.perf_counter() - start)


def _load_model(name: str) -> list[str]:
    return list(parse._model(name).pipe_names)  # the pipeline itself stays on the worker


def bench_dask(root: Path, texts, cfg: parse.ParseConfig, workers: int) -> float:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(_load_model, cfg.model)  # load the model on every worker before timing
        return bench_pipeline(root, texts, cfg, client=client)


def load_average() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", type=int, default=4000)
    ap.add_argument("--loop-captions", type=int, default=1500, help="captions for the slow loops")
    ap.add_argument("--model", default=sgparse.DEFAULT_MODEL)
    ap.add_argument("--batch-size", type=int, default=parse.ParseConfig.batch_size)
    ap.add_argument("--skip-dask", action="store_true")
    args = ap.parse_args()

    texts = synthetic_captions(args.captions)
    model = sgparse.resolve_model(args.model)
    full = spacy.load(model)
    nlp = parse._model(args.model)  # the pipeline's own (components it does not read left out)
    print(f"model {model} {sgparse.model_version(model)}, spaCy {spacy.__version__}; "
          f"pipeline components {nlp.pipe_names} (full model adds "
          f"{[c for c in full.pipe_names if c not in nlp.pipe_names]})")
    print(f"load before: {load_average()}")
    bench_pipe(nlp, texts[:200], args.batch_size)  # warm-up
    cfg = parse.ParseConfig(model=args.model, chunk_size=max(1, args.captions // 8),
                            batch_size=args.batch_size)
    res = {}
    res["loop, full model"] = bench_loop(full, texts[:args.loop_captions])
    res["loop, same components"] = bench_loop(nlp, texts[:args.loop_captions])
    res["bare nlp.pipe"] = bench_pipe(nlp, texts, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        res["itmkit pipeline (1 process)"] = bench_pipeline(Path(tmp) / "p", texts, cfg)
        if not args.skip_dask:
            for w in (1, 2):
                res[f"dask {w} worker(s)"] = bench_dask(Path(tmp) / f"d{w}", texts, cfg, w)
    print(f"load after:  {load_average()}")
    print(f"{'method':30s} {'captions/s':>10s}")
    for k, v in res.items():
        print(f"{k:30s} {v:10,.0f}")
    pipe, ours, loop = res["bare nlp.pipe"], res["itmkit pipeline (1 process)"], res["loop, full model"]
    print(f"pipeline / per-caption loop (full model): {ours / loop:.2f}x (goal >= 3)")
    print(f"pipeline / per-caption loop (same components): {ours / res['loop, same components']:.2f}x")
    print(f"pipeline / bare nlp.pipe: {ours / pipe:.2f} (goal >= 0.8)")
    if not args.skip_dask:
        print(f"dask 2 workers / 1 worker: {res['dask 2 worker(s)'] / res['dask 1 worker(s)']:.2f}x "
              f"(goal near 2; needs 2 idle cores)")


if __name__ == "__main__":
    main()
