"""Context scenes of the demo (``itmkit demo --scenes context``).

The flat demo's captions describe only the shapes inside the given boxes, on a grey background,
and every caption is about equally specific. A context scene adds what the flat one lacks:

* a **backdrop** (pipeline/backdrops.py: grass, sea with a horizon, sky, brick wall, night,
  sand) that every caption names ("... on the grass", "at night"). Each object sits on a grey
  tile that fills its box, so no backdrop pixel lies inside a box: a box's crop never shows it,
  only the whole image (the grid stream) does, and region features only as far as their
  receptive field reaches past the box (benchmarks/backdrop_probe.py measures it);
* a focus pair that often **touches or overlaps** (entangled regions);
* relations that only **geometry** decides (left of, above, on top of, next to, touching,
  overlapping),
  each computed from the drawn boxes and recorded in ``Scene.facts``;
* captions of **mixed specificity** (``SPECIFICITY``): every object with attributes and
  relations, the focus pair, one object, or only the scene and a count; and a small share of
  **near-duplicates** (the scene before, objects moved by a pixel or two, other captions);
* hard-negative partners of four kinds (``PARTNERS``): relation and attribute as in the flat
  demo, **context** (the same objects on another backdrop) and **specificity** (the scene
  reduced to its first object, captioned as the only shape there: "a single red circle on the
  grass", while the full scene's captions all name a second object or count two or more, so
  each caption is true of exactly one image of the pair).

Scene ``i`` is drawn from the generator seeded with ``(seed, i)`` and its partner's captions
from ``(seed, i + 1)``, as in the flat demo.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from pipeline import backdrops
from pipeline.demo import (NEAR_WORDS, NUMBERS, RELATIONS, SHAPE_WORDS, DemoConfig, Scene, _pick,
                           fit_in_cell, noun_phrase, object_masks, sample_scene as sample_flat, stack,
                           tight_box)

# shares of the five captions' specificity on a scene without a partner
SPECIFICITY = {"full": 0.3, "pair": 0.3, "object": 0.2, "scene": 0.2}
FOCUS = {"full": 0.5, "pair": 0.5}               # captions that name the focus pair and its relation
MORE_THAN_ONE = {"full": 0.4, "pair": 0.4, "scene": 0.2}  # each names a second object or a count >= 2
SINGLE = {"single": 1.0}                         # one object, said to be the only one
ENTANGLE_FRACTION = 0.4         # focus pairs in neighbouring cells moved to touch or overlap
NEAR_DUPLICATE_FRACTION = 0.05  # unpaired scenes followed by a jittered copy
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above", "on": "under", "under": "on"}
CONTACT_WORDS = {"overlapping": ["overlapping", "partly covering"], "touching": ["touching", "in contact"]}
NEAR = 0.15  # "next to": boxes at most this share of the image side apart


# ---------------------------------------------------------------------------------------------
# geometry: what the boxes decide

def box_relation(a, b) -> str | None:
    """The relation of box ``a`` to box ``b`` (x1, y1, x2, y2) that geometry alone decides, a
    RELATIONS key, or None where the centres are about as far apart across as down."""
    wa, ha, wb, hb = a[2] - a[0], a[3] - a[1], b[2] - b[0], b[3] - b[1]
    across = min(a[2], b[2]) - max(a[0], b[0])
    if across > 0.5 * min(wa, wb):  # stacked: one rests on the other, a small gap at most
        if 0 <= b[1] - a[3] <= 0.15 * (ha + hb):
            return "on"
        if 0 <= a[1] - b[3] <= 0.15 * (ha + hb):
            return "under"
    dx, dy = (b[0] + b[2] - a[0] - a[2]) / 2, (b[1] + b[3] - a[1] - a[3]) / 2
    if abs(dx) >= 1.5 * abs(dy):
        return "left" if dx > 0 else "right"
    if abs(dy) >= 1.5 * abs(dx):
        return "above" if dy > 0 else "below"
    return None


def box_contact(a, b) -> str | None:
    """"overlapping" where the boxes share more than a pixel each way, "touching" within two pixels."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w > 1 and h > 1:
        return "overlapping"
    if w > -2 and h > -2:
        return "touching"
    return None


def box_gap(a, b) -> float:
    """Shortest distance between two boxes in pixels (0 where they touch or overlap)."""
    gx = max(0.0, max(a[0], b[0]) - min(a[2], b[2]))
    gy = max(0.0, max(a[1], b[1]) - min(a[3], b[3]))
    return float(np.hypot(gx, gy))


def boxes_of(scene: Scene, size: int) -> list[list[float]]:
    return [tight_box(m) for m in object_masks(scene, size)]


# ---------------------------------------------------------------------------------------------
# scenes

def sample_scene(rng: np.random.Generator, size: int) -> Scene:
    """A flat scene with its focus pair aligned (and often entangled) and a backdrop; drawn
    again until the boxes decide the focus relation."""
    while True:
        scene = sample_flat(rng, size)
        a, b = scene.objects[:2]
        axis = "cy" if scene.relation in ("left", "right") else "cx"
        if scene.relation not in ("on", "under"):
            setattr(b, axis, getattr(a, axis))  # one row (column): the direction is unmistakable
            fit_in_cell(b, size)
            near = abs(a.cell[0] - b.cell[0]) + abs(a.cell[1] - b.cell[1]) == 1
            if near and rng.random() < ENTANGLE_FRACTION:
                along = "cx" if axis == "cy" else "cy"
                sign = 1.0 if getattr(b, along) > getattr(a, along) else -1.0
                overlap = float(rng.uniform(-0.05, 0.35)) * min(a.side, b.side)
                setattr(b, along, getattr(a, along) + sign * ((a.side + b.side) / 2 - overlap))
        scene.backdrop = str(rng.choice(list(backdrops.BACKDROPS)))
        scene.backdrop_seed = int(rng.integers(2 ** 31))
        boxes = boxes_of(scene, size)
        relation = box_relation(boxes[0], boxes[1])
        if relation is not None:
            scene.relation = relation
            return scene


def _inside(scene: Scene, size: int) -> None:
    for o in scene.objects:
        o.cx = float(np.clip(o.cx, o.side / 2 + 1, size - o.side / 2 - 1))
        o.cy = float(np.clip(o.cy, o.side / 2 + 1, size - o.side / 2 - 1))


def swap_positions(rng, scene: Scene, size: int) -> Scene | None:
    other = copy.deepcopy(scene)
    a, b = other.objects[:2]
    a.cx, a.cy, b.cx, b.cy = b.cx, b.cy, a.cx, a.cy
    a.cell, b.cell = b.cell, a.cell
    other.relation = OPPOSITE[scene.relation]
    if other.relation in ("on", "under"):
        stack(other, size)
    _inside(other, size)
    other.swapped = "position"
    boxes = boxes_of(other, size)
    return other if box_relation(boxes[0], boxes[1]) == other.relation else None


def swap_attribute(rng, scene: Scene, size: int) -> Scene | None:
    """Colour or texture swapped between A and B (not size: that would move the boxes)."""
    other = copy.deepcopy(scene)
    a, b = other.objects[:2]
    for attr in rng.permutation(["colour", "colour", "texture"]):
        if getattr(a, attr) != getattr(b, attr):
            va, vb = getattr(a, attr), getattr(b, attr)
            setattr(a, attr, vb)
            setattr(b, attr, va)
            other.swapped = str(attr)
            return other
    return None


def swap_backdrop(rng, scene: Scene, size: int) -> Scene:
    other = copy.deepcopy(scene)
    other.backdrop = str(rng.choice([n for n in backdrops.BACKDROPS if n != scene.backdrop]))
    other.swapped = "backdrop"
    return other


def only_first(rng, scene: Scene, size: int) -> Scene:
    other = copy.deepcopy(scene)
    other.objects = other.objects[:1]
    other.relation = ""
    other.swapped = "objects"
    return other


def near_duplicate(rng, scene: Scene, size: int) -> Scene | None:
    """The scene with every object moved by up to two pixels and another draw of its backdrop."""
    other = copy.deepcopy(scene)
    for o in other.objects:
        o.cx += float(rng.uniform(-2, 2))
        o.cy += float(rng.uniform(-2, 2))
    _inside(other, size)
    other.backdrop_seed = int(rng.integers(2 ** 31))
    other.near_duplicate = True
    boxes = boxes_of(other, size)
    return other if box_relation(boxes[0], boxes[1]) == scene.relation else None


@dataclass(frozen=True)
class Partner:
    make: object          # (rng, scene, size) -> partner Scene or None
    weight: float         # share among the pairs
    levels: dict          # caption specificity of the scene ...
    partner_levels: dict  # ... and of its partner: each caption true of one image of the pair


PARTNERS = {
    "relation": Partner(swap_positions, 0.25, FOCUS, FOCUS),
    "attribute": Partner(swap_attribute, 0.25, FOCUS, FOCUS),
    "context": Partner(swap_backdrop, 0.25, SPECIFICITY, SPECIFICITY),
    "specificity": Partner(only_first, 0.25, MORE_THAN_ONE, SINGLE),
}


# ---------------------------------------------------------------------------------------------
# captions

def _draw(rng, weights: dict) -> str:
    keys = list(weights)
    return keys[int(rng.choice(len(keys), p=np.array([weights[k] for k in keys]) / sum(weights.values())))]


def _relation_phrase(rng, rel: str) -> str:
    return _pick(rng, RELATIONS[rel][0])


def _focus(rng, scene: Scene, need, facts: list) -> str:
    a, b = scene.objects[:2]
    facts.append((0, scene.relation, 1))
    na, nb = noun_phrase(rng, a, need), noun_phrase(rng, b, need)
    if rng.random() < 0.5:
        return f"{na} {_relation_phrase(rng, scene.relation)} {nb}"
    return f"{nb} {_pick(rng, RELATIONS[scene.relation][1])} {na}"


def _full(rng, scene: Scene, boxes, need, facts: list, size: int) -> str:
    """Every object with its attributes; the extras placed relative to A or B where the boxes
    decide it; whether A and B touch or overlap."""
    parts = [_focus(rng, scene, need, facts)]
    contact = box_contact(boxes[0], boxes[1])
    if contact and rng.random() < 0.6:
        facts.append((0, contact, 1))
        parts[0] += f", {_pick(rng, ['the two', 'both'])} {_pick(rng, CONTACT_WORDS[contact])}"
    for k in range(2, len(scene.objects)):
        text = noun_phrase(rng, scene.objects[k])
        for ref in rng.permutation(2):
            rel = box_relation(boxes[k], boxes[int(ref)])
            if rel is not None:
                near = box_gap(boxes[k], boxes[int(ref)]) <= NEAR * size and rng.random() < 0.3
                facts.append((k, "near" if near else rel, int(ref)))
                phrase = _pick(rng, NEAR_WORDS) if near else _relation_phrase(rng, rel)
                text += f" {phrase} the {_pick(rng, SHAPE_WORDS[scene.objects[int(ref)].shape])}"
                break
        parts.append(text)
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _place(rng, text: str, where: str) -> str:
    """The backdrop phrase after the description or in front of it."""
    return f"{text} {where}" if rng.random() < 0.7 else f"{where}, {text}"


def caption(rng, scene: Scene, level: str, boxes, need, facts: list, size: int) -> str:
    where = _pick(rng, backdrops.BACKDROP_WORDS[scene.backdrop])
    n = len(scene.objects)
    if level == "full":
        return _place(rng, _full(rng, scene, boxes, need, facts, size), where)
    if level == "pair":
        text = _focus(rng, scene, need, facts)
        return _place(rng, f"there is {text}" if rng.random() < 0.2 else text, where)
    if level == "object":
        text = noun_phrase(rng, scene.objects[int(rng.integers(n))])
        return _place(rng, f"{_pick(rng, ['there is', 'a picture of', 'a photo of'])} {text}"
                      if rng.random() < 0.3 else text, where)
    if level == "scene":
        shapes = f"{NUMBERS[n]} shapes"
        return _pick(rng, [f"{shapes} {where}", f"a picture of {shapes} {where}", f"{where}: {shapes}",
                           f"a scene {where} with {shapes}"])
    if level == "single":
        o = scene.objects[0]
        t = int(rng.integers(4))
        if t == 0:
            return _place(rng, noun_phrase(rng, o, det=_pick(rng, ["a single", "only one", "just one"])), where)
        if t == 1:
            return _place(rng, f"{noun_phrase(rng, o)} on its own", where)
        if t == 2:
            return f"one shape {where}: {noun_phrase(rng, o)}"
        return f"{where}, {noun_phrase(rng, o)} and nothing else"
    raise ValueError(f"unknown caption level {level!r}")


def captions(rng, scene: Scene, levels: dict, size: int) -> tuple[list[str], list[str], list[tuple]]:
    """Five captions with their specificity levels drawn from ``levels``, and the geometric
    facts they state, (i, relation, j): object i <relation> object j."""
    need = frozenset({scene.swapped} & {"texture"})
    boxes = boxes_of(scene, size)
    drawn = [_draw(rng, levels) for _ in range(5)]
    facts: list[tuple] = []
    texts = [caption(rng, scene, level, boxes, need, facts, size) for level in drawn]
    return texts, drawn, sorted(set(facts))


# ---------------------------------------------------------------------------------------------
# the dataset

def partner_kinds(names: str) -> list[str]:
    """The ``PARTNERS`` kinds of a comma-separated list ("" = all of them), checked."""
    kinds = [k.strip() for k in names.split(",") if k.strip()] or list(PARTNERS)
    unknown = [k for k in kinds if k not in PARTNERS]
    if unknown:
        raise ValueError(f"--pair-kinds: unknown kind(s) {', '.join(unknown)}; the kinds: {', '.join(PARTNERS)}")
    return [k for k in PARTNERS if k in kinds]


def build_scenes(cfg: DemoConfig) -> tuple[list[tuple[str, Scene]], list[dict]]:
    """Scenes in image-id order with their splits, and the hard-negative pairs."""
    size = cfg.image_size
    kinds = partner_kinds(cfg.pair_kinds)
    weights = np.array([PARTNERS[k].weight for k in kinds])
    out, pairs = [], []
    for split, n in cfg.splits().items():
        start = len(out)
        while len(out) - start < n:
            i = len(out)
            rng = np.random.default_rng([cfg.seed, i])
            scene = sample_scene(rng, size)
            room = len(out) - start + 1 < n  # the split has room for a second image
            kind, other = None, None
            if room and rng.random() < cfg.pair_fraction:
                kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
                other = PARTNERS[kind].make(rng, scene, size)
            elif room and rng.random() < NEAR_DUPLICATE_FRACTION:
                other = near_duplicate(rng, scene, size)
            levels = PARTNERS[kind].levels if kind and other else SPECIFICITY
            scene.captions, scene.levels, scene.facts = captions(rng, scene, levels, size)
            out.append((split, scene))
            if other is not None:
                other_levels = PARTNERS[kind].partner_levels if kind else SPECIFICITY
                other.captions, other.levels, other.facts = captions(
                    np.random.default_rng([cfg.seed, i + 1]), other, other_levels, size)
                if kind:
                    pairs.append({"image_id": i, "partner_id": i + 1, "kind": kind})
                out.append((split, other))
    return out, pairs
