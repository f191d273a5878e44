"""A small synthetic dataset written with the real shard writers, for tests and benchmarks, and
random batches (no files) for the speed benchmarks.

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
from pipeline.shards import VOCAB_SPECIALS, Layout, Regions, RegionShardWriter, Vocabulary
from training.data import collate_images, collate_text

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


# ---------------------------------------------------------------------------------------------
# random batches: what speed benchmarks score (the values do not matter, the shapes do)

def random_vocab(words: int = 5000) -> Vocabulary:
    return Vocabulary({"words": [[w, 0] for w in VOCAB_SPECIALS] + [[f"w{i}", 1] for i in range(words)],
                       "min_count": 1, "predicates": [[f"p{i}", 1] for i in range(50)],
                       "attributes": [[f"a{i}", 1] for i in range(100)]})


def random_image_batches(n: int, boxes: int, feature_dim: int, batch: int, grid_hw=None, seed: int = 0):
    """Collated ``ImageBatch``es of ``n`` images with ``boxes`` random boxes and features (and a
    random grid of ``grid_hw`` cells when given)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        xy = rng.uniform(0, 0.7, (boxes, 2))
        grid = {} if grid_hw is None else {
            "grid": rng.normal(0, 1, (grid_hw[0] * grid_hw[1], feature_dim)).astype(np.float16),
            "grid_hw": grid_hw}
        items.append({"image_id": i, "image_hw": (480, 640), "boxes_known": True, **grid,
                      "features": rng.normal(0, 1, (boxes, feature_dim)).astype(np.float16),
                      "boxes": np.concatenate([xy, xy + rng.uniform(0.05, 0.3, (boxes, 2))], 1)
                      .clip(0, 1).astype(np.float32)})
    return [collate_images(items[s:s + batch]) for s in range(0, n, batch)]


def random_caption_batches(n: int, vocab: Vocabulary, batch: int, seed: int = 1):
    """Collated ``TextBatch``es of ``n`` captions of 8-16 random words (12 on average, as in
    Flickr30K) with three objects, two attributes and two relations each."""
    rng = np.random.default_rng(seed)
    items = []
    for j in range(n):
        length = int(rng.integers(8, 17))
        tokens = np.array([vocab.stoi["<start>"]] + list(rng.integers(len(VOCAB_SPECIALS), len(vocab), length))
                          + [vocab.stoi["<end>"]])
        objs = np.sort(rng.choice(np.arange(1, length + 1), 3, replace=False))
        items.append({"caption_id": j, "image_id": j // 5, "tokens": tokens,
                      "obj_index": objs, "obj_word": tokens[objs],
                      "attr_object": np.array([0, 2]), "attr_id": rng.integers(1, 100, 2),
                      "attr_word": tokens[objs[[0, 2]] - 1],
                      "rel_subject": np.array([0, 1]), "rel_predicate": rng.integers(1, 50, 2),
                      "rel_object": np.array([1, 2])})
    return [collate_text(items[s:s + batch]) for s in range(0, n, batch)]
