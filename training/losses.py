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


# ---------------------------------------------------------------------------------------------
# ReSG (issue #12): center hinge loss and positive-negative margin loss

def center_hinge_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor,
                      positives: torch.Tensor | None = None, intra_margin: float = 0.2,
                      inter_margin: float = 1.0) -> torch.Tensor:
    """Hinge losses around per-image centers, for a batch of B pairs (image i, caption i).

    ``img_emb``/``txt_emb`` are [B, D] L2-normalised global embeddings. Pair i belongs to the
    group of every pair k with ``positives[i, k]`` (same image id; the identity when None). The
    center of the group is the L2-normalised sum of its image and caption embeddings. With
    d(x, y) = ||x - y||^2 (in [0, 4] on the unit sphere):

        intra = sum_i [ max(0, d(v_i, c_i) - intra_margin) + max(0, d(t_i, c_i) - intra_margin) ]
        inter = sum_i mean_{k: not positives[i, k]} max(0, inter_margin - d(c_i, c_k))

    and the loss is intra + inter: both modalities of a group stay within ``intra_margin`` of
    their common center, and the centers of different images stay ``inter_margin`` apart.
    """
    b = img_emb.shape[0]
    pos = _positives(img_emb.new_empty(b, b), positives)
    members = pos.to(img_emb.dtype)
    centers = torch.nn.functional.normalize(members @ (img_emb + txt_emb), dim=-1)
    d_img = (img_emb - centers).pow(2).sum(-1)
    d_txt = (txt_emb - centers).pow(2).sum(-1)
    intra = (d_img - intra_margin).clamp(min=0).sum() + (d_txt - intra_margin).clamp(min=0).sum()
    d_cc = 2 - 2 * centers @ centers.t()   # squared distance of unit vectors (no sqrt: finite grads)
    neg = (~pos).to(img_emb.dtype)
    push = (inter_margin - d_cc).clamp(min=0) * neg
    inter = (push.sum(1) / neg.sum(1).clamp(min=1)).sum()
    return intra + inter


def pos_neg_margin_loss(sims: torch.Tensor, pos_margin: float = 0.6, neg_margin: float = 0.2,
                        positives: torch.Tensor | None = None) -> torch.Tensor:
    """Absolute margins on the scores of a batch of pairs (the double-margin contrastive loss).

    Matching pairs should score at least ``pos_margin``, non-matching pairs at most
    ``neg_margin``:

        sum_i max(0, pos_margin - s_ii) + sum_i mean_{j: not positives[i, j]} max(0, s_ij - neg_margin)

    Unlike the triplet loss, which only orders scores relative to each other, this fixes where
    positives and negatives lie on the score scale, so that scores are comparable across queries.
    """
    n = min(sims.shape)
    pos = _positives(sims, positives)
    pull = (pos_margin - sims.diagonal()[:n]).clamp(min=0).sum()
    neg = (~pos).to(sims.dtype)
    push = (sims - neg_margin).clamp(min=0) * neg
    return pull + (push.sum(1) / neg.sum(1).clamp(min=1)).sum()
