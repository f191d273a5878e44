"""CIMN: Cross-modal Independent Matching Network (two-tower, fast retrieval).

Each modality is encoded on its own, so every image and caption embedding can be computed once
and retrieval is one matrix product. Per modality:

    nodes (regions + box geometry | words through a BiGRU)
      -> Feature Relationship Reasoning: L layers of graph convolution over two relation graphs,
         the *neighbourhood* graph (spatially close boxes | adjacent words, fixed) and the
         *potential* graph (learned affinities between all pairs, attention)
      -> Graph Pooling: a GCN scores every node over the same graphs, the masked softmax of the
         scores pools the nodes into one embedding, L2-normalised
Trained with the Gravitation Loss (``training.losses.gravitation_loss``). The design choices where
the paper (only its abstract is public) is silent are listed in docs/models.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training import losses
from training.models import ITMModel, ModelConfig, register
from training.models.layers import bigru_states, box_features, masked_mean, masked_softmax


@dataclass
class CIMNConfig(ModelConfig):
    frr_layers: int = 2           # Feature Relationship Reasoning layers per modality
    box_sigma: float = 0.3        # neighbourhood kernel width, in image widths/heights
    word_window: int = 1          # words at most this many positions apart are neighbours
    dropout: float = 0.1
    frr_scale_init: float = 0.1   # initial per-channel gate on each FRR update (LayerScale)
    pooling: str = "graph"        # graph (Graph Pooling) | mean (mean of the nodes, for ablations)
    # Gravitation Loss (see losses.gravitation_loss)
    loss: str = "gravitation"     # gravitation | triplet (the VSE++ loss, for ablations)
    gl_power: float = 2.0         # force ~ 1 / distance**power (2: Newton's inverse square)
    gl_intra: float = 0.5         # weight of the image-image and caption-caption terms


def normalise_rows(adj: torch.Tensor) -> torch.Tensor:
    return adj / adj.sum(-1, keepdim=True).clamp(min=1e-12)


def box_neighbourhood(boxes: torch.Tensor, mask: torch.Tensor, known: torch.Tensor,
                      sigma: float) -> torch.Tensor:
    """[B, R, R] row-normalised spatial adjacency: a Gaussian kernel of the distance between box
    centres (normalised coordinates). Images without boxes (``known`` False) get a uniform graph
    over their regions, i.e. every region neighbours every other."""
    centres = (boxes[..., :2] + boxes[..., 2:]) / 2
    d2 = (centres[:, :, None] - centres[:, None, :]).pow(2).sum(-1)
    adj = torch.exp(-d2 / (2 * sigma ** 2))
    adj = torch.where(known[:, None, None], adj, torch.ones_like(adj))
    pair = mask[:, :, None] & mask[:, None, :]
    return normalise_rows(adj * pair)


def sequence_neighbourhood(mask: torch.Tensor, window: int) -> torch.Tensor:
    """[B, L, L] row-normalised adjacency linking words at most ``window`` positions apart."""
    pos = torch.arange(mask.shape[1], device=mask.device)
    near = (pos[:, None] - pos[None, :]).abs() <= window
    pair = mask[:, :, None] & mask[:, None, :] & near
    return normalise_rows(pair.float())


class PotentialRelation(nn.Module):
    """Learned affinities between all node pairs: scaled dot product of two projections, masked
    softmax over the neighbours (VSRN's region relation graph). No biases: a key bias would add a
    constant to every row of scores, which the softmax ignores (its gradient would be zero)."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.query(x) @ self.key(x).transpose(1, 2) / math.sqrt(x.shape[-1])
        return masked_softmax(scores, mask[:, None, :]) * mask[:, :, None]


class RelationReasoning(nn.Module):
    """One FRR layer: graph convolution over the neighbourhood graph and the potential graph,
    summed, with a residual connection and LayerNorm (per node, so padding cannot leak in). The
    update is scaled per channel by a learned factor that starts small (LayerScale), so that a
    layer begins close to the identity instead of smoothing every node with its neighbours."""

    def __init__(self, dim: int, dropout: float, scale_init: float):
        super().__init__()
        self.potential = PotentialRelation(dim)
        self.w_near = nn.Linear(dim, dim)
        self.w_potential = nn.Linear(dim, dim, bias=False)
        self.scale = nn.Parameter(torch.full((dim,), float(scale_init)))
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, near, mask):
        potential = self.potential(x, mask)
        update = F.relu(self.w_near(near @ x) + self.w_potential(potential @ x))
        return self.norm(x + self.scale * self.drop(update)), potential


class GraphPooling(nn.Module):
    """GCN-based soft pooling (the scoring of SAGPool, kept soft): a graph convolution over the
    mean of the two relation graphs gives each node a score, the masked softmax of the scores
    weights the nodes' projections into one embedding."""

    def __init__(self, dim: int, embed_dim: int):
        super().__init__()
        self.gcn = nn.Linear(dim, dim)
        self.score = nn.Linear(dim, 1, bias=False)   # a bias would shift every score alike
        self.out = nn.Linear(dim, embed_dim)

    def forward(self, x, adj, mask):
        h = torch.tanh(self.gcn(adj @ x))
        weights = masked_softmax(self.score(h).squeeze(-1), mask)
        return F.normalize(self.out((weights.unsqueeze(-1) * x).sum(1)), dim=-1)


class MeanPooling(nn.Module):
    """Graph Pooling with every real node weighted alike (the ablation of its learned scores)."""

    def __init__(self, dim: int, embed_dim: int):
        super().__init__()
        self.out = nn.Linear(dim, embed_dim)

    def forward(self, x, adj, mask):
        return F.normalize(self.out(masked_mean(x, mask)), dim=-1)


POOLINGS = {"graph": GraphPooling, "mean": MeanPooling}


class Tower(nn.Module):
    """FRR layers then graph pooling, for one modality."""

    def __init__(self, dim: int, embed_dim: int, layers: int, dropout: float, scale_init: float,
                 pooling: str = "graph"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"cimn: unknown pooling '{pooling}'; known: {', '.join(POOLINGS)}")
        self.layers = nn.ModuleList(RelationReasoning(dim, dropout, scale_init)
                                    for _ in range(layers))
        self.pool = POOLINGS[pooling](dim, embed_dim)

    def forward(self, x, near, mask):
        potential = near
        for layer in self.layers:
            x, potential = layer(x, near, mask)
        x = x * mask.unsqueeze(-1)
        return self.pool(x, (near + potential) / 2, mask)


@register("cimn")
class CIMN(ITMModel):
    config_class = CIMNConfig
    two_tower = True

    def __init__(self, cfg: CIMNConfig, vocab):
        super().__init__(cfg, vocab)
        d = cfg.embed_dim
        self.region_fc = nn.Linear(cfg.feature_dim, d)
        self.box_fc = nn.Linear(5, d)                # x1, y1, x2, y2, area
        self.embed = nn.Embedding(len(vocab), cfg.word_dim, padding_idx=0)
        self.gru = nn.GRU(cfg.word_dim, d, batch_first=True, bidirectional=True)
        self.image_tower = Tower(d, d, cfg.frr_layers, cfg.dropout, cfg.frr_scale_init, cfg.pooling)
        self.text_tower = Tower(d, d, cfg.frr_layers, cfg.dropout, cfg.frr_scale_init, cfg.pooling)

    def encode_image(self, img):
        x = self.region_fc(self.regions(img)) + self.box_fc(box_features(img.boxes))
        near = box_neighbourhood(img.boxes, img.region_mask, img.boxes_known, self.cfg.box_sigma)
        return self.image_tower(x, near, img.region_mask)

    def encode_text(self, txt):
        x = bigru_states(self.gru, self.embed(txt.tokens), txt.lengths)
        near = sequence_neighbourhood(txt.mask, self.cfg.word_window)
        return self.text_tower(x, near, txt.mask)

    @classmethod
    def hardest_negative(cls, cfg) -> bool:
        return cfg.loss == "triplet" and cfg.max_violation

    def loss(self, img_enc, txt_enc, batch, epoch: int):
        if self.cfg.loss not in LOSSES:
            raise ValueError(f"cimn: unknown loss '{self.cfg.loss}'; known: {', '.join(LOSSES)}")
        return LOSSES[self.cfg.loss](self, img_enc, txt_enc, batch, epoch)


def _gravitation(model, img_enc, txt_enc, batch, epoch):
    cfg = model.cfg
    inter, intra = losses.gravitation_terms(img_enc, txt_enc, margin=cfg.margin, power=cfg.gl_power,
                                            positives=batch.positives())
    return {"loss": inter + cfg.gl_intra * intra, "inter": inter.detach(), "intra": intra.detach()}


def _triplet(model, img_enc, txt_enc, batch, epoch):
    return ITMModel.loss(model, img_enc, txt_enc, batch, epoch)


LOSSES = {"gravitation": _gravitation, "triplet": _triplet}
