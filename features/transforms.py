"""Image decoding with the bad-image policy, and the resize the network expects.

Policy: grayscale, CMYK, palette and 16-bit images are converted to RGB; an alpha channel is
composited over white; EXIF orientation is applied. Refused (skipped and reported): what
``pipeline.images.open_image`` refuses from the header (missing files, files that are not images,
corrupt headers, images larger than ``max_pixels``, so a decompression bomb costs nothing; ingest
applies the same checks), truncated/corrupt image data, and images whose short side is below
``min_side`` pixels."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.images import MAX_PIXELS, BadImage, open_image

def load_image(path, max_pixels: int = MAX_PIXELS, min_side: int = 10) -> tuple[Image.Image, str]:
    """Decode ``path`` to an RGB image; returns the image and a note on any conversion ('' if none)."""
    with open_image(path, max_pixels) as im:
        w, h = im.size
        if min(w, h) < min_side:
            raise BadImage(f"too small: {w}x{h}, short side under {min_side} px")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise BadImage(f"truncated or corrupt: {e}") from None
        mode, note = im.mode, ""
        im = ImageOps.exif_transpose(im)
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        if im.mode in ("RGBA", "LA", "PA"):
            rgba = im.convert("RGBA")
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=rgba.getchannel("A"))
            note = f"converted from {mode}: alpha composited over white"
        elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            arr = (arr - arr.min()) * (255.0 / max(arr.max() - arr.min(), 1.0))
            im = Image.fromarray(arr.astype(np.uint8)).convert("RGB")
            note = f"converted from {mode} (rescaled to 8 bits) to RGB"
        elif im.mode != "RGB":
            im = im.convert("RGB")
            note = f"converted from {mode} to RGB"
        return im, note


def resized_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Short side to ``min_size`` unless that makes the long side exceed ``max_size``."""
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def to_network_input(im: Image.Image, min_size: int, max_size: int) -> torch.Tensor:
    """Resized uint8 [3, h, w] tensor in BGR order (mean subtraction happens in the model)."""
    h, w = resized_size(im.height, im.width, min_size, max_size)
    if (h, w) != (im.height, im.width):
        im = im.resize((w, h), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
