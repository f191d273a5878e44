"""VSE++ baseline (Faghri et al. 2018) on region features: mean-pooled regions and a GRU over
words, both projected to a joint space and L2-normalised; hardest-negative triplet loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.models import ITMModel, ModelConfig, register


@dataclass
class VSEPPConfig(ModelConfig):
    embed_dim: int = 1024
    word_dim: int = 300
    feature_dim: int = 2048
    lr: float = 2e-4
    epochs: int = 30
    lr_decay_epochs: tuple[int, ...] = (15,)
    margin: float = 0.2
    warmup_epochs: int = 1     # sum of violations first, then the hardest negative


@register("vsepp")
class VSEPP(ITMModel):
    config_class = VSEPPConfig
    DATASET_DEFAULTS = {"coco": {"lr_decay_epochs": (15,), "epochs": 30},
                        "f30k": {"lr_decay_epochs": (15,), "epochs": 30}}
    two_tower = True

    def __init__(self, cfg: VSEPPConfig, vocab):
        super().__init__(cfg, vocab)
        self.img_fc = nn.Linear(cfg.feature_dim, cfg.embed_dim)
        self.embed = nn.Embedding(len(vocab), cfg.word_dim, padding_idx=0)
        self.gru = nn.GRU(cfg.word_dim, cfg.embed_dim, batch_first=True)

    def encode_image(self, img):
        mask = img.region_mask.unsqueeze(-1).float()
        pooled = (img.regions * mask).sum(1) / mask.sum(1).clamp(min=1)
        return F.normalize(self.img_fc(pooled), dim=-1)

    def encode_text(self, txt):
        x = self.embed(txt.tokens)
        packed = nn.utils.rnn.pack_padded_sequence(x, txt.lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, h = self.gru(packed)
        return F.normalize(h[-1], dim=-1)
