"""Retrieval latency per query of a two-tower model over a synthetic gallery: FAISS's exact
inner-product index against brute force in torch on the same embeddings, and the approximate
IVF and HNSW indexes of ``training/retrieve.py`` (build time, latency, recall@10 against exact).

    python benchmarks/retrieval_latency.py [--model vsepp] [--galleries 1000,100000] [--queries 200]
           [--threads 1] [--nprobe 1,8,32] [--ef-search 16,64,256] [--set KEY=VALUE]

The gallery is the model's image embeddings of synthetic images (random region features, 36
boxes), rounded to float16 as ``training/export.py`` stores them; the queries are its text
embeddings of random captions of 8-16 words (``training.synthetic``). The model has its default
(paper-size) config unless changed with --set, and seeded random weights: what is measured is
the search over N vectors of its embedding size, which does not depend on training. Random
features give embeddings without cluster structure, and random captions are far from every
image: the hard case for approximate search (in such a gallery the ten best are barely better
than the next hundred). The last column is the case of a query with a good match: "near"
queries, each a gallery vector moved by Gaussian noise to cosine 0.7 from where it was (the
score of a matching pair of a trained model is of that order); it gives how often the index
returns that vector in its top 10 (the exact index: always).

Each query is searched alone (a batch of one, as a user's query comes), after a few warm-up
queries; the text encoding of a query is timed separately, once per query. Indexes are built
with ``retrieve.build_index``, the code the command line uses.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
import torch

from training import models, retrieve
from training.config import parse_shared_overrides
from training.data import ImageBatch
from training.synthetic import random_caption_batches, random_vocab

K = 10


def synthetic_images(n: int, boxes: int, dim: int, seed: int) -> ImageBatch:
    """A batch of ``n`` images with random region features and boxes (made in torch: a 100K
    gallery is 7 billion feature values)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, boxes, 2, generator=g) * 0.7
    return ImageBatch(regions=torch.randn(n, boxes, dim, generator=g),
                      boxes=torch.cat([xy, xy + 0.05 + torch.rand(n, boxes, 2, generator=g) * 0.25], -1).clamp(0, 1),
                      region_mask=torch.ones(n, boxes, dtype=torch.bool),
                      boxes_known=torch.ones(n, dtype=torch.bool),
                      image_hw=torch.tensor([[480, 640]]).repeat(n, 1),
                      image_ids=torch.arange(n))


@torch.no_grad()
def gallery(model, n: int, boxes: int, batch: int = 1000) -> np.ndarray:
    dim = getattr(model.cfg, "feature_dim", 2048)
    parts = [model.encode_image(synthetic_images(min(batch, n - s), boxes, dim, seed=s)) for s in range(0, n, batch)]
    return torch.cat(parts).numpy().astype(np.float16).astype(np.float32)


def timed(fn, queries: np.ndarray, warmup: int = 5) -> tuple[list, np.ndarray]:
    """Run ``fn`` on each query alone; (results, seconds per query)."""
    for q in queries[:warmup]:
        fn(q[None])
    out, secs = [], []
    for q in queries:
        t0 = time.perf_counter()
        out.append(fn(q[None]))
        secs.append(time.perf_counter() - t0)
    return out, np.array(secs)


def near_queries(vectors: np.ndarray, n: int, cosine: float = 0.7, seed: int = 0):
    """``n`` gallery rows, and their vectors moved by Gaussian noise to about ``cosine`` from
    where they were."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(vectors), n, replace=False)
    sigma = np.sqrt((1 / cosine ** 2 - 1) / vectors.shape[1])
    q = vectors[rows] + rng.normal(0, sigma, (n, vectors.shape[1])).astype(np.float32)
    return rows, q / np.linalg.norm(q, axis=1, keepdims=True)


def found_own(index, rows: np.ndarray, queries: np.ndarray) -> str:
    top = index.search(queries, K)[1]
    return f"{100 * np.mean([r in t for r, t in zip(rows, top)]):.1f} %"


def recall(found: list, exact: list) -> float:
    return float(np.mean([len(set(f[:K]) & set(e[:K])) / K for f, e in zip(found, exact)]))


def row(n, method, build, secs, rec, near) -> str:
    ms = 1000 * secs
    return (f"| {n:,} | {method} | {build} | {np.median(ms):.3f} | {np.percentile(ms, 95):.3f} | "
            f"{rec} | {near} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vsepp", help="a two-tower model (default: %(default)s)")
    p.add_argument("--galleries", default="1000,100000", help="gallery sizes (default: %(default)s)")
    p.add_argument("--queries", type=int, default=200, help="queries timed per method (default: %(default)s)")
    p.add_argument("--boxes", type=int, default=36, help="regions per synthetic image (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch and FAISS threads (default: %(default)s)")
    p.add_argument("--nprobe", default="1,8,32", help="IVF clusters searched, a list (default: %(default)s)")
    p.add_argument("--ef-search", default="16,64,256", help="HNSW search list sizes (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override (default: none, the model's defaults)")
    args = p.parse_args(argv)
    cls = models.get(args.model)
    if not cls.two_tower:
        raise SystemExit(f"retrieval_latency: {args.model} is not a two-tower model")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab = random_vocab()
    model = models.build(args.model, parse_shared_overrides(args.set, cls.config_class), vocab).eval()

    with torch.no_grad():
        batches = random_caption_batches(args.queries, vocab, 1)
        enc_secs, queries = [], []
        for b in batches:
            t0 = time.perf_counter()
            queries.append(model.encode_text(b))
            enc_secs.append(time.perf_counter() - t0)
    queries = torch.cat(queries).numpy()
    enc_ms = 1000 * np.array(enc_secs)
    print(f"retrieval_latency: {args.model} (embedding {queries.shape[1]}), {args.queries} queries one "
          f"at a time, top {K}, {args.threads} thread(s); encoding a query: median {np.median(enc_ms):.2f} ms, "
          f"p95 {np.percentile(enc_ms, 95):.2f} ms", flush=True)
    print("\n| gallery | method | build s | median ms / query | p95 ms | recall@10 vs exact | "
          "near queries: own vector in top 10 |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for n in (int(v) for v in args.galleries.split(",")):
        t0 = time.perf_counter()
        vectors = gallery(model, n, args.boxes)
        made = time.perf_counter() - t0
        g = torch.from_numpy(vectors)
        brute, secs = timed(lambda q: torch.topk(g @ torch.from_numpy(q[0]), K).indices.numpy(), queries)
        print(row(n, "brute force, torch (`g @ q`, `topk`)", "–", secs, "–", "–"))
        t0 = time.perf_counter()
        flat = retrieve.build_index(vectors, retrieve.IndexConfig("flat"))
        build = time.perf_counter() - t0
        exact, secs = timed(lambda q: flat.search(q, K)[1][0], queries)
        agree = recall(exact, brute)
        near = near_queries(vectors, min(args.queries, n))
        print(row(n, "FAISS exact (`--index flat`)", f"{build:.2f}", secs, f"{100 * agree:.1f} % vs torch",
                  found_own(flat, *near)))
        for kind, knob, values in (("ivf", "nprobe", args.nprobe), ("hnsw", "ef_search", args.ef_search)):
            t0 = time.perf_counter()
            cfg = retrieve.IndexConfig(kind)
            index = retrieve.build_index(vectors, cfg)
            build = time.perf_counter() - t0
            extra = f"nlist {index.nlist}, " if kind == "ivf" else f"M {cfg.hnsw_m}, efConstruction {cfg.ef_construction}, "
            for v in (int(x) for x in values.split(",")):
                setattr(cfg, knob, v)
                retrieve.INDEXES[kind].tune(index, cfg)
                found, secs = timed(lambda q: index.search(q, K)[1][0], queries)
                print(row(n, f"FAISS {kind.upper()} ({extra}{knob.replace('_', '')} {v})", f"{build:.2f}", secs,
                          f"{100 * recall(found, exact):.1f} %", found_own(index, *near)), flush=True)
        print(f"| {n:,} | (gallery of synthetic images encoded in {made:.1f} s) | | | | | |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
