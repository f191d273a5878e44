"""What the papers' mechanisms compute in a trained run, on its own data.

    python benchmarks/mechanisms.py RUN [--split val] [--max-images 500] [--batch-size N] [--root DATA]

dsrln  DIF's gate g (the share of the region kept against its grid context, per channel,
       ``fused = g x + (1 - g) c``), averaged over the channels and real regions of each image,
       for the captions that name the image's background and for those that do not, and per
       image (some caption names its background, or none does); the demo's context build names
       backdrops; on other builds all captions form one group. How alike two regions of one
       image are before GISA's first layer, after its last and leaving the encoder, and a region
       whose box moves in an image and in its relation-swapped partner (the demo's hard-negative
       pairs in the split). Per GISA layer: the share of region pairs relation networks' weight
       masks (relu(w.E) at most its floor, 1e-6 by default), and the attention's entropy with and
       without the geometry.
cimn   FRR's potential-relation attention, per tower and layer: its entropy against that of
       uniform attention over the same nodes, the share on the node itself, on overlapping boxes
       (IoU > 0) and on nearby boxes (centres at most ``box_sigma`` apart), each beside the share
       uniform attention would give; for words, the share on the adjacent words.
       The Gravitation Loss on batches of (image, first caption) pairs, every image and caption
       an anchor: masses and force weights of easy anchors (no negative within the margin) and
       hard ones: the mass, the share of it on the closest negative, the effective number of
       negatives (m² / Σ w²) and the anchor's loss. The cosine of the image embeddings of
       the two images of each hard-negative pair, per kind, beside random pairs of images.
resg   VReG's refinement rounds: where each region's attention goes (itself, overlapping and
       nearby boxes, against uniform attention), how large the update is against the node, and
       how alike the nodes are before and after: two regions of one image, and one box in an
       image and in its attribute-swapped partner (the demo's hard-negative pairs in the split),
       whose nodes differ only by the swapped colour or texture before the rounds.

Diagnostics, not tuning: the default split is val.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch
from torchvision import ops

from pipeline.config import HelpFormatter
from pipeline.shards import ShardError
from training import losses
from training.checkpoint import CheckpointError
from training.data import eval_loaders, hard_negative_pairs
from training.models.layers import masked_softmax
from training.run import load_run


def background_words() -> set[str]:
    """The words by which the demo's context captions name a backdrop (the last word of each
    phrase: "on the grass", "by a brick wall"); empty where the generator has no backdrops."""
    try:
        from pipeline.backdrops import BACKDROP_WORDS
    except ImportError:
        return set()
    return {phrase.split()[-1] for phrases in BACKDROP_WORDS.values() for phrase in phrases}


def caption_groups(vocab, texts, words: set[str]) -> dict[str, list[tuple[int, int]]]:
    """(caption id, image id) of every caption, grouped by whether it names the background; one
    group of all captions when none does (a build without backdrops)."""
    ids = {vocab.stoi[w] for w in words if w in vocab.stoi}
    groups = {"names the background": [], "does not": []}
    for t in texts:
        hit = torch.isin(t.tokens, torch.tensor(sorted(ids), dtype=t.tokens.dtype)) & t.mask
        for cid, iid, h in zip(t.caption_ids.tolist(), t.image_ids.tolist(), hit.any(1).tolist()):
            groups["names the background" if h else "does not"].append((cid, iid))
    if not groups["names the background"]:
        return {"all captions (none names a background)": groups["does not"]}
    return groups


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _capture(module, out: list):
    return module.register_forward_hook(lambda m, i, o: out.append(o))


# ---------------------------------------------------------------------------------------------
# dsrln

def dif_gate(run, images, texts, args) -> list[str]:
    model = run.model
    if model.dif is None:
        return ["DIF: not in this run (grid_fusion=false)"]
    logits, per_image = [], {}
    hook = _capture(model.dif.gate, logits)
    try:
        with torch.no_grad():
            for img in images:
                logits.clear()
                model.encode_image(img)
                g = torch.sigmoid(logits[0]).mean(-1)                     # [B, R]
                for iid, gi, m in zip(img.image_ids.tolist(), g, img.region_mask):
                    per_image[iid] = gi[m].mean().item()
    finally:
        hook.remove()
    lines = ["DIF gate g = share of the region kept (1 - g: its grid context), mean over channels and "
             "real regions of the caption's image", "",
             "| captions | n | mean g | std g | mean 1 - g |", "|---|---|---|---|---|"]
    groups = caption_groups(run.vocab, texts, background_words())
    named = {iid for _, iid in groups.get("names the background", [])}
    if named:   # the gate is the image's: also per image, whether any of its captions names it
        groups["images: some caption names the background"] = [(None, i) for i in per_image if i in named]
        groups["images: no caption does"] = [(None, i) for i in per_image if i not in named]
    for name, members in groups.items():
        g = [per_image[iid] for _, iid in members if iid in per_image]
        std = statistics.pstdev(g) if g else math.nan
        lines.append(f"| {name} | {len(g)} | {_mean(g):.3f} | {std:.3f} | {1 - _mean(g):.3f} |")
    return lines


# ---------------------------------------------------------------------------------------------
# cimn

def box_iou(boxes: torch.Tensor) -> torch.Tensor:
    """[B, R, 4] x1y1x2y2 -> [B, R, R] IoU of every pair (torchvision's, image by image); pairs of
    empty boxes (padding) give 0."""
    return torch.stack([ops.box_iou(b, b) for b in boxes]).nan_to_num(0.0)


def attention_stats(att: torch.Tensor, mask: torch.Tensor, groups: dict[str, torch.Tensor]) -> dict:
    """Per real row of ``att`` [B, N, N]: entropy, that of uniform attention over the row's real
    nodes, the share on the node itself, and per group (a [B, N, N] bool of node pairs, self
    excluded) the share on it and the share uniform attention would give; means over rows."""
    rows = mask.clone()
    n = mask.sum(-1, keepdim=True).expand_as(mask).float()[rows]               # real nodes per row
    a = att[rows]                                                              # [rows, N]
    out = {"rows": int(rows.sum()),
           "entropy": _mean((-(a * a.clamp(min=1e-12).log()).sum(-1)).tolist()),
           "uniform": _mean(n.log().tolist()),
           "self": _mean(att.diagonal(dim1=1, dim2=2)[rows].tolist())}
    eye = torch.eye(att.shape[-1], dtype=torch.bool)
    for name, pairs in groups.items():
        pairs = pairs & ~eye & mask[:, None, :]
        out[name] = (_mean((a * pairs[rows]).sum(-1).tolist()), _mean((pairs[rows].sum(-1) / n).tolist()))
    return out


def frr_attention(run, images, texts, args) -> list[str]:
    model, cfg = run.model, run.model.cfg
    if not cfg.frr_layers:
        return ["FRR: no layers in this run (frr_layers=0)"]
    stats = []   # (tower, layer, stats)
    for tower, batches in (("image", images), ("text", texts)):
        layers = (model.image_tower if tower == "image" else model.text_tower).layers
        acc = [[] for _ in layers]
        captured = []
        hooks = [_capture(layer.potential, captured) for layer in layers]
        try:
            with torch.no_grad():
                for b in batches:
                    captured.clear()
                    if tower == "image":
                        model.encode_image(b)
                        centres = (b.boxes[..., :2] + b.boxes[..., 2:]) / 2
                        near = torch.cdist(centres, centres) <= cfg.box_sigma
                        known = b.boxes_known[:, None, None]
                        groups = {"overlapping": (box_iou(b.boxes) > 0) & known, "near": near & known}
                        mask = b.region_mask
                    else:
                        model.encode_text(b)
                        pos = torch.arange(b.tokens.shape[1])
                        adjacent = (pos[:, None] - pos[None, :]).abs() <= cfg.word_window
                        groups = {"adjacent": adjacent.expand(len(b), -1, -1)}
                        mask = b.mask
                    for k, att in enumerate(captured):
                        acc[k].append(attention_stats(att, mask, groups))
        finally:
            for h in hooks:
                h.remove()
        for k, parts in enumerate(acc):
            stats.append((tower, k + 1, _merge(parts)))
    lines = ["FRR potential-relation attention, mean over real nodes; (uniform) = what equal attention "
             "over the node's real neighbours would give", "",
             "| tower | layer | nodes | entropy | (uniform) | self | overlapping (uniform) | near (uniform) | "
             "adjacent words (uniform) |", "|---|---|---|---|---|---|---|---|---|"]
    for tower, k, s in stats:
        share = lambda g: f"{s[g][0]:.3f} ({s[g][1]:.3f})" if g in s else "-"  # noqa: E731
        lines.append(f"| {tower} | {k} | {s['rows']} | {s['entropy']:.3f} | {s['uniform']:.3f} | {s['self']:.3f} | "
                     f"{share('overlapping')} | {share('near')} | {share('adjacent')} |")
    return lines


def _merge(parts: list[dict]) -> dict:
    """Row-weighted means of several ``attention_stats``."""
    total = sum(p["rows"] for p in parts)
    out = {"rows": total}
    for key in parts[0]:
        if key == "rows":
            continue
        w = [(p[key], p["rows"]) for p in parts if p["rows"]]
        if isinstance(parts[0][key], tuple):
            out[key] = tuple(sum(v[i] * r for v, r in w) / total for i in range(2))
        else:
            out[key] = sum(v * r for v, r in w) / total
    return out


def gravitation(run, images, texts, args) -> list[str]:
    model, cfg = run.model, run.model.cfg
    with torch.no_grad():
        v = torch.cat([model.encode_image(b) for b in images])
        image_ids = torch.cat([b.image_ids for b in images])
        first = {}
        for t in texts:
            enc = model.encode_text(t)
            for k, iid in enumerate(t.image_ids.tolist()):
                first.setdefault(iid, enc[k])
    keep = [k for k, iid in enumerate(image_ids.tolist()) if iid in first]
    v, image_ids = v[keep], image_ids[keep]
    t = torch.stack([first[iid] for iid in image_ids.tolist()])
    size = args.batch_size or cfg.batch_size
    rows = {"easy": [], "hard": []}
    for s in range(0, len(v), size):
        vb, tb, ids = v[s:s + size], t[s:s + size], image_ids[s:s + size]
        sims = vb @ tb.t()
        neg = ids[:, None] != ids[None, :]
        mass = 2 - sims.diagonal()
        pos = sims.diagonal()
        for anchor_sims, negatives in ((sims, neg), (sims.t(), neg.t())):
            w = losses.gravitation_weights(anchor_sims, negatives, mass, mass, cfg.gl_power)
            hinge = (cfg.margin + anchor_sims - pos[:, None]).clamp(min=0) * negatives
            for k in range(len(pos)):
                if not negatives[k].any():
                    continue
                group = "hard" if (hinge[k] > 0).any() else "easy"
                rows[group].append((pos[k].item(), mass[k].item(), (w[k].max() / mass[k]).item(),
                                    (mass[k] ** 2 / w[k].square().sum()).item(), (w[k] * hinge[k]).sum().item()))
    lines = [f"Gravitation Loss weights (gl_power {cfg.gl_power:g}, margin {cfg.margin:g}; this run trained "
             f"with loss={cfg.loss}) on batches of {size} (image, first caption) pairs, images and "
             "captions as anchors; hard = some negative within the margin", "",
             "| anchors | n | s(pair) | mass | share on the closest negative | effective negatives | loss |",
             "|---|---|---|---|---|---|---|"]
    for group, values in rows.items():
        cols = [_mean(c) for c in zip(*values)] if values else [math.nan] * 5
        lines.append(f"| {group} | {len(values)} | " + " | ".join(f"{c:.3f}" for c in cols) + " |")
    return lines


# model -> its mechanisms' diagnostics
def pair_embeddings(run, images, texts, args) -> list[str]:
    """How alike a two-tower model makes the two images of each hard-negative pair: the cosine
    of their embeddings, per kind, beside that of images drawn at random. A pair at cosine 1 is one
    point for the model, and no caption can score it apart."""
    model = run.model
    table = hard_negative_pairs(run.data.layout)
    if not table:
        return ["image embeddings of hard-negative pairs: the dataset has none"]
    with torch.no_grad():
        v = torch.nn.functional.normalize(torch.cat([model.encode_image(b) for b in images]), dim=-1)
    row = {iid: k for k, iid in enumerate(torch.cat([b.image_ids for b in images]).tolist())}
    by_kind: dict[str, list[float]] = {}
    for r in table:
        if r["image_id"] in row and r["partner_id"] in row:
            by_kind.setdefault(r["kind"], []).append((v[row[r["image_id"]]] @ v[row[r["partner_id"]]]).item())
    shuffled = torch.randperm(len(v), generator=torch.Generator().manual_seed(0))
    random = (v * v[shuffled]).sum(-1)[shuffled != torch.arange(len(v))].tolist()
    lines = ["image embeddings: cosine of the two images of each hard-negative pair (1 = one point "
             "for the model)", "", "| pairs | n | mean cosine | min | max |", "|---|---|---|---|---|"]
    for kind, c in sorted(by_kind.items()) + [("random images", random)]:
        lines.append(f"| {kind} | {len(c)} | {_mean(c):.4f} | {min(c):.4f} | {max(c):.4f} |")
    return lines


# ---------------------------------------------------------------------------------------------
# resg

def _real_cosines(x: torch.Tensor) -> list[float]:
    """Cosines of every pair of distinct rows of ``x`` [N, D]."""
    xn = torch.nn.functional.normalize(x, dim=-1)
    c = xn @ xn.T
    return c[~torch.eye(len(x), dtype=torch.bool)].tolist()


def _within(nodes: dict) -> float:
    """Mean cosine of two regions of one image, over every image's pairs."""
    return _mean(c for v in nodes.values() if len(v) > 1 for c in _real_cosines(v))


def _layer_ends(model, layers, images, each=None) -> tuple[dict, dict]:
    """Each image's real region nodes entering the first of ``layers`` and leaving the last.
    ``each(img, rounds, encoded)``, when given, sees every batch's (layer, inputs, output) per
    layer and what ``encode_image`` returned."""
    rounds = []
    hooks = [layer.register_forward_hook(lambda m, i, o: rounds.append((m, i, o))) for layer in layers]
    before, after = {}, {}
    try:
        with torch.no_grad():
            for img in images:
                rounds.clear()
                encoded = model.encode_image(img)
                if each is not None:
                    each(img, rounds, encoded)
                first, last, mask = rounds[0][1][0], rounds[-1][2], img.region_mask
                for i, iid in enumerate(img.image_ids.tolist()):
                    before[iid], after[iid] = first[i][mask[i]], last[i][mask[i]]
    finally:
        for h in hooks:
            h.remove()
    return before, after


def moved(boxes: dict, a: int, b: int) -> torch.Tensor:
    """Which regions' boxes differ between images ``a`` and ``b`` (as many regions in each)."""
    return (boxes[a] - boxes[b]).abs().amax(-1) > 1e-3


def split_pairs(run, kind: str, regions: dict) -> list[tuple[int, int]]:
    """The dataset's ``kind`` hard-negative pairs (image id, partner id) whose two images are both
    in ``regions`` (image id -> [regions, ...]) with as many regions each."""
    return [(r["image_id"], r["partner_id"]) for r in hard_negative_pairs(run.data.layout)
            if r["kind"] == kind and r["image_id"] in regions and r["partner_id"] in regions
            and len(regions[r["image_id"]]) == len(regions[r["partner_id"]])]


def partner_cosines(run, kind: str, stages: list[dict], boxes: dict | None = None) -> tuple[int, list[float]]:
    """Mean cosine of a region in an image and the same region in its ``kind`` partner (the
    split's hard-negative pairs whose two images have as many regions), for each stage's nodes
    (image id -> [regions, D]); with ``boxes`` (image id -> [regions, 4]), only the regions whose
    box moved between the two images. Returns the number of pairs and a cosine per stage."""
    pairs = split_pairs(run, kind, stages[0])
    cosines = [[] for _ in stages]
    for a, b in pairs:
        keep = moved(boxes, a, b) if boxes is not None else slice(None)
        for out, nodes in zip(cosines, stages):
            out += torch.nn.functional.cosine_similarity(nodes[a][keep], nodes[b][keep], dim=-1).tolist()
    return len(pairs), [_mean(c) for c in cosines]


def gisa_mixing(run, images, texts, args) -> list[str]:
    model = run.model
    if not len(model.gisa):
        return ["GISA: no layers in this run"]
    encoded, boxes = {}, {}

    def outputs(img, rounds, enc):
        for i, iid in enumerate(img.image_ids.tolist()):
            encoded[iid], boxes[iid] = enc.local[i][img.region_mask[i]], img.boxes[i][img.region_mask[i]]

    before, after = _layer_ends(model, model.gisa, images, outputs)
    lines = ["GISA: how alike two regions of one image are before its first layer and after its "
             "last; a region whose box moves, in an image and in its relation-swapped partner, "
             "before GISA, after it and leaving the image encoder (after DIF)", "",
             "| cosine | before GISA | after GISA | encoder output |", "|---|---|---|---|",
             f"| two regions of one image (mean over pairs) | {_within(before):.3f} | {_within(after):.3f} "
             f"| {_within(encoded):.3f} |"]
    n, cos = partner_cosines(run, "relation", [before, after, encoded], boxes)
    if n:
        lines.append(f"| a moved box, image and relation-swapped partner ({n} pairs) | "
                     + " | ".join(f"{c:.3f}" for c in cos) + " |")
    return lines


def gisa_attention(run, images, texts, args) -> list[str]:
    """Per GISA layer, over its heads: where relation networks' weight masks a region pair
    (relu(w . E) at or under its floor: log 1e-6 = -13.8 on the logit), how spread the attention
    is with the geometry terms and with the appearance logits alone, and in relation-swapped
    pairs, how much of a moved box's attention goes to the other moved box."""
    model = run.model
    if not len(model.gisa):
        return ["GISA: no layers in this run"]
    att = [{"full": [], "appearance": []} for _ in model.gisa]
    counts = [dict.fromkeys(("pairs", "masked", "rows", "self", "alone"), 0) for _ in model.gisa]
    per_image = [{} for _ in model.gisa]      # image id -> (attention, share of heads masking) [R, R]
    boxes = {}

    def layer_stats(img, rounds, encoded):
        for k, (layer, (x, mask, geo, known), _) in enumerate(rounds):   # known: boxes known & box_geometry
            b, r, _ = x.shape
            q, key, _ = layer.heads_of(x)
            appearance, geo_term = layer.logits(q, key, geo, known)
            rows = mask.unsqueeze(1).expand(b, layer.heads, r).reshape(-1, r)
            full = masked_softmax(appearance + geo_term, mask[:, None, None, :])               # [B, H, R, R]
            att[k]["full"].append(attention_stats(full.reshape(-1, r, r), rows, {}))
            att[k]["appearance"].append(attention_stats(
                masked_softmax(appearance, mask[:, None, None, :]).reshape(-1, r, r), rows, {}))
            weighed = layer.geo_weight is not None and bool(known.any())
            masked = ((layer.geometry_weight(geo) <= layer.floor) & known[:, None, None, None] if weighed
                      else torch.zeros_like(full, dtype=torch.bool))
            for i, iid in enumerate(img.image_ids.tolist()):
                m = mask[i]
                per_image[k][iid] = (full[i].mean(0)[m][:, m], masked[i].float().mean(0)[m][:, m])
                boxes[iid] = img.boxes[i][m]
            if not weighed:
                continue
            rows = (rows.view(b, layer.heads, r) & known[:, None, None]).reshape(-1, r)
            masked = masked.reshape(-1, r, r)[rows]                                              # [rows, R]
            real = mask[:, None, None, :].expand(b, layer.heads, r, r).reshape(-1, r, r)[rows]
            eye = torch.eye(r, dtype=torch.bool).expand(b * layer.heads, r, r)[rows]
            others = real & ~eye
            c = counts[k]
            c["pairs"] += int(others.sum())
            c["masked"] += int((masked & others).sum())
            c["rows"] += len(real)
            c["self"] += int((masked & eye).any(-1).sum())
            c["alone"] += int(((masked | ~others).all(-1) & others.any(-1)).sum())

    _layer_ends(model, model.gisa, images, layer_stats)
    lines = ["GISA's attention per layer, over heads and real regions: relation networks' weight "
             f"relu(w.E) masks a pair where it is at most geometry_floor = {model.cfg.geometry_floor:g} "
             f"(logit {math.log(model.cfg.geometry_floor):.1f}); the attention's entropy "
             "and share on the region itself, with the geometry terms and with the appearance logits "
             "alone", "",
             "| layer | pairs of two regions masked | self masked | rows that see no other region "
             "| entropy | appearance alone | (uniform) | self | appearance alone |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, (a, c) in enumerate(zip(att, counts)):
        full, app = _merge(a["full"]), _merge(a["appearance"])
        weight = ([f"{c['masked'] / max(c['pairs'], 1):.3f}", f"{c['self'] / max(c['rows'], 1):.3f}",
                   f"{c['alone'] / max(c['rows'], 1):.3f}"] if c["rows"] else ["no weight"] * 3)
        lines.append(f"| {k + 1} | {' | '.join(weight)} | {full['entropy']:.3f} | {app['entropy']:.3f} | "
                     f"{full['uniform']:.3f} | {full['self']:.3f} | {app['self']:.3f} |")
    return lines + moved_pair_attention(run, per_image, boxes)


def moved_pair_attention(run, per_image: list[dict], boxes: dict) -> list[str]:
    """In each relation-swapped pair of the split, the two boxes that trade places: how much of
    one's attention (mean over heads) goes to the other and to itself, and the share of heads
    whose weight masks the two; ``per_image`` holds each layer's (attention, masked share)
    [R, R] per image id."""
    pairs = split_pairs(run, "relation", boxes)
    focus = [(iid, *moved(boxes, a, b).nonzero().flatten().tolist()) for a, b in pairs for iid in (a, b)]
    focus = [f for f in focus if len(f) == 3]
    if not focus:
        return []
    lines = ["", f"A moved box of a relation-swapped pair ({len(focus)} images, two moved boxes each), "
             "mean over heads", "",
             "| layer | attention on the other moved box | on itself | heads masking the two |",
             "|---|---|---|---|"]
    for k, images_k in enumerate(per_image):
        other, own, mask_share = [], [], []
        for iid, i, j in focus:
            a, m = images_k[iid]
            other += [a[i, j].item(), a[j, i].item()]
            own += [a[i, i].item(), a[j, j].item()]
            mask_share += [m[i, j].item(), m[j, i].item()]
        lines.append(f"| {k + 1} | {_mean(other):.3f} | {_mean(own):.3f} | {_mean(mask_share):.3f} |")
    return lines


def vreg_mixing(run, images, texts, args) -> list[str]:
    model = run.model
    if not model.cfg.vreg or not len(model.v_refine):
        return ["VReG: not in this run (vreg=false)"]
    acc, ratios = [[] for _ in model.v_refine], [[] for _ in model.v_refine]

    def round_stats(img, rounds, encoded):
        centres = (img.boxes[..., :2] + img.boxes[..., 2:]) / 2
        groups = {"overlapping": box_iou(img.boxes) > 0, "near": torch.cdist(centres, centres) <= 0.3}
        for k, (layer, (x, mask), out) in enumerate(rounds):
            logits = layer.query(x) @ layer.key(x).transpose(1, 2) / x.shape[-1] ** 0.5
            acc[k].append(attention_stats(masked_softmax(logits, mask[:, None, :]), mask, groups))
            ratios[k] += ((out - x).norm(dim=-1) / x.norm(dim=-1).clamp(min=1e-6))[mask].tolist()

    before, after = _layer_ends(model, model.v_refine, images, round_stats)
    lines = ["VReG's refinement rounds (ContextRefine): attention over the image's regions, mean over "
             "real regions; (uniform) = equal attention; update = |x_out - x_in| / |x_in|", "",
             "| round | regions | entropy | (uniform) | self | overlapping (uniform) | near (uniform) | update |",
             "|---|---|---|---|---|---|---|---|"]
    for k, parts in enumerate(acc):
        st = _merge(parts)
        share = lambda g: f"{st[g][0]:.3f} ({st[g][1]:.3f})"  # noqa: E731
        lines.append(f"| {k + 1} | {st['rows']} | {st['entropy']:.3f} | {st['uniform']:.3f} | {st['self']:.3f} | "
                     f"{share('overlapping')} | {share('near')} | {_mean(ratios[k]):.3f} |")
    lines += ["", "| cosine | before VReG | after VReG |", "|---|---|---|",
              f"| two regions of one image (mean over pairs) | {_within(before):.3f} | {_within(after):.3f} |"]
    n, (cos_before, cos_after) = partner_cosines(run, "attribute", [before, after])
    if n:
        lines.append(f"| one box in an image and in its attribute-swapped partner ({n} pairs) | "
                     f"{cos_before:.3f} | {cos_after:.3f} |")
    return lines


DIAGNOSTICS = {"dsrln": [dif_gate, gisa_mixing, gisa_attention], "cimn": [frr_attention, gravitation, pair_embeddings],
               "resg": [vreg_mixing]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("run", help="a trained run folder (config.json, best.pt)")
    ap.add_argument("--root", default=None, help="data root (default: the run's)")
    ap.add_argument("--split", default="val", help="split to read")
    ap.add_argument("--max-images", type=int, default=500, help="first N images of the split")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="pairs per Gravitation Loss batch (default: the run's batch size)")
    ap.add_argument("--checkpoint", default="best", choices=("best", "last"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        run = load_run(args.run, args.root, which=args.checkpoint, split=args.split, max_images=args.max_images)
    except (CheckpointError, ShardError) as e:
        raise SystemExit(f"mechanisms: {e}")
    if run.config.model not in DIAGNOSTICS:
        raise SystemExit(f"mechanisms: {args.run}: no diagnostics for model '{run.config.model}'; "
                         f"models with some: {', '.join(sorted(DIAGNOSTICS))}")
    image_loader, text_loader = eval_loaders(run.data, 32)
    images = [b.to("cpu") for b in image_loader]     # .to makes the loader's float16 features float32
    texts = list(text_loader)
    print(f"{run.config.model} run {args.run} ({args.checkpoint}.pt) on {run.config.dataset}/{args.split}, "
          f"{sum(len(b) for b in images)} images, {sum(len(t) for t in texts)} captions\n")
    for diagnostic in DIAGNOSTICS[run.config.model]:
        print("\n".join(diagnostic(run, images, texts, args)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
