"""ReSG's losses on inputs worked out by hand (2-D unit vectors, small score matrices)."""

import math

import pytest
import torch

from training.losses import center_hinge_loss, pos_neg_margin_loss

R2, R10 = math.sqrt(2), math.sqrt(10)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_center_hinge_one_pair_per_image():
    # pair 0: v=(1,0), t=(0,1) -> center (1,1)/sqrt2, each at squared distance 2 - sqrt2
    # pair 1: v=t=(-1,0)       -> center (-1,0), distance 0
    # centers at squared distance 2 + sqrt2 from each other
    img, txt = t([1, 0], [-1, 0]), t([0, 1], [-1, 0])
    intra = 2 * (2 - R2 - 0.2)
    assert center_hinge_loss(img, txt, intra_margin=0.2, inter_margin=1.0).item() == pytest.approx(intra)
    inter = 2 * (4 - (2 + R2))                    # both rows, one negative each
    assert center_hinge_loss(img, txt, intra_margin=0.2, inter_margin=4.0).item() == pytest.approx(intra + inter)


def test_center_hinge_groups_pairs_of_the_same_image():
    # pairs 0 and 1 show the same image: one center (v0 + t0 + v1 + t1 = (3,1)) / sqrt10
    img, txt = t([1, 0], [1, 0], [0, -1]), t([1, 0], [0, 1], [0, -1])
    pos = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    # (1,0) is at 2 - 6/sqrt10 = 0.103 < 0.2 from the center; (0,1) at 2 - 2/sqrt10
    intra = 2 - 2 / R10 - 0.2
    # centers (3,1)/sqrt10 and (0,-1) are at 2 + 2/sqrt10; margin 3 -> each of the 3 rows
    inter = 3 * (3 - 2 - 2 / R10)
    got = center_hinge_loss(img, txt, pos, intra_margin=0.2, inter_margin=3.0)
    assert got.item() == pytest.approx(intra + inter)
    # without the grouping, pair 1 would be a negative of pair 0 and the value differs
    assert center_hinge_loss(img, txt, None, 0.2, 3.0).item() != pytest.approx(got.item())


def test_center_hinge_zero_when_satisfied_and_finite_gradients():
    img = t([1, 0], [0, 1]).requires_grad_()
    txt = t([1, 0], [0, 1]).requires_grad_()
    loss = center_hinge_loss(img, txt, intra_margin=0.1, inter_margin=1.0)   # centers 2 apart
    assert loss.item() == 0
    pos = torch.ones(2, 2, dtype=torch.bool)        # one image twice: identical centers
    loss = center_hinge_loss(img, txt * 0.5 + 0.5 * img.detach(), pos, 0.0, 1.0)
    loss.backward()
    assert torch.isfinite(img.grad).all() and torch.isfinite(txt.grad).all()


def test_pos_neg_margin_pairs():
    sims = t([0.5, 0.3], [0.1, 0.9])
    # pull: 0.6 - 0.5; push: row 0 has 0.3 - 0.2, row 1 nothing over 0.2
    assert pos_neg_margin_loss(sims, 0.6, 0.2).item() == pytest.approx(0.1 + 0.1)
    assert pos_neg_margin_loss(sims, 0.5, 0.3).item() == pytest.approx(0.0)


def test_pos_neg_margin_masks_other_positives():
    sims = t([0.7, 0.5, 0.4], [0.2, 0.8, 0.3], [0.6, 0.0, 0.1])
    pos = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    pull = 0.6 - 0.1                                 # only s22 is under 0.6
    push = (0.4 - 0.2) + (0.3 - 0.2) + ((0.6 - 0.2) + 0) / 2   # mean over each row's negatives
    assert pos_neg_margin_loss(sims, 0.6, 0.2, pos).item() == pytest.approx(pull + push)


def test_pos_neg_margin_needs_positives_when_not_square():
    with pytest.raises(ValueError, match="positives"):
        pos_neg_margin_loss(torch.zeros(2, 3))
