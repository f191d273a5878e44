"""DSRLN: shapes, padding invariance, gradients, block vs one-by-one scoring, the grid mask, box
geometry, images without boxes, save/load, the missing-grid error, and train.py / evaluate.py
end to end on a tiny synthetic dataset with grid shards."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.shards import Vocabulary
from training import checkpoint, evaluate, models, train
from training.data import Batch, DataConfig, PairDataset, ShardData, collate_images, collate_text
from training.models.dsrln import DIF, grid_mask, local_scores
from training.synthetic import make_dataset

REPO = Path(__file__).resolve().parents[1]
GRID = (3, 3)
TINY = {"embed_dim": 16, "word_dim": 8, "heads": 2, "geo_dim": 8, "grid_dim": 32, "gisa_layers": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    layout = make_dataset(root, splits={"train": 12, "val": 4, "test": 4}, dim=32, seed=3, grid_hw=GRID)
    vocab = Vocabulary.load(layout.vocab)
    return root, vocab, ShardData(root, "synth", vocab, DataConfig(split="train", grid=True))


@pytest.fixture(scope="module")
def items(data):
    """Pairs with different box counts (2..6) and caption lengths."""
    ds = PairDataset(data[2])
    out = []
    for k, j in enumerate(range(0, 40, 3)):
        img, cap = ds[j]
        n = 2 + k % 5
        out.append((dict(img, features=img["features"][:n], boxes=img["boxes"][:n]), cap))
    assert len({len(c["tokens"]) for _, c in out}) > 1
    return out


def make_model(vocab, **over):
    torch.manual_seed(0)
    return models.build("dsrln", dict(TINY, **over), vocab).eval()


def batch_of(items) -> Batch:
    return Batch(collate_images([a for a, _ in items]), collate_text([b for _, b in items]))


def pad_more(b: Batch, extra: int = 3) -> Batch:
    """The same batch with ``extra`` more padded regions (garbage features and boxes) and words
    (garbage ids beyond each caption's length), which the masks must hide."""
    g = torch.Generator().manual_seed(1)

    def grow(x, fill):
        return torch.cat([x, fill((x.shape[0], extra) + tuple(x.shape[2:])).to(x.dtype)], 1)

    img = dataclasses.replace(
        b.image, regions=grow(b.image.regions, lambda s: 5 * torch.randn(s, generator=g)),
        boxes=grow(b.image.boxes, lambda s: 3 * torch.randn(s, generator=g)),
        region_mask=grow(b.image.region_mask, torch.zeros))
    txt = dataclasses.replace(
        b.text, tokens=grow(b.text.tokens, lambda s: torch.randint(1, 6, s, generator=g)),
        mask=grow(b.text.mask, torch.zeros))
    return Batch(img, txt)


@torch.no_grad()
def scores(model, b: Batch) -> torch.Tensor:
    return model.similarity(model.encode_image(b.image), model.encode_text(b.text))


def test_registered_with_paper_family_defaults():
    cls = models.get("dsrln")
    assert cls.needs_grid and not cls.two_tower
    f30k, coco = models.default_config("dsrln", "f30k"), models.default_config("dsrln", "coco")
    assert (f30k.embed_dim, f30k.margin, f30k.batch_size, f30k.lr) == (1024, 0.2, 128, 2e-4)
    assert (f30k.epochs, f30k.lr_decay_epochs) == (30, (15,))
    assert (coco.epochs, coco.lr_decay_epochs) == (20, (10,))


def test_shapes_for_different_box_and_word_counts(data, items):
    model = make_model(data[1])
    d = TINY["embed_dim"]
    for a, b in ((0, 5), (5, 8), (2, 11)):
        img, txt = batch_of(items[a:a + 3]).image, batch_of(items[b:b + 2]).text
        ie, te = model.encode_image(img), model.encode_text(txt)
        assert ie.local.shape == (3, img.regions.shape[1], d) and ie.global_.shape == (3, d)
        assert te.local.shape == (2, txt.tokens.shape[1], d) and te.global_.shape == (2, d)
        s = model.similarity(ie, te)
        assert s.shape == (3, 2) and torch.isfinite(s).all()


def test_padding_changes_nothing(data, items):
    model = make_model(data[1])
    b = batch_of(items[:6])
    torch.testing.assert_close(scores(model, pad_more(b)), scores(model, b), rtol=1e-5, atol=1e-6)


def test_block_similarity_equals_pairs_one_by_one_and_chunking(data, items):
    model = make_model(data[1])
    b = batch_of(items[:5])
    block = scores(model, b)
    pairs = torch.tensor([[scores(model, Batch(batch_of([items[i]]).image, batch_of([items[j]]).text)).item()
                           for j in range(5)] for i in range(5)])
    torch.testing.assert_close(block, pairs, rtol=1e-5, atol=1e-6)
    small = make_model(data[1], sim_block_elems=1)  # one caption per chunk
    torch.testing.assert_close(scores(small, b), block, rtol=1e-5, atol=1e-6)


def test_local_scores_match_the_attended_vectors_written_out():
    g = torch.Generator().manual_seed(0)
    regions = F.normalize(torch.randn(3, 5, 7, generator=g), dim=-1)
    words = F.normalize(torch.randn(4, 6, 7, generator=g), dim=-1)
    rmask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    wmask = torch.arange(6)[None] < torch.tensor([[6], [3], [1], [4]])
    expected = torch.zeros(3, 4)
    for i in range(3):
        r = regions[i, rmask[i]]
        for c in range(4):
            w = words[c, wmask[c]]
            attended = torch.softmax(9.0 * w @ r.t(), -1) @ r
            expected[i, c] = F.cosine_similarity(w, attended, dim=-1).mean()
    torch.testing.assert_close(local_scores(regions, rmask, words, wmask, 9.0), expected)


def test_grid_mask_covers_the_box_and_its_neighbours():
    # 4 x 4 grid; the box spans x in [0.3, 0.45] -> column 1, y in [0.55, 0.8] -> rows 2..3
    box = torch.tensor([[[0.3, 0.55, 0.45, 0.8], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]]])
    m0 = grid_mask(box, (4, 4), near=0).view(3, 4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[2:4, 1] = True
    assert torch.equal(m0[0], expected)
    assert m0[1].all()                       # the whole image covers every cell
    assert m0[2].sum() == 1 and m0[2, 2, 2]  # a point still covers its cell
    m1 = grid_mask(box, (4, 4), near=1).view(3, 4, 4)
    expected[1:4, 0:3] = True
    assert torch.equal(m1[0], expected)


def test_gradients_reach_every_parameter(data, items):
    model = make_model(data[1]).train()
    b = batch_of(items[:8])
    assert b.image.boxes_known.all() and b.image.grid is not None
    model(b, epoch=0).backward()
    dead = [n for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not dead, dead


def test_geometry_matters_only_when_boxes_are_known(data, items):
    model = make_model(data[1])
    img = batch_of(items[:4]).image
    moved = dataclasses.replace(img, boxes=torch.rand(img.boxes.shape).sort(-1).values)
    nobox = dataclasses.replace(img, boxes_known=torch.zeros_like(img.boxes_known))
    nobox_moved = dataclasses.replace(moved, boxes_known=nobox.boxes_known)
    with torch.no_grad():
        enc = lambda i: model.encode_image(i).local  # noqa: E731
        assert (enc(img) - enc(moved)).abs().max() > 1e-4
        torch.testing.assert_close(enc(nobox), enc(nobox_moved))


def test_a_region_reads_only_grid_cells_near_its_box(data, items):
    model = make_model(data[1], near_cells=0)
    img = batch_of(items[:1]).image
    n = img.regions.shape[1]
    boxes = torch.tensor([[0.0, 0.0, 0.3, 0.3]] * n)[None]   # every box in the top-left cell
    img = dataclasses.replace(img, boxes=boxes)
    far = img.grid.clone()
    far[0, 1:] += 10 * torch.randn_like(far[0, 1:])             # change every other cell
    with torch.no_grad():
        a = model.encode_image(img).local
        b = model.encode_image(dataclasses.replace(img, grid=far)).local
        torch.testing.assert_close(a, b)
        near = img.grid.clone()
        near[0, 0] += 10
        c = model.encode_image(dataclasses.replace(img, grid=near)).local
    assert (a - c).abs().max() > 1e-4


def test_ablations_drop_what_they_name(data, items):
    img = batch_of(items[:3]).image
    noisy_grid = dataclasses.replace(img, grid=img.grid + 10 * torch.randn_like(img.grid))
    moved = dataclasses.replace(img, boxes=torch.rand(img.boxes.shape).sort(-1).values)
    enc = lambda m, i: m.encode_image(i).local  # noqa: E731
    with torch.no_grad():
        full = make_model(data[1])
        assert (enc(full, img) - enc(full, noisy_grid)).abs().max() > 1e-4
        no_grid = make_model(data[1], grid_fusion=False)
        assert no_grid.dif is None and no_grid.grid_fc is None
        torch.testing.assert_close(enc(no_grid, img), enc(no_grid, noisy_grid))
        assert (enc(no_grid, img) - enc(no_grid, moved)).abs().max() > 1e-4   # geometry still used
        regions_only = make_model(data[1], grid_fusion=False, box_geometry=False)
        torch.testing.assert_close(enc(regions_only, img), enc(regions_only, moved))


def test_missing_or_mismatched_grid_is_a_clear_error(data, items):
    model = make_model(data[1])
    img = batch_of(items[:2]).image
    with pytest.raises(ValueError, match="needs grid features"):
        model.encode_image(dataclasses.replace(img, grid=None))
    with pytest.raises(ValueError, match="grid_dim=32"):
        model.encode_image(dataclasses.replace(img, grid=img.grid[..., :7]))


def test_train_py_without_grid_shards_tells_the_user(tmp_path):
    make_dataset(tmp_path, splits={"train": 4, "val": 2, "test": 2}, dim=32)
    p = subprocess.run([sys.executable, str(REPO / "training" / "train.py"), "--model", "dsrln",
                        "--dataset", "synth", "--root", str(tmp_path), "--out", str(tmp_path / "r"),
                        "--workers", "0"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 1
    assert "needs grid features" in p.stderr and "--kind grid" in p.stderr, p.stderr[-2000:]


def test_save_load_gives_identical_scores(data, items, tmp_path):
    vocab = data[1]
    model = make_model(vocab)
    with torch.no_grad():  # move the parameters away from their initial values
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    b = batch_of(items[:4])
    before = scores(model, b)
    fresh = models.build("dsrln", dict(TINY), vocab).eval()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(scores(fresh, b), before)
    checkpoint.save(tmp_path / "m.pt", {"model": model.state_dict()})
    again = models.build("dsrln", dict(TINY), vocab).eval()
    again.load_state_dict(checkpoint.load(tmp_path / "m.pt")["model"])
    assert torch.equal(scores(again, b), before)


def test_train_and_evaluate_end_to_end(data, tmp_path, capsys):
    root = data[0]
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    assert train.main(["--model", "dsrln", "--dataset", "synth", "--root", str(root), "--out",
                       str(tmp_path / "r"), "--epochs", "1", "--batch-size", "10", "--workers", "0",
                       *sets]) == 0
    assert "train: dsrln on synth: 1 epoch(s) run" in capsys.readouterr().out
    assert evaluate.main([str(tmp_path / "r"), "--root", str(root), "--workers", "0",
                          "--hard-negatives", "--batch-size", "3"]) == 0
    res = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert 0 <= res["test/f30k-1k"]["rsum"] <= 600


def test_dif_by_hand():
    """DIF on one region and three grid cells, the third outside the region's mask, with identity
    projections (one head of 2 channels) and the gate g = sigmoid(x - c):

        x = (1, 0); cells (1, 0), (0, 1), (5, 5) [masked out]
        attention: softmax(x . cell / sqrt 2) over the allowed cells = (a, 1 - a),
            a = e^(1/sqrt2) / (e^(1/sqrt2) + 1) = .66976
        context c = a (1, 0) + (1 - a) (0, 1) = (a, 1 - a)
        g = (sigmoid(1 - a), sigmoid(-(1 - a)));  fused = g x + (1 - g) c, then LayerNorm"""
    dif = DIF(2, heads=1, dropout=0.0).eval()
    eye = torch.eye(2)
    with torch.no_grad():
        for lin, w in ((dif.q, eye), (dif.kv, torch.cat([eye, eye])), (dif.out, eye),
                       (dif.gate, torch.cat([eye, -eye], 1))):
            lin.weight.copy_(w)
            lin.bias.zero_()
    x = torch.tensor([[[1.0, 0.0]]])
    grid = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    allowed = torch.tensor([[[True, True, False]]])
    a = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    g = (sig(1 - a), sig(-(1 - a)))
    fused = torch.tensor([g[0] * 1 + (1 - g[0]) * a, g[1] * 0 + (1 - g[1]) * (1 - a)])
    assert fused.tolist() == pytest.approx([0.86190, 0.19214], abs=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(dif(x, grid, allowed)[0, 0], torch.nn.functional.layer_norm(fused, (2,)))
        dif.norm = torch.nn.Identity()
        torch.testing.assert_close(dif(x, grid, allowed)[0, 0], fused)


def test_standardised_grid_gives_each_image_its_own_context(data, items):
    """Grid cells that share one large common component (as raw detector features do: mean
    pairwise cosine 0.94 on the context demo) project to nearly one vector, so the context DIF
    mixes into every region is nearly the same for all images; standardised per channel
    (``grid_norm``, the default) the images' contexts differ."""
    _, vocab, _ = data
    b = batch_of(items[:6])
    g = torch.Generator().manual_seed(0)
    common = 5.0 + torch.rand(TINY["grid_dim"], generator=g)
    b.image.grid = common + 0.1 * torch.randn(b.image.grid.shape, generator=g)

    def context_cosine(model):
        with torch.no_grad():
            c = F.normalize(model.grid_fc(model.grid(b.image)).mean(1), dim=-1)
        off = ~torch.eye(len(c), dtype=torch.bool)
        return (c @ c.T)[off].mean().item()

    raw, norm = make_model(vocab, grid_norm=False).train(), make_model(vocab).train()
    assert norm.cfg.grid_norm and norm.grid_norm is not None
    assert context_cosine(raw) > 0.95 > 0.5 > context_cosine(norm)
    cells = norm.grid(b.image).reshape(-1, TINY["grid_dim"])
    torch.testing.assert_close(cells.mean(0), torch.zeros(TINY["grid_dim"]), atol=1e-4, rtol=0)
    assert make_model(vocab, grid_fusion=False).grid_norm is None


def test_runs_saved_before_grid_norm_read_the_grid_raw():
    cls = models.get("dsrln").config_class
    saved = {k: v for k, v in dataclasses.asdict(cls()).items() if k not in cls.SAVED_BEFORE}
    assert models.make_config(cls, saved, saved=True).grid_norm is False
    assert models.default_config("dsrln").grid_norm is True


def test_signed_geometry_tells_left_from_right(data, items):
    """GISA's geometry (relation networks' log |dx|) is the same for "A left of B" and "A right of
    B"; signed_geometry embeds the signed offsets, which differ."""
    img = batch_of(items[:1]).image
    img = dataclasses.replace(img, regions=img.regions[:, :2], region_mask=img.region_mask[:, :2],
                              boxes=torch.tensor([[[0.1, 0.4, 0.3, 0.6], [0.6, 0.4, 0.8, 0.6]]]))
    swapped = dataclasses.replace(img, boxes=img.boxes.flip(1))   # A and B trade places
    enc = lambda m, i: m.encode_image(i).local  # noqa: E731
    with torch.no_grad():
        blind = make_model(data[1], grid_fusion=False)
        torch.testing.assert_close(enc(blind, img), enc(blind, swapped))
        signed = make_model(data[1], grid_fusion=False, signed_geometry=True)
        assert (enc(signed, img) - enc(signed, swapped)).abs().max() > 1e-3
        off = make_model(data[1], grid_fusion=False, box_geometry=False, signed_geometry=True)
        torch.testing.assert_close(enc(off, img), enc(off, swapped))   # box_geometry=False: no geometry


def _silence_interaction(layer):
    layer.geo_query.zero_()


def _silence_weight(layer):
    layer.geo_weight.weight.zero_()
    layer.geo_weight.bias.fill_(1.0)                                     # log relu(1) = 0 for every pair


@pytest.mark.parametrize("switch, dropped, silence", [
    ({"geometry_weight": False}, "geo_weight", _silence_interaction),        # the interaction term alone
    ({"geometry_interaction": False}, "geo_query", _silence_weight)])       # the weight alone
def test_each_geometry_term_alone(data, items, switch, dropped, silence):
    img = batch_of(items[:3]).image
    moved = dataclasses.replace(img, boxes=torch.rand(img.boxes.shape).sort(-1).values)
    enc = lambda m, i: m.encode_image(i).local  # noqa: E731
    with torch.no_grad():
        model = make_model(data[1], grid_fusion=False, **switch)
        assert all(getattr(layer, dropped) is None for layer in model.gisa)
        assert (enc(model, img) - enc(model, moved)).abs().max() > 1e-4   # the term left still sees boxes
        for layer in model.gisa:
            silence(layer)                                               # ... and is all that does
        torch.testing.assert_close(enc(model, img), enc(model, moved))


def test_the_geometry_floor_is_the_logit_of_a_masked_pair(data, items):
    img = batch_of(items[:2]).image
    for floor in (1e-6, 0.1):
        model = make_model(data[1], grid_fusion=False, geometry_floor=floor, geometry_interaction=False)
        layer = model.gisa[0]
        with torch.no_grad():
            layer.geo_weight.weight.zero_()
            layer.geo_weight.bias.fill_(-1.0)                            # relu(w.E) = 0: every pair masked
            x = model.img_fc(model.regions(img))
            q, k, _ = layer.heads_of(x)
            geo = torch.zeros(*x.shape[:2], x.shape[1], model.cfg.geo_dim)
            appearance, geo_term = layer.logits(q, k, geo, torch.ones(len(x), dtype=torch.bool))
        torch.testing.assert_close(geo_term, torch.full_like(geo_term, math.log(floor)))
    with pytest.raises(ValueError, match="geometry_floor"):
        make_model(data[1], geometry_floor=0.0)
