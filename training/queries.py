"""A query of a run, prepared as its training captions or images were: a text (parsed into a
scene graph, encoded with the run's vocabulary), a caption or an image of the split, or an image
file extracted on the fly.

A text is parsed by the scene-graph parser with the spaCy model the dataset's graph shards
record (tokens for every model, the graph for those that read it), then encoded with the run's
vocabulary by ``encode_graph``, as its training captions were. A dataset caption uses its row of
the graph shards. An image file is the one place where training reaches into features
(``file_query`` imports it): the image is extracted with the extractor config the split's region
(and grid) shards record, after checking that the weights are the extractor those shards were
made with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.compute as pc

from pipeline import shards
from pipeline.images import BadImage
from pipeline.shards import Layout, ShardError
from training.data import ShardData, caption_item, collate_images, collate_text, encode_graph, image_item
from training.run import LoadedRun


class RetrieveError(ValueError):
    """A query or an option that cannot be served (unknown id, a run of the wrong kind, ...)."""




# ---------------------------------------------------------------------------------------------
# queries

@dataclass
class Query:
    kind: str                         # text | caption | image | file
    graph: dict | None = None         # text queries: the graph-table row (tokens, objects, ...)
    image: dict | None = None         # image queries: the item ImageDataset gives
    text: str | None = None
    caption_id: int | None = None
    image_id: int | None = None
    path: str | None = None
    truth: set = field(default_factory=set)   # ids of the gallery items that are the ground truth
    notes: list = field(default_factory=list)
    unknown: list = field(default_factory=list)   # text queries: words not in the run's vocabulary
    @property
    def gallery(self) -> str:
        return "images" if self.graph is not None else "captions"

    def describe(self) -> dict:
        return {k: v for k, v in (("kind", self.kind), ("text", self.text), ("caption_id", self.caption_id),
                                  ("image_id", self.image_id), ("path", self.path)) if v is not None}


def query_batch(run: LoadedRun, query: Query):
    """The query as a batch of one, through ``run``'s own vocabulary and caption length."""
    if query.graph is None:
        return collate_images([query.image])
    ids, objects, attributes, relations = encode_graph(query.graph, run.vocab, run.config.max_len)
    arr = lambda rows, width: np.asarray(rows, np.int32).reshape(-1, width)  # noqa: E731
    return collate_text([caption_item(-1, -1, np.asarray(ids, np.int32), arr(objects, 2),
                                      arr(attributes, 3), arr(relations, 3))])


def query_parser(layout: Layout, graph: bool = True) -> tuple[Callable[[str], dict], list[str]]:
    """text -> graph-table row, parsed with the spaCy model the dataset's graph shards record;
    and notes on anything that differs from how those shards were parsed. ``graph=False`` (a
    model that reads only the words): the row's tokens alone, from spaCy's tokenizer, which gives
    the tokens the whole pipeline gives (the later components do not retokenise) in a fraction
    of its time."""
    from pipeline import parse, sgparse   # spaCy takes seconds to import: only for text queries

    files = layout.index.files("graphs")
    recorded = (shards.table_metadata(files[0]).get("config") or {}) if files else {}
    notes = []
    if "model" not in recorded:
        model = sgparse.resolve_model(sgparse.DEFAULT_MODEL)
        notes.append(f"{files[0] if files else layout.dir}: the graph shards record no parser config; "
                     f"the query is parsed with spaCy's {model}")
    else:
        model = recorded["model"]
        now = parse.ParseConfig(model=model, chunk_size=recorded.get("chunk_size", 5000)).identity()
        diff = [f"{k} {recorded.get(k)} -> {v}" for k, v in now.items() if recorded.get(k) != v]
        if diff:
            notes.append("the parser differs from the one the graph shards were written with ("
                         + ", ".join(diff) + "): the query's graph may differ from a caption's")
    nlp = sgparse.load_model(model)
    if graph:
        return lambda text: next(sgparse.parse_texts(nlp, [text])).row(-1), notes
    return lambda text: sgparse.Graph(tokens=[t.text for t in nlp.tokenizer(text[:sgparse.MAX_CHARS])
                                              if not t.is_space]).row(-1), notes


def text_query(run: LoadedRun, text: str, parse: Callable[[str], dict] | None = None) -> Query:
    if not text.strip():
        raise RetrieveError("the query is empty")
    notes = []
    if parse is None:
        parse, notes = query_parser(Layout(run.root, run.config.dataset))
    graph = parse(text)
    if not graph["tokens"]:
        raise RetrieveError(f"the query {text!r} has no words")
    unknown = sorted({t.lower() for t in graph["tokens"][:run.config.max_len - 2]} - set(run.vocab.stoi))
    if unknown:
        notes.append(f"not in the run's vocabulary (read as <unk>): {', '.join(unknown)}")
    return Query("text", graph=graph, text=text, notes=notes, unknown=unknown)


def _not_searched(table_path: Path, kind: str, column: str, value: int, data: ShardData) -> RetrieveError:
    """Why id ``value`` is not in the split's gallery: no such id, another split, or left out."""
    table = shards.read_table(table_path, kind, [column, "split"])
    hit = table.filter(pc.equal(table[column], value))
    split = data.cfg.split
    if not hit.num_rows:
        return RetrieveError(f"no {column} {value} in {table_path}")
    other = hit["split"][0].as_py()
    if other != split:
        return RetrieveError(f"{column} {value} is in split '{other}', not '{split}' (pass --split {other})")
    first = f" of its first {data.cfg.max_images} images" if data.cfg.max_images else ""
    return RetrieveError(f"{column} {value} is in split '{split}' but not searched: the search covers "
                         f"the first {data.cfg.captions_per_image} captions of each image{first}")


def caption_query(run: LoadedRun, caption_id: int) -> Query:
    """A caption of the split, with its row of the graph shards; its image is the ground truth."""
    data, layout = run.data, Layout(run.root, run.config.dataset)
    where = np.flatnonzero(data.text.caption_ids == caption_id)
    if not len(where):
        raise _not_searched(layout.captions, "captions", "caption_id", caption_id, data)
    graph = None
    for path in layout.index.files("graphs"):
        table = shards.read_table(path, "graphs")
        table = table.filter(pc.equal(table["caption_id"], caption_id))
        if table.num_rows:
            graph = table.to_pylist()[0]
            break
    if graph is None:
        raise ShardError(f"caption_id {caption_id} has no row in the graph shards; "
                         "rerun itmkit parse")
    captions = shards.read_table(layout.captions, "captions", ["caption_id", "text"])
    text = captions.filter(pc.equal(captions["caption_id"], caption_id))["text"][0].as_py()
    image_id = int(data.text.image_ids[where[0]])
    return Query("caption", graph=graph, text=text, caption_id=caption_id, image_id=image_id,
                 truth={image_id})


def image_query(run: LoadedRun, image_id: int) -> Query:
    """An image of the split; its captions in the split are the ground truth."""
    data = run.data
    where = np.flatnonzero(data.image_ids == image_id)
    if not len(where):
        layout = Layout(run.root, run.config.dataset)
        raise _not_searched(layout.images, "images", "image_id", image_id, data)
    truth = {int(c) for c, i in zip(data.text.caption_ids, data.text.image_ids) if i == image_id}
    return Query("image", image=data.image(int(where[0])), image_id=image_id, truth=truth)


def file_query(run: LoadedRun, path, weights: str, seed: int | None = None, device="cpu",
               name: str | None = None) -> Query:
    """An image file that is not in the dataset, extracted on the fly as the split's shards were;
    ``path`` may be a file object (an upload), named ``name`` in messages.
    The one place training reaches into features: imported here, not at module level."""
    from features.single import check_weights, extract_image, recorded_config
    from features.weights import RANDOM, WeightsError

    data, notes = run.data, []
    name = str(path) if name is None else name
    kinds = ("regions", "grid") if data.grid_loc is not None else ("regions",)
    attrs = {"regions": data.shards[0].attrs}
    if "grid" in kinds:
        attrs["grid"] = data.grid_shards[0].attrs
    paths = {"regions": data.shards[0].path, "grid": data.grid_shards[0].path if data.grid_shards else None}
    try:
        cfgs = {k: recorded_config(attrs[k], paths[k]) for k in kinds}
        if weights == RANDOM and seed is None:   # the seed the shards were extracted with
            found = re.fullmatch(r"random-seed-(\d+)", str(attrs["regions"].get("weights_sha256", "")))
            seed = int(found.group(1)) if found else 0
        seed = 0 if seed is None else seed
        for k in kinds:
            if "config_hash" not in attrs[k]:
                raise RetrieveError(f"{paths[k]}: the shard records no config hash, so the extractor "
                                    "weights it was made with cannot be checked")
            check_weights(cfgs[k], k, weights, seed, attrs[k]["config_hash"], paths[k])
        cfg = cfgs["regions"]
        if cfg.boxes == "given":
            notes.append("the dataset's regions were extracted on given boxes; this image has none, "
                         "so the detector chooses its boxes (boxes=adaptive)")
            cfg = type(cfg).from_dict({**cfg.to_dict(), "boxes": "adaptive"})
        if "grid" in kinds and cfgs["grid"].settings_for("grid") != cfg.settings_for("grid"):
            out = extract_image(path, cfg, weights, seed, device, ("regions",))
            if hasattr(path, "seek"):   # a file object: read again from its start
                path.seek(0)
            grid = extract_image(path, cfgs["grid"], weights, seed, device, ("grid",))
            out.grid, out.grid_hw = grid.grid, grid.grid_hw
        else:
            out = extract_image(path, cfg, weights, seed, device, kinds)
    except WeightsError as e:
        raise RetrieveError(str(e)) from None
    except BadImage as e:
        raise RetrieveError(f"{name}: {e}") from None
    if out.note:
        notes.append(f"{name}: {out.note}")
    if out.weights.is_random:
        notes.append(f"extractor weights {out.weights.description}")
    item = image_item(out.regions)
    if out.grid is not None:
        item["grid"], item["grid_hw"] = out.grid, tuple(out.grid_hw)
    return Query("file", image=item, path=name, notes=notes)

