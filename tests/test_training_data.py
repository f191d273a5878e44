"""Batch format and the shard-backed datasets, on a tiny synthetic dataset written by the tests."""

import numpy as np
import pytest
import torch

from pipeline import shards
from pipeline.shards import ShardError, Vocabulary
from training import models
from training.data import (CaptionDataset, DataConfig, ImageDataset, PairDataset, ShardData,
                           collate_images, collate_pairs, collate_text, make_loader)
from training.synthetic import make_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    layout = make_dataset(root, splits={"train": 40, "test": 10}, images_per_shard=16)
    return root, layout, Vocabulary.load(layout.vocab)


def test_batch_shapes_masks_and_graph_indices(synth):
    root, layout, vocab = synth
    data = ShardData(root, "synth", vocab, DataConfig(split="train"))
    assert data.n_images == 40 and len(data.text) == 200
    batch = collate_pairs([PairDataset(data)[j] for j in range(0, 25, 3)])
    img, txt = batch.image, batch.text
    assert img.regions.shape == (9, 6, shards.FEATURE_DIM) and img.regions.dtype == torch.float32
    assert img.region_mask.all() and img.boxes_known.all()
    assert (img.boxes >= 0).all() and (img.boxes <= 1).all()
    assert torch.equal(txt.image_ids, img.image_ids)
    assert (txt.tokens[:, 0] == Vocabulary.START).all()
    assert (txt.tokens[torch.arange(9), txt.lengths - 1] == Vocabulary.END).all()
    assert torch.equal(txt.mask.sum(1), txt.lengths)
    # each object's position in tokens holds the head word, and obj_word is that word
    held = txt.tokens.gather(1, txt.obj_index)
    assert torch.equal(held[txt.obj_mask], txt.obj_word[txt.obj_mask])
    graphs = shards.read_table(layout.graphs(0)).to_pylist()
    by_id = {g["caption_id"]: g for g in graphs}
    for b in range(9):
        g = by_id[int(txt.caption_ids[b])]
        assert int(txt.rel_mask[b].sum()) == len(g["relations"])
        for k, r in enumerate(g["relations"]):
            assert int(txt.rel_predicate[b, k]) == vocab.predicate_id(r["predicate"])
            assert (int(txt.rel_subject[b, k]), int(txt.rel_object[b, k])) == (r["subject"], r["object"])
        for k, a in enumerate(g["attributes"]):
            assert int(txt.attr_id[b, k]) == vocab.attribute_id(a["attribute"]) > 0


def test_caption_without_graph_objects_and_variable_boxes(synth):
    _, _, vocab = synth
    empty = {"caption_id": 7, "image_id": 1, "tokens": np.array([1, 5, 2]), "obj_index": np.zeros(0, int),
             "obj_word": np.zeros(0, int), "attr_object": np.zeros(0, int), "attr_id": np.zeros(0, int),
             "attr_word": np.zeros(0, int), "rel_subject": np.zeros(0, int),
             "rel_predicate": np.zeros(0, int), "rel_object": np.zeros(0, int)}
    txt = collate_text([empty, empty])
    assert txt.obj_mask.shape == (2, 1) and not txt.obj_mask.any() and not txt.rel_mask.any()
    im = lambda n, i: {"image_id": i, "image_hw": (10, 20), "features": np.ones((n, 8), np.float16),  # noqa: E731
                       "boxes": np.zeros((n, 4), np.float32), "boxes_known": True}
    img = collate_images([im(3, 0), im(1, 1), im(0, 2)])
    assert img.region_mask.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    assert img.regions[1, 1:].abs().sum() == 0


def test_order_is_region_shard_order_and_first_five_captions(synth):
    root, layout, vocab = synth
    data = ShardData(root, "synth", vocab, DataConfig(split="test"))
    ids = np.concatenate([shards.RegionShard(p).image_ids for p in layout.index.files("regions")
                          if "-test-" in p.name])
    assert data.image_ids.tolist() == ids.tolist()
    assert (data.text.image_ids == np.repeat(ids, 5)).all()
    assert (np.diff(data.text.caption_ids.reshape(-1, 5), axis=1) > 0).all()
    images = collate_images([ImageDataset(data)[i] for i in range(3)])
    caps = collate_text([CaptionDataset(data)[j] for j in range(15)])
    assert torch.equal(caps.image_ids, images.image_ids.repeat_interleave(5))


def test_sampler_is_deterministic_and_ddp_partitions(synth):
    root, _, vocab = synth
    ds = PairDataset(ShardData(root, "synth", vocab, DataConfig(split="train")))
    order = lambda **kw: [c for b in make_loader(ds, collate_pairs, 32, shuffle=True, **kw)  # noqa: E731
                          for c in b.text.caption_ids.tolist()]
    assert order(seed=3) == order(seed=3) != order(seed=4)
    a, b = order(seed=3, rank=0, world_size=2), order(seed=3, rank=1, world_size=2)
    assert sorted(a + b) == sorted(order(seed=3)) and not set(a) & set(b)


def test_nan_boxes_become_whole_image(tmp_path):
    layout = make_dataset(tmp_path, splits={"train": 4}, nan_boxes=True)
    data = ShardData(tmp_path, "synth", Vocabulary.load(layout.vocab), DataConfig())
    img = collate_images([data.image(0)])
    assert not img.boxes_known.any()
    assert torch.equal(img.boxes[0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_grid_features_aligned_and_missing_grid_is_a_clear_error(tmp_path, synth):
    layout = make_dataset(tmp_path, splits={"train": 5}, grid_hw=(2, 3))
    data = ShardData(tmp_path, "synth", Vocabulary.load(layout.vocab), DataConfig(grid=True))
    img = collate_images([data.image(i) for i in range(5)])
    assert img.grid.shape == (5, 6, shards.FEATURE_DIM) and img.grid_hw == (2, 3)
    grid = shards.GridShard(layout.grid("train", 0))
    assert torch.allclose(img.grid[4], torch.from_numpy(grid.get(4)).float())
    root, _, vocab = synth
    with pytest.raises(ShardError, match="needs grid features"):
        ShardData(root, "synth", vocab, DataConfig(grid=True))


def test_config_mismatch_and_short_captions_are_refused(synth):
    root, _, vocab = synth
    with pytest.raises(ShardError, match="expects regions shards of config deadbeef"):
        ShardData(root, "synth", vocab, DataConfig(), hashes={"regions": "deadbeef"})
    with pytest.raises(ShardError, match="has 5 caption"):
        ShardData(root, "synth", vocab, DataConfig(captions_per_image=6))


def test_registry_builds_and_names_unknown(synth):
    _, _, vocab = synth
    assert "vsepp" in models.names()
    with pytest.raises(KeyError, match="known models: .*vsepp"):
        models.get("nope")
    with pytest.raises(ValueError, match="no field"):
        models.build("vsepp", {"not_a_field": 1}, vocab)
    m = models.build("vsepp", {"embed_dim": 16}, vocab)
    assert m.cfg.embed_dim == 16 and m.two_tower


def test_half_batches_become_float32_on_to(synth):
    root, _, vocab = synth
    data = ShardData(root, "synth", vocab, DataConfig(split="train"))
    items = [PairDataset(data)[j] for j in range(4)]
    full, half = collate_pairs(items), collate_pairs(items, half=True)
    assert half.image.regions.dtype == torch.float16
    moved = half.to("cpu")
    assert moved.image.regions.dtype == torch.float32
    assert torch.equal(moved.image.regions, full.image.regions)
    assert torch.equal(moved.text.tokens, full.text.tokens)


def with_graph_rows(root, edit):
    """A small synthetic dataset whose first graph chunk is rewritten with ``edit`` applied to
    its rows and registered again, so that only the rows are at fault."""
    layout = make_dataset(root, splits={"train": 4})
    path = layout.graphs(0)
    rows = shards.read_table(path, "graphs").to_pylist()
    edit(rows)
    shards.write_table(path, rows, "graphs")
    chash = layout.index.entries("graphs")[0].config_hash
    layout.index.register("graphs", path, rows=len(rows), config_hash=chash)
    return layout, path


@pytest.mark.parametrize("field,value,problem", [
    ("tokens", None, "'tokens' is null"),
    ("objects", None, "'objects' is null"),
    ("objects", [{"head": "cube", "span": "cube", "token_index": None}], "'objects' holds a null"),
    ("relations", [None], "'relations' holds a null")])
def test_null_graph_fields_are_one_line_naming_the_file_and_row(tmp_path, field, value, problem):
    def edit(rows):
        rows[3][field] = value
    layout, path = with_graph_rows(tmp_path, edit)
    with pytest.raises(ShardError) as e:
        ShardData(tmp_path, "synth", Vocabulary.load(layout.vocab), DataConfig())
    assert str(e.value).startswith(f"{path}: row 3 (caption_id 3): {problem}")
    assert "\n" not in str(e.value)


def test_out_of_range_graph_indices_are_counted_in_one_warning(tmp_path, capsys):
    def edit(rows):
        rows[1]["relations"].append({"subject": 0, "predicate": "on", "object": 99})
        rows[2]["relations"].append({"subject": -1, "predicate": "on", "object": 0})
        rows[4]["attributes"].append({"object": 7, "attribute": "red"})
    layout, path = with_graph_rows(tmp_path, edit)
    data = ShardData(tmp_path, "synth", Vocabulary.load(layout.vocab), DataConfig())
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {path}: dropped 2 relation(s) and 1 attribute(s) whose object index is out of range"]
    good = sum(len(r) for r in shards.read_table(path, "graphs").column("relations").to_pylist()) - 2
    assert sum(len(data.text.relations[j]) for j in range(10)) == good   # the rows still load

    # relations whose objects a short max_len cuts off are dropped as before, and not counted
    short = ShardData(tmp_path, "synth", Vocabulary.load(layout.vocab), DataConfig(max_len=4))
    assert sum(len(short.text.relations[j]) for j in range(10)) < good
    assert capsys.readouterr().err.strip().splitlines() == err


# ---------------------------------------------------------------------------------------------
# pair_batches: hard-negative pairs in one batch

def _batches(sampler, size):
    order = list(sampler)
    return [order[i:i + size] for i in range(0, len(order), size)]


def test_paired_batches_hold_each_pair_together_and_every_caption_once():
    from training.data import PairedBatchSampler

    pairs = [(0, 1), (10, 11), (20, 21), (1, 30)]   # image 1 is in two pairs: its first one counts
    sampler = PairedBatchSampler(40, 5, pairs, 8, seed=3)
    assert sampler.pairs == [(0, 1), (10, 11), (20, 21)]
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = _batches(sampler, 8)
        assert all(len(b) == 8 for b in batches)                     # drop_last: whole batches
        assert sorted(c for b in batches for c in b) == list(range(200))   # 200 = 25 batches of 8
        for a, b in sampler.pairs:   # each caption of a beside a caption of b, five times an epoch
            meetings = sum(min(sum(c // 5 == a for c in x), sum(c // 5 == b for c in x)) for x in batches)
            assert meetings == 5
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) != first
    again = PairedBatchSampler(40, 5, pairs, 8, seed=3)
    again.set_epoch(1)
    assert list(again) == first and list(PairedBatchSampler(40, 5, pairs, 8, seed=4)) != list(again)


def test_paired_batches_split_between_ranks_without_overlap():
    from training.data import PairedBatchSampler

    pairs = [(i, i + 1) for i in range(0, 20, 2)]
    ranks = [PairedBatchSampler(30, 5, pairs, 6, seed=1, rank=r, world=2, drop_last=False) for r in range(2)]
    a, b = list(ranks[0]), list(ranks[1])
    assert not set(a) & set(b) and sorted(a + b) == list(range(150))
    for r in ranks:   # each unit (a caption of a and one of b) stays inside one batch of its rank
        for batch in _batches(r, 6)[:-1]:
            for a_, b_ in pairs:
                assert sum(c // 5 == a_ for c in batch) == sum(c // 5 == b_ for c in batch)
    with pytest.raises(ValueError, match="at least 2"):
        PairedBatchSampler(30, 5, pairs, 1)


def test_image_pairs_reads_the_kinds_asked_for_within_the_split(tmp_path):
    import pyarrow as pa

    from pipeline.shards import Layout
    from training.data import image_pairs

    layout = Layout(tmp_path, "toy")
    with pytest.raises(ShardError, match="no hard-negative pairs.*hard_negatives.parquet"):
        image_pairs(layout, [1, 2], "all")
    layout.dir.mkdir(parents=True)
    table = pa.table({"image_id": [1, 3, 5, 7], "partner_id": [2, 4, 6, 99],
                      "kind": ["relation", "attribute", "relation", "relation"]})
    import pyarrow.parquet as pq
    pq.write_table(table, layout.hard_negatives)
    ids = [5, 6, 1, 2, 3, 4, 7]           # 99 is in another split: its pair is left out
    assert image_pairs(layout, ids, "relation") == [(2, 3), (0, 1)]
    assert image_pairs(layout, ids, "all") == [(2, 3), (4, 5), (0, 1)]
    assert image_pairs(layout, ids, "attribute, relation") == [(2, 3), (4, 5), (0, 1)]
    with pytest.raises(ValueError, match="has the kinds attribute, relation"):
        image_pairs(layout, ids, "context")
