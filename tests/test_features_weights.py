"""Weight loading: detectron2 pickle and torch state dict round trips, the restricted unpickler,
and strict consumption of every tensor."""

import pickle

import numpy as np
import pytest
import torch


pytestmark = pytest.mark.usefixtures("one_thread")

from features.config import ExtractorConfig
from features.rcnn import BottomUpRCNN
from features.transforms import to_network_input
from features.weights import (WeightsError, load_state_strict, load_weights, read_state,
                              restricted_load, save_detectron2_pickle, weights_info)
from PIL import Image

SMALL = dict(min_size=64, max_size=96, rpn_pre_nms_topk=200, rpn_post_nms_topk=16)


def scene():
    im = Image.new("RGB", (120, 80), (40, 40, 40))
    im.paste((255, 0, 0), (16, 20, 56, 60))
    return im

# names as in the public detectron2 R-101-C4 attribute checkpoints
EXPECTED_KEYS = {
    "backbone.stem.conv1.weight": (64, 3, 7, 7), "backbone.stem.conv1.norm.running_var": (64,),
    "backbone.res2.0.shortcut.weight": (256, 64, 1, 1), "backbone.res2.0.conv1.norm.bias": (64,),
    "backbone.res4.22.conv3.weight": (1024, 256, 1, 1),
    "proposal_generator.rpn_head.conv.weight": (512, 1024, 3, 3),
    "proposal_generator.rpn_head.objectness_logits.weight": (12, 512, 1, 1),
    "proposal_generator.rpn_head.anchor_deltas.weight": (48, 512, 1, 1),
    "roi_heads.res5.0.shortcut.weight": (2048, 1024, 1, 1), "roi_heads.res5.2.conv3.norm.weight": (2048,),
    "roi_heads.box_predictor.cls_score.weight": (1601, 2048), "roi_heads.box_predictor.bbox_pred.weight": (6400, 2048),
    "roi_heads.attribute_predictor.obj_embed.weight": (1601, 256),
    "roi_heads.attribute_predictor.fc.0.weight": (512, 2304),
    "roi_heads.attribute_predictor.attr_score.weight": (401, 512),
}


@pytest.fixture(scope="module")
def model():
    m = BottomUpRCNN(ExtractorConfig(**SMALL))
    load_weights(m, "random", seed=3)
    return m


def outputs(model):
    im = scene()
    return model([to_network_input(im, 64, 96)], [(im.height, im.width)])[0]


def test_key_names_and_shapes(model):
    state = model.state_dict()
    for name, shape in EXPECTED_KEYS.items():
        assert tuple(state[name].shape) == shape, name
    assert not any("num_batches_tracked" in k for k in state)


def test_detectron2_pickle_round_trip(model, tmp_path):
    path = save_detectron2_pickle(model, tmp_path / "model_final.pkl")
    raw = restricted_load(path)
    assert set(raw) >= {"model"} and isinstance(next(iter(raw["model"].values())), np.ndarray)
    other = BottomUpRCNN(ExtractorConfig(**SMALL))  # fresh, untrained: weights must all come from the file
    info = load_weights(other, str(path))
    assert info.sha256 == weights_info(str(path)).sha256 and not info.is_random
    want, got = outputs(model), outputs(other)
    for key in want:
        assert torch.equal(want[key], got[key]), key


@pytest.mark.parametrize("protocol", [2, 4])
def test_restricted_unpickler_reads_numpy_pickles(tmp_path, protocol):
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, 2], np.int64)}
    (tmp_path / "w.pkl").write_bytes(pickle.dumps({"model": arrays, "__author__": "x"}, protocol=protocol))
    state = read_state(tmp_path / "w.pkl")
    assert torch.equal(state["a"], torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert state["b"].dtype == torch.int64


def test_torch_state_dict_round_trip(model, tmp_path):
    torch.save({"model": model.state_dict(), "iteration": 7}, tmp_path / "model.pth")
    other = BottomUpRCNN(ExtractorConfig(**SMALL))
    load_weights(other, str(tmp_path / "model.pth"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


class WritesAFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (_write_file, (self.target,))


def _write_file(target):
    with open(target, "w") as f:
        f.write("pwned")


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "written_by_pickle.txt"
    bad = tmp_path / "evil.pkl"
    arrays = {"backbone.stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}
    bad.write_bytes(pickle.dumps({"model": arrays, "payload": WritesAFile(str(target))}, protocol=2))
    # sanity: the plain unpickler would run the payload
    pickle.loads(bad.read_bytes())
    assert target.exists()
    target.unlink()
    with pytest.raises(WeightsError, match=r"refusing to load .*_write_file"):
        read_state(bad)
    assert not target.exists()
    os_system = tmp_path / "os.pkl"
    os_system.write_bytes(b"cos\nsystem\n(S'touch " + str(target).encode() + b"'\ntR.")
    with pytest.raises(WeightsError, match="refusing to load os.system"):
        load_weights(BottomUpRCNN(ExtractorConfig(**SMALL)), str(os_system))
    assert not target.exists()


def test_every_tensor_must_be_consumed(model, tmp_path):
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    del state["roi_heads.res5.1.conv2.weight"]
    state["roi_heads.extra.weight"] = np.zeros(3, np.float32)
    state["roi_heads.box_predictor.cls_score.weight"] = np.zeros((81, 2048), np.float32)
    with pytest.raises(WeightsError) as err:
        load_state_strict(BottomUpRCNN(ExtractorConfig(**SMALL)), {k: torch.from_numpy(v) for k, v in state.items()})
    msg = str(err.value)
    assert "1 missing: ['roi_heads.res5.1.conv2.weight']" in msg
    assert "1 unexpected: ['roi_heads.extra.weight']" in msg
    assert "roi_heads.box_predictor.cls_score.weight: checkpoint (81, 2048) != model (1601, 2048)" in msg


def test_pixel_mean_in_checkpoint_is_checked(model):
    state = dict(model.state_dict())
    state["pixel_mean"] = torch.tensor([[[102.9801]], [[115.9465]], [[122.7717]]])
    state["pixel_std"] = torch.ones(3, 1, 1)
    load_state_strict(BottomUpRCNN(ExtractorConfig(**SMALL)), state)  # consumed, matches the config
    state["pixel_mean"] = torch.tensor([103.5, 116.3, 123.7])
    with pytest.raises(WeightsError, match="pixel_mean"):
        load_state_strict(BottomUpRCNN(ExtractorConfig(**SMALL)), state)


def test_unreadable_weights(tmp_path):
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(WeightsError, match="junk.pkl"):
        read_state(tmp_path / "junk.pkl")
    with pytest.raises(WeightsError, match="not found"):
        read_state(tmp_path / "missing.pkl")


def test_random_is_seeded():
    cfg = ExtractorConfig(**SMALL, depth=50)
    a, b = BottomUpRCNN(cfg), BottomUpRCNN(cfg)
    load_weights(a, "random", seed=5)
    load_weights(b, "random", seed=5)
    assert torch.equal(a.roi_heads.res5[0].conv1.weight, b.roi_heads.res5[0].conv1.weight)
    load_weights(b, "random", seed=6)
    assert not torch.equal(a.roi_heads.res5[0].conv1.weight, b.roi_heads.res5[0].conv1.weight)
