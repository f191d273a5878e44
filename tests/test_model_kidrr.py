"""KIDRR: shapes, padding invariance, gradients, block vs one-by-one scoring, save/load, relation
direction, and train.py / evaluate.py end to end on a tiny synthetic dataset."""

import dataclasses
import json

import pytest
import torch

from pipeline.shards import Vocabulary
from training import checkpoint, evaluate, models, train
from training.data import Batch, DataConfig, PairDataset, ShardData, collate_images, collate_text
from training.models.layers import masked_mean
from training.synthetic import make_dataset

TINY = {"embed_dim": 24, "word_dim": 12, "sim_dim": 8, "feature_dim": 2048, "kid_iters": 2,
        "reason_steps": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    layout = make_dataset(root, splits={"train": 12, "val": 4, "test": 4}, dim=32, seed=3)
    vocab = Vocabulary.load(layout.vocab)
    return root, vocab, ShardData(root, "synth", vocab, DataConfig(split="train"))


@pytest.fixture(scope="module")
def items(data):
    """Pairs with different box counts (2..6) and both caption lengths of the synthetic data."""
    _, _, d = data
    ds = PairDataset(d)
    out = []
    for k, j in enumerate(range(0, 40, 3)):
        img, cap = ds[j]
        n = 2 + k % 5
        out.append((dict(img, features=img["features"][:n], boxes=img["boxes"][:n]), cap))
    lengths = {len(c["tokens"]) for _, c in out}
    assert len(lengths) > 1 and any(len(c["rel_subject"]) for _, c in out)
    return out


def make_model(vocab, **over):
    torch.manual_seed(0)
    return models.build("kidrr", dict(TINY, **over), vocab).eval()


def batch_of(items) -> Batch:
    return Batch(collate_images([a for a, _ in items]), collate_text([b for _, b in items]))


def pad_more(b: Batch, extra: int = 3) -> Batch:
    """The same batch with ``extra`` more padded regions, words, objects, attributes and
    relations, filled with garbage that the masks must hide."""
    g = torch.Generator().manual_seed(1)

    def grow(x, fill):
        shape = (x.shape[0], extra) + tuple(x.shape[2:])
        return torch.cat([x, fill(shape).to(x.dtype)], 1)

    rand = lambda s: torch.randn(s, generator=g)  # noqa: E731
    img = dataclasses.replace(
        b.image, regions=grow(b.image.regions, rand),
        boxes=grow(b.image.boxes, lambda s: torch.rand(s, generator=g)),
        region_mask=grow(b.image.region_mask, torch.zeros))
    t = b.text
    o = t.obj_index.shape[1]
    ints = lambda hi: (lambda s: torch.randint(0, hi, s, generator=g))  # noqa: E731
    txt = dataclasses.replace(
        t, tokens=grow(t.tokens, ints(5)), mask=grow(t.mask, torch.zeros),
        obj_index=grow(t.obj_index, ints(t.tokens.shape[1])), obj_word=grow(t.obj_word, ints(5)),
        obj_mask=grow(t.obj_mask, torch.zeros),
        attr_object=grow(t.attr_object, ints(o)), attr_id=grow(t.attr_id, ints(3)),
        attr_word=grow(t.attr_word, ints(5)), attr_mask=grow(t.attr_mask, torch.zeros),
        rel_subject=grow(t.rel_subject, ints(o)), rel_predicate=grow(t.rel_predicate, ints(2)),
        rel_object=grow(t.rel_object, ints(o)), rel_mask=grow(t.rel_mask, torch.zeros))
    return Batch(img, txt)


@torch.no_grad()
def scores(model, b: Batch) -> torch.Tensor:
    return model.similarity(model.encode_image(b.image), model.encode_text(b.text))


def test_registered_with_paper_family_defaults():
    assert "kidrr" in models.names() and not models.get("kidrr").two_tower
    f30k, coco = models.default_config("kidrr", "f30k"), models.default_config("kidrr", "coco")
    assert (f30k.embed_dim, f30k.sim_dim, f30k.margin, f30k.batch_size) == (1024, 256, 0.2, 128)
    assert (f30k.epochs, f30k.lr_decay_epochs) == (40, (30,))
    assert (coco.epochs, coco.lr_decay_epochs) == (20, (10,))


def test_shapes_for_different_box_and_word_counts(data, items):
    _, vocab, _ = data
    model = make_model(vocab)
    for a, b in ((0, 5), (5, 8), (2, 11)):
        img, txt = batch_of(items[a:a + 3]).image, batch_of(items[b:b + 2]).text
        ie, te = model.encode_image(img), model.encode_text(txt)
        assert ie.local.shape == (3, img.regions.shape[1], TINY["embed_dim"])
        assert te.local.shape == (2, txt.tokens.shape[1], TINY["embed_dim"])
        assert ie.global_.shape == (3, TINY["embed_dim"]) and te.global_.shape == (2, TINY["embed_dim"])
        s = model.similarity(ie, te)
        assert s.shape == (3, 2) and torch.isfinite(s).all()


def test_padding_changes_nothing(data, items):
    _, vocab, _ = data
    model = make_model(vocab)
    b = batch_of(items[:6])
    torch.testing.assert_close(scores(model, pad_more(b)), scores(model, b), rtol=1e-5, atol=1e-6)


def test_block_similarity_equals_pairs_one_by_one_and_chunking(data, items):
    _, vocab, _ = data
    model = make_model(vocab)
    b = batch_of(items[:5])
    block = scores(model, b)
    one = batch_of  # each image / caption alone: a batch of one, without padding
    pairs = torch.tensor([[scores(model, Batch(one([items[i]]).image, one([items[j]]).text)).item()
                           for j in range(5)] for i in range(5)])
    torch.testing.assert_close(block, pairs, rtol=1e-5, atol=1e-6)
    small = make_model(vocab, sim_block_elems=1)  # one caption per chunk
    torch.testing.assert_close(scores(small, b), block, rtol=1e-5, atol=1e-6)


def test_gradients_reach_every_parameter(data, items):
    _, vocab, _ = data
    model = make_model(vocab).train()
    b = batch_of(items[:8])
    assert b.text.rel_mask.any() and b.text.attr_mask.any() and b.image.boxes_known.all()
    loss = model(b, epoch=0)
    loss.backward()
    dead = [n for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.abs().max() > 1e-7)]
    assert not dead, dead


def test_relation_direction_changes_the_text_encoding(data, items):
    _, vocab, _ = data
    model = make_model(vocab)
    t = batch_of(items[:8]).text
    swapped = dataclasses.replace(t, rel_subject=t.rel_object, rel_object=t.rel_subject)
    a, b = model.encode_text(t).local, model.encode_text(swapped).local
    has_rel = t.rel_mask.any(1)
    assert (a[has_rel] - b[has_rel]).abs().max() > 1e-4
    torch.testing.assert_close(a[~has_rel], b[~has_rel])


def test_images_without_boxes_ignore_geometry(data, items):
    _, vocab, _ = data
    model = make_model(vocab)
    img = batch_of(items[:4]).image
    nobox = dataclasses.replace(img, boxes_known=torch.zeros_like(img.boxes_known))
    moved = dataclasses.replace(nobox, boxes=torch.rand(img.boxes.shape))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(nobox).local, model.encode_image(moved).local)
        assert (model.encode_image(img).local - model.encode_image(moved).local).abs().max() > 0


def test_save_load_gives_identical_scores(data, items, tmp_path):
    _, vocab, _ = data
    model = make_model(vocab)
    with torch.no_grad():  # move the parameters away from their initial values
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    b = batch_of(items[:4])
    before = scores(model, b)
    fresh = models.build("kidrr", dict(TINY), vocab).eval()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(scores(fresh, b), before)
    checkpoint.save(tmp_path / "m.pt", {"model": model.state_dict()})
    again = models.build("kidrr", dict(TINY), vocab).eval()
    again.load_state_dict(checkpoint.load(tmp_path / "m.pt")["model"])
    assert torch.equal(scores(again, b), before)


def test_train_and_evaluate_end_to_end(data, tmp_path, capsys):
    root, out = str(data[0]), str(tmp_path / "r")
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one intra-op thread beats two fighting over shared cores
    try:
        assert train.main(["--model", "kidrr", "--dataset", "synth", "--root", root, "--out", out,
                           "--epochs", "1", "--batch-size", "10", "--workers", "0", *sets]) == 0
        assert "train: kidrr on synth: 1 epoch(s) run" in capsys.readouterr().out
        assert evaluate.main([out, "--root", root, "--workers", "0", "--hard-negatives",
                              "--batch-size", "3"]) == 0
    finally:
        torch.set_num_threads(n)
    res = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert 0 <= res["test/f30k-1k"]["rsum"] <= 600 and "attribute" in res["test/hard_negatives"]


def reference_score(model, ie, te, i: int, j: int) -> torch.Tensor:
    """Score of image i with caption j written out plainly, one pair, no padding: SCAN attention
    per query, SGRAF similarity vectors, then the relation graph with two separate projections."""
    cfg, rel = model.cfg, model.relation
    r = ie.local[i][ie.mask[i]]                               # [R, D] real regions only
    w = te.local[j][te.mask[j]]                               # [L, D]
    vg, tg = ie.global_[i], te.global_[j]

    def att(q, k):                                            # each row of q over the rows of k
        return torch.softmax(cfg.attn_lambda * q @ k.t(), -1) @ k

    def sim(layer, a, b):
        return torch.nn.functional.normalize(layer.proj((a - b) ** 2), dim=-1)

    s = torch.cat([sim(model.sim_gg, vg, tg)[None], sim(model.sim_gl, att(tg[None], r), tg[None]),
                   sim(model.sim_gl, att(vg[None], w), vg[None]),
                   sim(model.sim_t2i, att(w, r), w), sim(model.sim_i2t, att(r, w), r)])
    types = torch.tensor([0, 1, 2] + [3] * len(w) + [4] * len(r))
    n = len(s)
    for q, k, upd in zip(rel.q, rel.k, rel.update):
        a = torch.softmax(q(s) @ k(s).t() / s.shape[-1] ** 0.5 + rel.type_bias[types][:, types], -1)
        a = a * torch.sigmoid(torch.nn.functional.softplus(rel.sharpness) * (a * n - rel.threshold))
        a = a / (a.sum(-1, keepdim=True) + 1e-6)
        s = s + torch.relu(upd(a @ s))
    pooled = s.mean(0) if cfg.readout == "mean" else s[0]
    return torch.sigmoid(rel.score(pooled)).squeeze()


@pytest.mark.parametrize("readout", ["mean", "global"])
def test_scores_match_a_written_out_reference(data, items, readout):
    _, vocab, _ = data
    model = make_model(vocab, readout=readout)
    with torch.no_grad():
        for p in model.parameters():       # non-zero biases, so the fused projections are checked
            p.add_(0.05 * torch.randn_like(p))
        b = batch_of(items[:4])
        ie, te = model.encode_image(b.image), model.encode_text(b.text)
        block = model.similarity(ie, te)
        ref = torch.stack([torch.stack([reference_score(model, ie, te, i, j) for j in range(4)])
                           for i in range(4)])
    torch.testing.assert_close(block, ref, rtol=1e-5, atol=1e-6)


def test_unknown_readout_is_refused(data):
    with pytest.raises(ValueError, match="unknown readout 'max'.*mean"):
        make_model(data[1], readout="max")


def test_no_dissemination_keeps_the_projected_nodes_and_their_mean(data, items):
    _, vocab, _ = data
    model = make_model(vocab, kid_iters=0).train()
    b = batch_of(items[:4])
    ie = model.encode_image(b.image)
    x, mask = model.img_fc(model.regions(b.image)), b.image.region_mask
    torch.testing.assert_close(ie.local[mask], torch.nn.functional.normalize(x, dim=-1)[mask])
    torch.testing.assert_close(ie.global_, torch.nn.functional.normalize(masked_mean(x, mask), dim=-1))
    te = model.encode_text(b.text)
    (model.similarity(ie, te).sum()).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert unused and all(n.startswith(("img_graph.", "txt_graph.", "geometry.")) for n in unused), unused
    assert make_model(vocab).img_graph.iters == TINY["kid_iters"] > 0


def test_no_reconstruction_is_the_graph_with_no_type_bias_and_no_pruning(data, items):
    _, vocab, _ = data
    full, plain = make_model(vocab), make_model(vocab, reconstruct=False)
    dropped = {"relation.type_bias", "relation.threshold", "relation.sharpness"}
    assert set(plain.state_dict()) == set(full.state_dict()) - dropped
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.05 * torch.randn_like(p))
        plain.load_state_dict({k: v for k, v in full.state_dict().items() if k not in dropped})
        b = batch_of(items[:4])
        reconstructed = scores(full, b)
        full.relation.type_bias.zero_()
        full.relation.threshold.fill_(-1e4)          # keeps every edge
        off = scores(full, b)
    assert (reconstructed - off).abs().max() > 1e-5
    torch.testing.assert_close(scores(plain, b), off, rtol=1e-4, atol=1e-5)


FIRST_VERSION = {"sgraf_init": False, "feature_norm": False}   # what runs saved before them did


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_start_spread_apart_at_the_demo_sizes(data, items, seed):
    """At initialisation the scores of a training batch differ by a useful part of the margin:
    with PyTorch's default initialisation of the scoring layers and raw region features (the
    first version) their spread was about 1 % of it, and training sat at the collapsed loss
    2 x margin x batch for epochs (docs/models.md, "kidrr")."""
    _, vocab, _ = data
    sizes = dict(TINY, embed_dim=256, word_dim=128, sim_dim=64, reason_steps=3)
    b = batch_of(items[:12])

    def spread(**over):
        torch.manual_seed(seed)
        model = models.build("kidrr", dict(sizes, **over), vocab).train()   # FeatureNorm: batch statistics
        return scores(model, b).std().item()

    margin = models.default_config("kidrr").margin
    assert spread() > 0.05 * margin > spread(**FIRST_VERSION)


def test_runs_saved_before_the_fix_keep_their_initialisation_and_inputs():
    cls = models.get("kidrr").config_class
    saved = {k: v for k, v in dataclasses.asdict(cls()).items() if k not in FIRST_VERSION}
    old = models.make_config(cls, saved, saved=True)
    assert {k: getattr(old, k) for k in FIRST_VERSION} == FIRST_VERSION
    new = models.default_config("kidrr")
    assert new.sgraf_init and new.feature_norm
