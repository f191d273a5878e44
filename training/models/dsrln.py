"""DSRLN (IEEE TMM 2025): Dual Stream Relation Learning Network, regions + grid features.

Three parts, the paper's three modules (docs/models.md "dsrln" lists every choice made where the
abstract is silent and which published module it follows):

1. ``GISA``, geometry-sensitive interactive self-attention over the regions: per head, the
   attention logit of region i on region j is the sum of an appearance term (q_i . k_j), a
   geometry term (relation networks' relative box geometry, embedded and mapped to a weight,
   added as log max(w, floor), floor 1e-6) and an interactive term (the appearance query of i
   read against the geometry embedding of the pair (i, j), as the content-position term of
   relative attention).
2. ``DIF``, dual information fusion: each region attends to the grid cells its box covers or is
   near (``grid_mask``: at most ``near_cells`` cells away from the covered cells, see there),
   and an adaptive gate mixes the region with this grid context, channel by channel.
3. Alignment: local (SCAN's text-to-image attention: every word attends to the fused regions,
   cosine of the word with its attended vector, mean over words) and global (cosine of the mean
   fused region with the mean word); the score is a convex combination of the two.

Cross attention, so ``two_tower = False``; ``similarity`` works on (images x captions) blocks in
caption chunks whose [images, captions, words, regions] tensors stay under ``sim_block_elems``.
The attended region vectors are never materialised: their norm comes from the regions' Gram
matrix (see ``local_scores``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.models import ITMModel, ModelConfig, register
from training.models.layers import (FeatureNorm, LocalGlobal, attended_cosine, bigru_states,
                                    masked_mean, masked_softmax, relative_geometry,
                                    relative_offsets)


@dataclass
class DSRLNConfig(ModelConfig):
    grid_dim: int = 2048           # grid feature channels
    heads: int = 8                 # attention heads of GISA and DIF
    gisa_layers: int = 1
    geo_dim: int = 64              # sinusoidal embedding of the 4-d relative box geometry
    near_cells: int = 1            # DIF: a region reads the grid cells within this many cells of its box
    attn_lambda: float = 9.0       # inverse temperature of the word-to-region attention (SCAN)
    global_weight: float = 0.5     # score = (1 - w) * local + w * global
    box_geometry: bool = True      # ablation: False drops GISA's geometry and interaction terms
    # GISA's geometry is relation networks' (log |dx| / w, ...): it drops the sign of the offset,
    # so it cannot tell "A left of B" from "A right of B"; True embeds the signed offsets
    # (relative_offsets) instead (docs/models.md, "dsrln")
    signed_geometry: bool = False
    geometry_weight: bool = True   # ablation: False keeps GISA's interaction term, drops log max(relu(w.E), floor)
    geometry_interaction: bool = True  # ablation: False keeps GISA's geometry weight, drops q_i . U E_ij
    # relation networks' floor of the weight: a pair whose relu(w.E) is under it gets the logit
    # log(floor), -13.8 at 1e-6, which takes it out of the head (docs/models.md, "dsrln")
    geometry_floor: float = 1e-6
    grid_fusion: bool = True       # ablation: False drops DIF (regions only; grid shards unused)
    # standardise the grid cells per channel, as the regions are (feature_norm): raw grid cells
    # share one large common component (mean pairwise cosine 0.94 on the context demo), so the
    # grid context DIF mixes into every region starts as nearly one vector (docs/models.md, "dsrln")
    grid_norm: bool = True
    dropout: float = 0.1

    SAVED_BEFORE = {"feature_norm": False, "grid_norm": False}


# ---------------------------------------------------------------------------------------------
# 1. geometry-sensitive interactive self-attention

def sinusoid(x: torch.Tensor, dim: int, wave: float = 1000.0) -> torch.Tensor:
    """[..., 4] -> [..., dim]: each coordinate in sin/cos at dim // 8 frequencies (relation
    networks' embedding of the geometry; 100 * x spreads the log ratios over the wavelengths)."""
    n = dim // 8
    freq = wave ** (-torch.arange(n, device=x.device, dtype=x.dtype) / n)
    arg = 100.0 * x.unsqueeze(-1) * freq                          # [..., 4, n]
    return torch.cat([arg.sin(), arg.cos()], -1).flatten(-2)      # [..., 8 n]


class GISALayer(nn.Module):
    """One transformer layer over regions whose attention logits add, per head h,

        appearance   q_i . k_j / sqrt(d_h)
        geometry     log max(relu(w_h . E_ij), floor)        (relation networks; floor 1e-6)
        interaction  q_i . (U_h E_ij) / sqrt(d_h)            (appearance query x geometry)

    with E_ij the sinusoidal embedding of the relative geometry of boxes i and j. Images whose
    boxes are unknown (``known`` False) get neither geometry term: plain self-attention."""

    def __init__(self, dim: int, heads: int, geo_dim: int, dropout: float, weight: bool = True,
                 interaction: bool = True, floor: float = 1e-6):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not divisible by heads {heads}")
        if not floor > 0:
            raise ValueError(f"geometry_floor {floor} must be > 0: its log is the logit of a masked pair")
        self.floor = floor
        self.heads, self.dh = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.geo_weight = nn.Linear(geo_dim, heads) if weight else None
        # U_h maps the geometry embedding into head h's query space; applied to q instead
        # (q_i . U_h E = (U_h^T q_i) . E) so that no [B, R, R, dim] tensor is ever built
        self.geo_query = (nn.Parameter(torch.randn(heads, self.dh, geo_dim) / math.sqrt(geo_dim))
                          if interaction else None)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(2 * dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def heads_of(self, x):
        """q, k, v [B, H, R, d_h] of the regions x [B, R, D]."""
        b, r, _ = x.shape
        return (t.view(b, r, self.heads, self.dh).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))

    def geometry_weight(self, geo):
        """relu(w_h . E_ij) [B, H, R, R]: relation networks' weight, entering as log max(., floor)."""
        return F.relu(self.geo_weight(geo)).permute(0, 3, 1, 2)

    def logits(self, q, k, geo, known):
        """The appearance logits and the geometry terms (weight + interaction, 0 for images
        whose boxes are unknown), [B, H, R, R] each."""
        appearance = q @ k.transpose(-1, -2) / math.sqrt(self.dh)
        geo_term = torch.zeros_like(appearance)
        if self.geo_query is not None:                                             # interaction
            qg = torch.einsum("bhid,hdg->bhig", q, self.geo_query)
            geo_term = torch.einsum("bhig,bijg->bhij", qg, geo) / math.sqrt(self.dh)
        if self.geo_weight is not None:
            geo_term = geo_term + torch.log(self.geometry_weight(geo).clamp(min=self.floor))
        return appearance, torch.where(known[:, None, None, None], geo_term, 0)

    def forward(self, x, mask, geo, known):
        b, r, d = x.shape
        q, k, v = self.heads_of(x)
        appearance, geo_term = self.logits(q, k, geo, known)
        att = self.drop(masked_softmax(appearance + geo_term, mask[:, None, None, :]))
        y = (att @ v).transpose(1, 2).reshape(b, r, d)
        x = self.norm1(x + self.drop(self.out(y)))
        return self.norm2(x + self.drop(self.ffn(x)))


# ---------------------------------------------------------------------------------------------
# 2. dual information fusion with the grid

def grid_mask(boxes: torch.Tensor, grid_hw: tuple[int, int], near: int) -> torch.Tensor:
    """[B, R, 4] normalised boxes -> [B, R, H*W] bool: cell (row, col) of an H x W grid over the
    image is allowed for a box when it lies at most ``near`` cells (Chebyshev distance, in cell
    units) from the cells the box covers. The covered cells are columns floor(x1 W) ..
    ceil(x2 W) - 1 and rows floor(y1 H) .. ceil(y2 H) - 1, at least one of each, so a box always
    covers a cell even when it is thinner than one. The whole-image box covers every cell."""
    gh, gw = grid_hw

    def span(lo, hi, n):
        first = (lo * n).floor().clamp(0, n - 1)
        last = torch.maximum((hi * n).ceil() - 1, first).clamp(max=n - 1)
        idx = torch.arange(n, device=boxes.device, dtype=boxes.dtype)
        return (idx >= first.unsqueeze(-1) - near) & (idx <= last.unsqueeze(-1) + near)   # [B, R, n]

    cols = span(boxes[..., 0], boxes[..., 2], gw)
    rows = span(boxes[..., 1], boxes[..., 3], gh)
    return (rows.unsqueeze(-1) & cols.unsqueeze(-2)).flatten(-2)


class DIF(nn.Module):
    """Masked multi-head cross-attention from regions to grid cells, then an adaptive gate:
    fused = g * region + (1 - g) * context, g = sigmoid(W [region; context]) per channel."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dh = heads, dim // heads
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.gate = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, grid, allowed):
        b, r, d = x.shape
        g = grid.shape[1]
        q = self.q(x).view(b, r, self.heads, self.dh).transpose(1, 2)
        k, v = (t.view(b, g, self.heads, self.dh).transpose(1, 2) for t in self.kv(grid).chunk(2, -1))
        att = masked_softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dh), allowed[:, None])
        ctx = self.out((self.drop(att) @ v).transpose(1, 2).reshape(b, r, d))
        gate = torch.sigmoid(self.gate(torch.cat([x, ctx], -1)))
        return self.norm(gate * x + (1 - gate) * ctx)


# ---------------------------------------------------------------------------------------------
# 3. local + global alignment

def local_scores(regions, rmask, words, wmask, lam: float) -> torch.Tensor:
    """SCAN text-to-image: every word attends to the regions (softmax of lam * cosine over real
    regions), score = mean over real words of cos(word, attended vector). regions [I, R, D] and
    words [C, L, D] are unit vectors; returns [I, C]. Only [I, C, L, R] tensors are built
    (``attended_cosine``)."""
    per_word = attended_cosine(regions, rmask, words, lam)                     # [I, C, L]
    return masked_mean(per_word.unsqueeze(-1), wmask[None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# the model

@register("dsrln")
class DSRLN(ITMModel):
    config_class = DSRLNConfig
    two_tower = False
    needs_grid = True

    def __init__(self, cfg: DSRLNConfig, vocab):
        super().__init__(cfg, vocab)
        d = cfg.embed_dim
        self.img_fc = nn.Linear(cfg.feature_dim, d)
        self.gisa = nn.ModuleList(GISALayer(d, cfg.heads, cfg.geo_dim, cfg.dropout, cfg.geometry_weight,
                                            cfg.geometry_interaction, cfg.geometry_floor)
                                  for _ in range(cfg.gisa_layers))
        self.grid_fc = nn.Linear(cfg.grid_dim, d) if cfg.grid_fusion else None
        self.dif = DIF(d, cfg.heads, cfg.dropout) if cfg.grid_fusion else None
        self.grid_norm = FeatureNorm(cfg.grid_dim) if cfg.grid_fusion and cfg.grid_norm else None
        self.embed = nn.Embedding(len(vocab), cfg.word_dim, padding_idx=0)
        self.gru = nn.GRU(cfg.word_dim, d, batch_first=True, bidirectional=True)

    def encode_image(self, img):
        if img.grid is None:
            raise ValueError("dsrln needs grid features (ImageBatch.grid is None): load the data "
                             "with DataConfig(grid=True) from a dataset that has grid shards")
        if img.grid.shape[-1] != self.cfg.grid_dim:
            raise ValueError(f"dsrln: grid features have {img.grid.shape[-1]} channels, the model "
                             f"expects grid_dim={self.cfg.grid_dim} (--set grid_dim=...)")
        mask = img.region_mask
        known = img.boxes_known.to(torch.bool)
        geometry = known & self.cfg.box_geometry
        # padded boxes may hold anything and unknown boxes mean nothing: both become the whole
        # image, so the geometry stays finite and such regions may read every grid cell
        real = (mask & known[:, None]).unsqueeze(-1)
        boxes = torch.where(real, img.boxes, img.boxes.new_tensor([0., 0., 1., 1.]))
        pair = (relative_offsets(boxes[:, :, None], boxes[:, None, :]) if self.cfg.signed_geometry
                else relative_geometry(boxes))
        geo = sinusoid(pair, self.cfg.geo_dim)
        x = self.img_fc(self.regions(img))
        for layer in self.gisa:
            x = layer(x, mask, geo, geometry)
        if self.dif is not None:
            x = self.dif(x, self.grid_fc(self.grid(img)), grid_mask(boxes, img.grid_hw, self.cfg.near_cells))
        x = torch.where(mask.unsqueeze(-1), x, 0)
        return LocalGlobal(F.normalize(x, dim=-1), mask, F.normalize(masked_mean(x, mask), dim=-1))

    def grid(self, img) -> torch.Tensor:
        """The batch's grid cells [B, G, C], standardised when ``cfg.grid_norm``."""
        if self.grid_norm is None:
            return img.grid
        return self.grid_norm(img.grid, img.grid.new_ones(img.grid.shape[:2], dtype=torch.bool))

    def encode_text(self, txt):
        x = bigru_states(self.gru, self.embed(txt.tokens), txt.lengths)
        return LocalGlobal(F.normalize(x, dim=-1), txt.mask, F.normalize(masked_mean(x, txt.mask), dim=-1))

    def similarity(self, img_enc: LocalGlobal, txt_enc: LocalGlobal):
        regions, rmask, vg = img_enc.local, img_enc.mask, img_enc.global_
        words, wmask, tg = txt_enc.local, txt_enc.mask, txt_enc.global_
        n_img, n_reg = rmask.shape
        n_txt, n_word = wmask.shape
        chunk = max(1, self.cfg.sim_block_elems // max(1, n_img * n_word * n_reg))
        local = torch.cat([local_scores(regions, rmask, words[s:s + chunk], wmask[s:s + chunk],
                                        self.cfg.attn_lambda)
                           for s in range(0, n_txt, chunk)], 1)
        w = self.cfg.global_weight
        return (1 - w) * local + w * (vg @ tg.t())
