"""Backdrops of the demo's context scenes: textured scenery a caption can name ("on the grass",
"at night", "by the sea").

Each backdrop is a function ``(rng, size) -> float RGB [size, size, 3]`` in 0..255, drawn from
its own generator, so one seed gives the same pixels. They differ in colour *and* texture
(blades, waves, bricks, scattered lights, ripples, clouds), so that a CNN's grid features can
tell them apart where a flat colour would be a single number.
"""

from __future__ import annotations

import numpy as np


def _grid(size: int):
    yy, xx = np.mgrid[:size, :size].astype(float)
    return yy, xx


def _blend(top, bottom, rows: int, cols: int | None = None) -> np.ndarray:
    """A vertical gradient from colour ``top`` to ``bottom``, [rows, cols, 3]."""
    t = np.linspace(0.0, 1.0, rows)[:, None, None]
    return np.asarray(top, float) * (1 - t) + np.asarray(bottom, float) * t + np.zeros((1, cols or rows, 1))


def grass(rng, size):
    yy, xx = _grid(size)
    blades = rng.normal(0, 1, size)[None, :] * (1 + 0.5 * np.sin(yy / 3 + rng.uniform(0, 6)))
    shade = 16 * blades + 8 * rng.normal(0, 1, (size, size))
    img = _blend((70, 150, 55), (45, 115, 35), size)
    return img + shade[..., None] * np.array([0.5, 1.0, 0.4])


def sea(rng, size):
    """Sky above a horizon, waves below it."""
    yy, xx = _grid(size)
    horizon = int(size * rng.uniform(0.28, 0.4))
    img = _blend((35, 95, 165), (20, 60, 130), size)
    waves = np.sin(yy * 0.9 + 2.5 * np.sin(xx * 0.12 + rng.uniform(0, 6)))
    img = img + (22 * waves)[..., None] * np.array([0.6, 0.8, 1.0])
    img[:horizon] = _blend((150, 195, 235), (195, 220, 240), horizon, size)
    return img


def sky(rng, size):
    """Blue sky with soft white clouds."""
    yy, xx = _grid(size)
    img = _blend((70, 130, 220), (150, 195, 245), size)
    cloud = np.zeros((size, size))
    for _ in range(int(rng.integers(3, 6))):
        cx, cy, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.06, 0.14) * size
        cloud += np.exp(-(((xx - cx) / (2 * r)) ** 2 + ((yy - cy) / r) ** 2))
    cloud = np.clip(cloud, 0, 1)[..., None]
    haze = 7 * rng.normal(0, 1, (size, size, 1))  # grain, so that the sky is not smooth either
    return img * (1 - 0.8 * cloud) + 250 * 0.8 * cloud + haze


def brick(rng, size):
    """Rows of bricks, every other row shifted by half a brick, with light mortar."""
    yy, xx = _grid(size)
    h, w = 10, 22
    row = (yy // h).astype(int)
    shifted = xx + (row % 2) * w / 2 + rng.uniform(0, w)
    col = (shifted // w).astype(int)
    tone = rng.normal(0, 12, (size // h + 2, size // w + 3))[row, col]
    img = np.array([165.0, 70.0, 50.0]) + tone[..., None] * np.array([1.0, 0.6, 0.5])
    mortar = (yy % h < 2) | (shifted % w < 2)
    img[mortar] = (200, 190, 175)
    return img


def night(rng, size):
    """A dark sky with scattered points of light."""
    img = _blend((10, 15, 45), (25, 30, 70), size)
    n = int(size * size * 0.012)
    ys, xs = rng.integers(0, size, n), rng.integers(0, size, n)
    img[ys, xs] = rng.uniform(180, 255, (n, 1))
    return img


def sand(rng, size):
    """Pale sand with wind ripples and grain."""
    yy, xx = _grid(size)
    ripples = np.sin(yy * 0.55 + 3 * np.sin(xx * 0.08 + rng.uniform(0, 6)))
    shade = 12 * ripples + 10 * rng.normal(0, 1, (size, size))
    return _blend((225, 200, 145), (205, 175, 120), size) + shade[..., None]


BACKDROPS = {"grass": grass, "sea": sea, "sky": sky, "brick": brick, "night": night, "sand": sand}

# how captions name each backdrop: no phrase shares a word that names another backdrop, none
# uses a colour word (colours are for the objects)
BACKDROP_WORDS = {
    "grass": ["on the grass", "on a lawn", "in a meadow"],
    "sea": ["by the sea", "in front of the sea", "at the seaside"],
    "sky": ["in the sky", "against a clear sky", "up in the sky"],
    "brick": ["against a brick wall", "in front of a brick wall", "by a brick wall"],
    "night": ["at night", "at nighttime", "in the dark"],
    "sand": ["on the sand", "on a sandy beach", "in the sand"],
}


def draw(name: str, seed: int, size: int) -> np.ndarray:
    if name not in BACKDROPS:
        raise ValueError(f"unknown backdrop {name!r}; known: {', '.join(BACKDROPS)}")
    return np.clip(BACKDROPS[name](np.random.default_rng(seed), size), 0, 255)
