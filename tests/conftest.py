"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: with small models and shared cores it is much
    faster than several threads spinning against each other. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = ["--set", "embed_dim=32", "--set", "word_dim=16", "--batch-size", "20", "--workers", "0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(data root, run folder): a 1-epoch vsepp run of embedding size 32 on a synthetic dataset
    of 24 train / 8 val / 8 test images."""
    from training import train
    from training.synthetic import make_dataset
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, splits={"train": 24, "val": 8, "test": 8})
    out = root / "run"
    assert train.main(["--model", "vsepp", "--dataset", "synth", "--root", str(root), "--out", str(out),
                       "--epochs", "1", *TINY]) == 0
    return root, out
