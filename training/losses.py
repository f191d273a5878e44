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


def collapse_note(mean_loss: float, sims, margin: float, batch_size: int) -> str:
    """A warning for the epoch line when training has collapsed, else "".

    When the scores of every image for a caption are equal (or of every caption for an image),
    each of the 2 x batch anchors of the hardest-negative hinge loss pays about the margin, so
    the loss sits at 2 x margin x batch, and its gradient cancels: the run stays there. Both
    signs are required: the epoch's mean loss within 5 % of that value, and validation scores
    ``sims`` [images, captions] (numpy) whose spread along one of the two axes is below 1 % of
    the margin (so a loss of another form that passes that value is not flagged). A shortlisted
    validation gives the pair (each image's scores of its candidate captions [images, K], each
    caption's scores of its candidate images [captions, K]) instead of the matrix."""
    collapsed = 2 * margin * batch_size
    i2t, t2i = sims if isinstance(sims, tuple) else (sims, sims.T)
    spread = min(float(i2t.std(1).mean()), float(t2i.std(1).mean()))
    if abs(mean_loss - collapsed) > 0.05 * collapsed or spread >= 0.01 * margin:
        return ""
    return (f" COLLAPSED: loss near 2 x margin x batch = {collapsed:g}, validation scores "
            f"equal (spread {spread:.1e})")


# ---------------------------------------------------------------------------------------------
# ReSG: center hinge loss and positive-negative margin loss

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


# ---------------------------------------------------------------------------------------------
# CIMN: gravitation loss

@torch.no_grad()
def gravitation_weights(anchor_sims: torch.Tensor, negatives: torch.Tensor, mass_anchor: torch.Tensor,
                        mass_other: torch.Tensor, power: float = 2.0, eps: float = 1e-3) -> torch.Tensor:
    """[A, N] weight of each negative b of each anchor a (rows; zero off ``negatives``).

    Each negative b pulls with F(a, b) = m_a m_b / (r_ab + eps)**power, where r_ab =
    sqrt(2 - 2 cos) is the Euclidean distance of the unit embeddings; anchor a spends its mass
    m_a over its negatives in proportion to their pull:  w_ab = m_a F(a, b) / sum_c F(a, c)."""
    r = (2 - 2 * anchor_sims).clamp(min=0).sqrt()
    force = mass_anchor[:, None] * mass_other[None, :] / (r + eps) ** power
    force = torch.where(negatives, force, torch.zeros_like(force))  # positives: r = 0
    return mass_anchor[:, None] * force / force.sum(1, keepdim=True).clamp(min=1e-12)


def _gravity_hinge(anchor_sims: torch.Tensor, pos_sims: torch.Tensor, negatives: torch.Tensor,
                   mass_anchor: torch.Tensor, mass_other: torch.Tensor, margin: float,
                   power: float, eps: float) -> torch.Tensor:
    """Sum over anchors (rows) of the force-weighted hinge against the anchor's negatives: the
    loss of row a is sum_b w_ab * max(0, margin + s_ab - s_a+) with w from
    ``gravitation_weights``. Forces and masses are weights (no gradient flows through them); the
    hinge gives the direction.
    """
    weights = gravitation_weights(anchor_sims, negatives, mass_anchor, mass_other, power, eps)
    hinge = (margin + anchor_sims - pos_sims[:, None]).clamp(min=0)
    return (weights * hinge).sum()


def gravitation_terms(img_emb: torch.Tensor, txt_emb: torch.Tensor, margin: float = 0.2,
                      power: float = 2.0, positives: torch.Tensor | None = None,
                      eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """The inter-modal and intra-modal terms of CIMN's Gravitation Loss for a batch of B pairs
    (image i, caption i) of L2-normalised embeddings [B, D].

    Mass of pair i: m_i = 2 - s_ii (detached; s_ii = cos(v_i, t_i), so m in [1, 3]): a pair whose
    image and caption are still far apart is heavier, its hinge violations count more. The image
    and the caption of a pair both carry the pair's mass.

    inter: anchors v_i against captions t_j and anchors t_j against images v_i, j not positive,
           hinge max(0, margin + s_ij - s_ii) (resp. - s_jj);
    intra: anchors v_i against images v_k and t_i against captions t_k, k not positive, hinge
           max(0, margin + cos(v_i, v_k) - s_ii): an image must be closer to its own caption
           than to another image (same for captions).
    Each anchor's hinges are weighted by the gravitational force law (see ``_gravity_hinge``):
    close negatives pull hardest, so the loss concentrates on hard negatives smoothly instead of
    weighting them all equally (sum) or keeping only the hardest (max).
    """
    sims = img_emb @ txt_emb.t()
    neg = ~_positives(sims, positives)
    pos_sims = sims.diagonal()
    mass = (2 - pos_sims).detach()
    args = dict(margin=margin, power=power, eps=eps)
    inter = (_gravity_hinge(sims, pos_sims, neg, mass, mass, **args)
             + _gravity_hinge(sims.t(), pos_sims, neg.t(), mass, mass, **args))
    # positives[i, k] compares image ids, so it marks same-image pairs within a modality too
    intra = (_gravity_hinge(img_emb @ img_emb.t(), pos_sims, neg, mass, mass, **args)
             + _gravity_hinge(txt_emb @ txt_emb.t(), pos_sims, neg, mass, mass, **args))
    return inter, intra


def gravitation_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, margin: float = 0.2,
                     power: float = 2.0, intra_weight: float = 0.5,
                     positives: torch.Tensor | None = None) -> torch.Tensor:
    """CIMN's Gravitation Loss: inter + intra_weight * intra (see ``gravitation_terms``)."""
    inter, intra = gravitation_terms(img_emb, txt_emb, margin, power, positives)
    return inter + intra_weight * intra
