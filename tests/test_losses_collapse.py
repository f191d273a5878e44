"""The collapse warning of the training log: the hardest-negative hinge loss at 2 x margin x batch
with every score equal."""

import numpy as np
import torch

from training import losses


def test_equal_scores_give_the_collapsed_loss_and_the_warning():
    sims = torch.full((16, 16), 0.3)
    loss = losses.triplet_loss(sims, margin=0.2, max_violation=True).item()
    assert abs(loss - 2 * 0.2 * 16) < 1e-5
    note = losses.collapse_note(loss, sims.numpy(), margin=0.2, batch_size=16)
    assert note.startswith(" COLLAPSED") and "6.4" in note


def test_no_warning_for_a_model_that_separates_or_a_loss_elsewhere():
    rng = np.random.default_rng(0)
    spread = rng.normal(0, 0.1, (40, 200))
    assert losses.collapse_note(6.4, spread, margin=0.2, batch_size=16) == ""     # scores differ
    equal = np.full((40, 200), 0.5)
    assert losses.collapse_note(3.1, equal, margin=0.2, batch_size=16) == ""      # loss elsewhere
    assert losses.collapse_note(6.45, equal + rng.normal(0, 1e-4, equal.shape), 0.2, 16) != ""
    # one side collapsed: every image scores a caption the same, captions differ by an offset
    offsets = equal + rng.normal(0, 0.05, (1, 200))
    assert losses.collapse_note(6.6, offsets, 0.2, 16) != ""
    assert losses.collapse_note(6.6, offsets + rng.normal(0, 0.05, (40, 1)) * rng.normal(0, 1, (1, 200)), 0.2, 16) == ""
