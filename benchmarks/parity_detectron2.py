"""Parity of itmkit's bottom-up Faster R-CNN (features/) with a detectron2 reference build.

Not part of the test suite and never imported by it. detectron2 is not a dependency of itmkit:
build a detectron2 bottom-up-attention fork yourself, outside this repository, in a virtualenv
that has torch, and run this script with that interpreter (itmkit is pure Python):

    PYTHONPATH=/path/to/itmkit /path/to/refvenv/bin/python benchmarks/parity_detectron2.py \\
        --ref-config /path/to/reference/configs/VG-Detection/faster_rcnn_R_101_C4_attr_caffemaxpool.yaml

(itmkit's defaults are that checkpoint's settings; the figures in docs/BENCHMARKS.md were taken
before they became defaults, with ``--set 'anchor_sizes=[64,128,256,512]' --set pooler=roi_pool
--set bbox_reg_classes=1600``, which is the same configuration.)

The script builds a seeded random itmkit model, writes it with itmkit's detectron2 pickle writer,
loads that pickle into the reference model built from ``--ref-config`` (every tensor must be
consumed with the same values, else it stops), runs both on the same synthetic images (same
resize, same uint8 BGR input) and prints the largest absolute and relative differences per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features import rpn as itm_rpn  # noqa: E402
from features.config import ExtractorConfig  # noqa: E402
from features.rcnn import BottomUpRCNN  # noqa: E402
from features.transforms import to_network_input  # noqa: E402
from features.weights import load_weights, read_state, save_detectron2_pickle  # noqa: E402
from pipeline.config import add_set_argument, typed_settings  # noqa: E402


def synthetic_images(n: int, seed: int) -> list[Image.Image]:
    """Textured scenes: a smooth background with random rectangles and ellipses."""
    rng = np.random.default_rng(seed)
    sizes = [(480, 640), (500, 375), (427, 640), (640, 480)]
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = rng.uniform(40, 200, 3)
        img = np.stack([base[c] + 40 * np.sin(xx / rng.uniform(20, 90) + c) * np.cos(yy / rng.uniform(20, 90))
                        for c in range(3)], -1)
        for _ in range(12):
            y0, x0 = rng.integers(0, h - 20), rng.integers(0, w - 20)
            y1, x1 = y0 + rng.integers(15, h // 2), x0 + rng.integers(15, w // 2)
            colour = rng.uniform(0, 255, 3)
            if rng.random() < 0.5:
                img[y0:y1, x0:x1] = colour
            else:
                cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
                img[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = colour
        img += rng.normal(0, 6, img.shape)
        out.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)))
    return out


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return {"shape": f"{tuple(a.shape)} vs {tuple(b.shape)}"}
    if a.numel() == 0:
        return {"n": 0}
    d = (a - b).abs()
    scale = b.abs().max().clamp_min(1e-12)
    return {"max_abs": float(d.max()), "max_rel": float(d.max() / scale), "ref_max": float(scale),
            "n": a.numel()}


def match_boxes(a: torch.Tensor, b: torch.Tensor):
    """Greedy one-to-one matching of two box sets by coordinate distance (sets may be ordered
    differently). Returns index pairs and the number of unmatched boxes on each side."""
    if len(a) == 0 or len(b) == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), len(a), len(b)
    cost = torch.cdist(a.double(), b.double(), p=float("inf"))
    ia, ib, used_a, used_b = [], [], set(), set()
    for flat in torch.argsort(cost.flatten()).tolist():
        i, j = divmod(flat, cost.shape[1])
        if i in used_a or j in used_b:
            continue
        if cost[i, j] > 1.0:  # more than a pixel apart: not the same proposal
            break
        ia.append(i), ib.append(j), used_a.add(i), used_b.add(j)
    return torch.tensor(ia, dtype=torch.long), torch.tensor(ib, dtype=torch.long), len(a) - len(ia), len(b) - len(ib)


class _NmsRecorder:
    """Stands in for ``torchvision.ops.boxes`` inside features.rpn only, to read the objectness
    scores of the proposals itmkit keeps (its RPN returns boxes only)."""

    def __init__(self, module):
        self._module, self.calls = module, []

    def __getattr__(self, name):
        return getattr(self._module, name)

    def nms(self, boxes, scores, thresh):
        keep = self._module.nms(boxes, scores, thresh)
        self.calls.append(scores[keep])
        return keep


def build_reference(config_path: str, cfg_itm: ExtractorConfig):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(config_path)
    cfg.MODEL.DEVICE = "cpu"
    # test-time RPN settings are taken from itmkit's config, so both keep the same proposals
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = cfg_itm.rpn_pre_nms_topk
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = cfg_itm.rpn_post_nms_topk
    cfg.MODEL.RPN.NMS_THRESH = cfg_itm.rpn_nms
    cfg.MODEL.RPN.MIN_SIZE = cfg_itm.rpn_min_size
    cfg.freeze()
    model = build_model(cfg)
    model.eval()
    return cfg, model


def load_reference(model, pkl: Path) -> list[str]:
    """Load with the reference's own checkpointer, then check that every tensor arrived."""
    from detectron2.checkpoint import DetectionCheckpointer

    DetectionCheckpointer(model).load(str(pkl))
    import pickle
    with open(pkl, "rb") as f:
        raw = pickle.load(f)["model"]
    own = model.state_dict()
    # anchors are computed from the config, not stored in checkpoints
    problems = [f"missing in pickle: {k}" for k in sorted(set(own) - set(raw)) if ".cell_anchors." not in k]
    problems += [f"unused from pickle: {k}" for k in sorted(set(raw) - set(own)) if k not in ("pixel_mean", "pixel_std")]
    for k in sorted(set(own) & set(raw)):
        if tuple(own[k].shape) != tuple(raw[k].shape):
            problems.append(f"shape {k}: reference {tuple(own[k].shape)} vs pickle {tuple(raw[k].shape)}")
        elif not torch.equal(own[k].cpu(), torch.from_numpy(np.asarray(raw[k])).to(own[k].dtype)):
            problems.append(f"value {k}: not loaded")
    return problems


def run(args) -> dict:
    overrides = typed_settings(args.set, ExtractorConfig, "the extractor (features/config.py)")
    cfg_itm = ExtractorConfig.from_dict({**dict(min_size=args.min_size, max_size=args.max_size,
                                                rpn_post_nms_topk=args.proposals), **overrides})
    torch.manual_seed(args.seed)
    itm = BottomUpRCNN(cfg_itm)
    load_weights(itm, "random", seed=args.seed)

    tmp = Path(tempfile.mkdtemp(prefix="parity-"))
    pkl = save_detectron2_pickle(itm, tmp / "itmkit_random.pkl")
    itm_back = BottomUpRCNN(cfg_itm)  # the pickle also loads back into itmkit (its own reader)
    itm_back.load_state_dict({k: v for k, v in read_state(pkl).items()}, strict=True)

    ref_cfg, ref = build_reference(args.ref_config, cfg_itm)
    problems = load_reference(ref, pkl)
    if problems:
        print(f"the reference does not take itmkit's pickle ({len(problems)} problems):", file=sys.stderr)
        for p in problems[:40]:
            print("  " + p, file=sys.stderr)
        raise SystemExit(3)

    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputs
    from detectron2.structures import Boxes, Instances

    stats: dict[str, list[dict]] = {}

    def add(stage, d):
        stats.setdefault(stage, []).append(d)

    counts = []
    mean = itm.pixel_mean
    for idx, im in enumerate(synthetic_images(args.images, args.seed)):
        x8 = to_network_input(im, cfg_itm.min_size, cfg_itm.max_size)     # uint8 BGR, same for both
        size = tuple(x8.shape[1:])
        with torch.no_grad():
            # backbone
            c4_itm = itm.backbone(x8[None].float() - mean)
            images = ref.preprocess_image([{"image": x8.float()}])
            feats = ref.backbone(images.tensor)
            c4_ref = feats["res4"]
            add("C4 backbone output (res4)", diff(c4_itm, c4_ref))
            # RPN head maps, anchors
            obj_itm, dlt_itm = itm.proposal_generator.rpn_head(c4_itm)
            obj_ref, dlt_ref = ref.proposal_generator.rpn_head([c4_ref])
            add("RPN objectness logits (map)", diff(obj_itm, obj_ref[0]))
            add("RPN anchor deltas (map)", diff(dlt_itm, dlt_ref[0]))
            h, w = c4_itm.shape[-2:]
            anchors_ref = ref.proposal_generator.anchor_generator([c4_ref])
            anchors_ref = anchors_ref[0][0].tensor if isinstance(anchors_ref[0], list) else anchors_ref[0].tensor
            add("RPN anchors", diff(itm.proposal_generator.anchor_generator(h, w), anchors_ref))
            # proposals (sets; matched one to one)
            recorder = _NmsRecorder(itm_rpn.box_ops)
            itm_rpn.box_ops = recorder
            try:
                prop_itm = itm.proposal_generator(c4_itm, [size])[0]
            finally:
                itm_rpn.box_ops = recorder._module
            score_itm = recorder.calls[-1][: len(prop_itm)]
            props_ref, _ = ref.proposal_generator(images, feats, None)
            prop_ref, score_ref = props_ref[0].proposal_boxes.tensor, props_ref[0].objectness_logits
            ia, ib, only_itm, only_ref = match_boxes(prop_itm, prop_ref)
            counts.append({"image": idx, "size": size, "proposals_itmkit": len(prop_itm),
                           "proposals_ref": len(prop_ref), "matched": len(ia),
                           "only_itmkit": only_itm, "only_ref": only_ref})
            add("RPN proposal boxes (matched)", diff(prop_itm[ia], prop_ref[ib]))
            add("RPN proposal objectness (matched)", diff(score_itm[ia], score_ref[ib]))

            # box head on the same boxes (the reference's proposals), each from its own C4
            boxes = prop_ref
            f_itm = itm.roi_heads.region_features(c4_itm, [boxes])
            f_ref = ref.roi_heads._shared_roi_transform([c4_ref], [Boxes(boxes)]).mean(dim=[2, 3])
            add("2048-d region features (given boxes)", diff(f_itm, f_ref))
            cls_itm, deltas_itm = itm.roi_heads.box_predictor(f_itm)
            out_ref = ref.roi_heads.box_predictor(f_ref)
            cls_ref, attr_ref, deltas_ref = out_ref if len(out_ref) == 3 else (out_ref[0], None, out_ref[1])
            add("class logits (1601)", diff(cls_itm, cls_ref))
            add("class scores (softmax, 1601)", diff(cls_itm.softmax(1), cls_ref.softmax(1)))
            add("box deltas", diff(deltas_itm, deltas_ref))
            # final (class-regressed, clipped) boxes for each box's best foreground class
            fg = itm.roi_heads.foreground_probs(cls_itm)
            labels = fg.argmax(1)
            reg_itm = itm._regress(boxes, deltas_itm, labels, size)
            inst = Instances(size)
            inst.proposal_boxes = Boxes(boxes)
            outs = FastRCNNOutputs(ref.roi_heads.box2box_transform, cls_ref, deltas_ref, [inst],
                                   ref.roi_heads.smooth_l1_beta)
            per_class = outs.predict_boxes()[0].view(len(boxes), -1, 4)
            reg_ref = Boxes(per_class[torch.arange(len(boxes)), labels]).clone()
            reg_ref.clip(size)
            add("final boxes (regressed for the best class)", diff(reg_itm, reg_ref.tensor))
            # attributes: class embedding of the argmax over all 1601 logits, as the reference
            if attr_ref is not None:
                attr_itm = itm.roi_heads.attribute_predictor(f_itm, cls_itm.argmax(1))
                add("attribute logits (401)", diff(attr_itm, attr_ref))
                add("attribute scores (softmax, 401)", diff(attr_itm.softmax(1), attr_ref.softmax(1)))
                counts[-1]["argmax_is_background"] = int((cls_ref.argmax(1) == cls_ref.shape[1] - 1).sum())
            # itmkit's whole extractor in given-boxes mode vs the reference on the same boxes
            orig = (im.height, im.width)
            given = boxes[:36] / itm._scale(size, orig, boxes.device)
            out = itm([x8], [orig], given_boxes=[given], grid=False)[0]
            add("extractor features, --boxes given (36)", diff(out["features"], f_ref[:36]))
            fg_ref = torch.softmax(cls_ref[:36], 1)[:, :-1]
            add("extractor object scores, --boxes given", diff(out["obj_scores"], fg_ref.max(1).values))
            counts[-1]["given_labels_equal"] = int((out["obj_labels"] == fg_ref.argmax(1)).sum())
    return {"stats": stats, "counts": counts, "cfg_itm": cfg_itm, "ref_cfg": ref_cfg}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref-config", required=True, help="the reference repository's BUTD config (yaml)")
    add_set_argument(p, "an itmkit extractor setting (features/config.py)")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--min-size", type=int, default=600)
    p.add_argument("--max-size", type=int, default=1000)
    p.add_argument("--proposals", type=int, default=300, help="RPN proposals after NMS (both models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    r = run(args)
    secs = time.time() - t0
    print(f"reference config: {args.ref_config}")
    print(f"itmkit settings changed: {args.set or 'none'}; images {args.images}, resize "
          f"{args.min_size}/{args.max_size}, proposals {args.proposals}, seed {args.seed}; "
          f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.1f}, {secs:.0f}s")
    for c in r["counts"]:
        print("  image", json.dumps(c))
    print(f"{'stage':48s} {'max |diff|':>12s} {'max rel':>10s} {'max |ref|':>10s}")
    worst = {}
    for stage, ds in r["stats"].items():
        if any("shape" in d for d in ds):
            print(f"{stage:48s} SHAPE MISMATCH {[d.get('shape') for d in ds]}")
            worst[stage] = {"shape": [d.get("shape") for d in ds]}
            continue
        ds = [d for d in ds if d.get("n")]
        if not ds:
            print(f"{stage:48s} (empty)")
            continue
        w = {"max_abs": max(d["max_abs"] for d in ds), "max_rel": max(d["max_rel"] for d in ds),
             "ref_max": max(d["ref_max"] for d in ds)}
        worst[stage] = w
        print(f"{stage:48s} {w['max_abs']:12.3g} {w['max_rel']:10.3g} {w['ref_max']:10.3g}")
    if args.json:
        Path(args.json).write_text(json.dumps({"stages": worst, "images": r["counts"], "set": args.set,
                                               "ref_config": args.ref_config, "seconds": secs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
