"""Small masked operations that several models share (not a model: not in the registry)."""

from __future__ import annotations

import torch
from torch import nn


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


def bigru_states(gru: nn.GRU, emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-word states [B, L, D] of a bidirectional GRU over padded word embeddings [B, L, E],
    the mean of the two directions as in SCAN; padded positions are zero."""
    packed = nn.utils.rnn.pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, _ = gru(packed)
    out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=emb.shape[1])
    d = out.shape[-1] // 2
    return (out[..., :d] + out[..., d:]) / 2
