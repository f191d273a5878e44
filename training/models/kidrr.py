"""KIDRR (Xie et al., IP&M 2023): knowledge iterative dissemination and relational reconstruction.

Three stages, the paper's three modules (docs/models.md "kidrr" lists every choice made where the
abstract is silent and which published module it follows):

1. ``Dissemination`` (per modality): local nodes (regions; words) plus one global node. Each
   iteration broadcasts the global node to the locals through a learned gate, propagates along the
   modality's knowledge edges (image: feature affinity + a learned box-geometry bias; text: the
   caption's scene graph: attribute and relation edges, with direction-aware predicate
   embeddings), and refreshes the global node from the updated locals (attention pooling + GRU).
2. Similarity *vectors* (SGRAF's ``l2norm(W (a - b)^2)``) from several perspectives:
   global-global, global-local both ways, and local-local both ways (each word with its attended
   regions, each region with its attended words, SCAN-style attention).
3. ``RelationGraph``: these vectors are the nodes of a graph whose edges come from their
   affinities, re-weighted by a learned node-type bias and softly pruned below a learned
   threshold, then reasoned over in a few steps (SGR-like); the mean of all reasoned nodes gives
   the score (``readout = "global"``: the global-global node alone, as SGRAF reads SGR).

Cross attention, so ``two_tower = False``; ``similarity`` works on (images x captions) blocks in
caption chunks sized so that one chunk's per-node tensors stay under ``sim_block_elems``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.models import ITMModel, ModelConfig, register
from training.models.layers import (LocalGlobal, bigru_states, masked_mean, masked_softmax,
                                    relative_geometry)

# node types of the relation graph (row/column index of its learned type bias)
GG, GL_TXT, GL_IMG, T2I, I2T = range(5)


@dataclass
class KIDRRConfig(ModelConfig):
    sim_dim: int = 256             # size of a similarity vector (SGRAF)
    kid_iters: int = 2             # dissemination iterations per modality
    kid_scale_init: float = 0.1    # initial per-channel gate on each dissemination update
    reason_steps: int = 3          # relation-graph reasoning steps (SGR uses 3)
    attn_lambda: float = 9.0       # inverse temperature of the cross attention (SCAN / SGRAF)
    prune_init: float = 0.5        # initial pruning threshold, in units of a uniform edge weight
    readout: str = "mean"          # score from: mean (all reasoned nodes) | global (SGRAF's node)
    reconstruct: bool = True       # ablation: False reasons over the plain affinities (no type bias, no pruning)
    # SGRAF's initialisation of the scoring layers (similarity vectors, relation graph, score):
    # Xavier-uniform weights, zero biases. False: PyTorch's default, under which all scores of a
    # batch start within 1 % of the margin of each other and training sat at the collapsed loss
    # (docs/models.md, "kidrr")
    sgraf_init: bool = True
    sim_block_elems: int = 1 << 25  # bound on pairs x nodes x max(embed_dim, sim_dim) per chunk
    # SGRAF's Flickr30K schedule (COCO: the base's DATASET_DEFAULTS)
    epochs: int = 40
    lr_decay_epochs: tuple[int, ...] = (30,)
    SAVED_BEFORE = {"sgraf_init": False, "feature_norm": False}


# ---------------------------------------------------------------------------------------------
# 1. knowledge graph iterative dissemination

class Dissemination(nn.Module):
    """Iterative global <-> local message passing over one modality's knowledge graph.

    ``edges`` [B, N, N] bool says which node j node i may read from (the diagonal is always
    allowed, so padded rows stay finite); ``bias`` [B, N, N] is added to the edge logits."""

    def __init__(self, dim: int, iters: int, scale_init: float):
        super().__init__()
        self.iters = iters
        # per-channel gates on the two residual updates (LayerScale)
        self.scale_g = nn.Parameter(torch.full((dim,), float(scale_init)))
        self.scale_l = nn.Parameter(torch.full((dim,), float(scale_init)))
        self.gate = nn.Linear(2 * dim, dim)
        self.broadcast = nn.Linear(dim, dim)
        # no bias on keys or on the pooling score: a constant per row cancels in the softmax
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.pool_x, self.pool_g = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.pool_w = nn.Linear(dim, 1, bias=False)
        self.refresh = nn.GRUCell(dim, dim)

    def forward(self, x, mask, edges, bias=None):
        n, d = x.shape[1], x.shape[2]
        edges = edges | torch.eye(n, dtype=torch.bool, device=x.device)
        g = masked_mean(x, mask)
        for _ in range(self.iters):
            # global -> local: every node takes the part of the global knowledge its gate lets in
            gx = g.unsqueeze(1).expand_as(x)
            gate = torch.sigmoid(self.gate(torch.cat([x, gx], -1)))
            x = self.norm1(x + self.scale_g * gate * self.broadcast(gx))
            # local <-> local along the knowledge edges
            q, k, v = self.q(x), self.k(x), self.v(x)
            logits = q @ k.transpose(1, 2) / math.sqrt(d)
            if bias is not None:
                logits = logits + bias
            x = self.norm2(x + self.scale_l * self.out(masked_softmax(logits, edges) @ v))
            # local -> global: attention pooling of the updated nodes refreshes the global node
            score = self.pool_w(torch.tanh(self.pool_x(x) + self.pool_g(g).unsqueeze(1))).squeeze(-1)
            w = masked_softmax(score, mask)
            g = self.refresh((w.unsqueeze(-1) * x).sum(1), g)
        return x, g


class BoxGeometry(nn.Module):
    """Relation networks' relative box geometry (log distance and size ratios) mapped by a small
    MLP to one additive edge logit per region pair."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1, bias=False))  # a bias cancels in the softmax

    def forward(self, boxes, known):
        # images without boxes (imported precomp features) get no geometric term
        return self.mlp(relative_geometry(boxes)).squeeze(-1) * known[:, None, None].to(boxes.dtype)


def text_edges(txt, n_tokens: int) -> torch.Tensor:
    """[B, L, L] bool knowledge edges of the captions' scene graphs: attribute word <-> its
    object's head, subject head <-> object head. The attribute's position is the occurrence of
    its word in the caption nearest to the head (the batch carries the word, not its position)."""
    b = txt.tokens.shape[0]
    dev = txt.tokens.device
    edges = torch.zeros(b, n_tokens, n_tokens, dtype=torch.bool, device=dev)
    rows = torch.arange(b, device=dev)[:, None]
    head = txt.obj_index.gather(1, txt.attr_object)                                    # [B, A]
    pos = torch.arange(n_tokens, device=dev)
    hit = (txt.tokens[:, None, :] == txt.attr_word[:, :, None]) & txt.mask[:, None, :]  # [B, A, L]
    dist = (pos[None, None, :] - head[:, :, None]).abs().masked_fill(~hit, n_tokens + 1)
    attr_pos = dist.argmin(-1)
    ok = txt.attr_mask & hit.any(-1)
    for a, c in ((attr_pos, head), (head, attr_pos)):
        edges[rows.expand_as(a)[ok], a[ok], c[ok]] = True
    subj = txt.obj_index.gather(1, txt.rel_subject)
    obj = txt.obj_index.gather(1, txt.rel_object)
    for a, c in ((subj, obj), (obj, subj)):
        m = txt.rel_mask
        edges[rows.expand_as(a)[m], a[m], c[m]] = True
    return edges


# ---------------------------------------------------------------------------------------------
# 2. similarity vectors and 3. relation graph reconstruction

class SimVector(nn.Module):
    """SGRAF's similarity representation: l2norm(W (a - b)^2)."""

    def __init__(self, dim: int, sim_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, sim_dim)

    def forward(self, a, b):
        return F.normalize(self.proj(torch.sub(a, b).square_()), dim=-1)


READOUTS = {"global": lambda s, mask: s[:, GG], "mean": masked_mean}


class RelationGraph(nn.Module):
    """Reasoning over the similarity vectors of each pair. Edges are the nodes' affinities plus a
    learned bias per pair of node types (re-weighting); an edge whose weight falls below a learned
    fraction of the uniform weight 1/n is softly pruned and the rows renormalised
    (reconstruction); each step then aggregates along the rebuilt edges. Without
    ``reconstruct`` the edges are the affinities alone (SGR's graph)."""

    def __init__(self, sim_dim: int, steps: int, prune_init: float, readout: str, n_types: int = 5,
                 reconstruct: bool = True):
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"kidrr: unknown readout '{readout}'; known: {', '.join(READOUTS)}")
        self.readout = READOUTS[readout]
        self.q = nn.ModuleList(nn.Linear(sim_dim, sim_dim) for _ in range(steps))
        self.k = nn.ModuleList(nn.Linear(sim_dim, sim_dim, bias=False) for _ in range(steps))
        self.update = nn.ModuleList(nn.Linear(sim_dim, sim_dim) for _ in range(steps))
        self.reconstruct = reconstruct
        if reconstruct:
            self.type_bias = nn.Parameter(torch.zeros(n_types, n_types))
            self.threshold = nn.Parameter(torch.tensor(float(prune_init)))
            self.sharpness = nn.Parameter(torch.tensor(math.log(math.expm1(10.0))))  # softplus -> 10
        self.score = nn.Linear(sim_dim, 1)

    def forward(self, s, mask, types):
        """s [P, N, S] similarity vectors, mask [P, N], types [N] -> scores [P]."""
        n = s.shape[1]
        bias = self.type_bias[types][:, types] if self.reconstruct else 0.0
        cols = mask.unsqueeze(1) | torch.eye(n, dtype=torch.bool, device=s.device)
        count = mask.sum(-1).clamp(min=1).to(s.dtype)[:, None, None]
        for q, k, upd in zip(self.q, self.k, self.update):
            # q(s) k(s)^T as s (Wq^T Wk) s^T + (bq Wk) s^T: one S x S product per node, not two
            qk = F.linear(s, k.weight.t() @ q.weight, k.weight.t() @ q.bias)
            logits = qk @ s.transpose(1, 2) / math.sqrt(s.shape[-1]) + bias
            a = masked_softmax(logits, cols)
            if self.reconstruct:
                keep = torch.sigmoid(F.softplus(self.sharpness) * (a * count - self.threshold))
                a = a * keep
                a = a / (a.sum(-1, keepdim=True) + 1e-6)
            s = s + F.relu(upd(a @ s))
        return torch.sigmoid(self.score(self.readout(s, mask))).squeeze(-1)


def xavier_init(module: nn.Module) -> None:
    """SGRAF's ``init_weights`` on every linear layer of ``module``: weights uniform in
    ±sqrt(6 / (fan_in + fan_out)), biases zero. With PyTorch's default the projection biases
    are about 4x longer than the data part of (a - b)^2, so every similarity vector starts near
    the same direction and the scores of all pairs nearly equal."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


# ---------------------------------------------------------------------------------------------
# the model

@register("kidrr")
class KIDRR(ITMModel):
    config_class = KIDRRConfig
    two_tower = False

    def __init__(self, cfg: KIDRRConfig, vocab):
        super().__init__(cfg, vocab)
        d, s = cfg.embed_dim, cfg.sim_dim
        # image side
        self.img_fc = nn.Linear(cfg.feature_dim, d)
        self.geometry = BoxGeometry()
        self.img_graph = Dissemination(d, cfg.kid_iters, cfg.kid_scale_init)
        # text side
        self.embed = nn.Embedding(len(vocab), cfg.word_dim, padding_idx=0)
        self.gru = nn.GRU(cfg.word_dim, d, batch_first=True, bidirectional=True)
        # predicate embeddings for the subject and the object role keep the relation's direction
        n_pred = len(getattr(vocab, "predicates", ["<unk>"]))
        self.pred_subj = nn.Embedding(n_pred, d)
        self.pred_obj = nn.Embedding(n_pred, d)
        for emb in (self.pred_subj, self.pred_obj):  # small next to the GRU states in [-1, 1]
            nn.init.normal_(emb.weight, std=0.1)
        self.txt_graph = Dissemination(d, cfg.kid_iters, cfg.kid_scale_init)
        # similarity vectors and the relation graph
        self.sim_gg, self.sim_gl = SimVector(d, s), SimVector(d, s)
        self.sim_t2i, self.sim_i2t = SimVector(d, s), SimVector(d, s)
        self.relation = RelationGraph(s, cfg.reason_steps, cfg.prune_init, cfg.readout,
                                      reconstruct=cfg.reconstruct)
        if cfg.sgraf_init:
            for layer in (self.sim_gg, self.sim_gl, self.sim_t2i, self.sim_i2t, self.relation):
                xavier_init(layer)

    # encoders ---------------------------------------------------------------------------------

    def encode_image(self, img):
        x, mask = self.img_fc(self.regions(img)), img.region_mask
        edges = mask[:, :, None] & mask[:, None, :]
        x, g = self.img_graph(x, mask, edges, self.geometry(img.boxes, img.boxes_known))
        return LocalGlobal(F.normalize(x, dim=-1), mask, F.normalize(g, dim=-1))

    def encode_text(self, txt):
        n_tok = txt.tokens.shape[1]
        x = bigru_states(self.gru, self.embed(txt.tokens), txt.lengths)
        # relation knowledge: each head word receives its predicates, by role
        subj = F.one_hot(txt.obj_index.gather(1, txt.rel_subject), n_tok).to(x.dtype)   # [B, E, L]
        obj = F.one_hot(txt.obj_index.gather(1, txt.rel_object), n_tok).to(x.dtype)
        m = txt.rel_mask.unsqueeze(-1).to(x.dtype)
        x = x + (subj * m).transpose(1, 2) @ self.pred_subj(txt.rel_predicate) \
              + (obj * m).transpose(1, 2) @ self.pred_obj(txt.rel_predicate)
        x, g = self.txt_graph(x, txt.mask, text_edges(txt, n_tok))
        return LocalGlobal(F.normalize(x, dim=-1), txt.mask, F.normalize(g, dim=-1))

    # scoring ----------------------------------------------------------------------------------

    def similarity(self, img_enc: LocalGlobal, txt_enc: LocalGlobal):
        regions, rmask, vg = img_enc.local, img_enc.mask, img_enc.global_
        words, wmask, tg = txt_enc.local, txt_enc.mask, txt_enc.global_
        n_img, n_reg = rmask.shape
        n_txt, n_word = wmask.shape
        nodes = 3 + n_word + n_reg
        width = max(self.cfg.embed_dim, self.cfg.sim_dim)
        chunk = max(1, self.cfg.sim_block_elems // max(1, n_img * nodes * width))
        types = torch.tensor([GG, GL_TXT, GL_IMG] + [T2I] * n_word + [I2T] * n_reg,
                             device=regions.device)
        out = []
        for start in range(0, n_txt, chunk):
            sl = slice(start, start + chunk)
            out.append(self._score_block(regions, rmask, vg, words[sl], wmask[sl], tg[sl], types))
        return torch.cat(out, 1)

    def _score_block(self, regions, rmask, vg, words, wmask, tg, types):
        """Scores [n_img, c] of every image with each of c captions. Attention is SCAN's
        softmax(lam * cosine); the word-region cosines are one matrix product that both directions
        read, and nothing is expanded over the pairs before a pairwise result needs it."""
        n_img, c = regions.shape[0], words.shape[0]
        lam = self.cfg.attn_lambda
        logits = lam * torch.einsum("ird,cld->icrl", regions, words)        # [I, c, R, L]
        # local-local: each word with its attended regions, each region with its attended words
        w = masked_softmax(logits, rmask[:, None, :, None], dim=2)
        t2i = self.sim_t2i(torch.einsum("icrl,ird->icld", w, regions), words[None])  # [I,c,L,S]
        w = masked_softmax(logits, wmask[None, :, None, :], dim=3)
        i2t = self.sim_i2t(torch.einsum("icrl,cld->icrd", w, words), regions[:, None])  # [I,c,R,S]
        # global-local: each global vector with the locals of the other modality it attends to
        w = masked_softmax(lam * torch.einsum("ird,cd->icr", regions, tg), rmask[:, None, :])
        gl_txt = self.sim_gl(torch.einsum("icr,ird->icd", w, regions), tg[None])
        w = masked_softmax(lam * torch.einsum("id,cld->icl", vg, words), wmask[None])
        gl_img = self.sim_gl(torch.einsum("icl,cld->icd", w, words), vg[:, None])
        gg = self.sim_gg(vg[:, None], tg[None])                 # [I, c, S]
        s = torch.cat([gg.unsqueeze(2), gl_txt.unsqueeze(2), gl_img.unsqueeze(2), t2i, i2t], 2)
        mask = torch.cat([torch.ones(n_img, c, 3, dtype=torch.bool, device=s.device),
                          wmask[None].expand(n_img, c, -1), rmask[:, None].expand(n_img, c, -1)], 2)
        scores = self.relation(s.flatten(0, 1), mask.flatten(0, 1), types)
        return scores.view(n_img, c)
