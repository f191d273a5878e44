"""benchmarks/gpu.py, the GPU check: one line and exit 0 without a CUDA device; every part runs
at tiny sizes on a CPU (slow) and on a GPU (-m gpu)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu.py"
MODELS = ("cimn", "dsrln", "kidrr", "resg", "vsepp")


def run(*args, env=None, timeout=1800):
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)


def test_without_a_gpu_it_says_so_in_one_line():
    r = run(env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and "no CUDA device" in r.stdout and "nothing measured" in r.stdout


def every_part_ran(out: str) -> None:
    for title in ("1. extraction images/s", "2. AMP against float32", "3. training samples/s", "4. scoring",
                  "CIMN against the fastest cross-attention model"):
        assert f"## {title}" in out, out
    rows = re.findall(r"^(both, 1 pass|regions|grid)\s+(\d)\s+(on|off)\s+(-|all)\s+([\d.]+)$", out, re.M)
    assert {r[0] for r in rows} == {"both, 1 pass", "regions", "grid"} and all(float(r[4]) > 0 for r in rows)
    assert any(r[3] == "all" for r in rows)
    assert re.search(r"max relative difference \(L2 per region\) [\d.]+", out)
    for name in MODELS:
        assert re.search(rf"^  {name}\s+\(.*\) batch \d+:\s+[\d.]+ samples/s", out, re.M), name
        assert re.search(rf"^  {name}\s+\(.*\): \d+ x \d+ in [\d.]+ s", out, re.M), name
    assert re.search(r"cimn [\d.]+ s vs \w+ [\d.]+ s", out)


@pytest.mark.slow
def test_every_part_runs_at_tiny_sizes_on_cpu():
    r = run("--device", "cpu", "--tiny")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TINY sizes" in r.stdout
    every_part_ran(r.stdout)


@pytest.mark.gpu
def test_every_part_runs_at_tiny_sizes_on_cuda():
    r = run("--device", "cuda", "--tiny")
    assert r.returncode == 0, r.stderr[-3000:]
    every_part_ran(r.stdout)
