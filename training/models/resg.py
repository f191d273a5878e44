"""ReSG: relationship-enhanced semantic graphs (Liu, He, Cheung, Xu, Wang), a cross-modal scene
graph matching model in the line of SGM (Wang et al., WACV 2020).

* VReG (image): object nodes from the regions (appearance + box), refined by attention over
  semantically related regions; relation nodes for each region and its ``rel_neighbours`` most
  similar regions, from both refined appearances plus the pair's box geometry and union box.
* TReG (caption): object nodes from the parsed scene graph (BiGRU state of the head word plus its
  attributes), refined the same way; relation nodes from (subject, predicate, object) triples.
* Score: node-level correspondence, objects with objects and relations with relations (each text
  node attends over the image's nodes of its kind, SCAN text-to-image), averaged per level and
  mixed; a caption without relations is scored on its objects only.
* Loss: hard-negative triplet + center hinge + positive-negative margin (training/losses.py).

See docs/models.md, section "ReSG", for which choices the paper leaves open and how they are made.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.shards import Vocabulary
from training import losses
from training.models import ITMModel, ModelConfig, register
from training.models.layers import (Encoding, attended_cosine, bigru_states, box_features, centre_size,
                                    masked_mean, masked_softmax, relative_offsets)


@dataclass
class ReSGConfig(ModelConfig):
    gcn_layers: int = 1            # rounds of contextual refinement of the object nodes
    rel_neighbours: int = 4        # visual relation nodes per region (its most similar regions)
    attn_lambda: float = 9.0       # SCAN's inverse temperature of the text-to-image attention
    rel_weight: float = 0.5        # share of the relation level in the score (captions with relations)
    center_weight: float = 0.1     # center hinge loss
    center_intra_margin: float = 0.2
    center_inter_margin: float = 1.0
    pn_weight: float = 1.0         # positive-negative margin loss
    pos_margin: float = 0.6
    neg_margin: float = 0.2
    # ablations: vreg=False makes the image its projected regions (no refinement, no relation
    # nodes: the caption's relation nodes are matched with the regions); treg=False makes the
    # caption its words' GRU states (no scene graph, no refinement, no relation nodes)
    vreg: bool = True
    treg: bool = True


@dataclass
class SceneGraph(Encoding):
    """A graph encoding (VReG or TReG): L2-normalised object and relation nodes with their masks,
    and the global embedding (mean of the object nodes) that the center hinge loss works on."""

    objects: torch.Tensor          # [B, O, D]
    object_mask: torch.Tensor      # [B, O]
    relations: torch.Tensor        # [B, P, D]
    relation_mask: torch.Tensor    # [B, P]
    global_: torch.Tensor          # [B, D]


class ContextRefine(nn.Module):
    """Nodes aggregate their semantically related neighbours: one round is a residual update by
    attention (affinity of projected node pairs, softmax over the real nodes), as VSRN's GCN."""

    def __init__(self, dim: int):
        super().__init__()
        self.query, self.key = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.value, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = self.query(x) @ self.key(x).transpose(1, 2) / x.shape[-1] ** 0.5
        x = x + F.relu(self.out(masked_softmax(logits, mask[:, None, :]) @ self.value(x)))
        return x * mask.unsqueeze(-1)


def _mlp(d_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d), nn.ReLU(), nn.Linear(d, d))


def pair_geometry(boxes: torch.Tensor, subj: torch.Tensor, obj: torch.Tensor) -> torch.Tensor:
    """[B, P, 10] geometry of region pairs: the object box relative to the subject box (signed
    relative position and log scale, ``relative_offsets``), then the union box (x1, y1, x2, y2,
    area) and the IoU. ``boxes`` [B, R, 4] normalised x1y1x2y2; ``subj``/``obj`` [B, P] region
    indices."""
    take = lambda idx: boxes.gather(1, idx.unsqueeze(-1).expand(-1, -1, 4))  # noqa: E731
    a, b = take(subj), take(obj)
    _, _, wa, ha = centre_size(a)
    _, _, wb, hb = centre_size(b)
    union = torch.cat([torch.minimum(a[..., :2], b[..., :2]), torch.maximum(a[..., 2:], b[..., 2:])], -1)
    inter = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    iou = inter / (wa * ha + wb * hb - inter).clamp(min=1e-6)
    return torch.cat([relative_offsets(a, b), box_features(union), iou.unsqueeze(-1)], -1)


def _compact(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the real nodes of each row to the front (stable) and cut the width to the longest row."""
    order = (~mask).to(torch.int8).argsort(dim=1, stable=True)
    width = max(int(mask.sum(1).max()), 1)
    order = order[:, :width]
    return x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1])), mask.gather(1, order)


@register("resg")
class ReSG(ITMModel):
    config_class = ReSGConfig
    two_tower = False

    def __init__(self, cfg: ReSGConfig, vocab):
        super().__init__(cfg, vocab)
        d = cfg.embed_dim
        # VReG
        self.region_fc = nn.Linear(cfg.feature_dim, d)
        self.box_fc = nn.Linear(5, d)
        self.v_refine = nn.ModuleList(ContextRefine(d) for _ in range(cfg.gcn_layers if cfg.vreg else 0))
        self.geo_fc = nn.Linear(10, d) if cfg.vreg else None
        self.v_rel = _mlp(3 * d, d) if cfg.vreg else None
        # TReG
        self.embed = nn.Embedding(len(vocab), cfg.word_dim, padding_idx=0)
        self.gru = nn.GRU(cfg.word_dim, d, batch_first=True, bidirectional=True)
        self.attr_fc = nn.Linear(cfg.word_dim, d) if cfg.treg else None
        self.t_refine = nn.ModuleList(ContextRefine(d) for _ in range(cfg.gcn_layers if cfg.treg else 0))
        self.predicate = nn.Embedding(len(getattr(vocab, "predicates", [])) or 1, d) if cfg.treg else None
        self.t_rel = _mlp(3 * d, d) if cfg.treg else None

    # -- VReG ----------------------------------------------------------------------------------
    def encode_image(self, img):
        mask, boxes = img.region_mask, img.boxes
        x = self.region_fc(self.regions(img)) + self.box_fc(box_features(boxes))
        x = x * mask.unsqueeze(-1)
        for layer in self.v_refine:
            x = layer(x, mask)
        if not self.cfg.vreg:
            return self._nodes(x, mask, x, mask)

        # relation nodes: each region with its most similar other regions
        b, r, _ = x.shape
        k = max(1, min(self.cfg.rel_neighbours, r - 1))
        xn = F.normalize(x, dim=-1)
        affinity = xn @ xn.transpose(1, 2)
        allowed = mask[:, :, None] & mask[:, None, :] & ~torch.eye(r, dtype=torch.bool, device=x.device)
        top = affinity.masked_fill(~allowed, float("-inf")).topk(k, dim=-1)
        subj = torch.arange(r, device=x.device).view(1, r, 1).expand(b, r, k).reshape(b, -1)
        obj = top.indices.reshape(b, -1)
        rel_mask = torch.isfinite(top.values).reshape(b, -1)
        pick = lambda idx: x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
        geo = self.geo_fc(pair_geometry(boxes, subj, obj))
        rel = self.v_rel(torch.cat([pick(subj), pick(obj), geo], -1)) * rel_mask.unsqueeze(-1)
        return self._nodes(x, mask, rel, rel_mask)

    # -- TReG ----------------------------------------------------------------------------------
    def encode_text(self, txt):
        emb = self.embed(txt.tokens)
        h = bigru_states(self.gru, emb, txt.lengths)
        d = h.shape[-1]
        words = txt.mask & (txt.tokens != Vocabulary.START) & (txt.tokens != Vocabulary.END)
        if not self.cfg.treg:   # one masked-out relation node: every caption is scored on its objects
            x, mask = _compact(h * words.unsqueeze(-1), words)
            return self._nodes(x, mask, h.new_zeros(h.shape[0], 1, d), words.new_zeros(h.shape[0], 1))

        # object nodes: the head word's state plus the mean of its attribute words
        obj = h.gather(1, txt.obj_index.unsqueeze(-1).expand(-1, -1, d))
        amask = txt.attr_mask.unsqueeze(-1).to(emb.dtype)
        attr = self.attr_fc(self.embed(txt.attr_word)) * amask
        owner = txt.attr_object.unsqueeze(-1).expand(-1, -1, d)
        attr_sum = torch.zeros_like(obj).scatter_add(1, owner, attr)
        attr_cnt = torch.zeros_like(obj[..., :1]).scatter_add(1, txt.attr_object.unsqueeze(-1), amask)
        obj = obj + attr_sum / attr_cnt.clamp(min=1)

        # a caption whose parse found no object is matched on its words instead
        has_obj = txt.obj_mask.any(1, keepdim=True)
        x = torch.cat([obj, h], 1)
        mask = torch.cat([txt.obj_mask, words & ~has_obj], 1)
        x = x * mask.unsqueeze(-1)
        for layer in self.t_refine:
            x = layer(x, mask)

        pick = lambda idx: x.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))  # noqa: E731
        rel = self.t_rel(torch.cat([pick(txt.rel_subject), self.predicate(txt.rel_predicate),
                                    pick(txt.rel_object)], -1)) * txt.rel_mask.unsqueeze(-1)
        x, mask = _compact(x, mask)
        return self._nodes(x, mask, rel, txt.rel_mask)

    @staticmethod
    def _nodes(obj, obj_mask, rel, rel_mask) -> SceneGraph:
        glob = F.normalize(masked_mean(obj, obj_mask), dim=-1)
        return SceneGraph(F.normalize(obj, dim=-1), obj_mask, F.normalize(rel, dim=-1), rel_mask, glob)

    # -- node-level correspondence -------------------------------------------------------------
    def similarity(self, img_enc: SceneGraph, txt_enc: SceneGraph):
        """Each text node attends over the image's nodes of its kind (``attended_cosine``, in
        float32: under autocast |a|^2 of float16 could underflow to 0); per level the mean over
        the caption's nodes; images are taken in chunks whose attention tensors stay under
        ``sim_block_elems``."""
        v, t = img_enc, txt_enc
        ni, nt = v.objects.shape[0], t.objects.shape[0]
        per_image = nt * max(t.objects.shape[1] * v.objects.shape[1], t.relations.shape[1] * v.relations.shape[1])
        step = max(1, self.cfg.sim_block_elems // max(per_image, 1))
        has_rel = t.relation_mask.any(1)
        w = self.cfg.rel_weight * has_rel.to(v.objects.dtype)   # objects only when no relation
        lam = self.cfg.attn_lambda

        def level(nodes, mask, queries, qmask):
            scores = attended_cosine(nodes.float(), mask, queries.float(), lam)     # [i, nt, K]
            return masked_mean(scores.unsqueeze(-1), qmask[None]).squeeze(-1)

        rows = []
        for s in range(0, ni, step):
            sl = slice(s, s + step)
            so = level(v.objects[sl], v.object_mask[sl], t.objects, t.object_mask)
            sr = level(v.relations[sl], v.relation_mask[sl], t.relations, t.relation_mask)
            rows.append((1 - w) * so + w * sr)
        return torch.cat(rows)

    def loss(self, img_enc, txt_enc, batch, epoch: int):
        sims = self.similarity(img_enc, txt_enc)
        pos = batch.positives()
        hardest = self.cfg.max_violation and epoch >= self.cfg.warmup_epochs
        triplet = losses.triplet_loss(sims, margin=self.cfg.margin, max_violation=hardest, positives=pos)
        center = losses.center_hinge_loss(img_enc.global_, txt_enc.global_, pos, self.cfg.center_intra_margin,
                                          self.cfg.center_inter_margin)
        pn = losses.pos_neg_margin_loss(sims, self.cfg.pos_margin, self.cfg.neg_margin, pos)
        total = triplet + self.cfg.center_weight * center + self.cfg.pn_weight * pn
        return {"loss": total, "triplet": triplet.detach(), "center": center.detach(), "pn": pn.detach()}
