"""Small masked operations that several models share (not a model: not in the registry)."""

from __future__ import annotations

import torch


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
