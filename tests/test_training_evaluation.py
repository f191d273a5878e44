"""Metrics against hand-worked examples (ties included), protocols, losses, blocked similarity."""

import numpy as np
import pytest
import torch

from training import losses
from training.evaluation import (chance_metrics, compute_sims, evaluate_protocol, hard_negative_accuracy,
                                 recall_metrics, small_split_warning)

# 2 images x 10 captions (caption j belongs to image j // 5), worked by hand:
# image 0: best own caption 0.9, one wrong caption scores 0.95 -> rank 2
# image 1: best own caption 0.5, five wrong captions tie at 0.5 -> ties count against: rank 6
# captions: 0 -> rank 1; 1-4 (0.1 vs 0.5) -> 2; 5 (0.5 vs 0.95) -> 2; 6-9 (0.1 vs 0.2) -> 2
SIMS = np.array([[0.9, 0.1, 0.1, 0.1, 0.1, 0.95, 0.2, 0.2, 0.2, 0.2],
                 [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1]])


def test_recall_metrics_hand_worked():
    m = recall_metrics(SIMS)
    assert m == pytest.approx({
        "i2t_r1": 0.0, "i2t_r5": 50.0, "i2t_r10": 100.0, "i2t_medr": 4.0, "i2t_meanr": 4.0,
        "t2i_r1": 10.0, "t2i_r5": 100.0, "t2i_r10": 100.0, "t2i_medr": 2.0, "t2i_meanr": 1.9,
        "rsum": 360.0})
    assert list(m) == ["i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
                       "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum"]


def test_ties_count_against_the_model():
    m = recall_metrics(np.zeros((3, 15)))
    assert m["i2t_r1"] == m["t2i_r1"] == 0.0
    assert m["i2t_meanr"] == 11.0 and m["t2i_meanr"] == 3.0   # last among 10 wrong / 2 other
    perfect = recall_metrics(np.kron(np.eye(3), np.ones((1, 5))))
    assert perfect["rsum"] == 600.0 and perfect["i2t_medr"] == perfect["t2i_medr"] == 1.0


def test_best_of_five_captions_and_other_own_captions_do_not_count():
    sims = np.zeros((2, 10))
    sims[0, :5] = [0.1, 0.9, 0.8, 0.7, 0.2]   # own captions outrank each other: still rank 1
    sims[0, 5:] = 0.5
    assert recall_metrics(sims)["i2t_r1"] == 50.0  # image 1 ties everything -> not rank 1


def test_shape_is_checked():
    with pytest.raises(ValueError, match="5 captions per image"):
        recall_metrics(np.zeros((2, 9)))


def test_coco_1k_is_the_mean_over_folds_and_5k_the_whole():
    rng = np.random.default_rng(0)
    sims = rng.normal(size=(30, 150)).astype(np.float32)
    folds = [recall_metrics(sims[f * 6:(f + 1) * 6, f * 30:(f + 1) * 30]) for f in range(5)]
    m = evaluate_protocol(sims, "coco-1k", fold_size=6)
    assert m["folds"] == 5
    assert m["rsum"] == pytest.approx(np.mean([f["rsum"] for f in folds]))
    assert m["t2i_r1"] == pytest.approx(np.mean([f["t2i_r1"] for f in folds]))
    assert evaluate_protocol(sims, "coco-5k") == recall_metrics(sims)
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_protocol(sims, "coco-2k")


def test_triplet_loss_sum_hardest_and_positives():
    sims = torch.tensor([[0.5, 0.45, 0.4], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # only image 0 has violations: caption 1 (0.2 + 0.45 - 0.5) and caption 2 (0.2 + 0.4 - 0.5)
    assert losses.triplet_loss(sims, 0.2, max_violation=False).item() == pytest.approx(0.25)
    assert losses.triplet_loss(sims, 0.2, max_violation=True).item() == pytest.approx(0.15)
    pos = torch.eye(3, dtype=torch.bool)
    pos[0, 1] = True   # caption 1 also describes image 0: not a negative
    assert losses.triplet_loss(sims, 0.2, True, positives=pos).item() == pytest.approx(0.1)


class _Tower(torch.nn.Module):
    two_tower = True

    def encode_image(self, img):
        return img

    def encode_text(self, txt):
        return txt

    def similarity(self, a, b):
        return a @ b.t()


class _Cross(_Tower):
    """Returns a tuple encoding and scores pairwise, as a cross-attention model does."""
    two_tower = False
    calls = 0

    def encode_image(self, img):
        return (img, img.sum(1))

    def similarity(self, a, b):
        type(self).calls += 1
        return (a[0][:, None, :] * b[None, :, :]).sum(-1)


def _batches(x, size):
    return [_Wrap(x[i:i + size]) for i in range(0, len(x), size)]


class _Wrap:
    def __init__(self, t):
        self.t = t

    def to(self, device):
        return self.t.to(device)


def test_blocked_similarity_equals_one_matrix_product():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(7, 4, generator=g), torch.randn(35, 4, generator=g)
    full = (img @ txt.t()).numpy()
    two = compute_sims(_Tower(), _batches(img, 3), _batches(txt, 8), progress=False)
    cross = compute_sims(_Cross(), _batches(img, 3), _batches(txt, 8), progress=False)
    assert np.allclose(two, full, atol=1e-6) and np.allclose(cross, full, atol=1e-6)
    assert _Cross.calls == 3 * 5   # every (image block, caption block) pair once


def test_hard_negative_accuracy():
    sims = np.zeros((3, 15))
    sims[0, :5], sims[0, 5:10] = 1.0, 0.0     # image 0 prefers its own captions
    sims[1, :5], sims[1, 5:10] = 0.5, 0.5     # image 1 cannot tell: ties count one half
    pairs = [{"image_id": 10, "partner_id": 11, "kind": "attribute"},
             {"image_id": 10, "partner_id": 99, "kind": "relation"}]
    r = hard_negative_accuracy(sims, np.array([10, 11, 12]), pairs)
    assert r["attribute"]["pairs"] == 1 and r["skipped_pairs"] == 1
    assert r["attribute"]["i2t_acc"] == pytest.approx(75.0)   # image 0: 25 of 25 wins, image 1: 25 ties
    # captions of 0 score 1.0 on image 0 vs 0.5 on image 1: pass; captions of 1: 0.5 vs 0.0: pass
    assert r["attribute"]["t2i_acc"] == pytest.approx(100.0)


def test_hard_negative_pairs_of_equal_images_are_at_chance():
    """Two images with equal features: every caption scores both the same; a tie is a coin toss."""
    sims = np.tile(np.random.default_rng(0).random((1, 10)), (2, 1))
    r = hard_negative_accuracy(sims, np.array([0, 1]), [{"image_id": 0, "partner_id": 1, "kind": "context"}])
    assert r["context"]["t2i_acc"] == pytest.approx(50.0)


def test_chance_metrics_match_random_scores():
    # hand-worked: 2 images, 2 captions each; image->text R@1 = 2/4, t2i R@1 = 1/2
    small = chance_metrics(2, captions_per_image=2)
    assert small["i2t_r1"] == pytest.approx(50.0) and small["t2i_r1"] == pytest.approx(50.0)
    assert small["i2t_r5"] == 100.0 and small["t2i_r10"] == 100.0
    assert chance_metrics(1000)["rsum"] == pytest.approx(3.2, abs=0.01)
    rng = np.random.default_rng(0)
    measured = np.mean([recall_metrics(rng.random((100, 500)))["rsum"] for _ in range(200)])
    assert measured == pytest.approx(chance_metrics(100)["rsum"], rel=0.05)


def test_a_split_where_chance_is_high_is_warned_about():
    assert small_split_warning("val", 2) == ("split 'val' has only 2 image(s): random scores already "
                                             "reach rSum 499.6 of 600, so its recalls mean little")
    assert small_split_warning("test", 30) is not None          # chance 102.0
    assert small_split_warning("test", 31) is None              # chance 98.8
    assert small_split_warning("test", 1000) is None
