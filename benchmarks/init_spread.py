"""How far apart a model's scores start: the measurement behind kidrr's plateau on small builds
(docs/models.md, "kidrr"; docs/BENCHMARKS.md, "kidrr: the plateau on a small build").

    python benchmarks/init_spread.py --root data [--dataset demo] [--models vsepp,kidrr]
        [--batches 2] [--seed 0] [--set embed_dim=256 --set sim_dim=64 ...]

Each model is built as a new run would build it (its defaults, the dataset's, then ``--set``;
a key goes to the models whose config has it) with ``--seed``, in training mode, and scores the first
``--batches`` training batches of ``batch_size`` pairs (the data order of a run of that seed).
Per batch: the std of the batch's scores and their mean spread over images per caption (the
direction vsepp's and kidrr's collapses flattened), positives minus negatives, the hardest-
negative and summed-negative triplet losses (the first is 2 x margin x batch when every score is
equal), and the model's gradient norm under each loss before clipping. Scores that start within
a few per cent of the margin of each other, with a small gradient, are what sat at the collapsed
loss. No training step is taken.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from pipeline.config import add_root_argument, add_set_argument, resolve_root
from pipeline.shards import Layout, Vocabulary
from training import losses, models
from training.config import dataset_key, parse_shared_overrides
from training.data import DataConfig, PairDataset, ShardData, collate_pairs, make_loader


def grad_norm(model: torch.nn.Module, loss: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_root_argument(ap)
    ap.add_argument("--dataset", default="demo", help="dataset name (default demo)")
    ap.add_argument("--models", default=",".join(models.names()), help="comma-separated registered models")
    ap.add_argument("--batches", type=int, default=2, help="training batches scored per model (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initialisation and data order (default 0)")
    add_set_argument(ap, "a config field, for every model that has it")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = resolve_root(args.root)
    vocab = Vocabulary.load(Layout(root, args.dataset).vocab)
    for name in args.models.split(","):
        cls = models.get(name)
        cfg = models.default_config(name, dataset_key(args.dataset),
                                    **parse_shared_overrides(args.set, cls.config_class))
        torch.manual_seed(args.seed)
        model = models.build(name, cfg, vocab).train()
        data = ShardData(root, args.dataset, vocab, DataConfig(split="train", grid=cls.needs_grid))
        loader = make_loader(PairDataset(data), partial(collate_pairs, half=False), cfg.batch_size,
                             shuffle=True, seed=args.seed, drop_last=True)
        for i, batch in zip(range(args.batches), loader):
            pos = batch.positives()

            def sims():
                return model.similarity(model.encode_image(batch.image), model.encode_text(batch.text))

            s = sims()
            hardest = losses.triplet_loss(s, cfg.margin, True, pos)
            summed = losses.triplet_loss(s, cfg.margin, False, pos)
            g_hard = grad_norm(model, hardest)
            g_sum = grad_norm(model, losses.triplet_loss(sims(), cfg.margin, False, pos))
            s = s.detach()
            print(f"{name} batch {i}: scores std {s.std():.4f} (over images per caption {s.std(0).mean():.4f}), "
                  f"positives - negatives {s[pos].mean() - s[~pos].mean():+.4f}; triplet loss hardest "
                  f"{hardest:.2f} (equal scores: {2 * cfg.margin * len(s):g}), summed {summed:.1f}; "
                  f"gradient norm hardest {g_hard:.1f}, summed {g_sum:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
