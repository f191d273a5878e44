"""Shared model pieces (training/models/layers.py), the registry, configs of older runs, and the
word-vector initialisation (``--set word_vectors=true``)."""

import dataclasses
import json
import math
import sys

import numpy as np
import pytest
import torch

from pipeline import shards
from pipeline.shards import Vocabulary
from training import checkpoint, models, train
from training.config import RunConfig
from training.models import layers
from training.synthetic import make_dataset, random_caption_batches, random_image_batches, random_vocab

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# box geometry

def test_relative_offsets_are_relation_networks_geometry_and_keep_the_sign():
    a = torch.tensor([0.1, 0.2, 0.3, 0.6])        # centre (0.2, 0.4), w 0.2, h 0.4
    b = torch.tensor([0.5, 0.0, 0.9, 0.2])        # centre (0.7, 0.1), w 0.4, h 0.2
    got = layers.relative_offsets(a, b)
    want = torch.tensor([(0.7 - 0.2) / 0.2, (0.1 - 0.4) / 0.4, math.log(0.4 / 0.2), math.log(0.2 / 0.4)])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(layers.relative_offsets(b, a)[:2] * torch.tensor([0.4, 0.2]),
                               -got[:2] * torch.tensor([0.2, 0.4]))   # b sees a on the other side


def test_relative_geometry_of_every_pair():
    boxes = torch.tensor([[[0.1, 0.2, 0.3, 0.6], [0.5, 0.0, 0.9, 0.2], [0.1, 0.2, 0.3, 0.6]]])
    geo = layers.relative_geometry(boxes)
    assert geo.shape == (1, 3, 3, 4)
    torch.testing.assert_close(geo[0, 0, 1], torch.tensor([math.log(0.5 / 0.2), math.log(0.3 / 0.4),
                                                           math.log(2.0), math.log(0.5)]))
    # a box on top of another: the distance terms are floored at 1e-3, not -inf
    torch.testing.assert_close(geo[0, 0, 2], torch.tensor([math.log(1e-3)] * 2 + [0.0, 0.0]))
    assert torch.isfinite(layers.relative_geometry(torch.zeros(2, 4, 4))).all()   # padded boxes


def test_box_features():
    got = layers.box_features(torch.tensor([[0.1, 0.2, 0.5, 0.7]]))
    torch.testing.assert_close(got, torch.tensor([[0.1, 0.2, 0.5, 0.7, 0.4 * 0.5]]))


# ---------------------------------------------------------------------------------------------
# attention and masks

def test_attended_cosine_matches_the_attended_vectors_written_out():
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(3, 5, 8, generator=g), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(2, 4, 8, generator=g), dim=-1)
    vmask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    got = layers.attended_cosine(v, vmask, t, 9.0)
    for i in range(2):   # image 2 has no real entry: scores 0
        real = v[i][vmask[i]]
        for j in range(2):
            att = torch.softmax(9.0 * t[j] @ real.t(), -1) @ real
            torch.testing.assert_close(got[i, j], torch.nn.functional.cosine_similarity(t[j], att, dim=-1))
    assert torch.equal(got[2], torch.zeros(2, 4))


def test_masked_softmax_and_mean_ignore_padding_even_when_it_is_nan():
    x = torch.tensor([[1.0, 2.0, float("nan")], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    p = layers.masked_softmax(x, mask)
    torch.testing.assert_close(p[0], torch.softmax(torch.tensor([1.0, 2.0, -math.inf]), 0))
    assert torch.equal(p[1], torch.zeros(3))       # nothing to attend to: zeros, not NaN
    m = layers.masked_mean(x.unsqueeze(-1), mask).squeeze(-1)
    torch.testing.assert_close(m, torch.tensor([1.5, 0.0]))


# ---------------------------------------------------------------------------------------------
# encodings

@dataclasses.dataclass
class Toy(layers.Encoding):
    a: torch.Tensor
    b: torch.Tensor


def test_encodings_slice_and_move_like_a_tensor():
    enc = Toy(torch.arange(12).view(4, 3), torch.arange(4) > 1)
    part = enc[1:3]
    assert isinstance(part, Toy) and len(part) == 2
    assert torch.equal(part.a, enc.a[1:3]) and torch.equal(part.b, enc.b[1:3])
    moved = enc.to(torch.float64)
    assert moved.a.dtype == torch.float64 and moved.b.dtype == torch.float64


def test_cross_attention_encoders_return_named_encodings():
    vocab = random_vocab(50)
    img = random_image_batches(3, 4, 32, 3, grid_hw=(2, 2))[0]
    txt = random_caption_batches(2, vocab, 2)[0]
    for name in (n for n in models.names() if not models.get(n).two_tower):
        m = models.build(name, _small(name), vocab).eval()
        with torch.no_grad():
            ie, te = m.encode_image(img), m.encode_text(txt)
            assert isinstance(ie, layers.Encoding) and isinstance(te, layers.Encoding)
            # one image at a time (sliced encodings) gives the rows of the whole block
            full = m.similarity(ie, te)
            rows = torch.cat([m.similarity(ie[i:i + 1], te) for i in range(3)])
        torch.testing.assert_close(rows, full)


def _small(name: str) -> dict:
    small = {"embed_dim": 16, "word_dim": 8, "feature_dim": 32}
    return small | {"dsrln": {"grid_dim": 32, "heads": 2}, "kidrr": {"sim_dim": 8}}.get(name, {})


# ---------------------------------------------------------------------------------------------
# region feature standardisation (every model)

def test_feature_norm_ignores_padding_and_depends_on_the_item_alone_at_evaluation():
    g = torch.Generator().manual_seed(0)
    norm = layers.FeatureNorm(6)
    x = 50 + torch.randn(4, 3, 6, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    garbage = torch.where(mask.unsqueeze(-1), x, torch.full_like(x, 1e6))
    out = norm.train()(garbage, mask)
    real = out[mask]
    torch.testing.assert_close(real.mean(0), torch.zeros(6), atol=1e-5, rtol=0)   # standardised
    torch.testing.assert_close(real.var(0, unbiased=False), torch.ones(6), atol=1e-3, rtol=0)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    torch.testing.assert_close(norm.running_mean, 0.1 * x[mask].mean(0))   # padding not counted
    norm.eval()
    torch.testing.assert_close(norm(x, mask)[1:2], norm(x[1:2], mask[1:2]))


def test_vsepp_tells_apart_images_that_share_a_large_common_component():
    """The cause of vsepp's collapse on random-weight features: every image is a big shared
    vector plus a small own part, and without standardisation the projection maps them all to
    nearly one point (cosine 0.99 on the demo), where the hardest-negative loss stays."""
    g = torch.Generator().manual_seed(0)
    common = 1.6 + 0.6 * torch.rand(32, generator=g)
    img = random_image_batches(16, 3, 32, 16)[0]
    img = dataclasses.replace(img, regions=common + 0.15 * torch.randn(16, 3, 32, generator=g))
    vocab = random_vocab(30)

    def mean_cosine(feature_norm):
        torch.manual_seed(0)
        m = models.build("vsepp", dict(_small("vsepp"), feature_norm=feature_norm), vocab).train()
        with torch.no_grad():
            v = m.encode_image(img)
        return (v @ v.t())[~torch.eye(16, dtype=torch.bool)].mean().item()

    assert mean_cosine(False) > 0.95
    assert mean_cosine(True) < 0.3


@pytest.mark.parametrize("name", models.names())
def test_standardised_regions_spread_the_scores_over_images_that_share_a_component(name):
    """Region features with one large positive common part (as detector features have): with
    raw features every model's scores of a caption against 16 images start nearly equal; the
    base config's feature_norm spreads them several times wider."""
    g = torch.Generator().manual_seed(0)
    common = 1.6 + 0.6 * torch.rand(32, generator=g)
    img = random_image_batches(16, 3, 32, 16, grid_hw=(2, 2))[0]
    img = dataclasses.replace(img, regions=common + 0.15 * torch.randn(16, 3, 32, generator=g))
    vocab = random_vocab(30)
    txt = random_caption_batches(16, vocab, 16)[0]

    def spread(feature_norm):
        torch.manual_seed(0)
        m = models.build(name, dict(_small(name), feature_norm=feature_norm), vocab).train()
        with torch.no_grad():
            return m.similarity(m.encode_image(img), m.encode_text(txt)).std(0).mean().item()

    assert spread(True) > 3 * spread(False)


# ---------------------------------------------------------------------------------------------
# registry and configs

def test_a_model_module_registers_itself_when_its_file_exists(tmp_path, monkeypatch):
    (tmp_path / "toymodel.py").write_text(
        "from training.models import ITMModel, register\n\n\n"
        "@register('toy')\nclass Toy(ITMModel):\n    pass\n")
    monkeypatch.setattr(models, "__path__", [*models.__path__, str(tmp_path)])
    try:
        assert "toy" in models.names() and models.get("toy").name == "toy"
    finally:
        monkeypatch.undo()
        models._REGISTRY.pop("toy", None)
        sys.modules.pop("training.models.toymodel", None)
    assert "toy" not in models.names()   # gone with its file: nothing else named it


def test_configs_restate_no_base_default():
    base = models.ModelConfig()
    for name in models.names():
        cls = models.get(name)
        own = cls.config_class.__dict__.get("__annotations__", {})
        restated = [f for f in own if hasattr(base, f) and getattr(cls.config_class(), f) == getattr(base, f)]
        assert not restated, (name, restated)
        for dataset, values in cls.DATASET_DEFAULTS.items():
            cfg = cls.config_class()
            same = [k for k, v in values.items() if getattr(cfg, k) == v]
            assert not same, (name, dataset, same)


def test_saved_configs_of_older_runs_load_as_they_were_trained():
    cls = models.get("resg").config_class
    old = {k: v for k, v in models.dataclasses.asdict(cls()).items() if k != "sim_block_elems"}
    old["sim_budget"] = 1234                                       # renamed since
    assert models.make_config(cls, old, saved=True).sim_block_elems == 1234
    for name in models.names():
        config_class = models.get(name).config_class
        saved = {k: v for k, v in models.dataclasses.asdict(config_class()).items() if k != "feature_norm"}
        assert models.make_config(config_class, saved, saved=True).feature_norm is False  # added since
        assert models.default_config(name).feature_norm is True                           # new runs


@pytest.mark.parametrize("name", models.names())
def test_a_run_saved_before_feature_norm_loads_and_scores_the_same(name, tmp_path):
    vocab = random_vocab(30)
    cfg = _small(name)
    torch.manual_seed(0)
    old = models.build(name, dict(cfg, **models.get(name).config_class.SAVED_BEFORE), vocab).eval()
    checkpoint.save(tmp_path / "best.pt", {"model": old.state_dict()})
    saved = {k: v for k, v in models.dataclasses.asdict(models.default_config(name, **cfg)).items()
             if k not in models.get(name).config_class.SAVED_BEFORE}
    run = RunConfig(model=name, dataset="synth", root=str(tmp_path), model_config=saved)
    again = models.build(name, run.model_cfg(), vocab).eval()
    again.load_state_dict(checkpoint.load(tmp_path / "best.pt")["model"])   # strict: same keys
    img = random_image_batches(4, 3, 32, 4, grid_hw=(2, 2))[0]
    txt = random_caption_batches(4, vocab, 4)[0]
    with torch.no_grad():
        assert torch.equal(again.similarity(again.encode_image(img), again.encode_text(txt)),
                           old.similarity(old.encode_image(img), old.encode_text(txt)))


# ---------------------------------------------------------------------------------------------
# word vectors

@pytest.fixture()
def vocab():
    return Vocabulary({"words": [[w, 0] for w in shards.VOCAB_SPECIALS] + [["dog", 3], ["cat", 2]],
                       "min_count": 1, "predicates": [["on", 1]], "attributes": [["red", 1]]})


@pytest.mark.parametrize("name", models.names())
def test_word_vectors_initialise_every_models_embedding(vocab, tmp_path, name):
    vectors = np.random.default_rng(0).normal(size=(len(vocab), 8)).astype(np.float32)
    vectors[0] = 0
    shards.write_vectors(tmp_path / "v.npy", vectors)
    over = dict(_small(name), word_dim=8, word_vectors=True)
    m = models.build(name, over, vocab, vectors=tmp_path / "v.npy")
    assert torch.equal(m.word_embedding().weight.detach(), torch.from_numpy(vectors))
    plain = models.build(name, dict(over, word_vectors=False), vocab, vectors=tmp_path / "v.npy")
    assert not torch.equal(plain.word_embedding().weight.detach(), torch.from_numpy(vectors))


def test_word_vectors_missing_or_of_another_width_are_refused_clearly(vocab, tmp_path):
    with pytest.raises(shards.ShardError, match=r"v\.npy: file not found.*itmkit vocab .*--vectors"):
        models.build("vsepp", {"word_vectors": True}, vocab, vectors=tmp_path / "v.npy")
    shards.write_vectors(tmp_path / "v.npy", np.zeros((len(vocab), 50)))
    with pytest.raises(ValueError, match=r"50-d, the model's word_dim is 300: add --set word_dim=50"):
        models.build("vsepp", {"word_vectors": True}, vocab, vectors=tmp_path / "v.npy")
    shards.write_vectors(tmp_path / "v.npy", np.zeros((len(vocab) + 1, 300)))
    with pytest.raises(shards.ShardError, match=r"do not match a vocabulary.*again for the current vocabulary"):
        models.build("vsepp", {"word_vectors": True}, vocab, vectors=tmp_path / "v.npy")


def test_train_with_word_vectors(tmp_path, capsys):
    root = tmp_path / "data"
    layout = make_dataset(root, splits={"train": 20, "val": 6, "test": 6})
    args = ["--model", "vsepp", "--dataset", "synth", "--root", str(root), "--epochs", "1",
            "--batch-size", "10", "--workers", "0", "--set", "embed_dim=16", "--set", "word_dim=8",
            "--set", "word_vectors=true"]
    with pytest.raises(shards.ShardError, match="itmkit vocab"):
        train.main([*args, "--out", str(tmp_path / "r0")])
    n = len(Vocabulary.load(layout.vocab))
    shards.write_vectors(layout.vocab_vectors, np.random.default_rng(0).normal(size=(n, 8)))
    assert train.main([*args, "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["model_config"]["word_vectors"] is True
