"""Precision / recall / F1 of the scene-graph parser against the hand-written gold captions, next
to SceneGraphParser on the same captions, and the captions/s of both.

    python benchmarks/parse_quality.py [--gold FILE ...] [--model NAME] [--repeat 5] [--no-peer] [-v]

The gold sets are tests/data/scene_graph_gold.jsonl (dev: the rules were written looking at it)
and tests/data/scene_graph_gold_heldout.jsonl (held out: not looked at while writing rules);
tests/data/scene_graph_gold.md says how they were made. Objects are compared by head,
attributes as (object head, attribute), relations as (subject head, predicate, object head);
each as a multiset per caption, summed over captions. "attributes w/o count" leaves out the
count attribute itmkit gives plain plurals ("several"), which SceneGraphParser does not make;
"relation pairs" compares (subject, object) only, whatever the predicate's wording (itmkit
writes "ride on" where SceneGraphParser writes "on").

SceneGraphParser (``pip install SceneGraphParser``) is optional: without it only itmkit's
figures are printed. Its graphs are read as: objects = entity ``lemma_head``, attributes = its
``amod`` and ``nummod`` modifiers (``lemma_span``; numbers as written), relations =
``lemma_relation``. Speed: both parse the same captions in this one process on one thread,
after their models are loaded; itmkit through ``sgparse.parse_texts`` (``nlp.pipe`` without
the components it does not read), SceneGraphParser through its ``parse`` (one ``nlp(text)`` with
the full model per caption, as it works).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

from pipeline import sgparse  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
GOLD = DATA / "scene_graph_gold.jsonl"
HELDOUT = DATA / "scene_graph_gold_heldout.jsonl"
PARTS = ("objects", "attributes", "attributes w/o count", "relations", "relation pairs")


def read_gold(path=GOLD) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def predicted_sets(graph: sgparse.Graph) -> dict:
    return {"objects": Counter(h for h, _, _ in graph.objects),
            "attributes": Counter(graph.named_attributes()),
            "relations": Counter(graph.triples())}


def gold_sets(item: dict) -> dict:
    return {"objects": Counter(item["objects"]),
            "attributes": Counter(tuple(a) for a in item["attributes"]),
            "relations": Counter(tuple(r) for r in item["relations"])}


def _without_count(attrs: Counter) -> Counter:
    return Counter({k: v for k, v in attrs.items() if k[1] != sgparse.PLURAL_ATTRIBUTE})


def _pairs(relations: Counter) -> Counter:
    out = Counter()
    for (s, _, o), n in relations.items():
        out[(s, o)] += n
    return out


def _derived(sets: dict) -> dict:
    return dict(sets, **{"attributes w/o count": _without_count(sets["attributes"]),
                         "relation pairs": _pairs(sets["relations"])})


def score(gold: list[dict], predicted: list) -> dict:
    """{part: {precision, recall, f1, tp, predicted, gold}} over all captions; ``predicted`` holds
    a Graph or a ``predicted_sets``-style dict per caption."""
    totals = {k: Counter() for k in PARTS}
    for item, got in zip(gold, predicted):
        want = _derived(gold_sets(item))
        got = _derived(predicted_sets(got) if isinstance(got, sgparse.Graph) else got)
        for k in totals:
            totals[k]["tp"] += sum((want[k] & got[k]).values())
            totals[k]["predicted"] += sum(got[k].values())
            totals[k]["gold"] += sum(want[k].values())
    out = {}
    for k, t in totals.items():
        p = t["tp"] / t["predicted"] if t["predicted"] else 1.0
        r = t["tp"] / t["gold"] if t["gold"] else 1.0
        out[k] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, **t}
    return out


# -- SceneGraphParser, read into the same sets

def load_peer(model: str):
    """SceneGraphParser's parser on ``model``, or None when it is not installed."""
    try:
        import sng_parser
    except ImportError:
        return None
    return sng_parser.Parser("spacy", model=model)


def peer_sets(graph: dict) -> dict:
    ents = graph["entities"]
    heads = [e["lemma_head"].lower() for e in ents]
    attrs = Counter()
    for head, e in zip(heads, ents):
        for m in e["modifiers"]:
            if m["dep"] == "amod":
                attrs[(head, m["lemma_span"].lower())] += 1
            elif m["dep"] == "nummod":
                attrs[(head, m["span"].lower())] += 1
    rels = Counter((heads[r["subject"]], r["lemma_relation"].lower(), heads[r["object"]])
                   for r in graph["relations"])
    return {"objects": Counter(heads), "attributes": attrs, "relations": rels}


def captions_per_second(parsers: dict, texts: list[str], repeat: int) -> dict:
    """Captions/s of each parser (a function of a list of texts), passes taken in turn so that
    a change of machine load falls on all of them alike."""
    seconds = dict.fromkeys(parsers, 0.0)
    for parse_all in parsers.values():
        parse_all(texts[:20])  # warm-up
    for _ in range(repeat):
        for name, parse_all in parsers.items():
            start = time.perf_counter()
            parse_all(texts)
            seconds[name] += time.perf_counter() - start
    return {name: repeat * len(texts) / s for name, s in seconds.items()}


def print_table(name: str, scores: dict) -> None:
    for k, s in scores.items():
        print(f"  {name:16s} {k:21s} {s['precision']:9.3f} {s['recall']:7.3f} {s['f1']:6.3f}   "
              f"{s['tp']}/{s['predicted']}/{s['gold']}")


def print_differences(gold: list[dict], graphs: list) -> None:
    for item, graph in zip(gold, graphs):
        want, got = gold_sets(item), predicted_sets(graph)
        diff = {k: (sorted((want[k] - got[k]).elements()), sorted((got[k] - want[k]).elements()))
                for k in want if want[k] != got[k]}
        if diff:
            print(item["caption"])
            for k, (missed, extra) in diff.items():
                print(f"   {k:10s} missed {missed}  extra {extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gold", action="append", default=None,
                    help="a gold .jsonl (repeatable; default: the dev and the held-out set)")
    ap.add_argument("--model", default=sgparse.DEFAULT_MODEL)
    ap.add_argument("--repeat", type=int, default=5, help="passes over the captions for the speed figures")
    ap.add_argument("--no-peer", action="store_true", help="leave SceneGraphParser out")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every caption itmkit gets wrong")
    args = ap.parse_args()

    sets = {Path(p).stem: read_gold(p) for p in (args.gold or [GOLD, HELDOUT])}
    model = sgparse.resolve_model(args.model)
    nlp = sgparse.load_model(args.model)
    peer = None if args.no_peer else load_peer(model)
    if peer is None and not args.no_peer:
        print("SceneGraphParser is not installed (pip install SceneGraphParser): itmkit's figures only")
    print(f"model {model} {sgparse.model_version(model)}, itmkit parser v{sgparse.PARSER_VERSION}"
          + (", SceneGraphParser on the same model" if peer else ""))
    print(f"  {'gold / parser':16s} {'part':21s} {'precision':>9s} {'recall':>7s} {'F1':>6s}   tp/pred/gold")
    everything = []
    for name, gold in sets.items():
        texts = [g["caption"] for g in gold]
        everything += texts
        graphs = list(sgparse.parse_texts(nlp, texts))
        if args.verbose:
            print_differences(gold, graphs)
        print(f"{name}: {len(gold)} captions")
        print_table("itmkit", score(gold, graphs))
        if peer is not None:
            print_table("SceneGraphParser", score(gold, [peer_sets(peer.parse(t)) for t in texts]))

    parsers = {"itmkit": lambda ts: list(sgparse.parse_texts(nlp, ts))}
    if peer is not None:
        parsers["SceneGraphParser"] = lambda ts: [peer.parse(t) for t in ts]
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rates = captions_per_second(parsers, everything, args.repeat)
    print(f"speed on the {len(everything)} gold captions x {args.repeat}, one process, one thread, passes "
          f"in turn (load before: {load.split('load average: ')[-1]})")
    for name, r in rates.items():
        print(f"  {name:16s}  {r:8,.0f} captions/s")
    if peer is not None:
        print(f"  itmkit / SceneGraphParser: {rates['itmkit'] / rates['SceneGraphParser']:.2f}x")


if __name__ == "__main__":
    main()
