"""Names of the object and attribute labels that region shards store as numbers.

The extractor's classifier has the 1600 object classes and 400 attributes of Visual Genome
(bottom-up attention); their names ship as package data in ``pipeline/data/genome/`` (see the
README there). Shards store 0-based label indices with the background class and the "no
attribute" output left out, whatever the classifier's own order (``features/roi_heads.py``,
``background_last``), so label i is line i of the vocabulary file. A shard written by an
extractor of another label set gets ``#i`` instead of a wrong name, and -1 (labels unknown, e.g.
imported precomp features) gets ``?``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

N_OBJECTS, N_ATTRIBUTES = 1600, 400


@lru_cache(maxsize=None)
def _names(kind: str) -> tuple[str, ...]:
    text = resources.files("pipeline").joinpath("data", "genome", f"{kind}_vocab.txt").read_text()
    return tuple(line.split(",")[0].strip().lower() for line in text.splitlines() if line.strip())


def object_names() -> tuple[str, ...]:
    return _names("objects")


def attribute_names() -> tuple[str, ...]:
    return _names("attributes")


def _name(names: tuple[str, ...] | None, i: int) -> str:
    i = int(i)
    if i < 0:
        return "?"
    return names[i] if names is not None and i < len(names) else f"#{i}"


@dataclass(frozen=True)
class LabelNames:
    """Label names for shards of one extractor config (``extractor`` attribute of a region shard):
    names when its classifier has the Visual Genome label set, ``#i`` otherwise."""

    objects: tuple[str, ...] | None
    attributes: tuple[str, ...] | None

    @classmethod
    def for_extractor(cls, extractor: dict | None) -> "LabelNames":
        ex = extractor or {}
        vg_objects = ex.get("num_classes", N_OBJECTS) == N_OBJECTS
        vg_attributes = ex.get("num_attributes", N_ATTRIBUTES) == N_ATTRIBUTES
        return cls(object_names() if vg_objects else None, attribute_names() if vg_attributes else None)

    def object(self, i: int) -> str:
        return _name(self.objects, i)

    def attribute(self, i: int) -> str:
        return _name(self.attributes, i)

    def region(self, obj: int, attr: int) -> str:
        """``attribute object`` of one box, e.g. ``red car``; the object alone without an attribute."""
        return self.object(obj) if int(attr) < 0 else f"{self.attribute(attr)} {self.object(obj)}"
