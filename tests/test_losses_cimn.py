"""CIMN's gravitation loss on hand-worked inputs.

Three pairs of unit vectors in 3-D:
    v1 = (1, 0, 0)      t1 = (0, 1, 0)       s11 = 0  -> mass 2 - 0 = 2
    v2 = (.6, .8, 0)    t2 = (.6, .8, 0)     s22 = 1  -> mass 1
    v3 = (0, 0, 1)      t3 = (0, 0, 1)       s33 = 1  -> mass 1
S = V T^T = [[0, .6, 0], [.8, 1, 0], [0, 0, 1]];  margin .2, power 2, eps 0.

inter, image anchor v1: negatives t2 (s .6, r^2 = 2 - 1.2 = .8) and t3 (s 0, r^2 = 2);
    forces ~ m/r^2 = 1/.8 = 1.25 and 1/2 = .5; v1 spends its mass 2 in that proportion:
    w = 2 * 1.25/1.75 = 10/7 and 2 * .5/1.75 = 4/7; hinges .2 + .6 - 0 = .8 and .2 + 0 - 0 = .2
    -> 10/7 * .8 + 4/7 * .2 = 8.8/7.
  image anchors v2, v3 (s_ii = 1): every hinge is .2 + s - 1 <= 0 -> 0.
  caption anchor t1: negatives v2 (s .8, r^2 = .4) and v3 (s 0, r^2 = 2): forces 2.5 and .5,
    w = 2 * 2.5/3 = 5/3 and 2 * .5/3 = 1/3; hinges 1.0 and .2 -> 5/3 + .2/3 = 5.2/3.
  caption anchors t2, t3: 0.                                   inter = 8.8/7 + 5.2/3
intra, image v1 against v2 (cos .6) and v3 (cos 0), own pair s11 = 0: the same numbers as the
    image anchor above -> 8.8/7; caption t1 against t2 (cos .8) and t3 (cos 0) -> 5.2/3; the
    other anchors have s_ii = 1 -> 0.                          intra = 8.8/7 + 5.2/3
"""

import pytest
import torch

from training import losses

V = torch.tensor([[1, 0, 0], [.6, .8, 0], [0, 0, 1]])
T = torch.tensor([[0, 1, 0], [.6, .8, 0], [0, 0, 1]])
ROW = 8.8 / 7 + 5.2 / 3


def test_hand_worked_inter_and_intra_terms():
    inter, intra = losses.gravitation_terms(V, T, margin=0.2, power=2.0, eps=0.0)
    assert inter.item() == pytest.approx(ROW, abs=1e-5)
    assert intra.item() == pytest.approx(ROW, abs=1e-5)
    total = losses.gravitation_loss(V, T, margin=0.2, power=2.0, intra_weight=0.5)
    assert total.item() == pytest.approx(1.5 * ROW, rel=1e-3)   # default eps 1e-3: close


def test_power_zero_weights_by_mass_only_and_large_power_keeps_the_hardest():
    # power 0: v1 spreads mass 2 over two negatives of mass 1 each -> w = 1, 1
    inter, _ = losses.gravitation_terms(V, T, margin=0.2, power=0.0, eps=0.0)
    assert inter.item() == pytest.approx((0.8 + 0.2) + (1.0 + 0.2), abs=1e-5)
    # a steep force law gives the whole mass to the closest negative: 2 * .8 + 2 * 1.0
    inter, _ = losses.gravitation_terms(V, T, margin=0.2, power=60.0, eps=0.0)
    assert inter.item() == pytest.approx(2 * 0.8 + 2 * 1.0, abs=1e-4)


def test_positives_are_never_negatives():
    # pairs 1 and 2 show the same image: t2 is no longer a negative of v1 (nor v2 of t1, nor
    # v2 of v1, nor t2 of t1); each of the two anchors keeps one negative (index 3), whose
    # hinge is .2 + 0 - 0 = .2 with the anchor's whole mass 2
    pos = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    inter, intra = losses.gravitation_terms(V, T, margin=0.2, power=2.0, positives=pos, eps=0.0)
    assert inter.item() == pytest.approx(2 * 0.2 + 2 * 0.2, abs=1e-5)
    assert intra.item() == pytest.approx(2 * 0.2 + 2 * 0.2, abs=1e-5)


def test_zero_when_every_pair_is_separated_by_the_margin():
    eye = torch.eye(4)
    inter, intra = losses.gravitation_terms(eye, eye, margin=0.2)
    assert inter.item() == 0 and intra.item() == 0


def test_masses_and_forces_carry_no_gradient():
    """The gradient is that of the hinges with the weights held fixed: for anchor v1 only,
    d/ds12 = 10/7 and d/ds13 = 4/7 (the violations are linear in s)."""
    v = V.clone().requires_grad_(True)
    t = T.clone().requires_grad_(True)
    inter, _ = losses.gravitation_terms(v, t, margin=0.2, power=2.0, eps=0.0)
    inter.backward()
    # d inter / d v1 = sum over v1's rows: 10/7 * (t2 - t1) + 4/7 * (t3 - t1)
    #                 + from caption anchor t1's row: -(5/3 + 1/3) * t1 (s11 is its positive)
    expected = 10 / 7 * (T[1] - T[0]) + 4 / 7 * (T[2] - T[0]) - 2 * T[0]
    assert torch.allclose(v.grad[0], expected, atol=1e-5)


def test_masses_and_forces_by_hand():
    """Masses 2 - s_ii = (2, 1, 1). F = m_a m_b / r^2. Image anchor v1 (mass 2): t2 (mass 1,
    r^2 .8) pulls 2/.8 = 2.5, t3 (mass 1, r^2 2) 2/2 = 1, so v1 spends its mass 2 as 2 * 2.5/3.5
    = 10/7 and 4/7. v2 (mass 1): t1 (mass 2, s .8, r^2 .4) pulls 2/.4 = 5, t3 (r^2 2) 1/2, so
    10/11 and 1/11. v3 (mass 1): t1 (mass 2, r^2 2) pulls 1, t2 (mass 1, r^2 2) .5: 2/3, 1/3."""
    sims = V @ T.t()
    mass = 2 - sims.diagonal()
    assert mass.tolist() == pytest.approx([2.0, 1.0, 1.0])
    neg = ~torch.eye(3, dtype=torch.bool)
    w = losses.gravitation_weights(sims, neg, mass, mass, power=2.0, eps=0.0)
    expected = torch.tensor([[0, 10 / 7, 4 / 7], [10 / 11, 0, 1 / 11], [2 / 3, 1 / 3, 0]])
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(w.sum(1), mass)                 # an anchor spends its whole mass
