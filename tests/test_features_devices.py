"""GPU choice for jobs that share a machine (`--gpu-locks`), on CPU with a fake device list:
jobs started at once get different GPUs, a fifth waits for one to be freed, a killed holder
frees its GPU."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from features.devices import held_gpu, lock_path
from test_features_extract import extract, make_dataset

REPO = Path(__file__).resolve().parents[1]
FAKE = ["GPU-fake-0", "GPU-fake-1", "GPU-fake-2", "GPU-fake-3"]
# a job: takes a GPU, says which, and holds it until its stdin closes
JOB = ("import sys; from features.devices import held_gpu\n"
       "with held_gpu(sys.argv[2].split(','), sys.argv[1], poll_s=0.05) as i:\n"
       "    print(i, flush=True); sys.stdin.read()\n")


def start(lock_dir):
    return subprocess.Popen([sys.executable, "-c", JOB, str(lock_dir), ",".join(FAKE)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_four_jobs_get_four_gpus_a_fifth_waits(tmp_path):
    jobs = [start(tmp_path) for _ in range(4)]
    try:
        got = [int(j.stdout.readline()) for j in jobs]
        assert sorted(got) == [0, 1, 2, 3]
        for uuid, j in zip([FAKE[i] for i in got], jobs):
            assert lock_path(tmp_path, uuid).read_text().split()[1] == str(j.pid)   # who holds it
        with held_gpu(FAKE, tmp_path, wait=False) as none:
            assert none is None
        fifth = start(tmp_path)
        assert "all 4 GPU(s) are taken" in fifth.stderr.readline()   # it waits...
        jobs[2].send_signal(signal.SIGKILL)   # ...until a job ends, even a killed one
        jobs[2].wait()
        assert int(fifth.stdout.readline()) == got[2]
        _stop(fifth)
    finally:
        for j in jobs:
            _stop(j)


def test_a_lone_job_takes_the_first_gpu_and_frees_it(tmp_path):
    with held_gpu(FAKE, tmp_path) as i:
        assert i == 0
        with held_gpu(FAKE, tmp_path) as j:
            assert j == 1
    with held_gpu(FAKE, tmp_path) as i:
        assert i == 0


def _stop(p) -> str:
    if p.poll() is None:
        p.stdin.close()
    p.wait(timeout=30)
    return p.stderr.read()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_locks_without_a_gpu_is_one_line(tmp_path, capsys):
    layout, _ = make_dataset(tmp_path)
    rc, _ = extract(layout, "--device", "cuda", "--gpu-locks", str(tmp_path / "locks"))
    assert rc == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "features extract: error: --gpu-locks: no CUDA device is visible to this process"
