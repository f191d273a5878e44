"""Model registry and the interface every image-text matching model implements.

    @register("vsepp")
    class VSEPP(ITMModel):
        config_class = VSEPPConfig
        two_tower = True
        ...

    model = build("vsepp", cfg, vocab)        # cfg: a config object, a dict of overrides or None
    names()                                   # ["cimn", ..., "vsepp"]: the --model choices

A model file defines its ``@dataclass`` config (a subclass of ``ModelConfig``, which carries the
sizes every model has and the training recipe; the subclass declares only its own fields and
the defaults it changes), per-dataset overrides in ``DATASET_DEFAULTS`` where they differ from
the base's, and the model class. Adding a model touches that one file and nothing else: every
module of this package is imported the first time the registry is read, and a model module
registers itself on import. Pieces that several models use live in ``layers.py``.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from pipeline import shards
from training import losses
from training.models.layers import FeatureNorm

_REGISTRY: dict[str, type["ITMModel"]] = {}

# config fields renamed since runs were first saved: old name -> new (config.json of older runs)
RENAMED_FIELDS = {"sim_budget": "sim_block_elems"}


@dataclass
class ModelConfig:
    """Fields every model has: the sizes and the training recipe. Model files subclass this, add
    their own hyper-parameters and restate only the defaults they change; ``train.py`` exposes
    every field as ``--set name=value`` and saves the resolved config in the run's config.json.

    ``SAVED_BEFORE``: fields added after runs were first saved, with the value that reproduces
    what those runs did; a saved config without such a field gets that value (``make_config(...,
    saved=True)``), a new run the field's default."""

    SAVED_BEFORE: ClassVar[dict[str, Any]] = {"feature_norm": False, "warmup_steps": 0}

    embed_dim: int = 1024
    word_dim: int = 300            # word embedding size (GloVe's 300 in the SCAN family)
    feature_dim: int = 2048        # region feature channels (bottom-up attention)
    # standardise region features per channel before the model's first layer (layers.FeatureNorm;
    # False: raw features, as runs saved before it). Detector features share a large common
    # component that starts every image near the same point and the hardest-negative loss at
    # 2 x margin x batch (docs/models.md, "What the models share")
    feature_norm: bool = True
    word_vectors: bool = False     # initialise the word embedding from text/vocab.vectors.npy
    # cross-attention models: bound on the elements of the largest tensor of one similarity chunk
    sim_block_elems: int = 1 << 24
    # optimisation (papers: Adam, lr 2e-4, decayed x0.1 after 15 epochs, clip 2.0)
    optimizer: str = "adam"          # adam | adamw
    lr: float = 2e-4
    weight_decay: float = 0.0
    epochs: int = 30
    lr_decay_epochs: tuple[int, ...] = (15,)   # step decay: lr *= lr_decay at each listed epoch
    lr_decay: float = 0.1
    batch_size: int = 128
    grad_clip: float = 2.0
    # hinge triplet loss (VSE++): sum over negatives for the first warmup epochs, then hardest
    # (from step 0, the hardest negative collapsed several models on the demo: docs/models.md)
    margin: float = 0.2
    max_violation: bool = True
    warmup_epochs: int = 1
    # ... and for at least this many steps, in whole epochs: a new run whose warmup_epochs hold
    # fewer steps (a small build's epoch is a few dozen) warms up longer (train.warmup_epochs)
    warmup_steps: int = 250


class ITMModel(nn.Module):
    """Base class. Subclasses set the class attributes and implement the three encoders.

    ``two_tower``: True when ``encode_image``/``encode_text`` return one L2-normalised embedding
    per item ([B, D] tensors) and ``similarity`` is their dot product; evaluation then scores all
    images against all captions with one matrix product. False for cross-attention models:
    evaluation keeps the per-batch encodings and calls ``similarity`` on every (image batch,
    caption batch) block, so memory stays bounded by the evaluation batch sizes.

    ``needs_grid``: the model reads ``ImageBatch.grid``; the dataset must have grid shards.
    ``ddp_find_unused_parameters``: passed to DistributedDataParallel.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    # the SCAN-family recipe on COCO (Flickr30K: the config's own 30 epochs, decay after 15)
    DATASET_DEFAULTS: ClassVar[dict[str, dict]] = {"coco": {"epochs": 20, "lr_decay_epochs": (10,)}}
    two_tower: ClassVar[bool] = True
    needs_grid: ClassVar[bool] = False
    # DDP must be told when some parameters may get no gradient in a step (e.g. a relation
    # module on a batch without relations)
    ddp_find_unused_parameters: ClassVar[bool] = False

    def __init__(self, cfg: ModelConfig, vocab):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = len(vocab)
        self.feature_norm = FeatureNorm(cfg.feature_dim) if cfg.feature_norm else None

    def regions(self, img) -> torch.Tensor:
        """The batch's region features [B, R, C], standardised when ``cfg.feature_norm``: what
        every model's ``encode_image`` projects."""
        if self.feature_norm is None:
            return img.regions
        return self.feature_norm(img.regions, img.region_mask)

    def encode_image(self, img) -> Any:
        """``img`` is a ``training.data.ImageBatch``; returns a [B, D] tensor (two-tower), or a
        ``layers.Encoding`` (a dataclass of tensors whose first dimension is the batch)."""
        raise NotImplementedError

    def encode_text(self, txt) -> Any:
        """``txt`` is a ``training.data.TextBatch``; same return convention as encode_image."""
        raise NotImplementedError

    def similarity(self, img_enc, txt_enc) -> torch.Tensor:
        """Scores [n_img, n_txt] of every image against every caption (higher = better match)."""
        return img_enc @ txt_enc.t()

    def forward(self, batch, epoch: int = 0):
        """The training step's loss on a ``Batch`` of pairs (what DDP wraps)."""
        return self.loss(self.encode_image(batch.image), self.encode_text(batch.text), batch, epoch)

    def loss(self, img_enc, txt_enc, batch, epoch: int) -> torch.Tensor | dict:
        """Training loss of a batch of matching pairs (image i goes with caption i; other pairs
        with the same image id are positives too and never used as negatives). Returns a scalar,
        or a dict with the total under ``"loss"`` and the parts to log beside it."""
        sims = self.similarity(img_enc, txt_enc)
        hardest = self.cfg.max_violation and epoch >= self.cfg.warmup_epochs
        return losses.triplet_loss(sims, margin=self.cfg.margin, max_violation=hardest,
                                   positives=batch.positives())

    @classmethod
    def hardest_negative(cls, cfg: ModelConfig) -> bool:
        """Whether training ends on the hardest-negative hinge (after the warm-up epochs)."""
        return cfg.max_violation

    def word_embedding(self) -> nn.Embedding:
        """The embedding that ``word_vectors`` initialises (``self.embed`` in every model here)."""
        return self.embed

    def load_word_vectors(self, path) -> None:
        """Initialise the word embedding from a vocabulary's vectors file (``pipeline vocab
        --vectors``; rows in vocabulary order, ``<pad>`` zero). The embedding stays trainable."""
        path = Path(path)
        hint = "run `itmkit vocab --dataset DATASET --vectors GLOVE.txt`"
        if not path.exists():
            raise shards.ShardError(f"{path}: file not found; word_vectors=true initialises the word "
                                    f"embedding from it: {hint}")
        emb = self.word_embedding()
        try:
            vectors = shards.read_vectors(path, emb.num_embeddings)
        except shards.ShardError as e:
            raise shards.ShardError(f"{e}; {hint} again for the current vocabulary") from None
        if vectors.shape[1] != emb.embedding_dim:
            raise ValueError(f"{path}: word vectors are {vectors.shape[1]}-d, the model's word_dim is "
                             f"{emb.embedding_dim}: add --set word_dim={vectors.shape[1]}")
        with torch.no_grad():
            emb.weight.copy_(torch.from_numpy(vectors))


def register(name: str):
    def wrap(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model '{name}' registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def _load_all() -> None:
    """Import every module of this package; model modules register themselves on import."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> type[ITMModel]:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model '{name}'; known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def default_config(name: str, dataset: str | None = None, **overrides) -> ModelConfig:
    """The model's defaults, then its per-dataset defaults (``coco``, ``f30k``), then overrides."""
    cls = get(name)
    values = dict(cls.DATASET_DEFAULTS.get(dataset or "", {}), **overrides)
    return make_config(cls.config_class, values)


def make_config(config_class: type[ModelConfig], values: dict, saved: bool = False) -> ModelConfig:
    """The config with ``values`` over the defaults. ``saved``: ``values`` is a whole config saved
    by an earlier run (renamed fields and fields added since are mapped to what that run did)."""
    values = {RENAMED_FIELDS.get(k, k): v for k, v in values.items()}
    if saved:
        values = {**{k: v for k, v in config_class.SAVED_BEFORE.items() if k not in values}, **values}
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{config_class.__name__} has no field(s) {unknown}; "
                         f"fields: {', '.join(fields)}")
    defaults = config_class()
    out = {}
    for k, v in values.items():  # JSON turns tuples into lists; keep the declared type
        if isinstance(getattr(defaults, k), tuple) and isinstance(v, list):
            v = tuple(v)
        out[k] = v
    return dataclasses.replace(defaults, **out)


def build(name: str, cfg: ModelConfig | dict | None = None, vocab=None, vectors=None) -> ITMModel:
    """Construct a registered model. ``cfg`` may be a config object, a dict of overrides of the
    defaults, or None; ``vocab`` is a ``pipeline.shards.Vocabulary``. ``vectors``: the path of
    the vocabulary's word vectors (``Layout.vocab_vectors``), read when ``cfg.word_vectors`` is
    set; leave it None when the weights come from a checkpoint instead."""
    cls = get(name)
    if not isinstance(cfg, ModelConfig):
        cfg = default_config(name, **(cfg or {}))
    if vocab is None:
        raise ValueError(f"build('{name}') needs the vocabulary (pipeline.shards.Vocabulary)")
    model = cls(cfg, vocab)
    if cfg.word_vectors and vectors is not None:
        model.load_word_vectors(vectors)
    return model
