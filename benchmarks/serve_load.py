"""Latency of ``itmkit serve`` over HTTP on loopback: startup, a warm text query from one client,
and a bounded load test from several concurrent clients (p50/p95/p99 and errors).

    python benchmarks/serve_load.py RUN [--root R] [--requests 2000] [--clients 8] [-k 10]
           [--gallery 100000] [--index flat] [--texts 500] [--threads 1] [--seed 0]

The server is started as a subprocess (``--server``: ``itmkit serve``'s own app, run by uvicorn on
a free loopback port), so that the clients do not share its interpreter. The queries are the
split's captions sent as free text (``/api/search?q=``, each parsed by spaCy and encoded by the
run, as a typed query is): ``--texts`` of them drawn at random, sent in a seeded random order;
every answer is the page's (the top-k images with their region labels).

``--gallery N`` pads a two-tower run's image index to N vectors with random unit vectors
(float16-rounded, as exported embeddings are), to time the search over a gallery of that size;
a padded row is answered as the real image of row ``row % n_real``, so the response has the
size of a real one. ``--index`` chooses the FAISS index (flat: exact, the default; ivf, hnsw),
built over the padded gallery as ``itmkit serve`` builds it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np


def server(args) -> None:
    """The app of ``itmkit serve RUN`` (its gallery padded to --gallery), run by uvicorn."""
    import faiss
    import torch
    import uvicorn

    from itmkit.cli import build_parser
    from training import serve

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    argv = ["serve", args.run, "--device", "cpu", "--index", args.index]
    argv += ["--root", args.root] if args.root else []
    runs = serve.load_runs(build_parser(["serve"]).parse_args(argv))
    print(json.dumps({"load_s": time.perf_counter() - t0}), flush=True)
    if args.gallery:
        pad(runs[0].retriever.searcher("images"), args.gallery, args.seed)
    app = serve.make_app(runs)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def pad(search, n: int, seed: int) -> None:
    """Replace a two-tower searcher's index by one of ``n`` vectors, the real ones first, of the
    kind and settings it was built with (``--index``)."""
    from training.index import build_index

    real = np.load(Path(search.method["export"]) / "images.npy").astype(np.float32)
    extra = np.random.default_rng(seed).standard_normal((n - len(real), real.shape[1]), dtype=np.float32)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    t0 = time.perf_counter()
    index = build_index(np.concatenate([real, extra.astype(np.float16).astype(np.float32)]), search.cfg)
    print(json.dumps({"build_s": time.perf_counter() - t0}), flush=True)
    search.index, n_real, inner = index, len(real), search.search

    def padded(query, k):
        ranking = inner(query, k)
        ranking.rows = ranking.rows % n_real
        return ranking
    search.search = padded
    how = f"{search.method['method']} over {n} vectors ({n - n_real} synthetic)"
    search.method = {**search.method, "method": how}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """One keep-alive connection; ``get`` returns (seconds, status)."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def get(self, path: str) -> tuple[float, int, bytes]:
        t0 = time.perf_counter()
        try:
            self.conn.request("GET", path)
            r = self.conn.getresponse()
            body = r.read()
            return time.perf_counter() - t0, r.status, body
        except (OSError, http.client.HTTPException):
            self.conn.close()
            return time.perf_counter() - t0, 0, b""


def percentiles(seconds: list[float]) -> str:
    ms = np.asarray(seconds) * 1000
    return ("p50 {:.1f} ms, p95 {:.1f} ms, p99 {:.1f} ms, max {:.1f} ms".format(
        *np.percentile(ms, [50, 95, 99]), ms.max()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--root", default=None)
    p.add_argument("--requests", type=int, default=2000, help="requests of the load test")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients of the load test")
    p.add_argument("--warm", type=int, default=200, help="sequential requests of the one-client test")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--texts", type=int, default=500, help="captions drawn (with replacement) as the queries")
    p.add_argument("--gallery", type=int, default=0, help="pad the image index to N vectors (0: as is)")
    p.add_argument("--index", default="flat", help="two-tower runs: the FAISS index (flat, ivf, hnsw)")
    p.add_argument("--threads", type=int, default=1, help="torch and FAISS threads of the server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.server:
        server(args)
        return 0

    port = free_port()
    cmd = [sys.executable, __file__, "--server", "--port", str(port), args.run, "--gallery", str(args.gallery),
           "--threads", str(args.threads), "--seed", str(args.seed), "--index", args.index]
    cmd += ["--root", args.root] if args.root else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).parents[1])
    try:
        load = json.loads(proc.stdout.readline())["load_s"]
        build = json.loads(proc.stdout.readline())["build_s"] if args.gallery else 0.0
        client = Client(port)
        while client.get("/api/runs")[1] != 200:
            if proc.poll() is not None:
                raise SystemExit("serve_load: the server exited")
            time.sleep(0.05)
            client = Client(port)
        ready = time.perf_counter() - t0 - build
        info = json.loads(client.get("/api/runs")[2])["runs"][0]
        texts = [json.loads(client.get("/api/example")[2])["text"] for _ in range(args.texts)]
        rng = random.Random(args.seed)
        paths = [f"/api/search?k={args.k}&q={urllib.parse.quote(rng.choice(texts))}"
                 for _ in range(args.requests + args.warm + 20)]
        _, status, body = client.get(paths[0])
        answer = json.loads(body)["runs"][0]
        print(f"server: {info['name']} ({info['model']}, {info['images']} images of {info['dataset']}/"
              f"{info['split']}), search by {answer['search']['method']}; {args.threads} thread(s)")
        print(f"startup: {ready:.1f} s until the first answer to /api/runs (process start, imports, load "
              f"and warm-up: {load:.1f} s of it in load_runs"
              + (f"; building the padded index took {build:.1f} s more, not counted)" if args.gallery else ")"))
        for path in paths[1:20]:   # warm-up
            client.get(path)
        seq = [client.get(path) for path in paths[20:20 + args.warm]]
        errors = sum(s != 200 for _, s, _ in seq)
        print(f"one client, {len(seq)} sequential text queries (k={args.k}): "
              f"{percentiles([t for t, _, _ in seq])}; errors {errors}")

        todo, lock, results = list(paths[20 + args.warm:]), threading.Lock(), []

        def worker():
            c = Client(port)
            while True:
                with lock:
                    if not todo:
                        return
                    path = todo.pop()
                t, s, _ = c.get(path)
                with lock:
                    results.append((t, s))
        threads = [threading.Thread(target=worker) for _ in range(args.clients)]
        t1 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t1
        errors = sum(s != 200 for _, s in results)
        print(f"load: {len(results)} requests from {args.clients} concurrent clients in {wall:.1f} s "
              f"({len(results) / wall:.0f} requests/s): {percentiles([t for t, _ in results])}; errors {errors}")
        return 1 if errors else 0
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
