"""Losses shared by all models: plain functions of a similarity matrix.

``sims`` is [n_img, n_txt]; ``positives`` is a bool [n_img, n_txt] mask of matching pairs (the
diagonal for a batch of pairs, plus other captions of the same image when an image occurs twice).
"""

from __future__ import annotations

import torch


def _positives(sims: torch.Tensor, positives: torch.Tensor | None) -> torch.Tensor:
    if positives is None:
        if sims.shape[0] != sims.shape[1]:
            raise ValueError(f"similarity matrix is {tuple(sims.shape)}: pass the positives mask "
                             "when images and captions are not paired one to one")
        return torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device)
    return positives.to(device=sims.device, dtype=torch.bool)


def triplet_loss(sims: torch.Tensor, margin: float = 0.2, max_violation: bool = True,
                 positives: torch.Tensor | None = None) -> torch.Tensor:
    """Hinge triplet loss of VSE++ in both directions, for a batch of paired items.

    Pair i (image i, caption i) is the anchor. With ``max_violation`` only the hardest negative
    of each anchor counts (VSE++'s MH loss), otherwise the sum over all negatives (the SH loss of
    VSE0; models warm up with it). Pairs marked positive are never negatives.
    """
    n = min(sims.shape)
    pos = _positives(sims, positives)
    d = sims.diagonal()[:n]
    cost_t = (margin + sims[:n] - d[:, None]).clamp(min=0)      # image i vs wrong captions
    cost_i = (margin + sims[:, :n] - d[None, :]).clamp(min=0)   # caption j vs wrong images
    cost_t = cost_t.masked_fill(pos[:n], 0)
    cost_i = cost_i.masked_fill(pos[:, :n], 0)
    if max_violation:
        return cost_t.max(dim=1).values.sum() + cost_i.max(dim=0).values.sum()
    return cost_t.sum() + cost_i.sum()


def infonce_loss(sims: torch.Tensor, temperature: float = 0.05,
                 positives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric cross-entropy over the batch (CLIP-style); other positives are masked out."""
    n = min(sims.shape)
    pos = _positives(sims, positives)
    logits = sims / temperature
    eye = torch.eye(*sims.shape, dtype=torch.bool, device=sims.device)
    logits = logits.masked_fill(pos & ~eye, float("-inf"))
    target = torch.arange(n, device=sims.device)
    return 0.5 * (torch.nn.functional.cross_entropy(logits[:n], target)
                  + torch.nn.functional.cross_entropy(logits[:, :n].t(), target))
