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
from training.data import (PairDataset, PairedBatchSampler, ShardData, collate_pairs, eval_loaders,
                           image_pairs, make_loader, shard_hashes)
from training.evaluation import (METRIC_KEYS, chance_metrics, compute_sims, recall_metrics,
                                 small_split_warning)
from training.run import create_model, data_root, load_checkpoint, load_vocab, open_split, writer_claim
from training.shortlist import Shortlist, rerank_split, split_shortlist

ERRORS = (ShardError, CheckpointError, ValueError)   # what itmkit reports as one line (exit 1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, choices=models.names(), help="a registered model")
    add_dataset_argument(p)
    add_root_argument(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    add_set_argument(p, "any field of the model's config (lr, epochs, batch_size, margin, ...) or a run "
                     "setting: val_shortlist=RUN2 validates re-scoring only the val_topk=20 best candidates "
                     "of that two-tower run (default: every pair scored); pair_batches=KINDS puts both "
                     "images of each training hard-negative pair of those kinds (relation,attribute,... "
                     "or all) in one batch (default: random batches)")
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
    proc = start_process(args.device)   # torch's threads: pipeline.config.command_threads
    # the first process writes the run folder; it holds the folder's claim until it ends
    with writer_claim(args.out) if proc.master else contextlib.nullcontext(), tensorboard_full_disk(args.out):
        train(args, proc)
    if proc.ddp:
        dist.destroy_process_group()
    return 0


@dataclasses.dataclass
class Process:
    """This process of the run: its rank among ``world`` (torchrun's DDP; 0 of 1 without it) and
    its device. The first process validates and writes the run folder."""

    rank: int
    world: int
    device: torch.device

    @property
    def ddp(self) -> bool:
        return self.world > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.ddp:
            dist.barrier()


def start_process(device: str) -> Process:
    """Join torchrun's process group when there is one: nccl on CUDA (GPU ``LOCAL_RANK``), gloo
    on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Process(0, 1, torch.device(device))
    proc = Process(int(os.environ["RANK"]), world, torch.device(device))
    dist.init_process_group("nccl" if proc.device.type == "cuda" else "gloo")
    if proc.device.type == "cuda":
        proc.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(proc.device)
    return proc


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


def train(args, proc: Process) -> None:
    """Config, data, model and optimiser; then each epoch: train, validate, checkpoint."""
    out = Path(args.out)
    run, vocab, layout = configure(args, out, proc)
    data = open_data(run, vocab, layout, proc)
    if not args.resume:   # a resumed run keeps the warm-up its config.json records
        settle_warmup(run, len(data.train), proc)
    cfg = run.model_cfg()
    state = start_state(args, run, vocab, layout, proc)
    writer = tensorboard(out, state.step) if proc.master else None
    last_epoch = cfg.epochs if args.stop_after is None else min(cfg.epochs, state.start_epoch + args.stop_after)
    for epoch in range(state.start_epoch, last_epoch):
        t0 = time.time()
        loss = train_epoch(state, data.train, cfg, epoch, proc, writer, progress=proc.master and not args.quiet)
        train_seconds = time.time() - t0
        if proc.master:   # validation on the first process; the others wait
            metrics, sims = validate(state.model, data, proc.device)
            row = {"epoch": epoch + 1, "step": state.step, "lr": lr_at(cfg, epoch), "train_loss": loss,
                   **metrics, "val_images": data.val.n_images, "chance_rsum": data.chance,
                   "train_seconds": train_seconds, "seconds": time.time() - t0}
            is_best = metrics["rsum"] > state.best_rsum
            state.best_rsum = max(state.best_rsum, metrics["rsum"])
            save_epoch(out, run, state, epoch, row, is_best)
            log_epoch(writer, row, state.step, is_best,
                      losses.collapse_note(loss, sims, cfg.margin, cfg.batch_size // proc.world))
        proc.barrier()
    if proc.master:
        writer.close()
        done = last_epoch - state.start_epoch
        print(f"train: {run.model} on {run.dataset}: {done} epoch(s) run "
              f"({state.start_epoch} done before), best val rSum {state.best_rsum:.1f}; wrote {out}/last.pt, "
              f"best.pt, metrics.csv, tb/" + ("" if done else " (nothing to do: run already complete)"))


def warmup_epochs(model: str, cfg: models.ModelConfig, steps_per_epoch: int) -> int:
    """Epochs of summed-negative warm-up before the hardest negative: ``warmup_epochs``, or as
    many whole epochs as ``warmup_steps`` steps take when that is more. The hardest negative of
    a model that has taken few steps sits at the collapsed loss (2 x margin x batch) for epochs:
    on a 600-image demo (75 steps an epoch) vsepp did for three epochs after one of warm-up, and
    none after four (docs/models.md, "What the models share")."""
    if not models.get(model).hardest_negative(cfg) or cfg.warmup_steps <= 0:
        return cfg.warmup_epochs
    return max(cfg.warmup_epochs, math.ceil(cfg.warmup_steps / steps_per_epoch))


def settle_warmup(run: RunConfig, steps_per_epoch: int, proc: Process) -> None:
    """Record in a new run's config the warm-up its epochs of ``steps_per_epoch`` steps need."""
    cfg = run.model_cfg()
    epochs = warmup_epochs(run.model, cfg, steps_per_epoch)
    if epochs != cfg.warmup_epochs:
        run.model_config["warmup_epochs"] = epochs
        if proc.master:
            print(f"train: hardest negatives from epoch {epochs + 1}: warmup_steps={cfg.warmup_steps} take "
                  f"{epochs} epochs of {steps_per_epoch} steps (--set warmup_steps=0: after warmup_epochs="
                  f"{cfg.warmup_epochs})", file=sys.stderr)


def configure(args, out: Path, proc: Process):
    """The run's config (new, or the saved one when resuming), its vocabulary, its dataset's
    layout; the validation split and the shard config hashes resolved and recorded in it."""
    run = make_run(args, out)
    proc.barrier()   # every rank has checked --out before rank 0 writes config.json into it
    root = data_root(run, args.root)
    vocab = load_vocab(root, run)
    run.vocab_fingerprint = vocab.fingerprint
    torch.manual_seed(run.seed)
    layout = Layout(root, run.dataset)
    run.val_split = pick_val_split(layout, run.val_split)
    # resolved once for both splits: a new run records what it finds, a resumed one insists on its own
    run.shard_hashes = shard_hashes(layout, [run.train_split, run.val_split], models.get(run.model).needs_grid,
                                    run.shard_hashes or None)
    return run, vocab, layout


@dataclasses.dataclass
class TrainData:
    train: torch.utils.data.DataLoader     # pairs, this process's share
    val: ShardData                          # the validation split
    val_images: torch.utils.data.DataLoader
    val_texts: torch.utils.data.DataLoader
    chance: float                           # the rSum of random scores on the validation split
    shortlist: Shortlist | None             # validation re-scores only its candidates (val_shortlist)


def open_data(run: RunConfig, vocab, layout: Layout, proc: Process) -> TrainData:
    """The training pairs, this process's share in batches, and the validation split (on the
    first process, its shortlist when the run validates on one)."""
    cfg = run.model_cfg()
    train_data = open_split(layout.root, run, vocab, run.train_split, run.max_images)
    val_data = open_split(layout.root, run, vocab, run.val_split)
    chance = chance_metrics(val_data.n_images)["rsum"]
    if proc.master and (warning := small_split_warning(run.val_split, val_data.n_images)):
        print(f"train: warning: {warning}", file=sys.stderr)
    sampler = None
    if run.pair_batches:
        pairs = image_pairs(layout, train_data.image_ids, run.pair_batches)
        sampler = PairedBatchSampler(train_data.n_images, train_data.cfg.captions_per_image, pairs,
                                     cfg.batch_size // proc.world, seed=run.seed, rank=proc.rank,
                                     world=proc.world)
        if proc.master:
            print(f"train: {len(sampler.pairs)} hard-negative image pairs ({run.pair_batches}) of "
                  f"{run.train_split} share their batches (pair_batches)", file=sys.stderr)
    # loaders carry features as float16; Batch.to(device) makes them float32
    loader = make_loader(PairDataset(train_data), partial(collate_pairs, half=True),
                         cfg.batch_size // proc.world, shuffle=True, seed=run.seed,
                         workers=run.workers, rank=proc.rank, world_size=proc.world, drop_last=True,
                         pin_memory=proc.device.type == "cuda", sampler=sampler)
    if len(loader) == 0:
        raise ValueError(f"{len(loader.dataset)} training pairs make no full batch of "
                         f"{cfg.batch_size // proc.world}; lower --batch-size")
    val_images, val_texts = eval_loaders(val_data, run.eval_batch_size, run.workers)
    shortlist = None   # the shortlisting run does not train: its candidates are made once
    if proc.master and run.val_shortlist:
        with torch.random.fork_rng(devices=[]):   # building its model must not move this run's seed
            shortlist, _ = split_shortlist(run.val_shortlist, val_data, run.val_topk, proc.device,
                                           run.eval_batch_size, run.workers, progress=False)
        rec = shortlist.recall(val_data.cfg.captions_per_image)
        print(f"train: validation re-scores the top {run.val_topk} of {run.val_shortlist}: "
              f"{len(shortlist.pairs):,} of {shortlist.sims.size:,} pairs; its shortlist holds a ground "
              f"truth for {rec['i2t']:.1f} % of images, {rec['t2i']:.1f} % of captions", file=sys.stderr)
    return TrainData(loader, val_data, val_images, val_texts, chance, shortlist)


@dataclasses.dataclass
class TrainState:
    """What the epochs change, and what last.pt saves for --resume."""

    model: models.ITMModel
    train_model: torch.nn.Module           # the model, wrapped in DDP under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    start_epoch: int = 0                   # the first epoch this invocation runs (0-based)
    step: int = 0
    best_rsum: float = -math.inf


def start_state(args, run: RunConfig, vocab, layout: Layout, proc: Process) -> TrainState:
    """The model and its optimiser: new (the run folder gets config.json), or as last.pt left
    them when resuming (and metrics.csv gets the row of an epoch whose end it missed)."""
    out, cfg = Path(args.out), run.model_cfg()
    # the word vectors (word_vectors=true) start a new run; a resumed one takes its checkpoint's
    model = create_model(run, vocab, vectors=None if args.resume else layout.vocab_vectors).to(proc.device)
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    # foreach: torch picks it on CUDA but loops over the tensors in Python on the CPU; the same
    # arithmetic (bitwise: tests/test_training_train.py), fewer passes
    optimizer = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    scaler = torch.amp.GradScaler("cuda", enabled=proc.device.type == "cuda")
    state = TrainState(model, model, optimizer, scaler)
    if args.resume and not (out / "last.pt").exists():
        print(f"train: {out} has no checkpoint yet (stopped in its first epoch): starting it over",
              file=sys.stderr)
    elif args.resume:
        ckpt = load_checkpoint(model, out / "last.pt", run, vocab)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        state.start_epoch, state.step, state.best_rsum = ckpt["epoch"] + 1, ckpt["step"], ckpt["best_rsum"]
        checkpoint.set_rng_state(ckpt["rng"])
        if proc.master and "metrics_row" in ckpt and restore_metrics(out / "metrics.csv", ckpt["metrics_row"]):
            print(f"train: restored the metrics.csv row of epoch {ckpt['metrics_row']['epoch']} from last.pt "
                  "(the run stopped before writing it)", file=sys.stderr)
    elif proc.master:
        out.mkdir(parents=True, exist_ok=True)
        run.save(out)
    if proc.ddp:
        state.train_model = torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=models.get(run.model).ddp_find_unused_parameters)
    return state


def tensorboard(out: Path, step: int):
    from torch.utils.tensorboard import SummaryWriter   # imported by the first process only
    return SummaryWriter(str(out / "tb"), purge_step=step)


def train_epoch(state: TrainState, loader, cfg: models.ModelConfig, epoch: int, proc: Process, writer,
                progress: bool) -> float:
    """One pass over this process's share of the pairs at the epoch's learning rate; the mean
    loss of its batches."""
    loader.sampler.set_epoch(epoch)
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(cfg, epoch)
    state.train_model.train()
    use_amp = pin = proc.device.type == "cuda"
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
    for batch in bar:
        batch = batch.to(proc.device, non_blocking=pin)
        with torch.autocast(proc.device.type, enabled=use_amp):
            result = state.train_model(batch, epoch)
        parts = result if isinstance(result, dict) else {"loss": result}
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(parts["loss"]).backward()
        if cfg.grad_clip > 0:
            state.scaler.unscale_(state.optimizer)
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip, foreach=True)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.step += 1
        loss = parts["loss"].item()
        total, count = total + loss, count + 1
        bar.set_postfix(loss=f"{loss:.3f}")
        if writer is not None:
            for k, v in parts.items():
                writer.add_scalar(f"train/{k}", float(v.detach() if torch.is_tensor(v) else v), state.step)
    return total / max(count, 1)


def validate(model: models.ITMModel, data: TrainData, device: torch.device):
    """Recalls on the validation split (re-scoring only the shortlist's candidates when there is
    one), and the scores the collapse check reads."""
    per = data.val.cfg.captions_per_image
    if data.shortlist is None:
        sims = compute_sims(model, data.val_images, data.val_texts, device, progress=False)
        return recall_metrics(sims, per), sims
    # the collapse check reads each query's re-scored candidates
    done = rerank_split(model, data.val_images, data.val_texts, data.shortlist, device, progress=False)
    return recall_metrics(done.i2t, per, done.t2i), data.shortlist.candidate_scores(done.scores)


def save_epoch(out: Path, run: RunConfig, state: TrainState, epoch: int, row: dict, is_best: bool) -> None:
    """best.pt when the epoch is the best, then last.pt, then its metrics.csv row. A checkpoint's
    ``epoch`` counts from 0 (the epoch it ends); metrics.csv, the log and every report count from 1."""
    meta = {"model": run.model, "vocab_fingerprint": run.vocab_fingerprint, "shard_hashes": run.shard_hashes,
            "dataset": run.dataset}
    weights = {"model": state.model.state_dict(), "meta": meta, "config": dataclasses.asdict(run),
               "epoch": epoch, "step": state.step, "best_rsum": state.best_rsum}
    if is_best:   # before last.pt: a stop in between repeats this epoch on resume
        checkpoint.save(out / "best.pt", weights)
    # last.pt carries the epoch's row: a stop before metrics.csv is written loses nothing,
    # --resume writes the row from it (restore_metrics)
    checkpoint.save(out / "last.pt", {**weights, "optimizer": state.optimizer.state_dict(),
                                      "scaler": state.scaler.state_dict(), "rng": checkpoint.rng_state(),
                                      "metrics_row": row})
    append_metrics(out / "metrics.csv", row)


def log_epoch(writer, row: dict, step: int, is_best: bool, collapsed: str) -> None:
    """The epoch's row to TensorBoard and one line to the log."""
    for k, v in row.items():
        writer.add_scalar(f"val/{k}" if k in METRIC_KEYS else f"epoch/{k}", v, step)
    writer.flush()
    print(f"epoch {row['epoch']}: loss {row['train_loss']:.4f} rsum {row['rsum']:.1f} "
          f"(chance {row['chance_rsum']:.1f}; R@1 i2t {row['i2t_r1']:.1f} t2i {row['t2i_r1']:.1f})"
          f"{' best' if is_best else ''}{collapsed}", file=sys.stderr)


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
    try:
        sys.exit(main())
    except ERRORS as e:   # one line, exit 1, as itmkit reports them
        sys.exit(f"train: error: {e}")
