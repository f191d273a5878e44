"""The workflow on a real SLURM cluster: a one-node cluster on this machine (munged, slurmctld and
slurmd; partitions `cpu` (default) and `gpu`; no accounting database), started from a temporary
folder, the demo run through profiles/slurm as docs/workflow.md says, then everything it
started stopped.

    python benchmarks/slurm.py                     # the demo through SLURM: jobs, wall time, checks
    python benchmarks/slurm.py --local             # ... and the same demo with --cores 2, compared
    python benchmarks/slurm.py --config demo_images=12 demo_epochs=1   # a smaller demo

It checks, and exits 1 naming the first check that fails: every job but the `demo` target went
through sbatch and completed, on the `cpu` partition, with one CPU and `demo_mem_mb`; the
report's path is printed; a second call submits nothing ("Nothing to be done"); `itmkit verify`
passes on the demo's folder; with --local, the local run's scores (eval.json) are the same and
its feature and graph shards hold the same bytes. Then it prints the figures (jobs, wall times).

Needs root: Debian's slurm-wlm and munge are installed with apt-get when missing, and the
daemons run as root. The cluster is private to this call: its own munge key and socket, its own
ports, its configuration and state in the temporary folder; the jobs are cancelled and the
daemons stopped when it ends, also on a failure or Ctrl-C. tests/test_slurm.py runs it (-m slow).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "slurmctld", "slurmd")
PACKAGES = ("slurm-wlm", "munge")


def install() -> None:
    """Debian's slurm-wlm and munge, when a daemon or sbatch is missing."""
    if all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in (*DAEMONS, "sbatch")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit(f"slurm: {' and '.join(PACKAGES)} are not installed; install them "
                 f"(apt-get install {' '.join(PACKAGES)}) or run this as root on Debian")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=True, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mb() -> int:
    """RealMemory of the node: what /proc/meminfo says, less a little for the system."""
    kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
              if line.startswith("MemTotal:"))
    return kb // 1024 - 512


def slurm_conf(folder: Path, cpus: int) -> str:
    return f"""\
ClusterName=itmkit
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge.socket
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={folder}/jobs.txt
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb()} State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP
"""


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def one_node_cluster(folder: Path, cpus: int = 2):
    """Start munged, slurmctld and slurmd for a cluster whose configuration is in ``folder``;
    yield the environment that points SLURM's commands at it. On the way out every job of it is
    cancelled and the daemons are stopped, in reverse order."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o711)   # munged wants its socket's folder searchable, not writable, by others
    for sub in ("state", "spool"):
        (folder / sub).mkdir(exist_ok=True)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    (folder / "slurm.conf").write_text(slurm_conf(folder, cpus))
    env = dict(os.environ, SLURM_CONF=str(folder / "slurm.conf"))
    # The jobstep plugin (0.6) starts each job's srun without SLURM_CONF, so srun looks for
    # /etc/slurm/slurm.conf (or a configless server), which this private cluster does not use:
    # an srun first in PATH puts it back. A site's cluster has its config where srun looks.
    wrapper = folder / "bin" / "srun"
    wrapper.parent.mkdir(exist_ok=True)
    wrapper.write_text(f'#!/bin/sh\nSLURM_CONF={shlex.quote(env["SLURM_CONF"])} exec {shutil.which("srun")} "$@"\n')
    wrapper.chmod(0o755)
    env["PATH"] = f"{wrapper.parent}{os.pathsep}{env['PATH']}"
    commands = [
        ["munged", "--foreground", "--force", f"--socket={folder}/munge.socket", f"--key-file={key}",
         f"--pid-file={folder}/munged.pid", f"--seed-file={folder}/munged.seed", f"--log-file={folder}/munged.log"],
        ["slurmctld", "-D", "-i"],          # -i: no state of an earlier cluster
        ["slurmd", "-D", "-N", "localhost"],
    ]
    procs = []
    try:
        for cmd in commands:
            exe = shutil.which(cmd[0]) or f"/usr/sbin/{cmd[0]}"
            with open(folder / f"{cmd[0]}.out", "wb") as out:
                procs.append(subprocess.Popen([exe, *cmd[1:]], env=env, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            time.sleep(1)
            if procs[-1].poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited at start: {(folder / f'{cmd[0]}.out').read_text()[-2000:]}")
        deadline = time.monotonic() + 60
        while sinfo(env) != "idle":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node is not idle after 60 s ({sinfo(env)!r}); see {folder}/slurmd.log")
            time.sleep(1)
        yield env
    finally:
        if len(procs) > 1:
            subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True)
            deadline = time.monotonic() + 60
            while squeue(env) and time.monotonic() < deadline:
                time.sleep(1)
        for proc in reversed(procs):
            stop(proc)


def sinfo(env) -> str:
    r = subprocess.run(["sinfo", "-h", "-p", "cpu", "-o", "%T"], env=env, capture_output=True, text=True)
    return r.stdout.strip()


def squeue(env) -> list[str]:
    r = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True)
    return r.stdout.split()


def completed_jobs(folder: Path) -> dict[str, dict]:
    """SLURM job id -> its record (JobState, Partition, ProcCnt, Tres, ...) of jobcomp/filetxt."""
    path = folder / "jobs.txt"
    records = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        records[fields["JobId"]] = fields
    return records


def snakemake(work: Path, *args, env, config: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work), *args,
           "--config", f"root={work / 'data'}", f"runs={work / 'runs'}", *config]
    start = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        queue = subprocess.run(["squeue", "-o", "%i %j %P %T %r"], env=env, capture_output=True, text=True).stdout
        out = "".join(x.decode() if isinstance(x, bytes) else x for x in (e.stdout, e.stderr) if x)
        raise Failed(f"snakemake did not finish in {timeout:.0f} s; the queue:\n{queue}", out) from None
    return r, time.perf_counter() - start


class Failed(Exception):
    def __init__(self, what: str, output: str = ""):
        super().__init__(what + (f"\n--- output (end) ---\n{output[-6000:]}" if output else ""))


def check(ok: bool, what: str, output: str = "") -> None:
    if not ok:
        raise Failed(what, output)


def submitted(output: str) -> dict[str, str]:
    """SLURM job id -> rule, from the plugin's 'has been submitted' lines."""
    return {jobid: rule for jobid, rule in re.findall(
        r"has been submitted with SLURM jobid (\d+) \(log: .*?/rule_(\w+)/", output)}


def rules_run(output: str) -> list[str]:
    return re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):$", output, re.M)


def scores(path: Path) -> dict:
    """eval.json without its checkpoint entries: the checkpoint records the data root, which
    differs between the two runs."""
    return {k: {m: v for m, v in res.items() if m != "checkpoint"} if isinstance(res, dict) else res
            for k, res in json.loads(path.read_text()).items()}


def digests(root: Path) -> dict[str, str]:
    """sha256 of every shard file of the demo's folder, by path relative to it."""
    folder = root / "demo"
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".h5", ".parquet")}


def config_value(key: str, config: list[str]):
    import yaml

    given = dict(item.split("=", 1) for item in config)
    return yaml.safe_load(given[key]) if key in given else \
        yaml.safe_load((REPO / "config" / "config.yaml").read_text())[key]


def run(work: Path, config: list[str], local: bool, timeout: float, cpus: int = 2) -> dict:
    """The demo through SLURM in ``work`` (and with --cores when ``local``); the checks; the
    figures."""
    install()
    figures = {}
    with one_node_cluster(work / "cluster", cpus) as slurm_env:
        env = dict(slurm_env, OMP_NUM_THREADS="1")
        r, seconds = snakemake(work / "slurm", "--profile", str(REPO / "profiles" / "slurm"), "demo",
                               env=env, config=config, timeout=timeout)
        out = r.stdout + r.stderr
        check(r.returncode == 0, f"the demo through SLURM failed (exit {r.returncode})", out)
        jobs = submitted(out)
        done = completed_jobs(work / "cluster")
        ran = rules_run(out)
        check(bool(jobs) and sorted(jobs.values()) == sorted(x for x in ran if x != "demo"),
              f"jobs not submitted through sbatch: ran {sorted(ran)}, submitted {sorted(jobs.values())}", out)
        mem = config_value("demo_mem_mb", config)
        for jobid, rule in jobs.items():
            rec = done.get(jobid, {})
            check(rec.get("JobState") == "COMPLETED", f"SLURM job {jobid} ({rule}): {rec or 'no record'}")
            check((rec["Partition"], rec["ProcCnt"]) == ("cpu", "1") and f"mem={mem}M" in rec["Tres"],
                  f"SLURM job {jobid} ({rule}) ran on {rec['Partition']} with {rec['ProcCnt']} CPU(s), "
                  f"{rec['Tres']}; wanted cpu, 1 CPU, mem={mem}M")
        report = work / "slurm" / "runs" / f"demo-{config_value('demo_model', config)}" / "report.html"
        check(f"-> {report}" in out, f"the report's path {report} is not printed", out)
        figures.update(jobs=len(jobs), slurm_s=seconds, rules=sorted(jobs.values()))

        again, seconds = snakemake(work / "slurm", "--profile", str(REPO / "profiles" / "slurm"), "demo",
                                   env=env, config=config, timeout=timeout)
        out = again.stdout + again.stderr
        check(again.returncode == 0 and "Nothing to be done" in out and not submitted(out),
              "the second call was not a no-op", out)
        figures["rerun_s"] = seconds
    check(not daemons_left(work / "cluster"), "a daemon of the cluster is still running")

    verify = subprocess.run([sys.executable, "-m", "itmkit", "verify", str(work / "slurm" / "data" / "demo")],
                            capture_output=True, text=True, env=env)
    check(verify.returncode == 0, "itmkit verify failed", verify.stdout + verify.stderr)
    figures["verify"] = (verify.stdout + verify.stderr).strip().splitlines()[-1]

    if local:
        r, seconds = snakemake(work / "local", "--cores", str(cpus), "demo", env=env, config=config,
                               timeout=timeout)
        check(r.returncode == 0, "the local demo failed", r.stdout + r.stderr)
        figures["local_s"] = seconds
        name = f"demo-{config_value('demo_model', config)}"
        evals = [scores(work / w / "runs" / name / "eval.json") for w in ("slurm", "local")]
        check(evals[0] == evals[1], f"the scores differ between the SLURM and the local run: {evals}")
        shards = [digests(work / w / "data") for w in ("slurm", "local")]
        figures["differ"] = sorted(p for p in shards[0] if shards[1].get(p) != shards[0][p])
        figures["files"] = len(shards[0])
        check(not [p for p in figures["differ"] if p.endswith(".h5") or "/graphs/" in p],
              f"feature or graph shards differ: {figures['differ']}")
    return figures


def daemons_left(folder: Path) -> bool:
    """Any daemon of the cluster still running (looked up by its pid file)."""
    for name in ("slurmctld", "slurmd", "munged"):
        pid = folder / f"{name}.pid"
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pid.read_text().split()[0]), 0)
            return True
    return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local", action="store_true", help="also run the demo with --cores 2 and compare")
    p.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE", help="demo settings (--config of snakemake)")
    p.add_argument("--timeout", type=float, default=3600,
                   help="seconds a snakemake call may take before the run fails, showing the queue")
    p.add_argument("--dir", type=Path, default=None, help="work here (kept) instead of a temporary folder")
    args = p.parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="itmkit-slurm-")))
        load = os.getloadavg()[0]
        try:
            figures = run(work.resolve(), args.config, args.local, args.timeout)
        except Failed as e:
            print(f"slurm: FAILED: {e}", file=sys.stderr)
            return 1
    print(f"slurm: {figures['jobs']} jobs through sbatch ({', '.join(figures['rules'])}), all COMPLETED on "
          f"partition cpu; the demo in {figures['slurm_s']:.0f} s; the second call a no-op in "
          f"{figures['rerun_s']:.0f} s; {figures['verify']}")
    if "local_s" in figures:
        print(f"local: the same demo with --cores 2 in {figures['local_s']:.0f} s; the same scores (eval.json); "
              f"{figures['files'] - len(figures['differ'])} of {figures['files']} files of the dataset folder "
              f"byte-identical (not: {', '.join(figures['differ']) or 'none'}, which hold the data root)")
    print(f"load {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run the clean-up on a kill too
    sys.exit(main())
