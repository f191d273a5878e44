"""VSE++ baseline (Faghri et al. 2018) on region features: mean-pooled regions (standardised per
channel first) and a GRU over words, both projected to a joint space and L2-normalised;
hardest-negative triplet loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from training.models import ITMModel, ModelConfig, register
from training.models.layers import masked_mean


@dataclass
class VSEPPConfig(ModelConfig):
    """The base's fields; ``feature_norm = false`` is the first version, which collapsed to equal
    scores on features with a large common component (docs/models.md)."""


@register("vsepp")
class VSEPP(ITMModel):
    config_class = VSEPPConfig
    DATASET_DEFAULTS = {}      # VSE++ trains 30 epochs (decay after 15) on COCO too
    two_tower = True

    def __init__(self, cfg: VSEPPConfig, vocab):
        super().__init__(cfg, vocab)
        self.img_fc = nn.Linear(cfg.feature_dim, cfg.embed_dim)
        self.embed = nn.Embedding(len(vocab), cfg.word_dim, padding_idx=0)
        self.gru = nn.GRU(cfg.word_dim, cfg.embed_dim, batch_first=True)

    def encode_image(self, img):
        return F.normalize(self.img_fc(masked_mean(self.regions(img), img.region_mask)), dim=-1)

    def encode_text(self, txt):
        x = self.embed(txt.tokens)
        packed = nn.utils.rnn.pack_padded_sequence(x, txt.lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, h = self.gru(packed)
        return F.normalize(h[-1], dim=-1)
