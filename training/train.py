"""Train an image-text matching model on a dataset's cached shards.

    itmkit train --model vsepp --dataset demo --root data --out runs/demo-vsepp
    itmkit train ... --resume                                   # continue from <out>/last.pt
    torchrun --nproc_per_node 2 training/train.py ...           # DDP (nccl on CUDA, gloo on CPU)

``python training/train.py ...`` is the same as ``itmkit train ...``.

Config, data, model, optimiser, loop, validation, checkpoint, in that order. The run folder gets
config.json, best.pt (the weights of the best validation rSum: what inference needs), last.pt (the
full training state of the last epoch: what --resume needs), metrics.csv and TensorBoard logs in tb/.
A run folder has one writer: ``train`` holds a claim on it (``shards.claim``) while it runs, and a
second ``train`` with the same --out is refused naming the holder.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import math
import os
import sys
import threading
import time
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline import shards
from pipeline.config import (UsageError, add_dataset_argument, add_quiet_argument, add_root_argument,
                             add_set_argument, add_threads_arguments, positive_int, resolve_root,
                             run_command)
from pipeline.manifest import dataset_defaults
from pipeline.shards import Layout, ShardError
from pipeline.shards.atomic import is_no_space
from training import checkpoint, losses, models
from training.checkpoint import CheckpointError
from training.config import RunConfig, parse_run_settings
from training.data import PairDataset, collate_pairs, eval_loaders, make_loader, shard_hashes
from training.evaluation import chance_metrics, compute_sims, recall_metrics, small_split_warning
from training.run import create_model, data_root, load_checkpoint, load_vocab, open_split, writer_claim
from training.shortlist import rerank_split, split_shortlist

ERRORS = (ShardError, CheckpointError, ValueError)   # what itmkit reports as one line (exit 1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, choices=models.names(), help="a registered model")
    add_dataset_argument(p)
    add_root_argument(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    add_set_argument(p, "any field of the model's config (lr, epochs, batch_size, margin, ...) or a run "
                     "setting: val_shortlist=RUN2 validates re-scoring only the val_topk=20 best candidates "
                     "of that two-tower run (default: every pair scored)")
    p.add_argument("--epochs", type=positive_int, default=None, help="shortcut for --set epochs=N (default: the model's)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="shortcut for --set batch_size=N (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    p.add_argument("--val-split", default="", help="validation split (default: val, else dev)")
    p.add_argument("--max-images", type=int, default=None, help="train on the first N images only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    add_threads_arguments(p)
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after N epochs of this invocation (resume later with --resume)")
    add_quiet_argument(p)


def lr_at(cfg: models.ModelConfig, epoch: int) -> float:
    return cfg.lr * cfg.lr_decay ** sum(epoch >= e for e in cfg.lr_decay_epochs)


def pick_val_split(layout: Layout, wanted: str) -> str:
    if wanted:
        return wanted
    splits = layout.index.splits("regions")
    for split in ("val", "dev"):
        if split in splits:
            return split
    raise ShardError(f"{layout.index.path}: no val or dev region shards; pass --val-split")


def command_settings(args) -> tuple[dict, dict]:
    """The run settings (val_shortlist, val_topk) and the model config fields the command line
    sets: --set, --epochs, --batch-size."""
    settings, overrides = parse_run_settings(args.set, models.get(args.model).config_class)
    if settings.get("val_topk", 1) < 1:
        raise UsageError(f"--set val_topk={settings['val_topk']}: must be at least 1")
    if settings.get("val_shortlist"):   # the run may be resumed from another directory
        settings["val_shortlist"] = str(Path(settings["val_shortlist"]).absolute())
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    return settings, overrides


def make_run(args, out: Path) -> RunConfig:
    """A new run's config, or the saved one when resuming (checked against the arguments)."""
    if args.resume:
        run = RunConfig.load(out)
        if run.model != args.model:
            raise CheckpointError(f"{out}: run dir of model '{run.model}', not '{args.model}'")
        if run.dataset != args.dataset:
            raise CheckpointError(f"{out}: run dir of dataset '{run.dataset}', not '{args.dataset}'")
        settings, overrides = command_settings(args)
        saved = {**dataclasses.asdict(run.model_cfg()), **{k: getattr(run, k) for k in settings}}
        changed = {k: (saved[k], v) for k, v in {**overrides, **settings}.items() if saved[k] != v}
        if changed:   # a resumed run keeps its recipe; silently ignoring the new one would mislead
            raise UsageError(f"{out}: --resume continues the run with its own config; it differs in "
                             + ", ".join(f"{k} ({a!r} saved, {b!r} given)" for k, (a, b) in changed.items())
                             + "; start a new run (another --out) to change them")
        return run
    if (out / "config.json").exists():
        raise CheckpointError(f"{out}: already holds a run; pass --resume to continue it or "
                              "choose another --out")
    settings, overrides = command_settings(args)
    root = resolve_root(args.root)
    family = dataset_defaults(root, args.dataset).family   # a missing dataset is said here
    cfg = models.default_config(args.model, family, **overrides)
    return RunConfig(model=args.model, dataset=args.dataset, root=str(root.absolute()),
                     seed=args.seed, workers=args.workers, val_split=args.val_split,
                     max_images=args.max_images, model_config=dataclasses.asdict(cfg), **settings)


def main(argv=None) -> int:
    """``itmkit train`` from Python; errors are raised."""
    return run_command(add_arguments, command, argv)


def command(args) -> int:
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = torch.device(args.device)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    master = rank == 0
    if args.threads:   # threads that wait for a busy core at every op cost more than they give
        torch.set_num_threads(args.threads)
    # the first process writes the run folder; it holds the folder's claim until it ends
    with writer_claim(args.out) if master else contextlib.nullcontext(), tensorboard_full_disk(args.out):
        train(args, device, rank, world, ddp)
    if ddp:
        dist.destroy_process_group()
    return 0


@contextlib.contextmanager
def tensorboard_full_disk(out):
    """A full disk met outside atomic_path (whose error names its file) as one line: TensorBoard's
    writer, mostly. It writes from a thread of its own, whose traceback Python would also print."""
    before = threading.excepthook
    threading.excepthook = lambda a: None if is_no_space(a.exc_value) else before(a)
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not is_no_space(e):
            raise
        for t in threading.enumerate():   # let the failed writer thread end before the hook goes
            if type(t).__name__ == "_AsyncWriterThread" and getattr(t, "exception", None) is not None:
                t.join(timeout=5)
        in_tb = any("tensorboard" in f.filename for f in traceback.extract_tb(e.__traceback__))
        what = (f"{Path(out) / 'tb'}: no space left on device while writing TensorBoard's log" if in_tb
                else f"{out}: no space left on device")
        raise ShardError(f"{what}; the checkpoints and metrics.csv are those of the last finished epoch") from None
    finally:
        threading.excepthook = before


def train(args, device: torch.device, rank: int, world: int, ddp: bool) -> None:
    master = rank == 0
    out = Path(args.out)

    # config
    run = make_run(args, out)
    if ddp:  # every rank has checked --out before rank 0 writes config.json into it
        dist.barrier()
    cfg = run.model_cfg()
    root = data_root(run, args.root)
    vocab = load_vocab(root, run)
    run.vocab_fingerprint = vocab.fingerprint
    torch.manual_seed(run.seed)

    # data
    cls = models.get(run.model)
    layout = Layout(root, run.dataset)
    run.val_split = pick_val_split(layout, run.val_split)
    # resolved once for both splits: a new run records what it finds, a resumed one insists on its own
    run.shard_hashes = shard_hashes(layout, [run.train_split, run.val_split], cls.needs_grid,
                                    run.shard_hashes or None)
    train_data = open_split(root, run, vocab, run.train_split, run.max_images)
    val_data = open_split(root, run, vocab, run.val_split)
    chance = chance_metrics(val_data.n_images)["rsum"]
    if master and (warning := small_split_warning(run.val_split, val_data.n_images)):
        print(f"train: warning: {warning}", file=sys.stderr)
    pin = device.type == "cuda"
    # loaders carry features as float16; Batch.to(device) makes them float32
    train_loader = make_loader(PairDataset(train_data), partial(collate_pairs, half=True),
                               cfg.batch_size // world, shuffle=True, seed=run.seed,
                               workers=run.workers, rank=rank, world_size=world, drop_last=True,
                               pin_memory=pin)
    if len(train_loader) == 0:
        raise ValueError(f"{len(train_loader.dataset)} training pairs make no full batch of "
                         f"{cfg.batch_size // world}; lower --batch-size")
    val_images, val_texts = eval_loaders(val_data, run.eval_batch_size, run.workers)
    shortlist = None   # the shortlisting run does not train: its candidates are made once
    if master and run.val_shortlist:
        with torch.random.fork_rng(devices=[]):   # building its model must not move this run's seed
            shortlist, _ = split_shortlist(run.val_shortlist, val_data, run.val_topk, device,
                                           run.eval_batch_size, run.workers, progress=False)
        rec = shortlist.recall(val_data.cfg.captions_per_image)
        print(f"train: validation re-scores the top {run.val_topk} of {run.val_shortlist}: "
              f"{len(shortlist.pairs):,} of {shortlist.sims.size:,} pairs; its shortlist holds a ground "
              f"truth for {rec['i2t']:.1f} % of images, {rec['t2i']:.1f} % of captions", file=sys.stderr)

    # model and optimiser
    # the word vectors (word_vectors=true) start a new run; a resumed one takes its checkpoint's
    model = create_model(run, vocab, vectors=None if args.resume else layout.vocab_vectors).to(device)
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    # foreach: torch picks it on CUDA but loops over the tensors in Python on the CPU; the same
    # arithmetic (bitwise: tests/test_training_train.py), fewer passes
    optimizer = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start_epoch, step, best_rsum = 0, 0, -math.inf
    if args.resume and not (out / "last.pt").exists():
        print(f"train: {out} has no checkpoint yet (stopped in its first epoch): starting it over",
              file=sys.stderr)
    elif args.resume:
        ckpt = load_checkpoint(model, out / "last.pt", run, vocab)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step, best_rsum = ckpt["epoch"] + 1, ckpt["step"], ckpt["best_rsum"]
        checkpoint.set_rng_state(ckpt["rng"])
        if master and "metrics_row" in ckpt and restore_metrics(out / "metrics.csv", ckpt["metrics_row"]):
            print(f"train: restored the metrics.csv row of epoch {ckpt['metrics_row']['epoch']} from last.pt "
                  "(the run stopped before writing it)", file=sys.stderr)
    elif master:
        out.mkdir(parents=True, exist_ok=True)
        run.save(out)
    train_model = torch.nn.parallel.DistributedDataParallel(
        model, find_unused_parameters=cls.ddp_find_unused_parameters) if ddp else model

    writer = None
    if master:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tb"), purge_step=step)
    meta = {"model": run.model, "vocab_fingerprint": vocab.fingerprint, "shard_hashes": run.shard_hashes,
            "dataset": run.dataset}
    run_config = dataclasses.asdict(run)

    # loop
    last_epoch = cfg.epochs if args.stop_after is None else min(cfg.epochs, start_epoch + args.stop_after)
    for epoch in range(start_epoch, last_epoch):
        t0 = time.time()
        train_loader.sampler.set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        train_model.train()
        total, count = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not master or args.quiet, leave=False)
        for batch in bar:
            batch = batch.to(device, non_blocking=pin)
            with torch.autocast(device.type, enabled=use_amp):
                result = train_model(batch, epoch)
            parts = result if isinstance(result, dict) else {"loss": result}
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(parts["loss"]).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            loss = parts["loss"].item()
            total, count = total + loss, count + 1
            bar.set_postfix(loss=f"{loss:.3f}")
            if writer is not None:
                for k, v in parts.items():
                    writer.add_scalar(f"train/{k}", float(v.detach() if torch.is_tensor(v) else v), step)
        train_seconds = time.time() - t0

        # validation on the first process; the others wait
        if master:
            per = val_data.cfg.captions_per_image
            if shortlist is None:
                sims = compute_sims(model, val_images, val_texts, device, progress=False)
                metrics = recall_metrics(sims, per)
            else:   # the collapse check reads each query's re-scored candidates
                done = rerank_split(model, val_images, val_texts, shortlist, device, progress=False)
                metrics = recall_metrics(done.i2t, per, done.t2i)
                sims = shortlist.candidate_scores(done.scores)
            row = {"epoch": epoch + 1, "step": step, "lr": lr_at(cfg, epoch),
                   "train_loss": total / max(count, 1), **metrics, "val_images": val_data.n_images,
                   "chance_rsum": chance, "train_seconds": train_seconds, "seconds": time.time() - t0}
            is_best = metrics["rsum"] > best_rsum
            best_rsum = max(best_rsum, metrics["rsum"])
            weights = {"model": model.state_dict(), "meta": meta, "config": run_config,
                       "epoch": epoch, "step": step, "best_rsum": best_rsum}
            if is_best:   # before last.pt: a stop in between repeats this epoch on resume
                checkpoint.save(out / "best.pt", weights)
            # last.pt carries the epoch's row: a stop before metrics.csv is written loses nothing,
            # --resume writes the row from it (restore_metrics)
            checkpoint.save(out / "last.pt", {**weights, "optimizer": optimizer.state_dict(),
                                              "scaler": scaler.state_dict(), "rng": checkpoint.rng_state(),
                                              "metrics_row": row})
            append_metrics(out / "metrics.csv", row)
            for k, v in row.items():
                writer.add_scalar(f"val/{k}" if k in metrics else f"epoch/{k}", v, step)
            writer.flush()
            collapsed = losses.collapse_note(row["train_loss"], sims, cfg.margin, cfg.batch_size // world)
            print(f"epoch {epoch + 1}: loss {row['train_loss']:.4f} rsum {metrics['rsum']:.1f} "
                  f"(chance {chance:.1f}; R@1 i2t {metrics['i2t_r1']:.1f} t2i {metrics['t2i_r1']:.1f})"
                  f"{' best' if is_best else ''}{collapsed}", file=sys.stderr)
        if ddp:
            dist.barrier()

    if master:
        writer.close()
        done = last_epoch - start_epoch
        print(f"train: {run.model} on {run.dataset}: {done} epoch(s) run "
              f"({start_epoch} done before), best val rSum {best_rsum:.1f}; wrote {out}/last.pt, "
              f"best.pt, metrics.csv, tb/" + ("" if done else " (nothing to do: run already complete)"))


def restore_metrics(path: Path, row: dict) -> bool:
    """Write ``row`` (last.pt's) into metrics.csv when the file lacks its epoch; True if it did."""
    if path.exists():
        with open(path, newline="") as f:
            if any(int(r["epoch"]) == row["epoch"] for r in csv.DictReader(f)):
                return False
    append_metrics(path, row)
    return True


def append_metrics(path: Path, row: dict) -> None:
    """Rewrite metrics.csv atomically with the rows of earlier epochs and this one (so a resumed
    run replaces the rows of epochs it repeats)."""
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < row["epoch"]]
    rows.append(row)
    with shards.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":   # python training/train.py ...: the same as itmkit train ...
    from itmkit.cli import main as itmkit

    sys.exit(itmkit(["train", *sys.argv[1:]]))
