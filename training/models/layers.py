"""Building blocks that several models share (not models: nothing here is registered).

* masked operations: ``masked_softmax`` (the one way padding is kept out of an attention),
  ``masked_mean``;
* the text side of the SCAN family: ``bigru_states``;
* ``FeatureNorm``: per-channel standardisation of region features;
* box geometry: ``box_features`` (a box as a 5-d input), ``relative_offsets`` and
  ``relative_geometry`` (relation networks' geometry of box pairs);
* matching: ``attended_cosine`` (SCAN's attention without materialising the attended vectors);
* ``Encoding``: the base of the named structures that cross-attention encoders return.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


# ---------------------------------------------------------------------------------------------
# masked operations

def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over the True entries of ``mask`` (broadcast against logits); rows without any
    True entry give zeros instead of NaN."""
    out = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim)
    return torch.nan_to_num(out, nan=0.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` [..., N, D] over the N entries where ``mask`` [..., N] is True (zeros when
    none is); padded entries never reach the result, even when they hold NaN."""
    m = mask.unsqueeze(-1)
    return torch.where(m, x, 0).sum(-2) / m.sum(-2).clamp(min=1).to(x.dtype)


class FeatureNorm(nn.BatchNorm1d):
    """Per-channel standardisation of region features [B, R, C] over the real regions (``mask``
    [B, R]) of the training batch, with running statistics at evaluation (an item's encoding
    then depends on that item alone); padded regions come out as zeros. No affine parameters:
    the projection that follows has its own.

    Why: detector features share a large common component (ReLU outputs are all positive; with
    RANDOM extractor weights the mean-pooled features of any two images have cosine 0.99), so a
    linear projection maps every image to nearly the same point and the hardest-negative loss
    settles where all scores are equal (docs/models.md, "vsepp")."""

    def __init__(self, dim: int):
        super().__init__(dim, affine=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        out[mask] = super().forward(x[mask])
        return out


# ---------------------------------------------------------------------------------------------
# text

def bigru_states(gru: nn.GRU, emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-word states [B, L, D] of a bidirectional GRU over padded word embeddings [B, L, E],
    the mean of the two directions as in SCAN; padded positions are zero."""
    packed = nn.utils.rnn.pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, _ = gru(packed)
    out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=emb.shape[1])
    d = out.shape[-1] // 2
    return (out[..., :d] + out[..., d:]) / 2


# ---------------------------------------------------------------------------------------------
# boxes (normalised x1, y1, x2, y2)

def box_features(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] boxes -> [..., 5] (x1, y1, x2, y2, area): the box as an input to a linear layer."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return torch.cat([boxes, area.unsqueeze(-1)], -1)


def centre_size(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(cx, cy, w, h) of [..., 4] boxes; w and h are at least 1e-3, so ratios stay finite."""
    return ((boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2,
            (boxes[..., 2] - boxes[..., 0]).clamp(min=1e-3), (boxes[..., 3] - boxes[..., 1]).clamp(min=1e-3))


def relative_offsets(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Box b relative to box a (broadcast [..., 4] each) in a's units, the relative position and
    scale of relation networks (Hu et al., CVPR 2018): [..., 4] =
    ((cx_b - cx_a) / w_a, (cy_b - cy_a) / h_a, log(w_b / w_a), log(h_b / h_a)). Signed: it
    tells left from right."""
    cxa, cya, wa, ha = centre_size(a)
    cxb, cyb, wb, hb = centre_size(b)
    return torch.stack([(cxb - cxa) / wa, (cyb - cya) / ha, torch.log(wb / wa), torch.log(hb / ha)], -1)


def relative_geometry(boxes: torch.Tensor) -> torch.Tensor:
    """Relation networks' geometry of every box pair: [B, R, 4] -> [B, R, R, 4], entry (i, j) =
    (log |dx| / w_i, log |dy| / h_i, log w_j / w_i, log h_j / h_i), distances floored at 1e-3
    (the form the paper embeds; the sign of the offset is dropped)."""
    rel = relative_offsets(boxes[:, :, None], boxes[:, None, :])
    return torch.cat([rel[..., :2].abs().clamp(min=1e-3).log(), rel[..., 2:]], -1)


# ---------------------------------------------------------------------------------------------
# matching

def attended_cosine(v: torch.Tensor, vmask: torch.Tensor, t: torch.Tensor, lam: float) -> torch.Tensor:
    """SCAN's text-to-image attention, query by query: [I, T, K] cosine of each query t[j, k]
    with its attended vector a = sum_r softmax_r(lam * cos(t[j, k], v[i, r])) v[i, r] over the
    real entries of ``v``.

    ``v`` [I, R, D] and ``t`` [T, K, D] are L2-normalised. The attended vectors are never built:
    t.a = sum_r w_r cos_r and |a|^2 = w^T G w with G the Gram matrix of v[i], so memory is
    I x T x K x R whatever D is. An image without real entries scores 0."""
    cos = torch.einsum("ird,tkd->itkr", v, t)
    w = masked_softmax(lam * cos, vmask[:, None, None, :])
    dot = (w * cos).sum(-1)
    gram = v @ v.transpose(1, 2)
    norm2 = (torch.einsum("itkr,irs->itks", w, gram) * w).sum(-1)
    return dot / norm2.clamp(min=1e-12).sqrt()


# ---------------------------------------------------------------------------------------------
# what cross-attention encoders return

@dataclasses.dataclass
class Encoding:
    """Base of a model's named encoding: every field is a tensor whose first dimension is the
    batch. ``to`` moves it (evaluation keeps encodings on the CPU between blocks) and ``enc[i:j]``
    takes items i..j-1, as for a tensor."""

    def _map(self, fn) -> "Encoding":
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def to(self, *args, **kwargs) -> "Encoding":
        return self._map(lambda t: t.to(*args, **kwargs))

    def __getitem__(self, index) -> "Encoding":
        return self._map(lambda t: t[index])

    def __len__(self) -> int:
        return len(getattr(self, dataclasses.fields(self)[0].name))


@dataclasses.dataclass
class LocalGlobal(Encoding):
    """Local vectors of an item (regions; words) and one global vector, all L2-normalised."""

    local: torch.Tensor       # [B, N, D]
    mask: torch.Tensor        # [B, N] bool: real entries
    global_: torch.Tensor     # [B, D]
