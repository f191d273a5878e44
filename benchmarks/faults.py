"""The fault audit: every failure itmkit guards against, run end to end on a fresh small demo.

    python benchmarks/faults.py [--dir PATH] [--images 60] [--keep] [--only NAME ...]

Builds a demo of 60 images at 96 px in a fresh folder and extracts it in shards of 8 images (a
ResNet-50 C4 extractor with random weights and the demo's given boxes, to keep it to minutes on
a CPU), then injects each fault and prints one line per fault, PASS or FAIL, with what was seen.
Exit status 0 when every fault passes. The faults:

1. a crafted checkpoint whose pickle runs a command is loaded by evaluate, train --resume and
   export: the command must not run
2. three `features extract` and three `pipeline parse` on one dataset at the same time: all
   succeed and `pipeline verify` finds every registered file intact
3. one flipped byte inside a region shard: the trainer refuses it naming the file, and a rerun of
   the extractor rewrites it
4. a folder-ingest CSV naming `../` and absolute paths, and one file under two names: those
   rows are refused and reported, no file is ingested twice
5. a decompression bomb (a PNG that claims 20000 x 20000 pixels) in a folder ingest: it is
   skipped and reported, and the ingest completes
6. a full disk (a 4 MB tmpfs when this machine lets a user namespace mount one, else an
   injected ENOSPC): extract and parse end with one line naming the file and "no space left",
   exit 1, no crash, and what is registered is intact
7. smaller ones: two identical extractions give byte-identical shards; an unknown workflow
   config key is one line; refused extractor weights stop extract before it announces that
   shards of another config will be replaced
8. run folders (a small vsepp on the demo): two `train` with one --out started together: one
   runs, the other is refused in one line naming the holder (host, pid), and metrics.csv and
   config.json are the runner's alone; `evaluate` of a run in training says which epoch it scores
9. a full disk (a tmpfs, else injected into the checkpoint's file object) while train saves a
   checkpoint, then for evaluate and report: one line each naming the file and "no space left",
   exit 1, the run's files before intact
10. a process killed (os._exit) between the save of last.pt and the write of metrics.csv at the
   last epoch: `train --resume` restores the row, metrics.csv has every epoch
11. eval.json and sims-SPLIT.npz of epoch 1's weights, the run trained on: the report leaves
   them out, says so, and shows the recalls of the weights it loaded
12. a truncated FAISS cache under RUN/index-SPLIT: retrieve rebuilds it, saying so; `itmkit
   upgrade` of an empty folder, a dataset folder, a text file: one line each, exit 1
13. a handed-over dataset whose shards.json has entries outside the folder (`../` paths, an
   absolute path, a shard that is a symbolic link out) or an entry that lacks a field: verify,
   prune, parse and inspect refuse it in one line naming the entry, exit 1, and the files
   outside are neither removed nor locked
14. a handed-over region shard whose `features` lie in another file (external raw storage, an
   external link to a text file, a virtual dataset), with shards.json updated to its hash:
   verify, inspect and train refuse it in one line naming the shard, and no traceback
15. inputs: the workflow's ingest job under a data root named with a space and `$(touch …)`,
   and a dry run given a parser name and a model setting holding shell code: the values stay
   whole and nothing injected runs; `vocab --dataset ../x` is a usage error that writes
   nothing; a graphs row with a null tokens list stops train with one line naming the file and
   row; out-of-range relation indices are counted in one warning line; a captions CSV that
   starts with a UTF-8 byte-order mark is ingested; a short CSV row is reported with its
   field count, not as a split conflict

`--only NAME` (repeatable, a part of a fault's name) runs only those faults, after the
concurrent writers, which build the dataset the others use.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
SMALL_NET = ["--set", "depth=50", "--set", "num_classes=20", "--set", "bbox_reg_classes=21",
             "--set", "num_attributes=10"]
EXTRACT = ["--kind", "both", "--weights", "random", "--boxes", "given", "--shard-size", "8",
           "--min-size", "96", "--max-size", "96", "--workers", "0", "--threads", "1", "--no-progress",
           *SMALL_NET]


def run(*cmd, timeout=900, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=REPO, env=env or ENV, capture_output=True, text=True,
                          timeout=timeout)


def start(*cmd) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def tail(r, n=300) -> str:
    return " ".join((r.stdout + r.stderr).split())[-n:]


def extract_cmd(root, *extra):
    return [PY, "-m", "itmkit", "extract", "--dataset", "demo", "--root", root, *EXTRACT, *extra]


def verify(root, name="demo") -> subprocess.CompletedProcess:
    return run(PY, "-m", "itmkit", "verify", Path(root) / name)


# ---------------------------------------------------------------------------------------------
# 2. concurrent writers (also builds the dataset the other faults use)

def concurrent_writers(root: Path) -> tuple[bool, str]:
    procs = [start(*extract_cmd(root)) for _ in range(3)]
    procs += [start(PY, "-m", "itmkit", "parse", "--dataset", "demo", "--root", root, "--chunk-size", "50",
                    "--no-progress") for _ in range(3)]
    rcs = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        rcs.append(p.returncode)
        if p.returncode:
            last = (err.strip().splitlines() or [""])[-1]
    v = verify(root)
    ok = all(rc == 0 for rc in rcs) and v.returncode == 0
    what = f"exit codes {rcs}; verify: {tail(v, 120)}"
    if not ok and any(rcs):
        what += f"; last error: {last[-200:]}"
    return ok, what


# ---------------------------------------------------------------------------------------------
# 1. crafted checkpoints

CRAFT = textwrap.dedent("""
    import os, sys, torch
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + sys.argv[2],))
    state = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
    state["payload"] = Payload()
    torch.save(state, sys.argv[1])
""")


def crafted_checkpoint(root: Path, work: Path) -> tuple[bool, str]:
    run_dir = work / "run"
    r = run(PY, "-m", "itmkit", "train", "--model", "vsepp", "--dataset", "demo", "--root", root, "--out", run_dir,
            "--epochs", "1", "--batch-size", "8", "--max-images", "8", "--workers", "0")
    if r.returncode:
        return False, f"could not train the run to tamper with: {tail(r)}"
    seen = []
    loaders = {
        "evaluate": [PY, "-m", "itmkit", "evaluate", run_dir, "--root", root, "--workers", "0"],
        "train --resume": [PY, "-m", "itmkit", "train", "--model", "vsepp", "--dataset", "demo", "--root", root,
                           "--out", run_dir, "--resume", "--workers", "0"],
        "export": [PY, "-m", "itmkit", "evaluate", run_dir, "--root", root, "--workers", "0",
                   "--export-index", work / "index"],
    }
    for name, cmd in loaders.items():
        marker = work / f"ran-{name.replace(' ', '')}"
        for ckpt in ("best.pt", "last.pt"):
            shutil.copy(run_dir / ckpt, work / f"clean-{ckpt}")
            r = run(PY, "-c", CRAFT, run_dir / ckpt, marker)
            if r.returncode:
                return False, f"could not craft {ckpt}: {tail(r)}"
        r = run(*cmd)
        seen.append(f"{name}: {'RAN THE CODE' if marker.exists() else 'no code ran'} (exit {r.returncode})")
        for ckpt in ("best.pt", "last.pt"):
            shutil.copy(work / f"clean-{ckpt}", run_dir / ckpt)
    return all("no code ran" in s for s in seen), "; ".join(seen)


# ---------------------------------------------------------------------------------------------
# 3. an altered shard

def flip_byte(path: Path, where: float = 0.9) -> None:
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * where)] ^= 0xFF
    path.write_bytes(bytes(raw))


def altered_shard(root: Path, work: Path) -> tuple[bool, str]:
    shard = root / "demo" / "regions" / "regions-train-0001.h5"
    flip_byte(shard)
    t = run(PY, "-m", "itmkit", "train", "--model", "vsepp", "--dataset", "demo", "--root", root,
            "--out", work / "run-altered", "--epochs", "1", "--batch-size", "8", "--workers", "0")
    refused = t.returncode != 0 and shard.name in t.stderr
    e = run(*extract_cmd(root))
    rewritten = e.returncode == 0 and "wrote 1 regions" in e.stdout and verify(root).returncode == 0
    return refused and rewritten, (f"train: {'refused, naming the file' if refused else 'TRAINED ON IT'} "
                                   f"(exit {t.returncode}); extract rerun: "
                                   f"{'rewrote it, verify ok' if rewritten else tail(e, 160)}")


# ---------------------------------------------------------------------------------------------
# 4, 5. folder ingest: paths outside the image folder, one file under two names, a bomb

def folder_dataset(work: Path, root: Path, name: str, rows: list[tuple[str, str]]) -> tuple[Path, Path]:
    """A folder dataset under work/name: images/ with three of the demo's PNGs, a CSV of rows."""
    src = work / name
    (src / "images").mkdir(parents=True)
    for i, png in enumerate(sorted((root / "demo" / "images").rglob("*.png"))[:3]):
        shutil.copy(png, src / "images" / f"img{i}.png")
    lines = ["file,caption,split"] + [f"{f},a photo number {k} of something,{'train' if k % 2 else 'test'}"
                                      for k, (f, _) in enumerate(rows)]
    (src / "captions.csv").write_text("\n".join(lines) + "\n")
    manifest = src / "manifest.yaml"
    manifest.write_text(f"name: {name}\nformat: folder\nsource_root: {src}\nimages: images\n"
                        f"annotations: captions.csv\nmin_captions: 1\n")
    return src, manifest


def ingested_paths(root: Path, name: str) -> list[str]:
    import pyarrow.parquet as pq

    path = root / name / "images.parquet"
    return pq.read_table(path).column("path").to_pylist() if path.exists() else []


def traversal_rows(work: Path, root: Path) -> tuple[bool, str]:
    outside = work / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    shutil.copy(sorted((root / "demo" / "images").rglob("*.png"))[0], secret)
    bad = {"../outside/secret.png": "a ../ path",          # rows 3, 4, 5 of the CSV: test, train, test
           "sub/../img0.png": "img0.png (a test image) again, under a second name, in train",
           str(secret): "an absolute path"}
    src, manifest = folder_dataset(work, root, "folder_paths",
                                   [("img0.png", ""), ("img1.png", ""), *[(f, "") for f in bad]])
    (src / "images" / "sub").mkdir()
    r = run(PY, "-m", "itmkit", "ingest", "--manifest", manifest, "--root", work / "ingest", "--quiet")
    paths = [Path(p).resolve() for p in ingested_paths(work / "ingest", "folder_paths")]
    images = (src / "images").resolve()
    outside_in = [str(p) for p in paths if not p.is_relative_to(images)]
    twice = len(paths) - len(set(paths))
    report = r.stdout + r.stderr + "".join(p.read_text() for p in (work / "ingest").rglob("ingest-report*"))
    rows = [f for f, _ in [("img0.png", ""), ("img1.png", ""), *[(f, "") for f in bad]]]
    reported = [f for f in bad if f in report or f"line {rows.index(f) + 2}" in report]
    ok = r.returncode in (0, 1) and bool(paths or r.returncode) and not outside_in and not twice \
        and len(reported) == len(bad)
    return ok, (f"exit {r.returncode}; ingested outside the image folder: {outside_in or 'none'}; "
                f"files under two ids: {twice}; rows reported: {len(reported)} of {len(bad)}")


def bomb_in_ingest(work: Path, root: Path) -> tuple[bool, str]:
    src, manifest = folder_dataset(work, root, "folder_bomb", [("img0.png", ""), ("img1.png", ""),
                                                               ("bomb.png", "")])
    sys.path.insert(0, str(REPO / "tests"))
    from test_features_extract import _png_with_size  # a valid 8x8 PNG whose header claims W x H

    _png_with_size(src / "images" / "bomb.png", 20000, 20000)
    r = run(PY, "-m", "itmkit", "ingest", "--manifest", manifest, "--root", work / "ingest", "--quiet")
    paths = ingested_paths(work / "ingest", "folder_bomb")
    report = r.stdout + r.stderr + "".join(p.read_text() for p in (work / "ingest").rglob("ingest-report*"))
    ok = r.returncode == 0 and len(paths) == 2 and "bomb.png" in report and "Traceback" not in report
    return ok, (f"exit {r.returncode}, {len(paths)} image(s) ingested, bomb "
                f"{'reported' if 'bomb.png' in report else 'NOT reported'}"
                + (f"; {tail(r, 160)}" if not ok else ""))


# ---------------------------------------------------------------------------------------------
# 6. a full disk

TMPFS = textwrap.dedent("""
    set -e
    mount -t tmpfs -o size=4m tmpfs "$1"
    mkdir -p "$1/data/demo/text"
    cp "$2/images.parquet" "$2/boxes.parquet" "$1/data/demo/"
    cp "$2/text/captions.parquet" "$1/data/demo/text/"
    cd "$3"
    set +e
    shift 3
    "$@" --root "$MNT/data" > "$MNT.extract" 2>&1; echo "exit $?" >> "$MNT.extract"
    avail=$(df --output=avail -B1 "$MNT" | tail -1)
    head -c $((avail > 30000 ? avail - 30000 : 0)) /dev/zero > "$MNT/filler"
    "$PYBIN" -m itmkit parse --dataset demo --root "$MNT/data" --chunk-size 50 --no-progress \\
        > "$MNT.parse" 2>&1; echo "exit $?" >> "$MNT.parse"
    "$PYBIN" -m itmkit verify "$MNT/data/demo" > "$MNT.verify" 2>&1; echo "exit $?" >> "$MNT.verify"
""")

INJECT = textwrap.dedent("""
    import errno, sys, h5py, pyarrow.parquet as pq
    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    h5py.File.flush = no_space
    pq.write_table = no_space
    sys.argv = sys.argv[1:]
    import runpy
    runpy.run_module(sys.argv[0], run_name="__main__")
""")


def full_disk_verdict(name: str, text: str) -> tuple[bool, str]:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    code = lines[-1] if lines else "no output"
    errors = [l for l in lines if "no space left" in l]
    crash = "Traceback" in text or "Exception ignored" in text or code not in ("exit 1",)
    ok = len(errors) == 1 and not crash
    named = Path(errors[0].split("error: ", 1)[-1].split(":")[0]).name if errors else ""
    return ok, f"{name}: {code}, {f'one line naming {named}, no space left' if errors else 'NO one-line error'}" + \
        (" (traceback or crash)" if crash and errors else "")


def full_disk(root: Path, work: Path) -> tuple[bool, str]:
    mnt = work / "tmpfs"
    mnt.mkdir()
    env = dict(ENV, MNT=str(mnt), PYBIN=PY)
    ds = root / "demo"
    r = None
    if shutil.which("unshare"):
        r = run("unshare", "-Urm", "bash", "-c", TMPFS, "-", mnt, ds, REPO,
                *[c for c in extract_cmd("X") if c not in ("--root", "X")], env=env)
    if r is not None and Path(f"{mnt}.verify").exists():
        how = "4 MB tmpfs"
        checks = [full_disk_verdict("extract", Path(f"{mnt}.extract").read_text()),
                  full_disk_verdict("parse", Path(f"{mnt}.parse").read_text())]
        v = Path(f"{mnt}.verify").read_text()
        intact = " 0 bad" in v and v.strip().endswith("exit 0")
    else:  # no tmpfs here: the same error, injected into the writers
        how = "injected ENOSPC (no tmpfs could be mounted)"
        copy = work / "injected"
        (copy / "demo" / "text").mkdir(parents=True)
        for f in ("images.parquet", "boxes.parquet", "text/captions.parquet"):
            shutil.copy(ds / f, copy / "demo" / f)
        e = run(PY, "-c", INJECT, "itmkit", *extract_cmd(copy)[3:])
        p = run(PY, "-c", INJECT, "itmkit", "parse", "--dataset", "demo", "--root", copy, "--no-progress")
        checks = [full_disk_verdict("extract", e.stdout + e.stderr + f"\nexit {e.returncode}"),
                  full_disk_verdict("parse", p.stdout + p.stderr + f"\nexit {p.returncode}")]
        v = verify(copy)
        intact = v.returncode in (0, 1) and " 0 bad" in v.stdout
    ok = all(c[0] for c in checks) and intact
    return ok, f"{how}: " + "; ".join(c[1] for c in checks) + f"; registered files {'intact' if intact else 'NOT intact'}"


# ---------------------------------------------------------------------------------------------
# 7. smaller ones

def identical_reruns(root: Path, work: Path) -> tuple[bool, str]:
    copy = work / "repro"
    (copy / "demo" / "text").mkdir(parents=True)
    for f in ("images.parquet", "boxes.parquet", "text/captions.parquet"):
        shutil.copy(root / "demo" / f, copy / "demo" / f)
    r = run(*extract_cmd(copy, "--split", "train", "--chunk", "0"))
    same = [(root / "demo" / k / f"{k}-train-0000.h5").read_bytes() == (copy / "demo" / k / f"{k}-train-0000.h5").read_bytes()
            for k in ("regions", "grid") if (copy / "demo" / k / f"{k}-train-0000.h5").exists()]
    return r.returncode == 0 and same == [True, True], f"region and grid shard of train chunk 0 byte-identical: {same}"


def config_error(work: Path) -> tuple[bool, str]:
    (work / "wf").mkdir(exist_ok=True)
    r = run(PY, "-m", "snakemake", "-s", REPO / "Snakefile", "--directory", work / "wf", "-n", "demo",
            "--config", "bogus_key=1", f"root={work / 'wf-data'}", timeout=300)
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip() and not l.startswith("Config file ")]
    ok = r.returncode != 0 and len(lines) == 1 and "bogus_key" in lines[0]
    return ok, f"{len(lines)} line(s): {lines[0][:100] if lines else ''}"


WEIGHTS = textwrap.dedent("""
    import sys
    from itmkit.cli import build_parser
    from features.extract import config_from_args
    from features.rcnn import BottomUpRCNN
    from features.weights import load_weights, save_detectron2_pickle
    args = build_parser().parse_args(["extract", "--dataset", "x", "--weights", "random", *sys.argv[2:]])
    model = BottomUpRCNN(config_from_args(args))
    load_weights(model, "random", seed=5)
    save_detectron2_pickle(model, sys.argv[1])
""")


def weights_first(root: Path, work: Path) -> tuple[bool, str]:
    weights = work / "other-shape.pkl"
    r = run(PY, "-c", WEIGHTS, weights, *SMALL_NET[:-2], "--set", "num_attributes=12")
    if r.returncode:
        return False, f"could not write the weights: {tail(r)}"
    cmd = extract_cmd(root, "--kind", "regions")
    cmd[cmd.index("random")] = weights
    e = run(*cmd)
    announced = "replaced" in e.stderr or "another config" in e.stderr
    return e.returncode == 1 and not announced, (f"exit {e.returncode}, "
                                                 f"{'announced replacements first' if announced else 'refused before announcing anything'}")


# ---------------------------------------------------------------------------------------------
# 8.-12. run folders

RUN_ARGS = ["--batch-size", "8", "--workers", "0", "--threads", "1", "--quiet", "--set", "embed_dim=32",
            "--set", "word_dim=16"]


def train_cmd(root, out, *extra) -> list:
    return [PY, "-m", "itmkit", "train", "--model", "vsepp", "--dataset", "demo", "--root", root, "--out", out,
            *RUN_ARGS, *extra]


def last_line(r) -> str:
    return ((r.stdout + r.stderr).strip().splitlines() or [""])[-1]


def metrics_epochs(run_dir: Path) -> list[str]:
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        return [row["epoch"] for row in csv.DictReader(f)]


def one_writer(root: Path, work: Path) -> tuple[bool, str]:
    import json

    out = work / "one-writer"
    procs = [start(*train_cmd(root, out, "--epochs", "2", "--seed", seed)) for seed in (0, 1)]
    done = [(p.wait(timeout=900), p.stderr.read()) for p in procs]
    rcs = [rc for rc, _ in done]
    refused = next((err.strip().splitlines()[-1] for rc, err in done if rc == 1 and err.strip()), "")
    named = "another process is training this run (host " in refused and ", pid " in refused
    runner = rcs.index(0) if rcs.count(0) == 1 else None
    alone = runner is not None and json.loads((out / "config.json").read_text())["seed"] == runner \
        and metrics_epochs(out) == ["1", "2"]
    # evaluate while a run trains (stopped once it has): it scores the last finished checkpoint, saying so
    busy = work / "in-training"
    p = start(*train_cmd(root, busy, "--epochs", "500"))
    while p.poll() is None and not (busy / "best.pt").exists():
        time.sleep(0.5)
    e = run(PY, "-m", "itmkit", "evaluate", busy, "--root", root, "--workers", "0", "--quiet")
    p.kill()
    p.wait()
    note = next((l for l in e.stderr.splitlines() if " is being trained (host " in l), "")
    said = e.returncode == 0 and "scoring its best.pt of epoch " in note
    ok = sorted(rcs) == [0, 1] and named and alone and said
    holder = refused.split(": ", 2)[-1].split(";")[0] or "NOT REFUSED"
    return ok, (f"exit codes {rcs}; the refused: {holder}; metrics.csv and config.json {'of the runner alone' if alone else 'MIXED'}; evaluate during training: "
                + (note.split("): ", 1)[-1] if said else f"exit {e.returncode}, NOT SAID: {tail(e, 120)}"))


RUN_TMPFS = textwrap.dedent("""
    set -e
    mount -t tmpfs -o size=8m tmpfs "$1"
    cd "$2"
    set +e
    shift 2
    "$@" --epochs 2 --stop-after 1 > "$MNT.setup" 2>&1
    sha256sum "$MNT"/run/*.pt "$MNT"/run/*.csv "$MNT"/run/*.json > "$MNT.before"
    avail=$(df --output=avail -B1 "$MNT" | tail -1)
    head -c $((avail > 100000 ? avail - 100000 : 0)) /dev/zero > "$MNT/filler"
    "$@" --resume > "$MNT.train" 2>&1; echo "exit $?" >> "$MNT.train"
    head -c 100000000 /dev/zero >> "$MNT/filler" 2>/dev/null
    "$PYBIN" -m itmkit evaluate "$MNT/run" --workers 0 --quiet --save-sims > "$MNT.evaluate" 2>&1
    echo "exit $?" >> "$MNT.evaluate"
    "$PYBIN" -m itmkit report "$MNT/run" --workers 0 > "$MNT.report" 2>&1; echo "exit $?" >> "$MNT.report"
    sha256sum "$MNT"/run/*.pt "$MNT"/run/*.csv "$MNT"/run/*.json > "$MNT.after"
""")

FULL_CHECKPOINT = textwrap.dedent("""
    import errno, io, sys
    from training import checkpoint

    class FullDisk(io.FileIO):   # takes 4 KB, then fails as a full disk does
        room = 4096
        def write(self, b):
            if len(b) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(b)
            return super().write(b)

    checkpoint.open = lambda path, mode: FullDisk(path, "wb")
    from itmkit.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def full_disk_in_a_run(root: Path, work: Path) -> tuple[bool, str]:
    mnt = work / "run-tmpfs"
    mnt.mkdir()
    env = dict(ENV, MNT=str(mnt), PYBIN=PY)
    r = None
    if shutil.which("unshare"):
        r = run("unshare", "-Urm", "bash", "-c", RUN_TMPFS, "-", mnt, REPO, *train_cmd(root, mnt / "run"),
                env=env)
    if r is not None and Path(f"{mnt}.after").exists():
        how = "8 MB tmpfs"
        checks = [full_disk_verdict(c, Path(f"{mnt}.{c}").read_text())
                  for c in ("train", "evaluate", "report")]
        intact = Path(f"{mnt}.before").read_text() == Path(f"{mnt}.after").read_text()
    else:   # no tmpfs here: the failure injected into the file object torch.save writes
        how = "injected ENOSPC in the checkpoint's file object (no tmpfs could be mounted)"
        out = work / "run-full"
        setup = run(*train_cmd(root, out, "--epochs", "2", "--stop-after", "1"))
        if setup.returncode:
            return False, f"could not train the run: {tail(setup)}"
        before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
        t = run(PY, "-c", FULL_CHECKPOINT, "train", *train_cmd(root, out, "--resume")[2:])
        checks = [full_disk_verdict("train", t.stdout + t.stderr + f"\nexit {t.returncode}")]
        intact = before == {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    ok = all(c[0] for c in checks) and intact
    return ok, (f"{how}: " + "; ".join(c[1] for c in checks)
                + f"; the run's files {'intact' if intact else 'NOT intact'}")


KILL_BETWEEN = textwrap.dedent("""
    import os, sys
    from training import train
    real = train.append_metrics
    def killed(path, row):   # last.pt of this epoch is saved; its metrics.csv row is not
        if row["epoch"] == 2:
            os._exit(9)
        real(path, row)
    train.append_metrics = killed
    from itmkit.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def killed_before_metrics(root: Path, work: Path) -> tuple[bool, str]:
    out = work / "killed"
    k = run(PY, "-c", KILL_BETWEEN, "train", *train_cmd(root, out, "--epochs", "2")[2:])
    lost = metrics_epochs(out) if (out / "metrics.csv").exists() else []
    r = run(*train_cmd(root, out, "--resume"))
    restored = "restored the metrics.csv row of epoch 2" in r.stderr
    rows = metrics_epochs(out)
    ok = k.returncode == 9 and lost == ["1"] and r.returncode == 0 and restored and rows == ["1", "2"]
    return ok, (f"killed (exit {k.returncode}) with metrics.csv epochs {lost}; --resume: exit {r.returncode}, "
                f"{'restored the row' if restored else 'NOT restored'}, epochs {rows}")


def stale_evaluation(root: Path, work: Path) -> tuple[bool, str]:
    import json
    import re

    out, fresh = work / "stale", work / "stale-fresh"
    steps = [train_cmd(root, out, "--epochs", "2", "--stop-after", "1"),
             [PY, "-m", "itmkit", "evaluate", out, "--checkpoint", "last", "--save-sims", "--workers", "0",
              "--quiet"],
             train_cmd(root, out, "--resume"),
             [PY, "-m", "itmkit", "report", out, "--checkpoint", "last", "--workers", "0", "--out",
              work / "stale.html"]]
    for cmd in steps:
        r = run(*cmd)
        if r.returncode:
            return False, f"'{' '.join(map(str, cmd[1:3]))}' failed: {tail(r)}"
    page = (work / "stale.html").read_text()
    shutil.copytree(out, fresh)
    for f in ("eval.json", "sims-test.npz"):
        (fresh / f).unlink()
    r = run(PY, "-m", "itmkit", "evaluate", fresh, "--checkpoint", "last", "--workers", "0", "--quiet")
    then = json.loads((out / "eval.json").read_text())["test/f30k-1k"]["rsum"]
    now = json.loads((fresh / "eval.json").read_text())["test/f30k-1k"]["rsum"] if r.returncode == 0 else None
    shown = re.search(r'<tr class="recall">.*?</tr>', page)
    said = "left out f30k-1k: scored last.pt of epoch 1, not the last.pt of epoch 2" in page \
        and "sims-test.npz holds the similarities of other weights" in page
    right = shown is not None and now is not None and f"{now:.1f} <span" in shown.group(0)
    return said and right, (f"eval.json of epoch 1 (rSum {then:.1f}) "
                            f"{'left out, said' if said else 'NOT SAID'}; "
                            f"the report shows {'the loaded weights' if right else 'OTHER'} rSum "
                            f"({now if now is None else f'{now:.1f}'} by a fresh evaluate)")


def damaged_cache_and_upgrade(root: Path, work: Path) -> tuple[bool, str]:
    import pyarrow.parquet as pq

    out = work / "cache"
    r = run(*train_cmd(root, out, "--epochs", "1"))
    if r.returncode:
        return False, f"could not train the run: {tail(r)}"
    images = pq.read_table(root / "demo" / "images.parquet").to_pylist()
    image_id = next(row["image_id"] for row in images if row["split"] == "test")
    query = [PY, "-m", "itmkit.cli", "retrieve", out, "--image-id", image_id, "-k", "3", "--index", "hnsw",
             "--quiet"]
    first = run(*query)
    cache = out / "index-test" / "faiss-captions-hnsw.index"
    if first.returncode or not cache.exists():
        return False, f"retrieve did not cache an index: {tail(first)}"
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    again = run(*query)
    rebuilt = (again.returncode == 0 and "rebuilt and cached" in again.stderr
               and "Traceback" not in again.stderr)
    text = work / "notes.txt"
    text.write_text("not a checkpoint\n")
    (work / "empty").mkdir()
    seen = []
    for path in (work / "empty", root / "demo", text):
        u = run(PY, "-m", "itmkit.cli", "upgrade", path)
        lines = (u.stdout + u.stderr).strip().splitlines()
        seen.append(u.returncode == 1 and len(lines) == 1 and str(path) in lines[0])
    return rebuilt and all(seen), (f"truncated cache: {'rebuilt, said' if rebuilt else tail(again, 160)}; "
                                   f"upgrade of an empty folder, a dataset folder, a text file: "
                                   f"{sum(seen)} of 3 one-line errors (exit 1)")


# ---------------------------------------------------------------------------------------------
# 13, 14. a dataset folder handed over by someone else

def handed_over(root: Path, work: Path, name: str) -> tuple[Path, Path]:
    """A copy of the demo dataset at work/name/demo, and a victim folder beside the copy's root
    holding victim.txt."""
    copy = work / name / "demo"
    shutil.copytree(root / "demo", copy, symlinks=True)
    victim = work / name / "victim"
    victim.mkdir()
    (victim / "victim.txt").write_bytes(b"not yours\n")
    return copy, victim


def one_line_refusal(r, *named) -> bool:
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    return r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr and all(n in lines[0] for n in named)


def index_outside_folder(root: Path, work: Path) -> tuple[bool, str]:
    import hashlib
    import json

    ds, victim = handed_over(root, work, "untrusted-index")
    index = ds / "shards.json"
    clean = index.read_text()
    (ds / "regions" / "regions-train-0099.h5").symlink_to(victim / "victim.txt")
    crafted = {"graphs ../": ("graphs", "../victim/victim.txt"),
               "regions absolute": ("regions", str(victim / "victim.txt")),
               "regions symlink": ("regions", "regions/regions-train-0099.h5"),
               "regions no sha256": ("regions", None)}
    commands = {"verify": [PY, "-m", "itmkit", "verify", ds],
                "prune": [PY, "-m", "itmkit", "prune", ds, "--kind", "regions", "--shard-size", "8"],
                "parse": [PY, "-m", "itmkit", "parse", "--dataset", "demo", "--root", ds.parent,
                          "--chunk-size", "50", "--no-progress"],
                "inspect": [PY, "-m", "itmkit", "inspect", index]}
    before = sorted(p.name for p in victim.iterdir())
    bad = []
    for case, (kind, path) in crafted.items():
        data = json.loads(clean)
        if path is None:
            data["kinds"][kind][0].pop("sha256")
            path = data["kinds"][kind][0]["path"]
        else:
            raw = b"not yours\n"
            data["kinds"][kind].append({"kind": kind, "path": path, "sha256": hashlib.sha256(raw).hexdigest(),
                                        "size": len(raw), "rows": 1, "config_hash": "other"})
        index.write_text(json.dumps(data))
        for what, cmd in commands.items():
            if not one_line_refusal(run(*cmd), "shards.json", json.dumps(path)):
                bad.append(f"{case}: {what}")
    index.write_text(clean)
    after = sorted(p.name for p in victim.iterdir())
    intact = after == before and (victim / "victim.txt").read_bytes() == b"not yours\n"
    ok = not bad and intact
    return ok, (f"{len(crafted)} crafted entries x {len(commands)} commands: "
                f"{'each refused in one line naming the entry' if not bad else 'NOT refused: ' + ', '.join(bad)}; "
                f"files outside {'untouched' if intact else f'CHANGED: {before} -> {after}'}")


CRAFT_H5 = textwrap.dedent("""
    import sys, h5py, numpy as np
    shard, victim, how = sys.argv[1:]
    with h5py.File(shard, "r") as f:
        data, attrs = {k: f[k][()] for k in f}, dict(f.attrs)
    feats = data.pop("features")
    with h5py.File(victim + ".h5", "w") as g:
        g["features"] = np.ones_like(feats)
    with h5py.File(shard, "w") as f:
        for k, v in data.items():
            f[k] = v
        f.attrs.update(attrs)
        if how == "external raw storage":
            f.create_dataset("features", shape=feats.shape, dtype=feats.dtype, external=[(victim, 0, feats.nbytes)])
        elif how == "external link":
            f["features"] = h5py.ExternalLink(victim, "features")
        else:
            layout = h5py.VirtualLayout(shape=feats.shape, dtype=feats.dtype)
            layout[:] = h5py.VirtualSource(victim + ".h5", "features", shape=feats.shape)
            f.create_virtual_dataset("features", layout)
""")


def h5_reading_outside(root: Path, work: Path) -> tuple[bool, str]:
    import hashlib
    import json

    ds, victim = handed_over(root, work, "untrusted-h5")
    shard = ds / "regions" / "regions-train-0000.h5"
    original = shard.read_bytes()
    if not (ds / "text" / "vocab.json").exists():
        run(PY, "-m", "itmkit", "vocab", "--dataset", "demo", "--root", ds.parent, "--min-count", "1", "--no-progress")
    index = ds / "shards.json"
    clean = index.read_text()
    seen = []
    for how in ("external raw storage", "external link", "virtual dataset"):
        shard.write_bytes(original)
        r = run(PY, "-c", CRAFT_H5, shard, victim / "victim.txt", how)
        if r.returncode:
            return False, f"could not craft the shard ({how}): {tail(r)}"
        data = json.loads(clean)
        entry = next(e for e in data["kinds"]["regions"] if e["path"] == "regions/regions-train-0000.h5")
        entry.update(sha256=hashlib.sha256(shard.read_bytes()).hexdigest(), size=shard.stat().st_size)
        index.write_text(json.dumps(data))
        checks = {"verify": run(PY, "-m", "itmkit", "verify", ds),
                  "inspect": run(PY, "-m", "itmkit", "inspect", shard),
                  "train": run(PY, "-m", "itmkit", "train", "--model", "vsepp", "--dataset", "demo", "--root", ds.parent,
                               "--out", work / "untrusted-h5" / "run", "--epochs", "1", "--batch-size", "8",
                               "--max-images", "8", "--workers", "0")}
        refused = [what for what, r in checks.items() if one_line_refusal(r, shard.name, "'features'")]
        seen.append(f"{how}: " + (f"refused by {', '.join(refused)}" if len(refused) == len(checks) else
                                  f"NOT refused by {', '.join(sorted(set(checks) - set(refused)))}"))
    shard.write_bytes(original)
    index.write_text(clean)
    return all("NOT" not in s for s in seen), "; ".join(seen)


# ---------------------------------------------------------------------------------------------
# 15. inputs

HOSTILE = " $(touch injected); touch injected2"


def injected(work: Path) -> list[str]:
    return [str(p) for p in [*work.rglob("injected*"), *REPO.glob("injected*")]]


def workflow_quoting(work: Path) -> tuple[bool, str]:
    base = work / "quoting"
    root = base / f"my data{HOSTILE}"
    images = root / "demo" / "images.parquet"
    r = run(PY, "-m", "snakemake", "-s", REPO / "Snakefile", "--directory", base / "wf", "--cores", "1", images,
            "--config", f"root={root}", f"runs={base / 'runs'}", "demo_images=8", timeout=600)
    written = r.returncode == 0 and images.exists()
    # the ingested root lists the parse jobs: the parser's name and a model setting with shell code
    spacy, setting = f"en_core_web_sm{HOSTILE}", f"256{HOSTILE} #"
    d = run(PY, "-m", "snakemake", "-s", REPO / "Snakefile", "--directory", base / "wf", "-n", "-p", "demo",
            "--config", f"root={root}", f"runs={base / 'runs'}", "demo_images=8", f"spacy_model={spacy}",
            f"demo_set={{embed_dim: '{setting}'}}", timeout=600)
    commands = [shlex.split(line.removeprefix("Shell command: ")) for line in d.stdout.splitlines()
                if line.startswith("Shell command: /")]
    whole = [value for value in (spacy, f"embed_dim={setting}") if any(value in words for words in commands)]
    stray = sorted(p.name for p in base.iterdir() if p.name not in (root.name, "wf", "runs"))
    ran = injected(work)
    ok = written and d.returncode == 0 and len(whole) == 2 and not ran and not stray
    return ok, (f"ingest job under '{root.name}': {'wrote images.parquet' if written else 'FAILED: ' + tail(r, 160)}; "
                f"dry run: parser name and demo_set value {'each one word' if len(whole) == 2 else 'SPLIT'}; "
                f"injected commands run: {ran or 'none'}; stray files: {stray or 'none'}")


def dataset_outside_root(work: Path, root: Path) -> tuple[bool, str]:
    before = sorted(p.name for p in work.iterdir())
    r = run(PY, "-m", "itmkit", "vocab", "--dataset", "../escaped", "--root", root, "--min-count", "1",
            "--no-progress")
    after = sorted(p.name for p in work.iterdir())
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    ok = r.returncode == 2 and "is not a dataset name" in r.stderr and before == after
    return ok, (f"exit {r.returncode}: {lines[-1][:110] if lines else 'no message'}; "
                f"written beside the root: {sorted(set(after) - set(before)) or 'nothing'}")


def demo_copy(root: Path, dest: Path) -> Path:
    shutil.copytree(root / "demo", dest / "demo", ignore=shutil.ignore_patterns("images", "*.lock"))
    return dest


def rewrite_graphs(root: Path, edit) -> tuple[Path, int]:
    """Apply ``edit(rows, train_caption_ids)`` to the graph chunk holding the first train
    caption and register it again (only its rows are at fault); returns the chunk and the count
    ``edit`` returns."""
    from pipeline import shards

    layout = shards.Layout(root, "demo")
    caps = shards.read_table(layout.captions, "captions").to_pylist()
    train = sorted(c["caption_id"] for c in caps if c["split"] == "train")
    for entry in layout.index.entries("graphs"):
        path = layout.dir / entry.path
        rows = shards.read_table(path, "graphs").to_pylist()
        if any(r["caption_id"] == train[0] for r in rows):
            n = edit(rows, set(train))
            shards.write_table(path, rows, "graphs")
            layout.index.register("graphs", path, rows=len(rows), config_hash=entry.config_hash,
                                  inputs_hash=entry.inputs_hash)
            return path, n
    raise RuntimeError("no graph chunk holds the first train caption")


def train_briefly(root: Path, out: Path) -> subprocess.CompletedProcess:
    return run(PY, "-m", "itmkit", "train", "--model", "vsepp", "--dataset", "demo", "--root", root, "--out", out,
               "--epochs", "1", "--batch-size", "8", "--workers", "0", "--threads", "1")


def null_graph_row(root: Path, work: Path) -> tuple[bool, str]:
    copy = demo_copy(root, work / "nulls")

    def edit(rows, train):
        k = next(k for k, r in enumerate(rows) if r["caption_id"] in train)
        rows[k]["tokens"] = None
        return k
    path, k = rewrite_graphs(copy, edit)
    t = train_briefly(copy, work / "run-nulls")
    lines = [l for l in t.stderr.splitlines() if l.strip()]
    ok = t.returncode == 1 and "Traceback" not in t.stderr and len(lines) == 1 \
        and path.name in lines[0] and f"row {k} " in lines[0]
    return ok, f"train: exit {t.returncode}, {len(lines)} line(s): {lines[-1][-140:] if lines else ''}"


def out_of_range_relations(root: Path, work: Path) -> tuple[bool, str]:
    copy = demo_copy(root, work / "indices")

    def edit(rows, train):
        bad = [r for r in rows if r["caption_id"] in train][:3]
        for r in bad:
            r["relations"].append({"subject": 0, "predicate": "on", "object": len(r["objects"]) + 5})
        return len(bad)
    path, n = rewrite_graphs(copy, edit)
    t = train_briefly(copy, work / "run-indices")
    warnings = [l for l in t.stderr.splitlines() if l.startswith("warning:") and path.name in l]
    ok = t.returncode == 0 and len(warnings) == 1 and f"dropped {n} relation(s)" in warnings[0]
    return ok, f"train: exit {t.returncode}; " + (warnings[0][-120:] if len(warnings) == 1 else
                                                  f"{len(warnings)} warning lines; {tail(t, 160)}")


def ingest_report(r: subprocess.CompletedProcess, out: Path) -> str:
    return r.stdout + r.stderr + "".join(p.read_text() for p in out.rglob("ingest-report*"))


def csv_with_bom(work: Path, root: Path) -> tuple[bool, str]:
    src, manifest = folder_dataset(work, root, "folder_bom", [("img0.png", ""), ("img1.png", ""), ("img2.png", "")])
    csv = src / "captions.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes())
    r = run(PY, "-m", "itmkit", "ingest", "--manifest", manifest, "--root", work / "ingest-bom", "--quiet")
    paths = ingested_paths(work / "ingest-bom", "folder_bom")
    ok = r.returncode == 0 and len(paths) == 3
    return ok, f"exit {r.returncode}, {len(paths)} of 3 images ingested" + (f"; {tail(r, 160)}" if not ok else "")


def short_csv_row(work: Path, root: Path) -> tuple[bool, str]:
    src, manifest = folder_dataset(work, root, "folder_short", [("img0.png", ""), ("img1.png", "")])
    with open(src / "captions.csv", "a") as f:
        f.write("img0.png\n")   # line 4: no caption, no split
    r = run(PY, "-m", "itmkit", "ingest", "--manifest", manifest, "--root", work / "ingest-short", "--quiet")
    report = ingest_report(r, work / "ingest-short")
    said = "line 4: row has 1 field, needs 2–3" in report
    ok = r.returncode == 0 and said and "split conflict" not in report
    return ok, (f"exit {r.returncode}; {'reported: line 4: row has 1 field, needs 2–3' if said else 'NOT reported'}"
                f"{'; reported as a split conflict' if 'split conflict' in report else ''}")


# ---------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="work folder (default: a new temporary folder)")
    ap.add_argument("--images", type=int, default=60, help="demo images (default 60)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--only", action="append", default=None, metavar="NAME",
                    help="run only the faults whose name contains NAME (repeatable); the concurrent "
                         "writers always run, they build the dataset")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="itmkit-faults-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    root = work / "data"
    t0 = time.time()
    r = run(PY, "-m", "itmkit", "demo", "--root", root, "--images", args.images, "--image-size", "96", "--quiet")
    if r.returncode:
        print(f"faults: could not build the demo: {tail(r)}", file=sys.stderr)
        return 1
    faults = [
        ("concurrent extract + parse", lambda: concurrent_writers(root)),
        ("crafted checkpoint", lambda: crafted_checkpoint(root, work)),
        ("altered shard", lambda: altered_shard(root, work)),
        ("ingest paths outside the folder", lambda: traversal_rows(work, root)),
        ("decompression bomb in ingest", lambda: bomb_in_ingest(work, root)),
        ("full disk", lambda: full_disk(root, work)),
        ("identical reruns", lambda: identical_reruns(root, work)),
        ("config error is one line", lambda: config_error(work)),
        ("weights checked first", lambda: weights_first(root, work)),
        ("one writer per run folder", lambda: one_writer(root, work)),
        ("full disk in a run folder", lambda: full_disk_in_a_run(root, work)),
        ("killed before metrics.csv", lambda: killed_before_metrics(root, work)),
        ("stale evaluation in a report", lambda: stale_evaluation(root, work)),
        ("FAISS cache, upgrade: one line", lambda: damaged_cache_and_upgrade(root, work)),
        ("index entries outside the folder", lambda: index_outside_folder(root, work)),
        ("HDF5 shard reading outside itself", lambda: h5_reading_outside(root, work)),
        ("workflow values quoted", lambda: workflow_quoting(work)),
        ("dataset name outside the root", lambda: dataset_outside_root(work, root)),
        ("graphs row with a null", lambda: null_graph_row(root, work)),
        ("out-of-range graph indices", lambda: out_of_range_relations(root, work)),
        ("captions CSV with a BOM", lambda: csv_with_bom(work, root)),
        ("short CSV row", lambda: short_csv_row(work, root)),
    ]
    if args.only:   # the first fault builds the dataset the others use
        faults = faults[:1] + [f for f in faults[1:] if any(n in f[0] for n in args.only)]
    failed = 0
    for i, (name, check) in enumerate(faults):
        t = time.time()
        if i == 1:  # training needs the vocabulary of the captions the first fault parsed
            run(PY, "-m", "itmkit", "vocab", "--dataset", "demo", "--root", root, "--min-count", "1", "--no-progress")
        try:
            ok, what = check()
        except Exception as e:  # a fault that breaks the audit itself is a failure, not a crash
            ok, what = False, f"{type(e).__name__}: {e}"
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name:32s} {what}  [{time.time() - t:.0f}s]", flush=True)
    print(f"faults: {len(faults) - failed} of {len(faults)} passed in {time.time() - t0:.0f}s "
          f"({args.images}-image demo in {work}{'' if args.keep else ', removed'}), "
          f"load average {os.getloadavg()[0]:.1f}")
    if not args.keep and not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
