"""docs/design.md's statements about the structure, each checked: the import direction, the
workflow calling only commands, a model or an annotation format added in one place, and the
names the page gives existing. A change that makes a statement false fails here."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from itmkit.cli import COMMANDS
from itmkit.cli import main as itmkit

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "features", "training", "itmkit")
DESIGN = (ROOT / "docs" / "design.md").read_text()

pytestmark = pytest.mark.usefixtures("one_thread")


def imports(package: str):
    """(file, imported module, at module level?) for every absolute import of a package's files."""
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                yield path.relative_to(ROOT).as_posix(), name, id(node) in top


def test_each_part_imports_only_the_parts_below_it():
    """pipeline imports neither features nor training; they import pipeline but not each other,
    but for the extractor imported inside the query module's function for an image-file query; nothing
    below itmkit imports it, not even in a function or an `if __name__ == "__main__"` block."""
    below = {"pipeline": set(), "features": {"pipeline"}, "training": {"pipeline"}}
    wrong = []
    for package, allowed in below.items():
        for file, name, top in imports(package):
            other = name.split(".")[0]
            if other in PACKAGES and other != package and other not in allowed:
                if (file, other, top) == ("training/queries.py", "features", False):
                    continue
                wrong.append(f"{file} imports {name}")
    assert not wrong, wrong


def test_itmkit_imports_a_commands_module_only_when_it_runs():
    commands = {module for module, _ in COMMANDS.values()}
    top = [name for file, name, top in imports("itmkit") if top]
    assert not [name for name in top if name in commands or name.split(".")[0] in ("features", "training")], top


def test_the_shards_modules_import_each_other_one_way():
    """layout (paths, names) uses the index; the index never imports layout back."""
    graph = {}
    for file, name, _ in imports("pipeline"):
        if file.startswith("pipeline/shards/") and name.startswith("pipeline.shards."):
            graph.setdefault(Path(file).stem, set()).add(name.rsplit(".", 1)[1])

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, (*seen, n))) for n in graph.get(a, ()))
    cycles = sorted(m for m in graph if reaches(m, m))
    assert not cycles, cycles


# ---------------------------------------------------------------------------------------------
# the workflow calls the commands

RULES = sorted((ROOT / "pipeline" / "rules").glob("*.smk")) + [ROOT / "Snakefile"]


def shell_strings(text: str) -> list[str]:
    """The first string of each `shell:` block (a name, such as EXTRACT, is looked up)."""
    out = []
    for block in re.findall(r"^    shell:\n((?:        .*\n?)+)", text, re.M):
        first = block.strip().splitlines()[0].strip()
        out.append(first)
    return out


def test_the_rules_run_itmkit_commands_and_import_no_library_code():
    """Every job's shell line starts with `{ITMKIT:q} COMMAND`, COMMAND one of itmkit's; no
    rule names an earlier spelling (`python -m pipeline`, `training/*.py`) or imports training
    or features code. The rules read the store's names (Layout), the manifests and the config
    check from pipeline to build the DAG, and nothing else."""
    constants = {}
    text = {p.name: p.read_text() for p in RULES}
    for body in text.values():
        for name, value in re.findall(r'^([A-Z_]+) = \(?("\{ITMKIT:q\}[^"]*")', body, re.M):
            constants[name] = value
    shells = []
    for name, body in text.items():
        assert not re.search(r"-m (pipeline|features|training)\b|training/\w+\.py|\{PY\b", body), name
        for line in re.findall(r"^\s*(?:from|import) ([\w.]+)", body, re.M):
            assert line.split(".")[0] not in ("training", "features", "itmkit"), (name, line)
        shells += [(name, constants.get(s, s)) for s in shell_strings(body)]
    assert len(shells) >= 10
    for name, line in shells:
        m = re.match(r'"\{ITMKIT:q\} ([\w-]+) ', line)
        assert m and m.group(1) in COMMANDS, (name, line)


@pytest.mark.parametrize("old, argv, command", [
    ("python -m pipeline", ["-m", "pipeline", "verify", "data/demo"], "itmkit verify data/demo"),
    ("python -m features", ["-m", "features", "extract", "--dataset", "demo"], "itmkit extract --dataset demo"),
])
def test_an_earlier_dispatcher_says_what_to_run_instead(old, argv, command):
    """`python -m pipeline` ran every command, which pipeline cannot without importing what sits
    above it; it names the command to run. (`python training/train.py` and the other scripts of
    training/ still run their own command, as torchrun starts them: tests/test_project.py.)"""
    import subprocess
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"{old} is no longer a command; run: {command}\n"


# ---------------------------------------------------------------------------------------------
# a model is one file; an annotation format is one reader

MODEL = '''
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from training.models import ITMModel, ModelConfig, register
from training.models.layers import masked_mean


@dataclass
class BagConfig(ModelConfig):
    embed_dim: int = 16


@register("bag")
class Bag(ITMModel):
    """Mean of the regions and mean of the words, each projected: nothing but the interface."""
    config_class = BagConfig

    def __init__(self, cfg, vocab):
        super().__init__(cfg, vocab)
        self.img = nn.Linear(cfg.feature_dim, cfg.embed_dim)
        self.embed = nn.Embedding(len(vocab), cfg.embed_dim, padding_idx=0)

    def encode_image(self, img):
        return F.normalize(self.img(masked_mean(self.regions(img), img.region_mask)), dim=-1)

    def encode_text(self, txt):
        return F.normalize(masked_mean(self.embed(txt.tokens), txt.mask), dim=-1)
'''


def test_a_sixth_model_is_one_file(tmp_path, monkeypatch, capsys):
    """A model file put beside the others (here: on the package's path) is a --model choice that
    trains, evaluates and reports, with no list edited anywhere."""
    from training import models
    from training.synthetic import make_dataset

    (tmp_path / "bagmodel.py").write_text(MODEL)
    monkeypatch.setattr(models, "__path__", [*models.__path__, str(tmp_path)])
    try:
        root = tmp_path / "data"
        make_dataset(root, splits={"train": 20, "val": 6, "test": 6})
        run = tmp_path / "runs" / "bag"
        assert itmkit(["train", "--model", "bag", "--dataset", "synth", "--root", root, "--out", run,
                       "--epochs", "1", "--batch-size", "10", "--workers", "0", "--quiet"]) == 0
        assert itmkit(["evaluate", run, "--workers", "0", "--quiet"]) == 0
        assert "f30k-1k (test, 6 images)" in capsys.readouterr().out
        assert itmkit(["report", run, "--workers", "0", "--device", "cpu"]) == 0
        assert "bag on synth" in (run / "report.html").read_text()
    finally:
        monkeypatch.undo()
        models._REGISTRY.pop("bag", None)
        sys.modules.pop("training.models.bagmodel", None)


def test_a_new_annotation_format_is_one_reader(tmp_path, monkeypatch, capsys):
    """A reader registered under a new name is a format the manifest schema accepts and ingest
    reads; a name no reader has is refused in one line listing the known ones."""
    from pipeline import ingest, manifest, shards

    def read_lines(m, report):   # "file<TAB>split<TAB>caption" per line
        sources = {}
        for n, line in enumerate(m.annotation_files()[0]["file"].read_text().splitlines(), 1):
            file, split, text = line.split("\t")
            src = sources.setdefault(file, ingest.Source(len(sources) + 1, m.images_dir / file, split, f"line {n}"))
            src.captions.append(ingest.Caption(n, text, f"line {n}"))
        return list(sources.values())
    monkeypatch.setitem(ingest.READERS, "lines", read_lines)

    lines = [f"{i}.jpg\t{split}\ta photo number {i} caption {j}"
             for i, split in enumerate(["train"] * 3 + ["val", "test"]) for j in range(5)]
    (tmp_path / "captions.tsv").write_text("\n".join(lines) + "\n")
    path = tmp_path / "mine.yaml"
    path.write_text(f"name: mine\nformat: lines\nsource_root: {tmp_path}\nimages: images\n"
                    "annotations: captions.tsv\n")
    assert itmkit(["ingest", "--manifest", path, "--root", tmp_path / "data", "--without-images",
                   "--quiet"]) == 0
    images = shards.read_table(shards.Layout(tmp_path / "data", "mine").images, "images").to_pylist()
    assert [r["split"] for r in images] == ["train"] * 3 + ["val", "test"]

    path.write_text(path.read_text().replace("format: lines", "format: nosuch"))
    manifest.load(path)   # the schema takes any name; ingest knows the readers
    assert itmkit(["ingest", "--manifest", path, "--root", tmp_path / "data", "--without-images"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no reader of format 'nosuch'" in err
    assert "known: coco, demo, folder, karpathy, lines" in err


# ---------------------------------------------------------------------------------------------
# the names the page gives

def test_the_files_and_names_the_design_page_gives_exist():
    """Every `path/file.py`, `package.module.name` and `Class.method` the page names in backticks
    is there."""
    import importlib

    from pipeline import shards
    missing = []
    for name in sorted(set(re.findall(r"`([\w./-]+\.(?:py|smk|yaml|json|md))`", DESIGN))):
        if "/" in name and not (ROOT / name).exists() and not (ROOT / "docs" / name).exists():
            missing.append(name)
    for dotted in sorted(set(re.findall(r"`((?:training|pipeline|features)(?:\.\w+)+)`", DESIGN))):
        module, _, attr = dotted.rpartition(".")
        try:
            if not hasattr(importlib.import_module(module), attr):
                importlib.import_module(dotted)
        except ImportError:
            missing.append(dotted)
    for cls, attr in set(re.findall(r"`(Layout|ShardIndex)\.(\w+)`", DESIGN)):
        if not hasattr(getattr(shards, cls), attr):
            missing.append(f"{cls}.{attr}")
    store = [importlib.import_module(f"pipeline.shards.{p.stem}") for p in (ROOT / "pipeline" / "shards").glob("*.py")]
    for name in re.findall(r"`(\w+)`", DESIGN.split("## Contract 1")[1].split("## Contract 2")[0]):
        if name.islower() and "_" in name and not any(hasattr(m, name) for m in store):
            missing.append(name)
    assert not missing, missing
