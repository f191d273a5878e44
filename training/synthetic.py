"""A small synthetic dataset written with the real shard writers, for tests and benchmarks.

Each image holds 2-3 objects, each a (colour, shape); its region features are the sum of a fixed
random vector per colour and per shape plus noise, so captions ("a red circle left of a blue
square") are genuinely predictable from the regions and a model can learn. Every image has five
captions with their scene graphs, a vocabulary, and everything is registered in shards.json.
Pairs of test images that differ only in which colour goes with which shape are listed in
hard_negatives.parquet (kind ``attribute``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from pipeline import shards
from pipeline.shards import Layout, Regions, RegionShardWriter

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "heart", "cross", "moon", "ring"]
RELATIONS = ["left of", "above", "near"]
CONFIG = {"generator": "training.synthetic", "version": 1}


def _scene(rng, n_obj):
    return [(str(rng.choice(COLOURS)), str(rng.choice(SHAPES))) for _ in range(n_obj)]


def _caption(rng, scene):
    """Tokens and graph of one caption about two of the scene's objects."""
    a, b = rng.choice(len(scene), 2, replace=False)
    rel = str(rng.choice(RELATIONS))
    (ca, sa), (cb, sb) = scene[a], scene[b]
    tokens = ["a", ca, sa] + rel.split() + ["a", cb, sb]
    objects = [{"head": sa, "span": f"{ca} {sa}", "token_index": 2},
               {"head": sb, "span": f"{cb} {sb}", "token_index": len(tokens) - 1}]
    attributes = [{"object": 0, "attribute": ca}, {"object": 1, "attribute": cb}]
    relations = [{"subject": 0, "predicate": rel, "object": 1}]
    if rng.random() < 0.2:  # some captions with no relation, one object
        tokens, objects, attributes, relations = ["a", ca, sa], objects[:1], attributes[:1], []
    return tokens, objects, attributes, relations


def make_dataset(root, name: str = "synth", splits: dict[str, int] | None = None, *,
                 dim: int = shards.FEATURE_DIM, boxes: int = 6, seed: int = 0, noise: float = 0.5,
                 images_per_shard: int = 1000, nan_boxes: bool = False, grid_hw=None) -> Layout:
    splits = splits or {"train": 200, "val": 50, "test": 50}
    rng = np.random.default_rng(seed)
    layout = Layout(Path(root), name)
    index = layout.index
    chash = shards.config_hash(dict(CONFIG, dim=dim, boxes=boxes, seed=seed))
    colour_vec = {c: rng.normal(0, 1, dim) for c in COLOURS}
    shape_vec = {s: rng.normal(0, 1, dim) for s in SHAPES}

    images, captions, graphs, hard = [], [], [], []
    image_id, caption_id = 0, 0
    for split, n in splits.items():
        scenes = []
        for i in range(n):
            if split == "test" and i % 2 == 1:  # partner of the previous image: colours swapped
                prev = scenes[-1]
                scene = [(prev[1][0], prev[0][1]), (prev[0][0], prev[1][1])] + prev[2:]
                hard.append({"image_id": image_id - 1, "partner_id": image_id, "kind": "attribute"})
            else:
                scene = _scene(rng, int(rng.integers(2, 4)))
            scenes.append(scene)
            images.append({"image_id": image_id, "path": f"{image_id}.png", "split": split,
                           "width": 640, "height": 480})
            for _ in range(5):
                tokens, objects, attributes, relations = _caption(rng, scene)
                captions.append({"caption_id": caption_id, "image_id": image_id, "split": split,
                                 "text": " ".join(tokens)})
                graphs.append({"caption_id": caption_id, "tokens": tokens, "lemmas": tokens,
                               "objects": objects, "attributes": attributes, "relations": relations})
                caption_id += 1
            image_id += 1
        first_id = image_id - n
        for k, start in enumerate(range(0, n, images_per_shard)):
            path = layout.regions(split, k)
            with RegionShardWriter(path, boxes_per_chunk=boxes, attrs={"config": CONFIG}) as w:
                for i in range(start, min(n, start + images_per_shard)):
                    w.append(_regions(rng, first_id + i, scenes[i], dim, boxes, noise,
                                      colour_vec, shape_vec, nan_boxes))
            index.register("regions", path, rows=min(n, start + images_per_shard) - start,
                           config_hash=chash)
            if grid_hw is not None:
                gpath = layout.grid(split, k)
                ids = np.arange(first_id + start, first_id + min(n, start + images_per_shard))
                feats = rng.normal(0, 1, (len(ids), grid_hw[0] * grid_hw[1], dim))
                shards.write_grid(gpath, ids, feats, grid_hw)
                index.register("grid", gpath, rows=len(ids), config_hash=chash)

    shards.write_table(layout.images, images, "images")
    index.register("images", layout.images, rows=len(images), config_hash=chash)
    shards.write_table(layout.captions, captions, "captions")
    index.register("captions", layout.captions, rows=len(captions), config_hash=chash)
    half = len(graphs) // 2
    for k, part in enumerate((graphs[:half], graphs[half:])):
        shards.write_table(layout.graphs(k), part, "graphs")
        index.register("graphs", layout.graphs(k), rows=len(part), config_hash=chash)
    shards.write_table(layout.hard_negatives, hard or {"image_id": [], "partner_id": [], "kind": []},
                       "hard_negatives")
    index.register("hard_negatives", layout.hard_negatives, rows=len(hard), config_hash=chash)

    train_ids = {c["caption_id"] for c in captions if c["split"] == "train"}
    words = Counter(t for g in graphs if g["caption_id"] in train_ids for t in g["tokens"])
    preds = Counter(r["predicate"] for g in graphs for r in g["relations"])
    attrs = Counter(a["attribute"] for g in graphs for a in g["attributes"])
    vocab = {"words": [[w, 0] for w in shards.VOCAB_SPECIALS] + sorted(words.items()),
             "min_count": 1, "predicates": sorted(preds.items()), "attributes": sorted(attrs.items())}
    shards.write_vocab(layout.vocab, vocab)
    index.register("vocab", layout.vocab, rows=len(vocab["words"]), config_hash=chash)
    return layout


def _regions(rng, image_id, scene, dim, boxes, noise, colour_vec, shape_vec, nan_boxes):
    feats = rng.normal(0, noise, (boxes, shards.FEATURE_DIM))
    for k, (c, s) in enumerate(scene[:boxes]):  # the first ``dim`` feature channels carry the scene
        feats[k, :dim] += colour_vec[c] + shape_vec[s]
    xy = rng.uniform(0, 400, (boxes, 2))
    wh = rng.uniform(20, 200, (boxes, 2))
    box = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    if nan_boxes:
        box[:] = np.nan
    return Regions(image_id, (480, 640), feats.astype(np.float16), box)
