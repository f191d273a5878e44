"""The package as a wheel: it carries every module and what the code reads (the manifests and
their schema, the label names), and a non-editable install ingests a dataset from another working directory."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NOT_SHIPPED = {"tests", "benchmarks"}   # folders of the checkout that hold Python code but are not packages


def run(cmd, **kw):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # nothing from the checkout
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=300, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the checkout's files (the build writes build/ and *.egg-info
    next to the sources, which must not land in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=False)
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    src = tmp / "src"
    for name in files.stdout.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    r = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src])
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = (tmp / "dist").glob("itmkit-*.whl")
    return whl


def test_wheel_carries_every_module_and_the_manifests(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in ROOT.glob("*/**/*.py")
               if p.relative_to(ROOT).parts[0] not in NOT_SHIPPED and (ROOT / p.relative_to(ROOT).parts[0] / "__init__.py").exists()}
    assert modules and modules <= names, f"not in the wheel: {sorted(modules - names)} (list the package in pyproject.toml)"
    manifests = {f"pipeline/manifests/{p.name}" for p in (ROOT / "manifests").glob("*.yaml")}
    assert "pipeline/manifests/schema.yaml" in manifests and manifests <= names, sorted(manifests - names)
    assert {f"pipeline/rules/{p.name}" for p in (ROOT / "pipeline" / "rules").glob("*.smk")} <= names
    labels = {f"pipeline/data/genome/{p.name}" for p in (ROOT / "pipeline" / "data" / "genome").iterdir()}
    assert "pipeline/data/genome/objects_vocab.txt" in labels and labels <= names, sorted(labels - names)
    assert "training/serve.html" in names   # itmkit serve's page


@pytest.mark.slow  # a venv, an install and three CLI runs: over 10 s on a loaded machine
def test_installed_wheel_ingests_from_another_directory(wheel, tmp_path):
    # a fresh environment that reuses the test interpreter's dependencies, with the wheel installed
    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", "--without-pip", venv]).returncode == 0
    python = venv / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel])
    assert r.returncode == 0, r.stdout + r.stderr

    work = tmp_path / "elsewhere"   # no manifests/, config/ or code of the checkout here
    photos = work / "mine" / "photos"
    photos.mkdir(parents=True)
    for i, name in enumerate(("a.png", "b.png")):
        Image.new("RGB", (12, 8), (40 * i, 90, 200)).save(photos / name)
    (work / "mine" / "captions.csv").write_text("file,caption,split\n" + "".join(
        f'{name},"photo {name} caption {k}",{split}\n' for name, split in (("a.png", "train"), ("b.png", "test"))
        for k in range(5)))
    (work / "mine.yaml").write_text(json.dumps({"name": "mine", "format": "folder", "source_root": "mine",
                                                "images": "photos", "annotations": "captions.csv"}))
    r = run([venv / "bin" / "itmkit", "ingest", "--manifest", "mine.yaml", "--root", "data", "--quiet"], cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "wrote 2 images (1 train / 0 val / 1 test) and 10 captions" in r.stdout
    assert (work / "data" / "mine" / "images.parquet").exists()

    # a shipped manifest, by name and by its checkout path; the code is the wheel's, not the checkout's
    (work / "f30k" / "images").mkdir(parents=True)
    Image.new("RGB", (12, 8)).save(work / "f30k" / "images" / "1.jpg")
    (work / "f30k" / "dataset_flickr30k.json").write_text(json.dumps({"images": [
        {"filename": "1.jpg", "imgid": 1, "split": "train",
         "sentences": [{"raw": f"a photo {k}", "sentid": k} for k in range(5)]}]}))
    for manifest in ("f30k", "manifests/f30k.yaml"):   # and the earlier spelling
        r = run([python, "-m", "itmkit", "ingest", "--manifest", manifest, "--source-root", "f30k",
                 "--root", "data", "--set", "expected=null", "--force", "--quiet"], cwd=work)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "wrote 1 images" in r.stdout
    r = run([python, "-c", "import pipeline.manifest as m; print(m.MANIFEST_DIR)"], cwd=work)
    assert Path(r.stdout.strip()) == Path(site) / "pipeline" / "manifests", r.stdout + r.stderr
    r = run([python, "-c", "from pipeline.labels import LabelNames as L; print(L.for_extractor(None).region(0, 4))"],
            cwd=work)
    assert r.stdout.strip() == "red yolk", r.stdout + r.stderr   # the label names are package data
