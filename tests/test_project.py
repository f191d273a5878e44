"""The project's entry points: README set-up commands that CI runs, and the --help of `itmkit` and of
the training scripts (`python -m pipeline`: tests/test_design.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def readme_command(n: int) -> str:
    out = subprocess.run(["bash", "-c", f'source <(sed -n "/^readme_command()/p" .ci/run); readme_command {n}'],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    return out


def test_ci_runs_the_readme_commands():
    install, tests = readme_command(1), readme_command(2)
    assert "pip install" in install and "-e '.[dev]'" in install
    assert "torch==" in install and "torchvision==" in install
    assert "pytest" in tests
    readme = (ROOT / "README.md").read_text()
    assert install in readme and tests in readme


@pytest.mark.parametrize("cmd", [
    [sys.executable, "-m", "itmkit", "--help"],
    [str(Path(sys.executable).with_name("itmkit")), "--help"],
    [sys.executable, "training/train.py", "--help"],
])
def test_cli_help(cmd):
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_torchvision_ops_run():
    from torchvision.ops import nms, roi_align
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
    assert roi_align(torch.rand(1, 3, 16, 16), [boxes], 7).shape == (3, 3, 7, 7)


def test_every_test_named_in_the_reliability_guarantees_exists():
    """docs/reliability.md backs each guarantee with a test; a renamed or deleted test must not
    leave a guarantee pointing at nothing."""
    import re
    text = (ROOT / "docs" / "reliability.md").read_text()
    named, current = [], None
    for path, short in re.findall(r"`(tests/[\w/]+\.py)?::(\w+)`", text):   # `::name`: the file before
        current = path or current
        named.append((current, short))
    assert len(named) > 20
    missing = [f"{f}::{t}" for f, t in named if not re.search(rf"^def {t}\(", (ROOT / f).read_text(), re.M)]
    assert not missing, missing
