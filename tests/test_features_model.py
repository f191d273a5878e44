"""The bottom-up Faster R-CNN on tiny images with a seeded random model: shapes, dtypes, box
coordinates, selection modes, edge cases, and features that carry the image content."""

import dataclasses

import numpy as np
import pytest
import torch


pytestmark = pytest.mark.usefixtures("one_thread")
from PIL import Image, ImageDraw

from features.config import ExtractorConfig
from features.rcnn import BottomUpRCNN, box_masks
from features.roi_heads import max_class_scores, select_boxes
from features.transforms import resized_size, to_network_input
from features.weights import load_weights

SMALL = dict(min_size=64, max_size=96, rpn_pre_nms_topk=200, rpn_post_nms_topk=16)


@pytest.fixture(scope="module")
def state():
    model = BottomUpRCNN(ExtractorConfig(**SMALL))
    load_weights(model, "random", seed=0)
    return model.state_dict()


def make_model(state, **overrides):
    model = BottomUpRCNN(ExtractorConfig(**dict(SMALL, **overrides)))
    model.load_state_dict(state)
    return model


def scene(color=(255, 0, 0), shape="square", x=16, size=(80, 120), noise_seed=None):
    h, w = size
    im = Image.new("RGB", (w, h), (40, 40, 40))
    d = ImageDraw.Draw(im)
    box = [x, 20, x + 40, 60]
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=color)
    if noise_seed is not None:
        arr = np.asarray(im, dtype=np.int16) + np.random.default_rng(noise_seed).integers(-8, 9, (h, w, 3))
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return im


def run(model, ims, **kw):
    tensors = [to_network_input(im, model.cfg.min_size, model.cfg.max_size) for im in ims]
    return model(tensors, [(im.height, im.width) for im in ims], **kw)


def test_shapes_dtypes_and_box_coordinates(state):
    model = make_model(state)
    ims = [scene(size=(80, 120)), scene(size=(150, 90), x=30)]
    for im, out in zip(ims, run(model, ims)):
        n = len(out["features"])
        assert 10 <= n <= 16  # min_boxes 10, at most the 16 proposals
        assert out["features"].shape == (n, 2048) and out["features"].dtype == torch.float32
        assert out["boxes"].shape == (n, 4) and out["boxes"].dtype == torch.float32
        for key in ("obj_labels", "attr_labels"):
            assert out[key].shape == (n,) and not out[key].is_floating_point()
        assert out["obj_labels"].min() >= 0 and out["obj_labels"].max() < 1600
        assert out["attr_labels"].min() >= 0 and out["attr_labels"].max() < 400
        for key in ("obj_scores", "attr_scores"):
            assert out[key].shape == (n,) and ((out[key] > 0) & (out[key] <= 1)).all()
        assert out["grid"].shape == (49, 2048)
        b = out["boxes"]
        # original pixels: inside the image as it was before resizing to 64..96
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= im.width).all() and (b[:, 3] <= im.height).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert b[:, 2].max() > 96 or b[:, 3].max() > 96 or max(im.size) <= 96  # not resized coordinates
        assert torch.isfinite(out["features"]).all() and torch.isfinite(out["grid"]).all()


def test_batched_equals_one_by_one(state):
    model = make_model(state)
    ims = [scene(), scene(color=(0, 0, 255)), scene(size=(100, 100))]
    together = run(model, ims)
    for im, want in zip(ims, together):
        alone = run(model, [im])[0]
        torch.testing.assert_close(alone["features"], want["features"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(alone["boxes"], want["boxes"], rtol=1e-4, atol=1e-2)


def test_fixed_k_returns_exactly_k(state):
    model = make_model(state, boxes="fixed:36")  # more than the 16 proposals: padded with the whole image
    out = run(model, [scene()])[0]
    assert out["features"].shape == (36, 2048) and out["boxes"].shape == (36, 4)
    model = make_model(state, boxes="fixed:5")
    out5 = run(model, [scene()])[0]
    assert len(out5["features"]) == 5


def test_zero_proposals_fall_back_to_the_whole_image(state):
    model = make_model(state, rpn_min_size=1e6)  # every proposal is too small: the RPN returns none
    im = scene()
    c4 = model.backbone(to_network_input(im, 64, 96)[None].float() - model.pixel_mean)
    assert len(model.proposal_generator(c4, [(64, 96)])[0]) == 0
    out = run(model, [im])[0]
    assert len(out["features"]) == 1
    torch.testing.assert_close(out["boxes"][0], torch.tensor([0.0, 0.0, im.width, im.height]))
    assert torch.isfinite(out["features"]).all()


def test_given_boxes_are_returned_exactly(state):
    model = make_model(state, boxes="given")
    im = scene(size=(90, 130))
    given = torch.tensor([[0.5, 1.25, 40.0, 33.0], [10, 10, 129.5, 89.0], [60, 20, 70, 30]])
    out = run(model, [im], given_boxes=[given])[0]
    assert torch.equal(out["boxes"], given)
    assert out["features"].shape == (3, 2048) and len(out["obj_labels"]) == 3
    empty = run(model, [im], given_boxes=[torch.zeros(0, 4)])[0]
    assert empty["features"].shape == (0, 2048) and empty["boxes"].shape == (0, 4)


def test_selection_rule():
    # box 1 overlaps box 0 and loses NMS on class 0, but keeps its own class 1 score
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60]], dtype=torch.float32)
    probs = torch.tensor([[0.9, 0.0], [0.8, 0.1], [0.05, 0.3]])
    best = max_class_scores(boxes, probs, 0.3)
    torch.testing.assert_close(best, torch.tensor([0.9, 0.1, 0.3]))
    assert select_boxes(best, 0.2, 1, 10).tolist() == [0, 2]
    assert select_boxes(best, 0.2, 3, 10).tolist() == [0, 2, 1]
    assert select_boxes(best, 0.0, 1, 1).tolist() == [0]
    assert select_boxes(best, 0.2, 1, 10, fixed=2).tolist() == [0, 2]


def test_resize_rule():
    assert resized_size(480, 640, 600, 1000) == (600, 800)
    assert resized_size(300, 1500, 600, 1000) == (200, 1000)  # long side capped
    t = to_network_input(Image.new("RGB", (640, 480), (255, 0, 0)), 60, 100)
    assert t.shape == (3, 60, 80) and t.dtype == torch.uint8
    assert t[:, 0, 0].tolist() == [0, 0, 255]  # BGR order


def test_random_features_carry_colour_shape_and_position(state):
    model = make_model(state, boxes="given")
    whole = torch.tensor([[0.0, 0.0, 120.0, 80.0]])
    variants = {"base": scene(), "colour": scene(color=(0, 0, 255)), "shape": scene(shape="circle"),
                "position": scene(x=70)}
    outs = {k: run(model, [im], given_boxes=[whole])[0] for k, im in variants.items()}
    base = outs["base"]
    f, g = base["features"][0], base["grid"]
    assert f.std() > 1e-2 * f.abs().mean() and (f > 0).float().mean() > 0.1  # not collapsed
    assert g.std(dim=0).mean() > 1e-2 * g.abs().mean()  # grid cells differ from each other
    for k in ("colour", "shape"):
        d = (outs[k]["features"][0] - f).norm() / f.norm()
        assert d > 0.01, f"region features barely change with {k}: {d:.4f}"
    for k in ("colour", "shape", "position"):
        d = (outs[k]["grid"] - g).norm() / g.norm()
        assert d > 0.01, f"grid features barely change with {k}: {d:.4f}"


def test_random_features_retrieve_the_same_content(state):
    """Nearest neighbour under noise: each noisy scene's closest other scene is its twin."""
    model = make_model(state)
    kinds = [((255, 0, 0), "square", 16), ((0, 0, 255), "square", 16), ((255, 0, 0), "circle", 16),
             ((255, 0, 0), "square", 70)]
    ims = [scene(c, s, x, noise_seed=seed) for c, s, x in kinds for seed in (1, 2)]
    grids = torch.stack([o["grid"].flatten() for o in run(model, ims, regions=False)])
    grids = torch.nn.functional.normalize(grids - grids.mean(0), dim=1)
    sims = grids @ grids.T
    sims.fill_diagonal_(-2)
    assert sims.argmax(1).tolist() == [1, 0, 3, 2, 5, 4, 7, 6]


def test_regions_only_and_grid_only(state):
    model = make_model(state)
    im = scene()
    r = run(model, [im], grid=False)[0]
    g = run(model, [im], regions=False)[0]
    assert "grid" not in r and "features" in r
    assert set(g) == {"grid"}


@pytest.mark.slow  # bfloat16 convolutions on a CPU without native support are slow
def test_amp_runs_and_stays_finite():
    model = BottomUpRCNN(ExtractorConfig(**SMALL, depth=50, num_classes=20, bbox_reg_classes=21,
                                         num_attributes=10, amp=True))
    load_weights(model, "random")
    out = run(model, [scene()])[0]
    assert out["features"].dtype == torch.float32 and torch.isfinite(out["features"]).all()
    assert torch.isfinite(out["grid"]).all() and len(out["boxes"]) >= 1


@pytest.mark.parametrize("pooler", ["roi_align_v2", "roi_pool"])
def test_other_poolers(state, pooler):
    model = make_model(state, pooler=pooler, boxes="given")
    out = run(model, [scene()], given_boxes=[torch.tensor([[0.0, 0.0, 50.0, 50.0]])])[0]
    assert out["features"].shape == (1, 2048) and torch.isfinite(out["features"]).all()


def test_config_validation():
    with pytest.raises(ValueError, match="fixed:K"):
        ExtractorConfig(boxes="fixed:0")
    with pytest.raises(ValueError, match="fixed:K"):
        ExtractorConfig(boxes="top36")
    with pytest.raises(ValueError, match="unknown extractor settings"):
        ExtractorConfig.from_dict({"min_size": 600, "bogus": 1})
    cfg = ExtractorConfig(boxes="fixed:36")
    assert cfg.fixed_boxes == 36 and ExtractorConfig.from_dict(cfg.to_dict()) == cfg
    assert dataclasses.replace(cfg, boxes="given").fixed_boxes is None


def test_channels_last_keeps_the_numbers(state):
    ims = [scene(), scene(size=(100, 100))]
    want = run(make_model(state), ims)
    got = run(make_model(state).channels_last(), ims)
    for a, b in zip(want, got):
        torch.testing.assert_close(b["grid"], a["grid"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b["features"], a["features"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=1e-4, atol=1e-2)
        assert torch.equal(b["obj_labels"], a["obj_labels"])


def test_profile_times_every_stage(state):
    from features.profile import Stages

    stages = Stages("cpu")
    run(make_model(state), [scene(), scene(size=(100, 100))], stages=stages)
    assert set(stages.seconds) == {"backbone", "grid head", "rpn", "box head", "box selection", "attributes"}
    assert all(s > 0 for s in stages.seconds.values())
    table = stages.table(wall=sum(stages.seconds.values()), images=2)
    assert table.splitlines()[1].startswith("backbone") and "loop wall" in table


def test_box_masks_cover_every_pixel_a_box_touches():
    masks = box_masks(torch.tensor([[1.5, 2.0, 4.0, 5.2], [0.0, 0.0, 8.0, 6.0]]), (6, 8))
    want = torch.zeros(6, 8, dtype=torch.bool)
    want[2:6, 1:4] = True   # rows 2..5 (5.2 reaches into row 5), columns 1..3 (1.5 reaches into column 1)
    assert torch.equal(masks[0], want)
    assert masks[1].all()


def _mean_filled_outside(im, box):
    """``im`` with every pixel outside ``box`` set to the model's mean pixel (RGB)."""
    arr = np.asarray(im).copy()
    mean_rgb = np.rint(ExtractorConfig().pixel_mean_bgr[::-1]).astype(np.uint8)
    inside = box_masks(torch.tensor([box]), arr.shape[:2])[0].numpy()
    arr[~inside] = mean_rgb
    return Image.fromarray(arr)


def test_box_only_regions_see_nothing_outside_their_box(state):
    image_mode, box_mode = make_model(state, boxes="given"), make_model(state, boxes="given", region_input="box")
    box = [30.0, 10.0, 70.0, 50.0]
    given = [torch.tensor([box])]
    # two images that differ only outside the box (inside it, the same ellipse on the same grey)
    a, b = scene(shape="round", x=30, size=(64, 96)), scene(shape="round", x=30, size=(64, 96))
    ImageDraw.Draw(b).rectangle([0, 0, 25, 63], fill=(0, 200, 255))
    ImageDraw.Draw(b).rectangle([75, 0, 95, 63], fill=(255, 255, 0))
    fa, fb = (run(box_mode, [im], given_boxes=given)[0]["features"] for im in (a, b))
    torch.testing.assert_close(fa, fb)
    ga, gb = (run(image_mode, [im], given_boxes=given)[0]["features"] for im in (a, b))
    assert (ga - gb).norm() > 1e-3 * ga.norm()   # the whole-image features do see the change
    # and a box-only feature is the whole-image feature of the image filled with the mean pixel outside the box
    # (up to the mean's rounding to whole pixel values)
    filled = run(image_mode, [_mean_filled_outside(a, box)], given_boxes=given)[0]["features"]
    torch.testing.assert_close(fa, filled, rtol=2e-2, atol=2e-2)


def test_box_only_detections_describe_each_kept_box_alone(state):
    im = scene(size=(64, 96))   # min_size 64, max_size 96: the input is the image itself, no resizing
    out = run(make_model(state, region_input="box"), [im])[0]
    assert 10 <= len(out["features"]) <= 16
    alone = run(make_model(state, boxes="given", region_input="box"), [im], given_boxes=[out["boxes"]])[0]
    torch.testing.assert_close(out["features"], alone["features"])
    torch.testing.assert_close(out["obj_labels"], alone["obj_labels"])


def test_region_input_is_in_the_region_hash_only_when_not_the_default():
    image, box = ExtractorConfig(), ExtractorConfig(region_input="box")
    assert "region_input" not in image.settings_for("regions")   # shards written before it stay current
    assert image.shard_hash("regions", "w") != box.shard_hash("regions", "w")
    assert image.shard_hash("grid", "w") == box.shard_hash("grid", "w")
    with pytest.raises(ValueError, match="region_input"):
        ExtractorConfig(region_input="crop")
