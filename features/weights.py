"""Weights for the extractor: the published detectron2 pickle (``{"model": {name: ndarray}}``),
a torch state dict, or a seeded random model.

The pickle is read by an unpickler that can only rebuild numpy arrays and plain containers, so a
crafted file cannot run code. Every tensor of the model must be given and every tensor given must
be used: anything else is an error that lists the offending names."""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.shards import sha256_file

RANDOM = "random"

# module.name pairs a numpy-array pickle needs (numpy 1 and numpy 2 spellings)
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # protocol-2 pickles spell bytes as _codecs.encode(str, "latin1")
}
# tensors a detectron2 checkpoint may carry besides the network; checked, not loaded
_PREPROCESSING_KEYS = ("pixel_mean", "pixel_std")
# The attribute head lives in detectron2's box predictor (bottom-up-attention fork):
# detectron2 name prefix -> this model's. Pickles are read and written with detectron2's names.
_DETECTRON2_PREFIXES = {
    "roi_heads.box_predictor.cls_embedding.": "roi_heads.attribute_predictor.obj_embed.",
    "roi_heads.box_predictor.fc_attr.": "roi_heads.attribute_predictor.fc.0.",
    "roi_heads.box_predictor.attr_score.": "roi_heads.attribute_predictor.attr_score.",
}


def _rename(name: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def from_detectron2_name(name: str) -> str:
    return _rename(name, _DETECTRON2_PREFIXES)


def to_detectron2_name(name: str) -> str:
    return _rename(name, {new: old for old, new in _DETECTRON2_PREFIXES.items()})


class WeightsError(RuntimeError):
    """A weights file is unsafe, unreadable, or does not fit the model."""


@dataclass
class WeightsInfo:
    source: str        # path, or "random"
    sha256: str        # of the file; "random-seed-S" for a random model
    description: str   # what shards record in their ``weights`` attribute

    @property
    def is_random(self) -> bool:
        return self.source == RANDOM


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise WeightsError(f"refusing to load {module}.{name}: a weights pickle may only hold "
                           f"numpy arrays and plain containers")


def restricted_load(path) -> object:
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, encoding="latin1").load()
        except WeightsError as e:
            raise WeightsError(f"{path}: {e}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise WeightsError(f"{path}: not a readable weights pickle: {e}") from e


def read_state(path) -> dict[str, torch.Tensor]:
    """Tensors by name from a detectron2 pickle or a torch checkpoint (``model`` entry if any)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: weights file not found")
    if zipfile.is_zipfile(path):  # torch.save format
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(f"{path}: cannot load as a torch state dict (weights only): {e}") from e
    else:
        obj = restricted_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a dict of tensors (or one under 'model'), got {type(obj).__name__}")
    state = {}
    for name, value in obj.items():
        name = from_detectron2_name(name[len("module."):] if name.startswith("module.") else name)
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: entry {name!r} is a {type(value).__name__}, not an array")
        state[name] = value
    return state


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source="weights") -> None:
    """Copy ``state`` into ``model``; every tensor on both sides must match by name and shape."""
    state = dict(state)
    for key in _PREPROCESSING_KEYS:
        value = state.pop(key, None)
        if key == "pixel_mean" and value is not None:
            want = model.pixel_mean.flatten().cpu()
            if not torch.allclose(value.flatten().float(), want, atol=1e-3):
                raise WeightsError(f"{source}: checkpoint pixel_mean {value.flatten().tolist()} differs "
                                   f"from the config's {want.tolist()}")
        if key == "pixel_std" and value is not None and not torch.allclose(value.float(), torch.ones(())):
            raise WeightsError(f"{source}: checkpoint pixel_std {value.flatten().tolist()} is not 1 "
                               f"(the Caffe convention divides by nothing)")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} != model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing: {missing}" if missing else "",
                 f"{len(unexpected)} unexpected: {unexpected}" if unexpected else "",
                 f"{len(shapes)} shape mismatches: {shapes}" if shapes else ""]
        raise WeightsError(f"{source} does not fit the model; " + "; ".join(p for p in parts if p))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def random_init(model: nn.Module, seed: int = 0) -> None:
    """A seeded random model whose features stay informative through all 101 layers: Kaiming
    convs, frozen-BN scales that keep the residual stream's scale near 1, small head weights."""
    from features.backbone import Bottleneck, ConvNorm, Stem  # local: only this function needs them
    g = torch.Generator().manual_seed(seed)
    # backbone and res5 are drawn first, so grid features do not depend on head-only settings
    trunk = [m for part in (model.backbone, model.roi_heads.res5) for m in part.modules()]
    with torch.no_grad():
        for m in trunk:
            if isinstance(m, nn.Conv2d):
                std = math.sqrt(2.0 / (m.in_channels * m.kernel_size[0] * m.kernel_size[1]))
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
                if m.bias is not None:
                    m.bias.zero_()
            if isinstance(m, ConvNorm):
                m.norm.weight.fill_(1.0)
                m.norm.bias.zero_()
                m.norm.running_mean.zero_()
                m.norm.running_var.fill_(1.0)
        for m in trunk:
            if isinstance(m, Stem):     # input pixels are in [-128, 128]: bring them to unit scale
                m.conv1.norm.weight.fill_(1.0 / 64)
            if isinstance(m, Bottleneck):  # damp each residual branch so 33 blocks do not blow up
                m.conv3.norm.weight.fill_(0.2)
        heads = [(model.proposal_generator.rpn_head.conv, 0.01), (model.proposal_generator.rpn_head.objectness_logits, 0.01),
                 (model.proposal_generator.rpn_head.anchor_deltas, 0.01),
                 (model.roi_heads.box_predictor.cls_score, 0.01), (model.roi_heads.box_predictor.bbox_pred, 0.001),
                 (model.roi_heads.attribute_predictor.fc[0], 0.01), (model.roi_heads.attribute_predictor.attr_score, 0.01)]
        for layer, std in heads:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * std)
            layer.bias.zero_()
        emb = model.roi_heads.attribute_predictor.obj_embed.weight
        emb.copy_(torch.randn(emb.shape, generator=g) * 0.01)


def weights_info(spec: str, seed: int = 0) -> WeightsInfo:
    """Identify ``spec`` (a weights path or ``random``) without building a model."""
    if spec == RANDOM:
        return WeightsInfo(RANDOM, f"random-seed-{seed}", f"RANDOM (seed {seed}): features are not meaningful")
    if not Path(spec).exists():
        raise WeightsError(f"{spec}: weights file not found")
    digest = sha256_file(spec)
    return WeightsInfo(str(spec), digest, f"{Path(spec).name} sha256 {digest}")


def load_weights(model: nn.Module, spec: str, seed: int = 0) -> WeightsInfo:
    """Fill ``model`` from ``spec``: a weights path or ``random``."""
    info = weights_info(spec, seed)
    if info.is_random:
        random_init(model, seed)
    else:
        load_state_strict(model, read_state(spec), source=str(spec))
    return info


def save_detectron2_pickle(model: nn.Module, path) -> Path:
    """Write the model's tensors in the detectron2 pickle layout (``{"model": {name: ndarray}}``),
    under detectron2's names."""
    state = {to_detectron2_name(k): v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    pickle.dump({"model": state, "__author__": "itmkit", "matching_heuristics": False}, buf, protocol=4)
    Path(path).write_bytes(buf.getvalue())
    return Path(path)
