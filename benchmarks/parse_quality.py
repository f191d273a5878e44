"""Precision / recall / F1 of the scene-graph parser against the hand-written gold captions.

    python benchmarks/parse_quality.py [--gold tests/data/scene_graph_gold.jsonl] [--model NAME] [-v]

Objects are compared by head, attributes as (object head, attribute), relations as (subject
head, predicate, object head); each as a multiset per caption, summed over captions.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from pipeline import sgparse

GOLD = Path(__file__).resolve().parents[1] / "tests" / "data" / "scene_graph_gold.jsonl"


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


def score(gold: list[dict], graphs: list[sgparse.Graph]) -> dict:
    """{part: {precision, recall, f1, tp, predicted, gold}} over all captions."""
    totals = {k: Counter() for k in ("objects", "attributes", "relations")}
    for item, graph in zip(gold, graphs):
        want, got = gold_sets(item), predicted_sets(graph)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gold", default=str(GOLD))
    ap.add_argument("--model", default=sgparse.DEFAULT_MODEL)
    ap.add_argument("-v", "--verbose", action="store_true", help="print every caption with a difference")
    args = ap.parse_args()
    gold = read_gold(args.gold)
    nlp = sgparse.load_model(args.model)
    graphs = list(sgparse.parse_texts(nlp, [g["caption"] for g in gold]))
    if args.verbose:
        for item, graph in zip(gold, graphs):
            want, got = gold_sets(item), predicted_sets(graph)
            diff = {k: (sorted((want[k] - got[k]).elements()), sorted((got[k] - want[k]).elements()))
                    for k in want if want[k] != got[k]}
            if diff:
                print(item["caption"])
                for k, (missed, extra) in diff.items():
                    print(f"   {k:10s} missed {missed}  extra {extra}")
    print(f"{len(gold)} gold captions, model {sgparse.resolve_model(args.model)}, parser v{sgparse.PARSER_VERSION}")
    print(f"{'':12s} {'precision':>9s} {'recall':>7s} {'F1':>6s}   tp/pred/gold")
    for k, s in score(gold, graphs).items():
        print(f"{k:12s} {s['precision']:9.3f} {s['recall']:7.3f} {s['f1']:6.3f}   "
              f"{s['tp']}/{s['predicted']}/{s['gold']}")


if __name__ == "__main__":
    main()
