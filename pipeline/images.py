"""Opening an image file under the bad-image policy, from its header only.

Refused (``BadImage``, whose message is the reason reported): a missing file, a file that is not an
image, a header cut short or corrupt, and an image of more than ``max_pixels`` pixels (a
decompression bomb), all decided before any pixel is decoded. Ingest uses this to read an image's
size; the feature extractor (features/transforms.py) decodes on top of it.
"""

from __future__ import annotations

import warnings

from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 100_000_000


class BadImage(Exception):
    """The image is refused; the message is the reason written to the report."""


def open_image(path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image at ``path``, opened lazily (nothing decoded yet); close it (``with``) after use."""
    try:
        with warnings.catch_warnings():   # max_pixels decides, not Pillow's warning at ~89 M pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:   # over twice Pillow's limit, whatever max_pixels says
        raise BadImage(f"too large: {e}") from None
    except OSError as e:  # a header cut short
        raise BadImage(f"truncated or corrupt: {e}") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise BadImage(f"too large: {w}x{h} is over {max_pixels:,} pixels (decompression bomb guard)")
    return im
