"""Wall seconds of `itmkit extract`, `train` and `evaluate` with their default threads and workers
against fixed settings, on the machine as found and on the machine loaded by this script.

    python benchmarks/threads.py [--work /tmp/itmkit-threads] [--commands extract,train,evaluate]
        [--load N] [--repeats 1] [--images 8]

Each command runs as its own process (imports, data opening and the work; the same for every
setting) with: its defaults (no --threads, no --workers), `--threads 1 --workers 0`,
`--threads 2 --workers 0` and `--threads 0 --workers 2` (torch's own thread count and two
workers: the defaults before the thread rule). Work: extract, --images demo images (RANDOM
weights, given boxes, regions and grid, the demo's image size); train, one epoch of vsepp on a
synthetic dataset of 300 training images; evaluate, a vsepp run on its 500 test images.
"as found" runs first; "loaded" then starts --load busy processes (default: twice the CPUs this
process may use) for the rest of the run; they are stopped when it ends and end themselves when
it is killed (or after --load-seconds). Per run it prints the seconds, the ratio to the best
setting of its command and condition, and the tasks running just before it
(pipeline.config.busy_cpus, what the default reads) with the 1-minute load. Settings are
interleaved per repeat so that a drifting load affects them alike; with --repeats N each
setting's figure is its fastest run. Its own runs count in the 1-minute load of the next; the
default does not read that average. Length: the 24 runs of one repeat took 25 min on 2 cores at
load 7-17 (extract and train slow down most under load); --commands evaluate alone, a few.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import busy_cpus, default_threads, default_workers, usable_cpus  # noqa: E402

SETTINGS = {"default": [], "1 thread": ["--threads", "1", "--workers", "0"],
            "2 threads": ["--threads", "2", "--workers", "0"],
            "torch's + 2 workers": ["--threads", "0", "--workers", "2"]}
ITMKIT = [sys.executable, "-m", "itmkit"]
# a busy process: it ends when its parent (this script) is gone, or after argv[1] seconds
SPIN = ("import os, sys, time\nparent, end = os.getppid(), time.time() + float(sys.argv[1])\n"
        "while time.time() < end and os.getppid() == parent:\n    pass\n")


def itmkit(*args, timeout=600) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("OMP_NUM_THREADS", None)   # the command decides
    t = time.perf_counter()
    r = subprocess.run([*ITMKIT, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        sys.exit(f"threads: itmkit {' '.join(map(str, args))} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t


def prepare(work: Path, images: int) -> Path:
    from training.synthetic import make_dataset

    root = work / "data"
    if not (root / "demo").exists():   # (--images is fixed by the first run in --work)
        itmkit("demo", "--root", root, "--images", images, "--quiet")
    if not (root / "synth").exists():
        make_dataset(root, "synth", {"train": 300, "val": 50, "test": 500})
    return root


def commands(root: Path, work: Path, images: int) -> dict:
    """name -> (run(setting flags) -> seconds)."""
    def extract(flags):
        for kind in ("regions", "grid"):
            shutil.rmtree(root / "demo" / kind, ignore_errors=True)
        return itmkit("extract", "--dataset", "demo", "--root", root, "--weights", "random", "--boxes", "given",
                      "--kind", "both", "--min-size", 160, "--max-size", 160, "--quiet",
                      *flags)

    runs = iter(range(10**6))

    def train(flags):
        out = work / "runs" / f"r{next(runs)}"
        shutil.rmtree(out, ignore_errors=True)
        return itmkit("train", "--model", "vsepp", "--dataset", "synth", "--root", root, "--out", out,
                      "--epochs", 1, "--quiet", *flags)

    def evaluate(flags):
        run = work / "runs" / "eval"
        if not (run / "best.pt").exists():
            itmkit("train", "--model", "vsepp", "--dataset", "synth", "--root", root, "--out", run,
                   "--epochs", 1, "--max-images", 50, "--quiet", "--threads", "1", "--workers", "0")
        return itmkit("evaluate", run, "--quiet", *flags)

    return {"extract": extract, "train": train, "evaluate": evaluate}


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def measure(runs: dict, names: list[str], repeats: int, condition: str) -> list[tuple]:
    rows = []
    for name in names:
        times = {s: [] for s in SETTINGS}
        context = {s: [] for s in SETTINGS}
        for _ in range(repeats):
            for setting, flags in SETTINGS.items():
                busy = busy_cpus()
                context[setting].append(f"running {busy:.0f}, load {loadavg()}")
                times[setting].append(runs[name](flags))
        best = min(min(t) for t in times.values())
        for setting in SETTINGS:
            secs = min(times[setting])
            rows.append((name, condition, setting, secs, secs / best, "; ".join(context[setting])))
            print(f"{name:9s} {condition:9s} {setting:21s} {secs:7.1f} s  {secs / best:5.2f}x best  "
                  f"({'; '.join(context[setting])})", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/itmkit-threads")
    ap.add_argument("--commands", default="extract,train,evaluate")
    ap.add_argument("--load", type=int, default=None, help="busy processes of the loaded condition "
                    "(default: twice the CPUs this process may use)")
    ap.add_argument("--load-seconds", type=float, default=3600,
                    help="the busy processes end after this at the latest (and when this script ends)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--images", type=int, default=8, help="demo images extracted")
    args = ap.parse_args()

    work = Path(args.work)
    root = prepare(work, args.images)
    runs = commands(root, work, args.images)
    names = args.commands.split(",")
    usable, machine = usable_cpus(), os.cpu_count()
    print(f"threads: {machine} CPUs, {usable} usable by this process; the default on the CPU is "
          f"{default_workers('cpu')} workers and, now, {default_threads(0, usable, busy_cpus(), machine)} "
          f"thread(s); load {loadavg()}", flush=True)
    t0 = time.perf_counter()
    rows = measure(runs, names, args.repeats, "as found")
    n = args.load or 2 * usable
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN, str(args.load_seconds)]) for _ in range(n)]
    try:
        time.sleep(2)
        rows += measure(runs, names, args.repeats, f"+{n} busy")
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    print(f"threads: {time.perf_counter() - t0:.0f} s in all; the default against the best setting:")
    for name in names:
        for condition in sorted({r[1] for r in rows}, key=lambda c: c != "as found"):
            r = next(r for r in rows if r[:3] == (name, condition, "default"))
            print(f"  {name:9s} {condition:9s} {r[4]:.2f}x ({'within' if r[4] <= 1.1 else 'NOT within'} 10 %)")


if __name__ == "__main__":
    main()
