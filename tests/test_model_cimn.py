"""CIMN: shapes, padding invariance, gradients, batch vs one-by-one similarity, relation graphs,
save/load, and train.py / evaluate.py end to end on a tiny synthetic dataset."""

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.shards import VOCAB_SPECIALS, Vocabulary
from training import checkpoint, models
from training.data import Batch, collate_images, collate_text
from training.models.cimn import RelationReasoning, box_neighbourhood, sequence_neighbourhood
from training.synthetic import make_dataset

REPO = Path(__file__).resolve().parents[1]
WORDS = ["a", "red", "blue", "dog", "cat", "ball", "on", "near", "big"]
TINY = {"embed_dim": 16, "word_dim": 8, "feature_dim": 12, "frr_layers": 2}


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary({"words": [[w, 0] for w in VOCAB_SPECIALS] + [[w, 1] for w in WORDS],
                       "min_count": 1, "predicates": [["on", 1]], "attributes": [["red", 1]]})


def model(vocab, **overrides):
    torch.manual_seed(0)
    return models.build("cimn", dict(TINY, **overrides), vocab).eval()


def image_item(rng, i, n_boxes, dim=12, known=True):
    xy = rng.uniform(0, 0.6, (n_boxes, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.1, 0.4, (n_boxes, 2))], 1).clip(0, 1)
    if not known:
        boxes[:] = [0, 0, 1, 1]
    return {"image_id": i, "image_hw": (100, 100), "boxes_known": known,
            "features": rng.normal(0, 1, (n_boxes, dim)).astype(np.float16),
            "boxes": boxes.astype(np.float32)}


def caption_item(vocab, j, image_id, words):
    empty = np.zeros(0, dtype=np.int64)
    return {"caption_id": j, "image_id": image_id, "tokens": np.array(vocab.encode(words)),
            **{k: empty for k in ("obj_index", "obj_word", "attr_object", "attr_id", "attr_word",
                                  "rel_subject", "rel_predicate", "rel_object")}}


CAPTIONS = [["a", "red", "dog", "on", "a", "ball"], ["cat"],
            ["a", "big", "blue", "cat", "near", "a", "red", "dog"], ["on", "near"]]


@pytest.fixture(scope="module")
def batch(vocab):
    rng = np.random.default_rng(0)
    images = [image_item(rng, i, n, known=i != 2) for i, n in enumerate((3, 5, 1, 4))]
    texts = [caption_item(vocab, j, j, w) for j, w in enumerate(CAPTIONS)]
    return Batch(collate_images(images), collate_text(texts))


def pad_width(t, extra, value=0):
    pad = torch.full((t.shape[0], extra) + t.shape[2:], value, dtype=t.dtype)
    return torch.cat([t, pad], 1)


def padded(batch, extra=3):
    """The same batch with ``extra`` more padded regions and words (random padding features)."""
    img, txt = batch.image, batch.text
    regions = pad_width(img.regions, extra)
    regions[:, -extra:] = torch.randn(regions.shape[0], extra, regions.shape[2]) * 5
    boxes = pad_width(img.boxes, extra)
    boxes[:, -extra:] = torch.rand(boxes.shape[0], extra, 4)
    img = dataclasses.replace(img, regions=regions, boxes=boxes,
                              region_mask=pad_width(img.region_mask, extra, False))
    txt = dataclasses.replace(txt, tokens=pad_width(txt.tokens, extra),
                              mask=pad_width(txt.mask, extra, False))
    return Batch(img, txt)


def test_registered_two_tower_with_dataset_defaults():
    assert "cimn" in models.names()
    cls = models.get("cimn")
    assert cls.two_tower and not cls.needs_grid
    assert models.default_config("cimn", "coco").lr_decay_epochs == (10,)
    assert models.default_config("cimn", "f30k").epochs == 30


def test_shapes_and_unit_norm_for_different_box_and_word_counts(vocab, batch):
    m = model(vocab)
    with torch.no_grad():
        v, t = m.encode_image(batch.image), m.encode_text(batch.text)
        for n_img, n_txt in ((4, 4), (1, 3), (3, 1)):
            assert m.similarity(v[:n_img], t[:n_txt]).shape == (n_img, n_txt)
    assert v.shape == t.shape == (4, 16)
    assert torch.allclose(v.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(t.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.isfinite(v).all() and torch.isfinite(t).all()


def test_padding_changes_nothing(vocab, batch):
    m = model(vocab)
    with torch.no_grad():
        a = m.similarity(m.encode_image(batch.image), m.encode_text(batch.text))
        p = padded(batch)
        b = m.similarity(m.encode_image(p.image), m.encode_text(p.text))
    assert torch.allclose(a, b, atol=1e-5)


def test_batch_similarity_equals_pairs_one_by_one(vocab, batch):
    m = model(vocab)
    rng = np.random.default_rng(0)
    images = [image_item(rng, i, n, known=i != 2) for i, n in enumerate((3, 5, 1, 4))]
    texts = [caption_item(vocab, j, j, w) for j, w in enumerate(CAPTIONS)]
    with torch.no_grad():
        full = m.similarity(m.encode_image(batch.image), m.encode_text(batch.text))
        for i, im in enumerate(images):
            v = m.encode_image(collate_images([im]))
            for j, tx in enumerate(texts):
                one = m.similarity(v, m.encode_text(collate_text([tx])))
                assert torch.allclose(full[i, j], one[0, 0], atol=1e-5), (i, j)


@pytest.mark.parametrize("loss", ["gravitation", "triplet"])
def test_gradients_reach_every_parameter(vocab, batch, loss):
    m = model(vocab, loss=loss).train()
    out = m(batch)
    total = out["loss"] if isinstance(out, dict) else out
    assert total > 0
    total.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_relation_graphs():
    boxes = torch.tensor([[[0, 0, .2, .2], [.1, 0, .3, .2], [.8, .8, 1, 1], [0, 0, 0, 0]]])
    mask = torch.tensor([[True, True, True, False]])
    adj = box_neighbourhood(boxes, mask, torch.tensor([True]), sigma=0.3)
    assert torch.allclose(adj.sum(-1), torch.tensor([[1., 1., 1., 0.]]))
    assert adj[0, :, 3].eq(0).all()                    # the padded region is nobody's neighbour
    assert adj[0, 0, 1] > 10 * adj[0, 0, 2]            # close boxes are stronger neighbours
    uniform = box_neighbourhood(boxes, mask, torch.tensor([False]), sigma=0.3)
    assert torch.allclose(uniform[0, :3, :3], torch.full((3, 3), 1 / 3))
    seq = sequence_neighbourhood(torch.tensor([[True, True, True, True, False]]), window=1)
    expected = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 0],
                             [0, 0, 0, 0, 0]], dtype=torch.float)
    assert torch.allclose(seq[0], expected / expected.sum(1, keepdim=True).clamp(min=1))


def test_unknown_loss_is_a_clear_error(vocab, batch):
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        model(vocab, loss="nope")(batch)


def encodings(m, batch):
    with torch.no_grad():
        return m.encode_image(batch.image), m.encode_text(batch.text)


def test_mean_pooling_is_graph_pooling_with_equal_node_scores(vocab, batch):
    full, mean = model(vocab), model(vocab, pooling="mean")
    dropped = {k for k in full.state_dict() if ".pool.gcn." in k or ".pool.score." in k}
    assert dropped and set(mean.state_dict()) == set(full.state_dict()) - dropped
    mean.load_state_dict({k: v for k, v in full.state_dict().items() if k not in dropped})
    with torch.no_grad():
        for tower in (full.image_tower, full.text_tower):   # a zero score: softmax weights 1/n
            tower.pool.score.weight.zero_()
    for a, b in zip(encodings(full, batch), encodings(mean, batch)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        model(vocab, pooling="max")


def test_no_frr_layers_is_frr_replaced_by_the_identity(vocab, batch):
    full, bare = model(vocab), model(vocab, frr_layers=0)
    dropped = {k for k in full.state_dict() if ".layers." in k}
    assert dropped and set(bare.state_dict()) == set(full.state_dict()) - dropped
    bare.load_state_dict({k: v for k, v in full.state_dict().items() if k not in dropped})
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(encodings(full, batch), encodings(bare, batch)))
    with torch.no_grad():
        for m in (full, bare):
            for tower in (m.image_tower, m.text_tower):
                # equal node scores, so that the pooling graph (which FRR's potential graph
                # enters) does not matter; a zero update and no norm make a layer the identity
                tower.pool.score.weight.zero_()
                for layer in tower.layers:
                    layer.scale.zero_()
                    layer.norm = torch.nn.Identity()
    for a, b in zip(encodings(full, batch), encodings(bare, batch)):
        torch.testing.assert_close(a, b)


def test_without_intra_terms_the_loss_is_the_inter_modal_term(vocab, batch):
    full = model(vocab)(batch)                  # eval mode: no dropout, the same encodings
    no_intra = model(vocab, gl_intra=0.0)(batch)
    assert full["intra"] > 0
    torch.testing.assert_close(no_intra["loss"], full["inter"])
    torch.testing.assert_close(full["loss"], full["inter"] + 0.5 * full["intra"])


def test_state_dict_and_checkpoint_round_trip(vocab, batch, tmp_path):
    m = model(vocab)
    path = checkpoint.save(tmp_path / "m.pt", {"model": m.state_dict()})
    m2 = models.build("cimn", dict(TINY), vocab).eval()   # other seed: differs until loaded
    m2.load_state_dict(checkpoint.load(path)["model"])
    with torch.no_grad():
        a = m.similarity(m.encode_image(batch.image), m.encode_text(batch.text))
        b = m2.similarity(m2.encode_image(batch.image), m2.encode_text(batch.text))
    assert torch.equal(a, b)


def test_train_and_evaluate_end_to_end(tmp_path):
    make_dataset(tmp_path, splits={"train": 24, "val": 8, "test": 8})
    small = ["--set", "embed_dim=32", "--set", "word_dim=16", "--batch-size", "20", "--workers", "0"]
    p = subprocess.run([sys.executable, str(REPO / "training" / "train.py"), "--model", "cimn",
                        "--dataset", "synth", "--root", str(tmp_path), "--out", str(tmp_path / "run"),
                        "--epochs", "1", *small], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "train: cimn on synth: 1 epoch(s) run" in p.stdout
    p = subprocess.run([sys.executable, str(REPO / "training" / "evaluate.py"), str(tmp_path / "run"),
                        "--root", str(tmp_path), "--workers", "0", "--hard-negatives"],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rSum" in p.stdout and "hard negatives [attribute]" in p.stdout


def test_frr_layer_by_hand():
    """One FRR layer, x <- x + gamma * ReLU(W_n A_near x + W_p A_pot x), on two real nodes and a
    padded one, with identity weights, gamma = 1 and the LayerNorm checked apart.

        x1 = (1, 0), x2 = (0, 2); A_near = [[.5, .5], [.5, .5]]
        A_pot = softmax_j(x_i . x_j / sqrt 2):  row 1 scores (1/sqrt2, 0) -> (a, 1 - a),
            a = e^(1/sqrt2) / (e^(1/sqrt2) + 1) = .66976;  row 2 scores (0, 4/sqrt2) -> (b, 1 - b),
            b = 1 / (1 + e^(4/sqrt2)) = .05581
        A_near x = (.5, 1) for both;  A_pot x = (a, 2 (1 - a)) and (b, 2 (1 - b))
        x1' = (1 + .5 + a, 0 + 1 + 2 (1 - a)),  x2' = (0 + .5 + b, 2 + 1 + 2 (1 - b))"""
    layer = RelationReasoning(2, dropout=0.0, scale_init=1.0).eval()
    with torch.no_grad():
        for lin in (layer.potential.query, layer.potential.key, layer.w_near, layer.w_potential):
            lin.weight.copy_(torch.eye(2))
        layer.w_near.bias.zero_()
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, False]])
    near = torch.tensor([[[.5, .5, 0], [.5, .5, 0], [0, 0, 0]]])
    a = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1)
    b = 1 / (1 + math.exp(4 / math.sqrt(2)))
    assert (round(a, 5), round(b, 5)) == (0.66976, 0.05581)
    expected = torch.tensor([[1 + .5 + a, 1 + 2 * (1 - a)], [.5 + b, 3 + 2 * (1 - b)]])
    with torch.no_grad():
        out, potential = layer(x, near, mask)
        torch.testing.assert_close(potential[0], torch.tensor([[a, 1 - a, 0], [b, 1 - b, 0], [0, 0, 0]]))
        torch.testing.assert_close(out[0, :2], torch.nn.functional.layer_norm(expected, (2,)))
        layer.norm = torch.nn.Identity()
        torch.testing.assert_close(layer(x, near, mask)[0][0, :2], expected)
