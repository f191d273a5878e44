"""The workflow on a real one-node SLURM cluster (benchmarks/slurm.py): the demo through
profiles/slurm, every job through sbatch on the cpu partition at the config's size, the
report's path printed, a no-op second call, `itmkit verify` clean, nothing left running."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the workflow tests' tiny demo: 12 images, one shard per split, one epoch
TINY_DEMO = ["demo_images=12", "demo_image_size=96", "demo_min_size=96", "demo_max_size=96",
             "demo_batch_size=4", "demo_epochs=1"]


def daemons() -> set[int]:
    r = subprocess.run(["pgrep", "-x", "munged|slurmctld|slurmd|slurmstepd"], capture_output=True, text=True)
    return {int(pid) for pid in r.stdout.split()}


@pytest.mark.slow
def test_demo_through_slurm(tmp_path):
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("needs snakemake-executor-plugin-slurm (pip install -e '.[slurm]')")
    if not shutil.which("slurmctld") and (os.geteuid() != 0 or not shutil.which("apt-get")):
        pytest.skip("needs slurm-wlm and munge, or root and apt-get to install them")
    before = daemons()
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "slurm.py"), "--dir", str(tmp_path),
                        "--timeout", "1500", "--config", *TINY_DEMO], capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert "jobs through sbatch" in r.stdout and "no-op" in r.stdout
    assert daemons() <= before, "the cluster's daemons are still running"
