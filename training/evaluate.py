"""Evaluate a run as the image-text matching literature does.

    itmkit evaluate runs/NAME [--split test] [--protocol f30k-1k|coco-5k|coco-1k|eccv|cxc|whole]
           [--checkpoint best|last] [--save-sims] [--hard-negatives] [--max-images N]
           [--export-index DIR]
    itmkit evaluate --ensemble runs/A runs/B [--split test]   # averages saved sims
    itmkit evaluate runs/KIDRR --shortlist runs/VSEPP [--topk 100] [--fuse 0.5]
    torchrun --nproc_per_node N training/evaluate.py runs/NAME ...   # scoring split over N processes

``python training/evaluate.py ...`` is the same as ``itmkit evaluate ...``.

Results are printed and merged into <run>/eval.json under "<split>/<protocol>" (an ensemble's
into eval-ensemble.json of RUN, else of its first member, with the member runs); each entry
records the checkpoint it scored ("checkpoint": file, sha256, epoch), as sims-<split>.npz does, so
a report never shows the recalls of other weights. A run that is being trained is scored as it
stands, saying so: its last finished checkpoint (each is renamed into place whole) and its
epoch. A part that cannot run (a protocol the split does not fit, hard negatives on a dataset
without pairs, an index of a cross-attention model) is skipped with one line saying why; the rest
is computed and saved.
The data root defaults to the one the run was trained on.

--shortlist RUN2 (a two-tower run of the same dataset) ranks every candidate of every query, RUN
re-scores only each query's --topk best (training/shortlist.py); the results go under
"<split>/<protocol> shortlist=RUN2@K" with the pairs scored and the time. A query whose ground truth
is not in its shortlist counts as RUN2 ranked it: RUN2's recall@K bounds the result.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline import shards
from pipeline.config import UsageError, add_quiet_argument, add_threads_arguments, positive_int, run_command
from pipeline.manifest import dataset_defaults
from pipeline.shards import Layout, ShardError
from training import models
from training.checkpoint import CheckpointError
from training.config import RunConfig
from training.data import eval_loaders, hard_negative_pairs
from training.evaluation import (PROTOCOLS, compute_sims, hard_negative_accuracy, protocol_result,
                                 small_split_warning)
from training.run import add_run_arguments, data_root, load_run, training_now
from training.shortlist import rerank_split, split_shortlist

ERRORS = (ShardError, CheckpointError, ValueError)   # what itmkit reports as one line (exit 1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", help="run folder written by itmkit train")
    p.add_argument("--split", default="test", help="split to score")
    p.add_argument("--protocol", choices=PROTOCOLS, action="append",
                   help="repeatable; default: the protocols the dataset recorded at ingest (its manifest's "
                   "`protocols`, else its family's: coco-1k and coco-5k, f30k-1k; else whole, the whole "
                   "split); eccv and cxc (COCO 5K test with COCO's ids, docs/training.md) on request")
    add_run_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per block, captions: 5x")
    add_threads_arguments(p)
    p.add_argument("--save-sims", action="store_true", help="write <run>/sims-<split>.npz")
    p.add_argument("--ensemble", nargs="+", metavar="RUN",
                   help="average the saved sims (--save-sims) of these runs; the results go to "
                        "eval-ensemble.json in the positional run folder, else in the first of these")
    p.add_argument("--hard-negatives", action="store_true",
                   help="pairwise accuracy on the dataset's hard_negatives.parquet pairs")
    p.add_argument("--max-images", type=int, default=None,
                   help="score only the first N images of the split and their captions (quick checks; "
                        "default: all)")
    p.add_argument("--fold-size", type=positive_int, default=1000, help="images per coco-1k fold")
    p.add_argument("--export-index", metavar="DIR", help="two-tower models: also write the image and "
                   "caption embeddings (float16 + ids) to DIR for a vector index (training/export.py)")
    s = p.add_argument_group("shortlist and re-rank (training/shortlist.py)")
    s.add_argument("--shortlist", metavar="RUN2", default=None,
                   help="a two-tower run of the same dataset ranks every candidate; RUN re-scores only "
                        "each query's --topk best (default: none, every pair scored)")
    s.add_argument("--topk", type=positive_int, default=100, metavar="K",
                   help="candidates per query that RUN re-scores, with --shortlist")
    s.add_argument("--fuse", type=float, default=None, metavar="ALPHA",
                   help="with --shortlist: rank the candidates by ALPHA * RUN + (1 - ALPHA) * RUN2, both "
                        "standardised per query (default: none, RUN's scores alone)")
    add_quiet_argument(p)


def sims_path(run_dir, split: str) -> Path:
    return Path(run_dir) / f"sims-{split}.npz"


def save_sims(path: Path, sims, image_ids, caption_ids, meta: dict) -> None:
    with shards.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, sims=sims.astype(np.float32), image_ids=image_ids, caption_ids=caption_ids,
                 dataset=meta["dataset"], shard_hashes=str(sorted(meta["shard_hashes"].items())),
                 checkpoint_sha256=meta.get("checkpoint_sha256", ""))


def load_sims(path: Path) -> dict:
    """The arrays of a sims-<split>.npz; plain arrays only (``allow_pickle=False``: an object
    array, whose loading could run code, is refused)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no saved similarities; run `itmkit evaluate RUN --save-sims` first")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:    # object arrays
        raise CheckpointError(f"{path}: refused: {e} (itmkit writes plain arrays only)") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read saved similarities (truncated or corrupt?): {e}") from None


def ensemble_sims(members: list[str], split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """The mean of the members' saved ``split`` similarities, their image and caption ids, dataset."""
    saved = [load_sims(sims_path(r, split)) for r in members]
    for r, s in zip(members[1:], saved[1:]):
        if not (np.array_equal(s["image_ids"], saved[0]["image_ids"])
                and np.array_equal(s["caption_ids"], saved[0]["caption_ids"])):
            raise CheckpointError(f"{r}: saved sims cover other images/captions than {members[0]}")
    first = saved[0]
    return (np.mean([s["sims"] for s in saved], axis=0), first["image_ids"], first["caption_ids"],
            str(first["dataset"]))


def check_args(args, world: int) -> None:
    if not args.run and not args.ensemble:
        raise UsageError("give a run folder (or --ensemble RUN1 RUN2 ...)")
    if args.fuse is not None and not args.shortlist:
        raise UsageError("--fuse needs --shortlist RUN2")
    if args.shortlist and args.ensemble:
        raise UsageError("--shortlist re-scores with a run's model; an ensemble averages saved similarities")
    if args.fuse is not None and not 0.0 <= args.fuse <= 1.0:
        raise UsageError(f"--fuse must be in [0, 1], got {args.fuse}")
    if args.ensemble and world > 1:
        raise UsageError("--ensemble averages saved similarities: there is nothing to split over processes")


def distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) under torchrun, else (0, 1, device). The processes exchange only
    CPU arrays (scores), so gloo serves CPUs and GPUs alike; each process takes GPU LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    dist.init_process_group("gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), world, device


def shortlisted(run, args, images, texts, device: str, rank: int, world: int):
    """RUN re-scoring RUN2's shortlist on the split: (Reranked, the eval.json entry's "shortlist"
    part) on process 0, (None, None) on the others. The seconds are of scoring: RUN2 on every pair,
    then RUN encoding the split and scoring the shortlisted pairs (loading the runs is not counted)."""
    shortlist, shortlist_s = split_shortlist(args.shortlist, run.data, args.topk, device, args.batch_size,
                                             args.workers, not args.quiet) if rank == 0 else (None, 0.0)
    done = rerank_split(run.model, images, texts, shortlist, device, args.fuse, rank, world, not args.quiet)
    if done is None:
        return None, None
    n, m = shortlist.sims.shape
    info = {"run": str(args.shortlist), "k": args.topk, "fuse": args.fuse, "pairs": done.pairs,
            "all_pairs": n * m, "seconds": shortlist_s + done.seconds, "shortlist_seconds": shortlist_s,
            "rerank_seconds": done.seconds, "recall_at_k": shortlist.recall(run.data.cfg.captions_per_image)}
    rec = info["recall_at_k"]
    print(f"shortlist: {args.shortlist} top {args.topk} of each query, re-scored by {run.config.model}"
          f"{f' fused at {args.fuse:g}' if args.fuse is not None else ''}: {done.pairs:,} of {n * m:,} pairs "
          f"({100.0 * done.pairs / (n * m):.1f} %) in {info['seconds']:.1f} s"
          + (f"; the shortlist holds a ground truth for {rec['i2t']:.1f} % of images, {rec['t2i']:.1f} % "
             f"of captions (the bound on R@K for K >= {args.topk})" if rec else ""))
    return done, info


def main(argv=None) -> int:
    """``itmkit evaluate`` from Python; errors are raised."""
    return run_command(add_arguments, command, argv)


def command(args) -> int:
    rank, world, device = distributed(args.device)
    check_args(args, world)
    outcome = Outcome()
    scored = score_ensemble(args, outcome) if args.ensemble else score_run(args, rank, world, device, outcome)
    if scored is None:   # the other processes only scored their share
        dist.destroy_process_group()
        return 0
    if warning := small_split_warning(args.split, scored.sims.shape[0]):
        print(f"evaluate: warning: {warning}", file=sys.stderr)
    results = protocol_results(scored, args, outcome)
    if args.hard_negatives:
        results.update(hard_negative_results(scored, args, outcome))
    with shards.claim(scored.out):   # two evaluations of one run merge, neither loses the other's entries
        old = shards.read_json(scored.out) if scored.out.exists() else {}
        shards.write_json(scored.out, {**old, **results})
    outcome.written.append(str(scored.out))
    print(f"evaluate: {scored.what} on {scored.dataset}/{args.split}: {', '.join(results)}"
          f"{'; skipped ' + ', '.join(outcome.skipped) if outcome.skipped else ''}; wrote {', '.join(outcome.written)}")
    if world > 1:
        dist.destroy_process_group()
    return 0


@dataclass
class Outcome:
    """What the command wrote and what it skipped (each skip said in one line as it happens)."""

    written: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def skip(self, part: str, why: str) -> None:
        self.skipped.append(part)
        print(f"evaluate: skipped {part}: {why}", file=sys.stderr)


@dataclass
class Scored:
    """The similarities of a split and what the results are saved with."""

    sims: np.ndarray                 # [images, captions]; image -> text ranks under a shortlist
    t2i_sims: np.ndarray | None      # text -> image ranks under a shortlist, else None
    image_ids: np.ndarray
    caption_ids: np.ndarray
    dataset: str
    root: Path | None                # the data root (for the hard-negative pairs)
    out: Path                        # eval.json (eval-ensemble.json)
    what: str                        # the run (or the ensemble) for the summary
    tag: dict                        # saved with every result: the checkpoint, the shortlist or the members
    suffix: str = ""                 # of the result keys: " shortlist=RUN2@K[ fuse=A]"


def score_ensemble(args, outcome: Outcome) -> Scored:
    """The mean of the members' saved similarities; their results go to eval-ensemble.json."""
    members = args.ensemble
    sims, image_ids, caption_ids, dataset = ensemble_sims(members, args.split)
    needs_data = args.hard_negatives or not args.protocol   # the pairs, the dataset's protocols
    root = data_root(RunConfig.load(members[0]), args.root) if needs_data else None
    for flag in ("--save-sims", "--export-index"):
        if getattr(args, flag[2:].replace("-", "_")):
            outcome.skip(flag, "an ensemble averages saved similarities; it has no model of its own")
    return Scored(sims, None, image_ids, caption_ids, dataset, root, Path(args.run or members[0]) / "eval-ensemble.json",
                  f"ensemble of {len(members)} runs", {"runs": [str(m) for m in members]})


def score_run(args, rank: int, world: int, device: str, outcome: Outcome) -> Scored | None:
    """The run's checkpoint scored on the split, every pair or only a shortlist's; the
    similarities saved and the embeddings exported when asked. None on processes other than the
    first (under torchrun), which only score their share."""
    trainer = training_now(args.run) if rank == 0 else None
    if trainer and not (Path(args.run) / f"{args.checkpoint}.pt").exists():
        raise CheckpointError(f"{args.run}: being trained ({trainer}) and has no finished "
                              f"{args.checkpoint}.pt yet; evaluate it after its first epoch")
    run = load_run(args.run, args.root, which=args.checkpoint, device=device, split=args.split,
                   max_images=args.max_images)
    if trainer:
        print(f"evaluate: {args.run} is being trained ({trainer}): scoring its {args.checkpoint}.pt "
              f"of epoch {run.scored['epoch']} of {run.config.model_cfg().epochs}, the last finished one",
              file=sys.stderr)
    data = run.data
    two_tower = models.get(run.config.model).two_tower
    if rank == 0 and args.export_index and not two_tower:   # said before the scoring, which may take long
        outcome.skip("--export-index", f"model '{run.config.model}' is a cross-attention model: its scores "
                    "need the image and the caption together, so it has no per-item embeddings to index")
    images, texts = eval_loaders(data, args.batch_size, args.workers)
    t2i_sims, suffix = None, ""
    if args.shortlist:
        done, info = shortlisted(run, args, images, texts, device, rank, world)
        sims, t2i_sims, tag = (done.i2t, done.t2i, {"shortlist": info}) if done else (None, None, {})
        tag["checkpoint"] = run.scored
        suffix = f" shortlist={args.shortlist}@{args.topk}" + (
            f" fuse={args.fuse:g}" if args.fuse is not None else "")
    else:
        sims, tag = compute_sims(run.model, images, texts, device, progress=not args.quiet,
                                 rank=rank, world=world), {"checkpoint": run.scored}
    if rank != 0:
        return None
    if args.save_sims and args.shortlist:
        outcome.skip("--save-sims", "a shortlisted evaluation ranks each direction on its own; there is no "
                    "one similarity matrix to save")
    elif args.save_sims:
        save_sims(sims_path(run.dir, args.split), sims, data.image_ids, data.text.caption_ids,
                  {"dataset": run.config.dataset, "shard_hashes": data.hashes,
                   "checkpoint_sha256": run.scored["sha256"]})
        outcome.written.append(str(sims_path(run.dir, args.split)))
    if args.export_index and two_tower:
        from training.export import export_run
        files, summary = export_run(run, args.export_index, batch_size=args.batch_size, workers=args.workers)
        print(summary)
        outcome.written += [str(f) for f in files]
    return Scored(sims, t2i_sims, data.image_ids, data.text.caption_ids, run.config.dataset, run.root,
                  run.dir / "eval.json", f"{args.run} ({args.checkpoint}.pt)", tag, suffix)


def protocol_results(scored: Scored, args, outcome: Outcome) -> dict:
    """The eval.json entries of the protocols asked for (default: the dataset's), each printed. A
    protocol the split does not fit is skipped, saying why; when none fits, the first reason is
    the error."""
    protocols = args.protocol or dataset_defaults(scored.root, scored.dataset).protocols
    results, failed = {}, []
    for protocol in protocols:
        try:
            result, line = protocol_result(scored.sims, protocol, args.fold_size, image_ids=scored.image_ids,
                                           caption_ids=scored.caption_ids, t2i_sims=scored.t2i_sims)
        except ValueError as e:   # e.g. coco-1k on fewer images than a fold, eccv off COCO 5K
            failed.append((protocol, e))
            continue
        results[f"{args.split}/{protocol}{scored.suffix}"] = {**result, **scored.tag}
        print(f"{protocol} ({args.split}, {scored.sims.shape[0]} images{scored.suffix}): {line}")
    if not results:   # nothing to keep: the first reason is the error
        raise failed[0][1]
    for protocol, e in failed:
        outcome.skip(protocol, str(e))
    return results


def hard_negative_results(scored: Scored, args, outcome: Outcome) -> dict:
    """Pairwise accuracy on the dataset's hard-negative pairs (skipped when it has none)."""
    layout = Layout(scored.root, scored.dataset)
    if not layout.hard_negatives.exists():
        outcome.skip("--hard-negatives", f"the dataset has no hard-negative pairs ({layout.hard_negatives} "
                    "does not exist)")
        return {}
    pairs = hard_negative_pairs(layout)
    hn = hard_negative_accuracy(scored.sims, scored.image_ids, pairs, t2i_sims=scored.t2i_sims)
    for kind, r in hn.items():
        if isinstance(r, dict):
            print(f"hard negatives [{kind}] {r['pairs']} pairs: image->text {r['i2t_acc']:.1f}% "
                  f"text->image {r['t2i_acc']:.1f}%")
    return {f"{args.split}/hard_negatives{scored.suffix}": {**hn, **scored.tag}}


if __name__ == "__main__":   # python training/evaluate.py ...: the same as itmkit evaluate ...
    try:
        sys.exit(main())
    except ERRORS as e:   # one line, exit 1, as itmkit reports them
        sys.exit(f"evaluate: error: {e}")
