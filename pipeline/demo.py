"""``itmkit demo``: the built-in demo dataset.

Procedurally drawn scenes of 2-4 objects (a shape with a colour, a size and a texture) placed on a
3x3 grid, each with its ground-truth boxes and five template-varied captions that name objects,
attributes, counts and spatial relations. Every scene has a *focus pair* (objects A and B, in one
row or one column) that three of its captions describe. Some scenes come with a partner image
that differs only in attribute binding (an attribute of A and B swapped) or in relation direction
(A and B swapped in place); those pairs are listed in ``hard_negatives.parquet``.
``--scenes context`` builds on these scenes (pipeline/demo_context.py): named backdrops, entangled
objects, captions of mixed specificity and two more kinds of hard negative.

Everything is deterministic per seed: scene ``i`` is drawn from its own generator seeded with
``(seed, i)``, so the same seed gives byte-identical captions and identical pixels.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, PngImagePlugin
from tqdm import tqdm

from pipeline import backdrops, shards
from pipeline.config import UsageError, add_quiet_argument, add_root_argument, resolve_root
from pipeline.shards import Layout

GENERATOR_VERSION = 1
NAME = "demo"

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "heart", "moon")
SIZES = {"small": (0.13, 0.17), "large": (0.24, 0.29)}  # side as a fraction of the image side
TEXTURES = ("plain", "striped", "dotted", "checkered")

# words a caption may use for each value (the first is the canonical name)
SHAPE_WORDS = {
    "circle": ["circle", "disc"], "square": ["square", "box", "block"],
    "triangle": ["triangle"], "diamond": ["diamond", "rhombus"], "star": ["star"],
    "cross": ["cross", "plus sign"], "heart": ["heart"], "moon": ["moon", "crescent"],
}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]}
TEXTURE_WORDS = {"plain": ["plain", "solid"], "striped": ["striped", "stripy"],
                 "dotted": ["dotted", "spotted"], "checkered": ["checkered", "chequered", "checked"]}
TEXTURE_WITH = {"striped": "with stripes", "dotted": "with dots", "checkered": "with a checkered pattern"}
# relation of A to B -> (phrases for "A <rel> B", phrases for the inverse "B <rel> A")
RELATIONS = {
    "left": (["left of", "to the left of", "on the left of"], ["right of", "to the right of"]),
    "right": (["right of", "to the right of", "on the right of"], ["left of", "to the left of"]),
    "above": (["above", "over"], ["below", "under", "beneath"]),
    "below": (["below", "under", "beneath"], ["above", "over"]),
    "on": (["on top of", "resting on", "sitting on"], ["under", "beneath", "underneath"]),
    "under": (["under", "beneath", "underneath"], ["on top of", "resting on"]),
}
NEAR_WORDS = ["next to", "near", "beside", "close to"]
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
SCENES = ("flat", "context")  # kinds of scene; build_scenes has the builder of each
CONTEXT_VERSION = 2  # raised whenever a context build's output changes, so that its hash does too


@dataclass
class DemoConfig:
    images: int = 2000
    seed: int = 0
    image_size: int = 160
    pair_fraction: float = 0.3   # fraction of scenes that get a hard-negative partner image
    version: int = GENERATOR_VERSION
    scenes: str = "flat"         # "flat" (shapes on grey) or "context" (pipeline/demo_context.py)
    pair_kinds: str = ""         # context scenes: the partner kinds drawn (comma-separated); "" = all

    def __post_init__(self):
        self.pair_fraction = float(self.pair_fraction)   # a manifest's 1 and --pair-fraction 1: one hash

    def record(self) -> dict:
        """The settings hashed and written into the tables. A flat build records what it did
        before scenes had a choice, so its tables, hashes and PNG tags stay byte-identical; the
        partner kinds are recorded only when they are not all of them, for the same reason."""
        d = asdict(self)
        if not d["pair_kinds"]:
            del d["pair_kinds"]
        if d["scenes"] == "flat":
            del d["scenes"]
        else:
            d["context_version"] = CONTEXT_VERSION
        return d

    def splits(self) -> dict[str, int]:
        """Test split up to 1,000 images (the F30K/COCO-1K protocol size), val up to 1,000."""
        n = self.images
        test, val = max(1, min(1000, n // 2)), max(1, min(1000, n // 10))
        return {"train": n - test - val, "val": val, "test": test}


@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    texture: str
    cx: float = 0.0       # centre, pixels
    cy: float = 0.0
    side: float = 0.0     # side of the square the shape is drawn in, pixels
    tint: tuple = (0, 0, 0)
    cell: tuple = (0, 0)  # (row, col) on the 3x3 grid


@dataclass
class Scene:
    objects: list[Obj]
    relation: str                 # relation of objects[0] (A) to objects[1] (B), a RELATIONS key
    background: int
    swapped: str = ""             # for a partner: "colour"/"texture"/"size" or "position"
    captions: list[str] = field(default_factory=list)
    # context scenes only (pipeline/demo_context.py)
    backdrop: str = ""            # a pipeline/backdrops.py name; "" is the flat grey background
    backdrop_seed: int = 0
    levels: list[str] = field(default_factory=list)   # each caption's specificity
    facts: list[tuple] = field(default_factory=list)  # (i, relation, j) the captions state
    near_duplicate: bool = False  # a jittered copy of the scene before it (not a hard negative)


# ---------------------------------------------------------------------------------------------
# scenes

def sample_scene(rng: np.random.Generator, size: int) -> Scene:
    n = int(rng.choice([2, 3, 4], p=[0.35, 0.4, 0.25]))
    shapes = [str(s) for s in rng.choice(SHAPES, 2, replace=False)]  # A and B: distinct shapes
    others = [s for s in SHAPES if s not in shapes]
    for _ in range(n - 2):  # extra objects may share a shape with each other (counts, plurals)
        shapes.append(shapes[-1] if n - 2 == 2 and len(shapes) == 3 and rng.random() < 0.4
                      else str(rng.choice(others)))
    objs = [Obj(s, str(rng.choice(list(COLOURS))), str(rng.choice(list(SIZES))),
                str(rng.choice(TEXTURES, p=[0.4, 0.2, 0.2, 0.2]))) for s in shapes]
    # A and B share a row or a column so that their relation is clearly directional
    if rng.random() < 0.5:
        row, cols = int(rng.integers(3)), rng.choice(3, 2, replace=False)
        cells = [(row, int(cols[0])), (row, int(cols[1]))]
        relation = "left" if cols[0] < cols[1] else "right"
    else:
        col, rows = int(rng.integers(3)), rng.choice(3, 2, replace=False)
        cells = [(int(rows[0]), col), (int(rows[1]), col)]
        relation = "above" if rows[0] < rows[1] else "below"
    free = [(r, c) for r in range(3) for c in range(3) if (r, c) not in cells]
    for k in rng.choice(len(free), n - 2, replace=False):
        cells.append(free[int(k)])
    cell_px = size / 3
    for o, cell in zip(objs, cells):
        lo, hi = SIZES[o.size]
        o.side = float(rng.uniform(lo, hi) * size)
        slack = max(0.0, (cell_px - o.side) / 2 - 1)
        o.cell = cell
        o.cx = (cell[1] + 0.5) * cell_px + float(rng.uniform(-slack, slack))
        o.cy = (cell[0] + 0.5) * cell_px + float(rng.uniform(-slack, slack))
        o.tint = tuple(int(v) for v in rng.integers(-12, 13, 3))
    scene = Scene(objs, relation, int(rng.integers(100, 161)))
    if relation in ("above", "below") and abs(cells[0][0] - cells[1][0]) == 1 and rng.random() < 0.5:
        scene.relation = "on" if relation == "above" else "under"
        stack(scene, size)
    return scene


def stack(scene: Scene, size: int) -> None:
    """Put the upper of A and B right on the lower one (touching, centred)."""
    a, b = scene.objects[:2]
    upper, lower = (a, b) if scene.relation == "on" else (b, a)
    fit_in_cell(upper, size, lower.cx)
    fit_in_cell(lower, size, upper.cx)  # the same column: centred on each other, both inside
    upper.cy = lower.cy - lower.side / 2 - upper.side / 2


def fit_in_cell(o: Obj, size: int, cx: float | None = None) -> None:
    """Move ``o`` (to ``cx`` if given) by as little as keeps it inside its grid cell."""
    cell_px = size / 3
    if cx is not None:
        o.cx = cx
    for axis, index in (("cx", o.cell[1]), ("cy", o.cell[0])):
        lo, hi = index * cell_px + o.side / 2 + 1, (index + 1) * cell_px - o.side / 2 - 1
        setattr(o, axis, float(np.clip(getattr(o, axis), lo, max(lo, hi))))


def partner_scene(rng: np.random.Generator, scene: Scene, size: int) -> Scene | None:
    """The scene with A and B's relation reversed, or one attribute swapped between them."""
    other = copy.deepcopy(scene)
    a, b = other.objects[:2]
    if rng.random() < 0.5:
        a.cx, a.cy, b.cx, b.cy = b.cx, b.cy, a.cx, a.cy
        a.cell, b.cell = b.cell, a.cell
        fit_in_cell(a, size)
        fit_in_cell(b, size)
        other.relation = {"left": "right", "right": "left", "above": "below", "below": "above",
                          "on": "under", "under": "on"}[scene.relation]
        if other.relation in ("on", "under"):
            stack(other, size)
        other.swapped = "position"
        return other
    for attr in rng.permutation(["colour", "colour", "texture", "size"]):
        if getattr(a, attr) != getattr(b, attr):
            va, vb = getattr(a, attr), getattr(b, attr)
            setattr(a, attr, vb)
            setattr(b, attr, va)
            if attr == "size":  # swap the drawn sides too, keep each object in its cell
                a.side, b.side = b.side, a.side
                for o in (a, b):
                    fit_in_cell(o, size)
                if other.relation in ("on", "under"):
                    stack(other, size)
            other.swapped = str(attr)
            return other
    return None


# ---------------------------------------------------------------------------------------------
# drawing

def shape_mask(shape: str, size: int, cx: float, cy: float, side: float) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    h = side / 2
    x0, y0, x1, y1 = cx - h, cy - h, cx + h, cy + h
    if shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        d.rectangle([x0 + 0.08 * side, y0 + 0.08 * side, x1 - 0.08 * side, y1 - 0.08 * side], fill=255)
    elif shape == "triangle":
        d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "diamond":
        d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif shape == "star":
        t = np.arange(10) * np.pi / 5 - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, h, 0.42 * h)
        d.polygon(list(zip(cx + r * np.cos(t), cy + r * np.sin(t))), fill=255)
    elif shape == "cross":
        w = side / 6
        d.rectangle([cx - w, y0, cx + w, y1], fill=255)
        d.rectangle([x0, cy - w, x1, cy + w], fill=255)
    elif shape == "heart":
        q = side / 4
        d.ellipse([x0, y0 + 0.1 * side, cx + 0.02 * side, y0 + 0.1 * side + 2 * q], fill=255)
        d.ellipse([cx - 0.02 * side, y0 + 0.1 * side, x1, y0 + 0.1 * side + 2 * q], fill=255)
        d.polygon([(x0 + 0.03 * side, y0 + 0.1 * side + 1.2 * q), (x1 - 0.03 * side, y0 + 0.1 * side + 1.2 * q),
                   (cx, y1)], fill=255)
    elif shape == "moon":
        d.ellipse([x0, y0, x1, y1], fill=255)
        d.ellipse([x0 + 0.38 * side, y0 - 0.05 * side, x1 + 0.38 * side, y1 - 0.05 * side], fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(img) > 127


@functools.lru_cache(maxsize=16)
def texture_mask(texture: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    if texture == "striped":
        return (xx + yy) % 6 < 2
    if texture == "dotted":
        return (xx % 6 - 2.5) ** 2 + (yy % 6 - 2.5) ** 2 < 3.0
    if texture == "checkered":
        return ((xx // 4) + (yy // 4)) % 2 == 1
    return np.zeros((size, size), bool)


def second_colour(rgb: np.ndarray) -> np.ndarray:
    """The pattern colour of a textured object: a darker shade of a light colour, a lighter
    shade of a dark one, so that the object's own colour stays the one you see."""
    if rgb.sum() > 400:
        return rgb * 0.3
    return rgb + (255 - rgb) * 0.7


TILE = 128  # grey behind each object of a context scene: no backdrop pixel lies inside a box


def object_masks(scene: Scene, size: int) -> list[np.ndarray]:
    masks = [shape_mask(o.shape, size, o.cx, o.cy, o.side) for o in scene.objects]
    for o, mask in zip(scene.objects, masks):
        if not mask.any():
            raise ValueError(f"object {o.shape} at ({o.cx:.0f}, {o.cy:.0f}) is outside the image")
    return masks


def tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def render(scene: Scene, size: int) -> tuple[np.ndarray, list[list[float]]]:
    """RGB uint8 [size, size, 3] and one tight box (x1, y1, x2, y2 pixels) per object."""
    masks = object_masks(scene, size)
    if scene.backdrop:
        img = backdrops.draw(scene.backdrop, scene.backdrop_seed, size)
        for mask in masks:  # the whole box, so that a box holds its object and nothing of the scene
            x1, y1, x2, y2 = (int(v) for v in tight_box(mask))
            img[y1:y2, x1:x2] = TILE
    else:
        shade = np.linspace(-8, 8, size)[:, None, None]  # a soft vertical gradient
        img = np.clip(scene.background + shade, 0, 255).repeat(size, axis=1).repeat(3, axis=2)
    boxes = []
    for o, mask in zip(scene.objects, masks):
        rgb = np.clip(np.array(COLOURS[o.colour]) + np.array(o.tint), 0, 255)
        second = second_colour(np.array(COLOURS[o.colour], float))
        pattern = texture_mask(o.texture, size)
        img[mask] = rgb
        img[mask & pattern] = second
        boxes.append(tight_box(mask))
    return img.astype(np.uint8), boxes


# ---------------------------------------------------------------------------------------------
# captions

def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(rng, o: Obj, need: frozenset = frozenset(), det: str | None = None) -> str:
    """A referring expression for ``o``; the colour is always named, size and texture when in
    ``need`` or by chance."""
    shape = _pick(rng, SHAPE_WORDS[o.shape])
    size = _pick(rng, SIZE_WORDS[o.size]) if "size" in need or rng.random() < 0.4 else None
    show_tex = "texture" in need or (o.texture != "plain" and rng.random() < 0.6) or rng.random() < 0.05
    texture = o.texture if show_tex else None
    style = rng.random()
    if texture and texture != "plain" and style < 0.25:  # "a red circle with stripes"
        words = [size, o.colour, shape, TEXTURE_WITH[texture]]
    elif style < 0.4 and not size:                        # "a circle that is red"
        tex = _pick(rng, TEXTURE_WORDS[texture]) if texture else None
        words = [shape, "that is", o.colour + (f" and {tex}" if tex else "")]
    else:                                                 # "a small striped red circle"
        tex = _pick(rng, TEXTURE_WORDS[texture]) if texture else None
        words = [size, tex, o.colour, shape] if rng.random() < 0.6 else [size, o.colour, tex, shape]
    text = " ".join(w for w in words if w)
    det = det or ("one" if rng.random() < 0.1 else _article(text))
    return f"{det} {text}"


def relation_caption(rng, scene: Scene, need: frozenset) -> str:
    a, b = scene.objects[:2]
    forward, inverse = RELATIONS[scene.relation]
    na, nb = noun_phrase(rng, a, need), noun_phrase(rng, b, need)
    t = int(rng.integers(7))
    if t == 0:
        return f"{na} {_pick(rng, forward)} {nb}"
    if t == 1:
        return f"{na} is {_pick(rng, forward)} {nb}"
    if t == 2:
        return f"there is {na} {_pick(rng, forward)} {nb}"
    if t == 3:
        return f"{nb} {_pick(rng, inverse)} {na}"
    if t == 4:
        return f"{nb} is {_pick(rng, inverse)} {na}"
    if t == 5:
        return f"{_pick(rng, ['a picture of', 'an image of', 'a drawing of'])} {na} {_pick(rng, forward)} {nb}"
    sa, sb = _pick(rng, SHAPE_WORDS[a.shape]), _pick(rng, SHAPE_WORDS[b.shape])
    return f"{na} and {nb}, the {sa} {_pick(rng, forward)} the {sb}"


def count_caption(rng, scene: Scene) -> str:
    """All objects grouped by shape: "two red stars, a blue circle and a green square"."""
    groups: dict[str, list[Obj]] = {}
    for o in scene.objects:
        groups.setdefault(o.shape, []).append(o)
    parts = []
    for shape, objs in groups.items():
        if len(objs) == 1:
            parts.append(noun_phrase(rng, objs[0]))
        else:
            word = _pick(rng, SHAPE_WORDS[shape])
            plural = word + ("es" if word.endswith(("s", "x")) else "s")
            colours = {o.colour for o in objs}
            colour = f"{objs[0].colour} " if len(colours) == 1 else ""
            parts.append(f"{NUMBERS[len(objs)]} {colour}{plural}")
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    n = len(scene.objects)
    t = int(rng.integers(3))
    if t == 0:
        return listing
    if t == 1:
        return f"{NUMBERS[n]} shapes: {listing}"
    return f"{_pick(rng, ['a gray background with', 'a picture with', 'a scene showing'])} {listing}"


def extra_caption(rng, scene: Scene) -> str:
    """A relation between an extra object C and A or B ("next to" when they are neighbours)."""
    c = scene.objects[int(rng.integers(2, len(scene.objects)))]
    ref = scene.objects[int(rng.integers(2))]
    dr, dc = c.cell[0] - ref.cell[0], c.cell[1] - ref.cell[1]
    if abs(dr) + abs(dc) == 1 and rng.random() < 0.5:
        phrase = _pick(rng, NEAR_WORDS)
    elif abs(dc) >= abs(dr):
        phrase = _pick(rng, RELATIONS["left" if dc < 0 else "right"][0])
    else:
        phrase = _pick(rng, RELATIONS["above" if dr < 0 else "below"][0])
    return f"{noun_phrase(rng, c)} {phrase} {noun_phrase(rng, ref)}"


def captions(rng, scene: Scene) -> list[str]:
    """Five captions: three about the focus pair, one counting/listing, one about an extra object
    (or a fourth about the pair). A swapped attribute is named in every focus caption."""
    need = frozenset({scene.swapped} & {"size", "texture"})
    out = [relation_caption(rng, scene, need) for _ in range(3)]
    out.append(count_caption(rng, scene))
    out.append(extra_caption(rng, scene) if len(scene.objects) > 2 else relation_caption(rng, scene, need))
    return [out[int(i)] for i in rng.permutation(5)]


# ---------------------------------------------------------------------------------------------
# the dataset

def build_scenes(cfg: DemoConfig) -> tuple[list[tuple[str, Scene]], list[dict]]:
    """Scenes in image-id order with their splits, and the hard-negative pairs."""
    from pipeline import demo_context  # context scenes are built from this module's parts

    builders = {"flat": build_flat_scenes, "context": demo_context.build_scenes}
    if cfg.scenes not in builders:
        raise ValueError(f"--scenes must be one of {', '.join(builders)}, got {cfg.scenes!r}")
    return builders[cfg.scenes](cfg)


def build_flat_scenes(cfg: DemoConfig) -> tuple[list[tuple[str, Scene]], list[dict]]:
    out, pairs = [], []
    for split, n in cfg.splits().items():
        start = len(out)
        while len(out) - start < n:
            i = len(out)
            rng = np.random.default_rng([cfg.seed, i])
            scene = sample_scene(rng, cfg.image_size)
            scene.captions = captions(rng, scene)
            out.append((split, scene))
            if len(out) - start < n and rng.random() < cfg.pair_fraction:
                other = partner_scene(rng, scene, cfg.image_size)
                if other is not None:
                    other.captions = captions(np.random.default_rng([cfg.seed, i + 1]), other)
                    kind = "relation" if other.swapped == "position" else "attribute"
                    pairs.append({"image_id": i, "partner_id": i + 1, "kind": kind})
                    out.append((split, other))
    return out, pairs


def _png_tag(chash: str, image_id: int) -> str:
    return f"{chash}:{image_id}"


def write_png(path: Path, pixels: np.ndarray, tag: str) -> None:
    # written under a temporary name and renamed, without fsync: a PNG is cheap to redraw and
    # carries its tag, so a half-written or stale one is simply drawn again on the next run
    info = PngImagePlugin.PngInfo()
    info.add_text("itmkit", tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")   # two demos on one root never share one
    Image.fromarray(pixels).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def png_is_current(path: Path, tag: str) -> bool:
    if not path.exists():
        return False
    try:
        with Image.open(path) as im:
            return im.info.get("itmkit") == tag
    except OSError:
        return False


def generate(root, cfg: DemoConfig, force: bool = False, progress: bool = True,
             record: dict | None = None) -> dict:
    """Write the demo dataset under ``root/demo``; returns a summary dict. ``record``: what the
    dataset is (pipeline/manifest.py), default that of manifests/demo.yaml."""
    if cfg.images < 4:
        raise ValueError(f"--images must be at least 4 (one train, val and test image), got {cfg.images}")
    if not 96 <= cfg.image_size <= 1024:
        raise ValueError(f"--image-size must be in [96, 1024], got {cfg.image_size}")
    if cfg.pair_kinds:   # checked before anything is written
        if cfg.scenes != "context":
            raise ValueError("--pair-kinds chooses among the partners of context scenes; add --scenes context")
        from pipeline import demo_context
        demo_context.partner_kinds(cfg.pair_kinds)
    layout = Layout(Path(root), NAME)
    index = layout.index
    chash = shards.config_hash(cfg.record())
    outputs = {"images": layout.images, "captions": layout.captions, "boxes": layout.boxes,
               "hard_negatives": layout.hard_negatives}
    if not force and all(index.is_valid(k, p, chash) for k, p in outputs.items()):
        return {"skipped": True, "images": cfg.images, "config_hash": chash, "dir": layout.dir}

    scenes, pairs = build_scenes(cfg)
    image_dir = layout.dir / "images"
    images, caps, boxes = [], [], []
    rendered = 0
    for image_id, (split, scene) in enumerate(tqdm(scenes, desc="demo images", unit="img",
                                                   disable=not progress, mininterval=2)):
        path = (image_dir / f"{image_id:06d}.png").resolve()
        pixels, obj_boxes = render(scene, cfg.image_size)
        tag = _png_tag(chash, image_id)
        if force or not png_is_current(path, tag):
            write_png(path, pixels, tag)
            rendered += 1
        images.append({"image_id": image_id, "path": str(path), "split": split,
                       "width": cfg.image_size, "height": cfg.image_size})
        boxes.append({"image_id": image_id, "boxes": [v for b in obj_boxes for v in b],
                      "labels": [o.shape for o in scene.objects]})
        for j, text in enumerate(scene.captions):
            caps.append({"caption_id": image_id * 5 + j, "image_id": image_id, "split": split, "text": text})

    if record is None:
        from pipeline import manifest

        record = manifest.manifest_record(manifest.load("demo"))
    meta = {"config": cfg.record(), "config_hash": chash, "dataset": record}
    written = [
        ("images", layout.images, images), ("captions", layout.captions, caps),
        ("boxes", layout.boxes, boxes), ("hard_negatives", layout.hard_negatives, pairs),
    ]
    for kind, path, rows in written:
        shards.write_table(path, rows, kind, metadata=meta)
        index.register(kind, path, rows=len(rows), config_hash=chash)
    return {"skipped": False, "images": len(images), "rendered": rendered, "captions": len(caps),
            "pairs": len(pairs), "splits": cfg.splits(), "config_hash": chash, "dir": layout.dir}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_root_argument(p)
    d = DemoConfig()
    sp = d.splits()
    p.add_argument("--images", type=int, default=d.images,
                   help=f"number of images (default %(default)s: {sp['train']} train / {sp['val']} val / "
                        f"{sp['test']} test; the test split is min(1000, N/2))")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--image-size", type=int, default=d.image_size, help="image side in pixels")
    p.add_argument("--pair-fraction", type=float, default=d.pair_fraction,
                   help="fraction of scenes that get a hard-negative partner")
    p.add_argument("--scenes", choices=SCENES, default=d.scenes,
                   help="flat: shapes on a grey background; context: shapes on named, textured "
                        "backdrops, touching and overlapping objects, captions of mixed specificity "
                        "and context-swap / specificity hard negatives (docs/datasets.md)")
    p.add_argument("--pair-kinds", default=d.pair_kinds, metavar="KINDS",
                   help="context scenes: the hard-negative partner kinds drawn, comma-separated "
                        "(relation, attribute, context, specificity; default: all four, equally often)")
    p.add_argument("--force", action="store_true", help="regenerate even if shards.json says it is current")
    add_quiet_argument(p)


def command(args) -> int:
    cfg = DemoConfig(images=args.images, seed=args.seed, image_size=args.image_size,
                     pair_fraction=args.pair_fraction, scenes=args.scenes, pair_kinds=args.pair_kinds)
    try:
        s = generate(resolve_root(args.root), cfg, force=args.force, progress=not args.quiet)
    except ValueError as e:   # a setting out of range
        raise UsageError(str(e)) from None
    except (shards.ShardError, OSError) as e:  # e.g. a full disk, a root that cannot be a folder
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    if s["skipped"]:
        print(f"demo: {s['dir']} is up to date ({s['images']} images, seed {cfg.seed}, "
              f"config {s['config_hash']}); nothing written (use --force to regenerate)")
    else:
        sp = s["splits"]
        print(f"demo: wrote {s['images']} images ({sp['train']} train / {sp['val']} val / {sp['test']} test; "
              f"{s['rendered']} PNGs drawn, {s['images'] - s['rendered']} already current), "
              f"{s['captions']} captions, boxes and {s['pairs']} hard-negative pairs to {s['dir']}")
    return 0
