"""ReSG: shapes, padding invariance, gradients, block-wise similarity, objects-only captions,
save/load, and train.py / evaluate.py end to end on a tiny synthetic dataset."""

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.shards import VOCAB_SPECIALS, Vocabulary
from training import checkpoint, evaluate, models, train
from training.data import Batch, collate_images, collate_text
from training.models.layers import bigru_states, box_features
from training.synthetic import make_dataset

WORDS = ["a", "red", "blue", "dog", "cat", "ball", "on", "near", "big"]
TINY = {"embed_dim": 16, "word_dim": 8, "feature_dim": 12, "rel_neighbours": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary({"words": [[w, 0] for w in VOCAB_SPECIALS] + [[w, 1] for w in WORDS],
                       "min_count": 1, "predicates": [["on", 1], ["near", 1]],
                       "attributes": [["red", 1], ["blue", 1], ["big", 1]]})


def model(vocab, **overrides):
    torch.manual_seed(0)
    return models.build("resg", dict(TINY, **overrides), vocab).eval()


def image_item(rng, i, n_boxes, dim=12):
    xy = rng.uniform(0, 0.6, (n_boxes, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.1, 0.4, (n_boxes, 2))], 1).clip(0, 1)
    return {"image_id": i, "image_hw": (100, 100), "boxes_known": True,
            "features": rng.normal(0, 1, (n_boxes, dim)).astype(np.float16),
            "boxes": boxes.astype(np.float32)}


def caption_item(vocab, j, image_id, words, objects, attrs=(), rels=()):
    """``objects``: token positions of the heads in ``words``; ``attrs``: (object, word);
    ``rels``: (subject, predicate, object)."""
    ids = np.array(vocab.encode(words))
    arr = lambda rows, w: np.array(rows, dtype=np.int64).reshape(-1, w)  # noqa: E731
    o, a, r = arr([(p + 1, ids[p + 1]) for p in objects], 2), \
        arr([(k, vocab.attribute_id(w), vocab.stoi[w]) for k, w in attrs], 3), \
        arr([(s, vocab.predicate_id(p), t) for s, p, t in rels], 3)
    return {"caption_id": j, "image_id": image_id, "tokens": ids,
            "obj_index": o[:, 0], "obj_word": o[:, 1],
            "attr_object": a[:, 0], "attr_id": a[:, 1], "attr_word": a[:, 2],
            "rel_subject": r[:, 0], "rel_predicate": r[:, 1], "rel_object": r[:, 2]}


def captions(vocab):
    return [
        caption_item(vocab, 0, 0, ["a", "red", "dog", "on", "a", "ball"], [2, 5], [(0, "red")], [(0, "on", 1)]),
        caption_item(vocab, 1, 1, ["a", "cat"], [1]),                                   # no relation
        caption_item(vocab, 2, 2, ["a", "big", "blue", "cat", "near", "a", "red", "dog"], [3, 7],
                     [(0, "big"), (0, "blue"), (1, "red")], [(0, "near", 1), (1, "near", 0)]),
        caption_item(vocab, 3, 3, ["on", "near"], []),                                  # no object
    ]


@pytest.fixture(scope="module")
def batch(vocab):
    rng = np.random.default_rng(0)
    images = [image_item(rng, i, n) for i, n in enumerate((3, 5, 1, 4))]
    return Batch(collate_images(images), collate_text(captions(vocab)))


def pad_width(t, extra, value=0):
    pad = torch.full((t.shape[0], extra) + t.shape[2:], value, dtype=t.dtype)
    return torch.cat([t, pad], 1)


def padded(batch, extra=3):
    img, txt = batch.image, batch.text
    img = dataclasses.replace(img, regions=pad_width(img.regions, extra),
                              boxes=pad_width(img.boxes, extra), region_mask=pad_width(img.region_mask, extra))
    fields = {f: pad_width(getattr(txt, f), extra) for f in
              ("tokens", "mask", "obj_index", "obj_word", "obj_mask", "attr_object", "attr_id", "attr_word",
               "attr_mask", "rel_subject", "rel_predicate", "rel_object", "rel_mask")}
    return Batch(img, dataclasses.replace(txt, **fields))


def scores(m, batch):
    with torch.no_grad():
        return m.similarity(m.encode_image(batch.image), m.encode_text(batch.text))


def test_registered_with_dataset_defaults():
    assert "resg" in models.names()
    cls = models.get("resg")
    assert cls.two_tower is False
    assert models.default_config("resg", "coco").epochs == 20
    assert models.default_config("resg", "f30k").lr_decay_epochs == (15,)


def test_shapes_with_different_box_and_word_counts(vocab, batch):
    m = model(vocab)
    ie, te = m.encode_image(batch.image), m.encode_text(batch.text)
    v_obj, v_omask, v_rel, v_rmask, v_glob = ie.objects, ie.object_mask, ie.relations, ie.relation_mask, ie.global_
    assert v_obj.shape == (4, 5, 16) and v_omask.sum(1).tolist() == [3, 5, 1, 4]
    assert v_rel.shape == (4, 10, 16)                       # 5 regions x 2 neighbours
    assert v_rmask.sum(1).tolist() == [6, 10, 0, 8]         # a lone region has no relation
    t_obj, t_omask, t_rel, t_rmask, t_glob = te.objects, te.object_mask, te.relations, te.relation_mask, te.global_
    assert t_omask.sum(1).tolist() == [2, 1, 2, 2]          # the object-less caption uses its 2 words
    assert t_rel.shape == (4, 2, 16) and t_rmask.sum(1).tolist() == [1, 0, 2, 0]
    assert v_glob.shape == t_glob.shape == (4, 16)
    s = m.similarity(ie, te[:3])
    assert s.shape == (4, 3) and torch.isfinite(s).all()


def test_padding_changes_nothing(vocab, batch):
    m = model(vocab)
    torch.testing.assert_close(scores(m, padded(batch)), scores(m, batch), atol=1e-5, rtol=1e-5)


def test_batch_similarity_equals_pairs_one_by_one(vocab, batch):
    m = model(vocab)
    ie, te = m.encode_image(batch.image), m.encode_text(batch.text)
    full = m.similarity(ie, te).detach()
    for i in range(4):
        for j in range(4):
            one = m.similarity(ie[i:i + 1], te[j:j + 1])
            torch.testing.assert_close(one[0, 0].detach(), full[i, j], atol=1e-5, rtol=1e-5)
    # and the memory-bounded chunks (one image at a time) give the same matrix
    m.cfg.sim_block_elems = 1
    torch.testing.assert_close(m.similarity(ie, te).detach(), full)


def test_caption_without_relation_is_scored_on_objects_only(vocab, batch):
    m = model(vocab)
    s = scores(m, batch)
    m.cfg.rel_weight = 0.0                              # objects only for every caption
    objects_only = scores(m, batch)
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s[:, 1], objects_only[:, 1])   # caption 1 has no relation
    torch.testing.assert_close(s[:, 3], objects_only[:, 3])   # nor caption 3 (no object either)
    assert not torch.allclose(s[:, 0], objects_only[:, 0])    # caption 0 has one: it counts


def test_relation_direction_and_attributes_change_the_score(vocab):
    m = model(vocab)
    rng = np.random.default_rng(1)
    words = ["a", "red", "dog", "on", "a", "blue", "cat"]
    caps = [caption_item(vocab, 0, 0, words, [2, 6], [(0, "red"), (1, "blue")], [(0, "on", 1)]),
            caption_item(vocab, 1, 0, words, [2, 6], [(0, "red"), (1, "blue")], [(1, "on", 0)]),
            caption_item(vocab, 2, 0, words, [2, 6], [(0, "blue"), (1, "red")], [(0, "on", 1)])]
    s = scores(m, Batch(collate_images([image_item(rng, 0, 4)] * 3), collate_text(caps)))[0]
    assert s[0] != s[1] and s[0] != s[2]


def test_gradients_reach_every_parameter(vocab, batch):
    m = model(vocab).train()
    out = m(batch, epoch=1)
    assert set(out) == {"loss", "triplet", "center", "pn"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    dead = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert dead == []


def test_loss_combines_the_three_losses(vocab, batch):
    m = model(vocab).train()
    out = m(batch, epoch=1)
    cfg = m.cfg
    total = out["triplet"] + cfg.center_weight * out["center"] + cfg.pn_weight * out["pn"]
    torch.testing.assert_close(out["loss"].detach(), total)
    m.cfg.center_weight = m.cfg.pn_weight = 0.0
    torch.testing.assert_close(m(batch, epoch=1)["loss"].detach(), out["triplet"])


def test_save_load_gives_identical_scores(vocab, batch, tmp_path):
    a = model(vocab)
    before = scores(a, batch)
    checkpoint.save(tmp_path / "m.pt", {"model": a.state_dict()})
    torch.manual_seed(123)
    b = models.build("resg", TINY, vocab).eval()
    assert not torch.allclose(scores(b, batch), before)
    b.load_state_dict(checkpoint.load(tmp_path / "m.pt")["model"])
    torch.testing.assert_close(scores(b, batch), before, atol=0, rtol=0)


def test_unknown_boxes_give_finite_scores(vocab, batch):
    img = dataclasses.replace(batch.image, boxes=torch.tensor([0.0, 0.0, 1.0, 1.0]).expand_as(batch.image.boxes).clone(),
                              boxes_known=torch.zeros(4, dtype=torch.bool))
    assert torch.isfinite(scores(model(vocab), Batch(img, batch.text))).all()


def test_train_and_evaluate_end_to_end(tmp_path, capsys):
    root = tmp_path / "data"
    make_dataset(root, splits={"train": 24, "val": 8, "test": 8}, dim=32)
    out = tmp_path / "run"
    assert train.main(["--model", "resg", "--dataset", "synth", "--root", str(root), "--out", str(out),
                       "--epochs", "1", "--batch-size", "20", "--workers", "0",
                       "--set", "embed_dim=16", "--set", "word_dim=8"]) == 0
    assert (out / "best.pt").exists() and "resg on synth" in capsys.readouterr().out
    assert evaluate.main([str(out), "--split", "test", "--root", str(root), "--hard-negatives",
                          "--workers", "0"]) == 0
    assert "attribute" in (out / "eval.json").read_text()


def shared(full, ablated):
    """Load ``full``'s parameters into ``ablated``; the names ``ablated`` lacks."""
    dropped = set(full.state_dict()) - set(ablated.state_dict())
    assert set(ablated.state_dict()) < set(full.state_dict())
    ablated.load_state_dict({k: v for k, v in full.state_dict().items() if k not in dropped})
    return dropped


def test_without_vreg_the_image_is_its_projected_regions(vocab, batch):
    full, bare = model(vocab), model(vocab, vreg=False)
    assert shared(full, bare) == {k for k in full.state_dict() if k.startswith(("v_refine.", "geo_fc.", "v_rel."))}
    img = batch.image
    with torch.no_grad():
        enc = bare.encode_image(img)
        x = torch.nn.functional.normalize(bare.region_fc(img.regions) + bare.box_fc(box_features(img.boxes)), dim=-1)
    mask = img.region_mask
    torch.testing.assert_close(enc.objects[mask], x[mask])
    torch.testing.assert_close(enc.relations, enc.objects)       # caption relations meet the regions
    assert torch.equal(enc.relation_mask, mask)
    # the text side is the full model's
    with torch.no_grad():
        te_full, te_bare = full.encode_text(batch.text), bare.encode_text(batch.text)
    torch.testing.assert_close(te_full.objects, te_bare.objects)
    torch.testing.assert_close(te_full.relations, te_bare.relations)


def test_without_treg_the_caption_is_its_words_scored_on_objects(vocab, batch):
    full, bare = model(vocab), model(vocab, treg=False)
    assert shared(full, bare) == {k for k in full.state_dict()
                                  if k.startswith(("attr_fc.", "t_refine.", "predicate.", "t_rel."))}
    txt = batch.text
    with torch.no_grad():
        enc = bare.encode_text(txt)
        states = torch.nn.functional.normalize(bigru_states(bare.gru, bare.embed(txt.tokens), txt.lengths), dim=-1)
    assert not enc.relation_mask.any()
    words = txt.mask & (txt.tokens != Vocabulary.START) & (txt.tokens != Vocabulary.END)
    for j in range(len(txt.tokens)):            # the real words, in order, are the object nodes
        n = int(words[j].sum())
        assert n > 0 and enc.object_mask[j].sum() == n
        torch.testing.assert_close(enc.objects[j, :n], states[j][words[j]])
    with torch.no_grad():
        ie = bare.encode_image(batch.image)
        s = bare.similarity(ie, enc)
        bare.cfg.rel_weight = 0.0
        torch.testing.assert_close(bare.similarity(ie, enc), s)   # relations never count
    # the image side is the full model's
    with torch.no_grad():
        torch.testing.assert_close(full.encode_image(batch.image).relations, ie.relations)


def test_loss_weights_zero_drop_exactly_their_term(vocab, batch):
    torch.manual_seed(1)
    out = model(vocab).train()(batch, epoch=1)
    for field, part, weight in (("center_weight", "center", 0.1), ("pn_weight", "pn", 1.0)):
        torch.manual_seed(1)
        off = model(vocab, **{field: 0.0}).train()(batch, epoch=1)
        assert out[part] > 0
        torch.testing.assert_close(off["loss"], out["loss"] - weight * out[part])
