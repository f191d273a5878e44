"""Dataset ingest on small fixtures: Karpathy COCO and F30K layouts, official COCO captions files,
a generic folder with CSV/JSONL captions, bad input, manifests and cache reuse."""

import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from pipeline import manifest as manifests
from pipeline import shards
from itmkit.cli import main as cli
from pipeline.ingest import IngestError, ingest, stable_id
from pipeline.manifest import ManifestError
from pipeline.shards import Layout


def write_image(path: Path, size=(12, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 30, 200)).save(path)


def sentences(start, n=5, text="a dog on a mat"):
    return [{"raw": f"{text} {k}", "tokens": [], "sentid": start + k, "imgid": 0} for k in range(n)]


# Karpathy order on purpose interleaves splits; restval must become train
COCO_SPLITS = ["train", "restval", "val", "test", "test", "train"]


@pytest.fixture
def coco_src(tmp_path):
    src = tmp_path / "coco"
    entries = []
    for i, split in enumerate(COCO_SPLITS):
        folder = "train2014" if split in ("train", "restval") else "val2014"
        name = f"COCO_{folder}_{1000 + i:012d}.jpg"
        write_image(src / "images" / folder / name, size=(10 + i, 7))
        entries.append({"filepath": folder, "filename": name, "imgid": i, "split": split,
                        "cocoid": 1000 + i, "sentids": [], "sentences": sentences(100 * i, 6 if i == 2 else 5)})
    (src / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return src


@pytest.fixture
def f30k_src(tmp_path):
    src = tmp_path / "f30k"
    entries = []
    for i, split in enumerate(["train", "train", "train", "val", "test", "test"]):
        name = f"{36979 + i}.jpg"
        write_image(src / "images" / name)
        entries.append({"filename": name, "imgid": i, "split": split, "sentids": [],
                        "sentences": sentences(5 * i)})
    (src / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return src


def rows(root, name, kind):
    return shards.read_table(getattr(Layout(root, name), kind), kind).to_pylist()


def test_karpathy_coco_layout(coco_src, tmp_path, capsys):
    root = tmp_path / "data"
    assert cli(["ingest", "--manifest", "manifests/coco.yaml", "--root", str(root),
                "--source-root", str(coco_src), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "wrote 6 images (3 train / 1 val / 2 test) and 31 captions" in out
    assert "counts differ from the manifest: images 6 != expected 123,287" in out
    assert "test 2 is not 5 folds of 1,000" in out
    images = rows(root, "coco", "images")
    # splits grouped train, val, test; Karpathy file order kept inside each split
    assert [(r["image_id"], r["split"]) for r in images] == [
        (1000, "train"), (1001, "train"), (1005, "train"), (1002, "val"), (1003, "test"), (1004, "test")]
    for r in images:
        assert Path(r["path"]).is_absolute() and Path(r["path"]).exists()
        assert (r["width"], r["height"]) == (10 + r["image_id"] - 1000, 7)
    caps = rows(root, "coco", "captions")
    assert len(caps) == 31 and len({c["caption_id"] for c in caps}) == 31
    assert [c["caption_id"] for c in caps if c["image_id"] == 1002] == list(range(200, 206))
    assert {c["split"] for c in caps if c["image_id"] == 1001} == {"train"}
    index = Layout(root, "coco").index
    assert [e.rows for e in index.entries("images")] == [6]
    assert [e.rows for e in index.entries("captions")] == [31]
    assert index.verify() == []


def test_karpathy_f30k_counts_match_and_overrides(f30k_src, tmp_path, capsys):
    root = tmp_path / "data"
    args = ["ingest", "--manifest", "f30k", "--root", str(root), "--quiet",
            "--images-dir", str(f30k_src / "images"), "--annotations", str(f30k_src / "dataset_flickr30k.json"),
            "--set", "expected={images: 6, splits: {train: 3, val: 1, test: 2}}"]
    assert cli(args) == 0
    assert "counts match the manifest" in capsys.readouterr().out
    assert [r["image_id"] for r in rows(root, "f30k", "images")] == [0, 1, 2, 3, 4, 5]
    # image ids from the file name number instead of imgid
    assert cli(args + ["--set", "image_id=filename", "--name", "f30k_byname"]) == 0
    assert [r["image_id"] for r in rows(root, "f30k_byname", "images")] == list(range(36979, 36985))
    # a wrong count fails under --strict, before anything is written
    assert cli(args + ["--set", "expected.splits.test=1000", "--strict", "--name", "f30k_strict"]) == 1
    assert "test 2 != expected 1,000" in capsys.readouterr().err
    assert not Layout(root, "f30k_strict").dir.exists()


def test_bad_input_is_skipped_with_file_and_row(coco_src, tmp_path, capsys):
    ann = coco_src / "dataset_coco.json"
    data = json.loads(ann.read_text())
    s0 = data["images"][0]["sentences"]
    s0[0]["raw"], s0[1]["raw"] = "", "   \t "                      # empty, whitespace-only
    s0[2]["raw"] = " ".join(["word"] * 10_000)                       # 10,000 tokens
    data["images"][1]["sentences"][0]["sentid"] = 102                # duplicate caption id (image 1 has 100..104)
    data["images"][1]["sentences"][1]["sentid"] = 3                  # duplicate of image 0's sentid 3
    data["images"].append(dict(data["images"][5]))                   # duplicate image id 1005
    data["images"][3]["filename"] = "COCO_val2014_gone.jpg"          # missing on disk
    blob = json.dumps(data).replace('"a dog on a mat 4"', '"a dog \\u00e9 MARK"', 1).encode()
    blob = blob.replace("\\u00e9 MARK".encode(), b"\xff\xfe MARK")    # bytes that are not UTF-8
    ann.write_bytes(blob)
    root = tmp_path / "data"
    assert cli(["ingest", "--manifest", "coco", "--root", str(root), "--source-root", str(coco_src),
                "--set", "expected=null", "--quiet"]) == 0
    err, out = capsys.readouterr()[::-1]
    assert "dataset_coco.json images[0].sentences[0] (sentid 0): caption is empty or whitespace-only" in err
    assert "images[0].sentences[1] (sentid 1): caption is empty or whitespace-only" in err
    assert "images[0].sentences[2] (sentid 2): caption has 10,000 tokens" in err
    assert "images[0].sentences[4] (sentid 4): caption is not valid UTF-8" in err
    assert "images[1].sentences[1] (sentid 3): caption id 3 already used by" in err
    assert "images[6] (COCO_train2014_000000001005.jpg): image id 1005 already used by" in err
    assert "images[3] (COCO_val2014_gone.jpg): image file" in err and "not found" in err
    # image 0 kept 1 of 5 captions and image 1 kept 3: both are left out (min_captions 5)
    assert "image 1000 has 1 valid caption(s)" in err
    assert "images[1].sentences[2] (sentid 102): caption id 102 already used by" in err
    for expect in ("3 duplicate id", "2 empty caption", "1 missing image", "1 not UTF-8",
                   "1 too long", "2 too few captions"):
        assert expect in out, out
    report = (root / "coco" / "ingest-report.txt").read_text()
    assert report.count("\n") == 10
    images = rows(root, "coco", "images")
    assert [r["image_id"] for r in images] == [1005, 1002, 1004]
    assert len(rows(root, "coco", "captions")) == 5 + 6 + 5

    # --strict fails on the first problem, leaving the earlier outputs as they were
    before = (root / "coco" / "images.parquet").read_bytes()
    assert cli(["ingest", "--manifest", "coco", "--root", str(root), "--source-root", str(coco_src),
                "--set", "expected=null", "--set", "max_tokens=100", "--strict", "--quiet"]) == 1
    assert "--strict: nothing written" in capsys.readouterr().err
    assert (root / "coco" / "images.parquet").read_bytes() == before


def test_unreadable_annotations_fail_with_the_file_named(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "dataset_coco.json").write_text('{"images": [')
    assert cli(["ingest", "--manifest", "coco", "--root", str(tmp_path / "d"), "--source-root", str(src)]) == 1
    assert "dataset_coco.json: not valid JSON (line 1" in capsys.readouterr().err
    (src / "dataset_coco.json").write_text('{"dataset": "coco"}')
    assert cli(["ingest", "--manifest", "coco", "--root", str(tmp_path / "d"), "--source-root", str(src)]) == 1
    assert "not a Karpathy split file" in capsys.readouterr().err


def test_official_coco_captions_files(tmp_path):
    src = tmp_path / "coco"
    for split, folder, ids in (("train", "train2014", [9, 25]), ("val", "val2014", [42])):
        images = []
        for i in ids:
            name = f"COCO_{folder}_{i:012d}.jpg"
            write_image(src / "images" / folder / name)
            images.append({"id": i, "file_name": name, "width": 640, "height": 480})
        anns = [{"id": 10 * i + k, "image_id": i, "caption": f"A cat number {k}."} for i in ids for k in range(5)]
        anns.append({"id": 999 + ids[0], "image_id": 7777, "caption": "an orphan"})
        (src / "annotations").mkdir(parents=True, exist_ok=True)
        (src / "annotations" / f"captions_{folder}.json").write_text(
            json.dumps({"images": images, "annotations": anns[::-1]}))
    m = manifests.load("coco", source_root=str(src), sets=[
        "format=coco", "expected=null", "path_template='{filename}'",
        "annotations=[{file: annotations/captions_train2014.json, split: train, images: train2014},"
        " {file: annotations/captions_val2014.json, split: val, images: val2014}]"])
    r = ingest(m, tmp_path / "data", progress=False)
    assert r.split_counts == {"train": 2, "val": 1, "test": 0}
    assert r.problems == {"missing image": 2}, r.messages
    assert any("captions_train2014.json annotations[0]: annotation 1008 refers to image_id 7777"
               in msg for msg in r.messages)
    images = rows(tmp_path / "data", "coco", "images")
    assert [(x["image_id"], x["width"], x["height"]) for x in images] == [(9, 640, 480), (25, 640, 480), (42, 640, 480)]
    caps = rows(tmp_path / "data", "coco", "captions")
    assert [c["caption_id"] for c in caps if c["image_id"] == 25] == [250, 251, 252, 253, 254]


def folder_fixture(tmp_path, fmt):
    src = tmp_path / "mine"
    for name in ("a.png", "b.png", "sub/c.png", "d.png"):
        write_image(src / "photos" / name)
    lines = [(f, f"photo {f} caption {k}") for f in ("a.png", "b.png", "sub/c.png") for k in range(5)]
    if fmt == "csv":
        body = "file,caption\n" + "".join(f'{f},"{t}"\n' for f, t in lines)
        body += 'gone.png,"a missing photo"\n'
        data = body.encode() + b'd.png,"bad \xff bytes"\n'
        (src / "captions.csv").write_bytes(data)
        return src, "captions.csv"
    body = "".join(json.dumps({"file": f, "caption": t, "split": "test" if f == "b.png" else "train"}) + "\n"
                   for f, t in lines)
    (src / "captions.jsonl").write_text(body + "{broken\n")
    return src, "captions.jsonl"


def folder_manifest(tmp_path, src, ann, **extra):
    path = tmp_path / "mine.yaml"
    path.write_text(json.dumps({"name": "mine", "format": "folder", "source_root": str(src),
                                "images": "photos", "annotations": ann, **extra}))
    return path


def test_folder_csv_stable_ids_and_hashed_splits(tmp_path):
    src, ann = folder_fixture(tmp_path, "csv")
    m = manifests.load(folder_manifest(tmp_path, src, ann))
    r = ingest(m, tmp_path / "data", progress=False)
    assert r.images == 3 and r.captions == 15
    assert r.problems == {"missing image": 1, "not UTF-8": 1, "too few captions": 1}
    assert any(msg.startswith("captions.csv line 17 (gone.png): image file") for msg in r.messages)
    assert any(msg.startswith("captions.csv line 18: caption is not valid UTF-8") for msg in r.messages)
    images = rows(tmp_path / "data", "mine", "images")
    assert {x["image_id"] for x in images} == {stable_id("a.png"), stable_id("b.png"), stable_id("sub/c.png")}
    assert all(x["split"] in ("train", "val", "test") for x in images)
    # the same file keeps its id and split when the folder grows
    with open(src / "captions.csv", "a") as f:
        f.writelines(f'e.png,"new {k}"\n' for k in range(5))
    write_image(src / "photos" / "e.png")
    r2 = ingest(m, tmp_path / "data2", progress=False)
    again = {x["image_id"]: x["split"] for x in rows(tmp_path / "data2", "mine", "images")}
    assert r2.images == 4
    assert all(again[x["image_id"]] == x["split"] for x in images)


def test_folder_jsonl_with_split_column(tmp_path):
    src, ann = folder_fixture(tmp_path, "jsonl")
    m = manifests.load(folder_manifest(tmp_path, src, ann))
    r = ingest(m, tmp_path / "data", progress=False)
    assert r.split_counts == {"train": 2, "val": 0, "test": 1}
    assert r.problems == {"malformed entry": 1}
    assert "captions.jsonl line 16: not a JSON object" in r.messages[0]


def test_cache_reuse_and_config_change(f30k_src, tmp_path, capsys):
    root = tmp_path / "data"
    base = ["ingest", "--manifest", "f30k", "--root", str(root), "--source-root", str(f30k_src), "--quiet"]
    assert cli(base) == 0
    mtime = (root / "f30k" / "images.parquet").stat().st_mtime_ns
    capsys.readouterr()
    assert cli(base) == 0
    assert "up to date" in capsys.readouterr().out
    assert (root / "f30k" / "images.parquet").stat().st_mtime_ns == mtime
    assert cli(base + ["--set", "min_captions=4"]) == 0        # a config change reruns
    assert "wrote 6 images" in capsys.readouterr().out
    assert cli(base + ["--set", "max_tokens=3"]) == 1          # nothing would survive: nothing written
    assert "no image survived the checks; nothing written (30 too long, 6 too few captions)" in capsys.readouterr().err
    index = Layout(root, "f30k").index
    assert len(index.entries("captions")) == 1                 # replaced, never mixed
    ann = f30k_src / "dataset_flickr30k.json"
    ann.write_text(ann.read_text().replace("a dog", "one dog"))  # an input change reruns
    assert cli(base) == 0
    assert "wrote 6 images" in capsys.readouterr().out


def test_without_images_needs_only_the_annotations(f30k_src, tmp_path, capsys):
    import shutil
    shutil.rmtree(f30k_src / "images")
    root = tmp_path / "data"
    assert cli(["ingest", "--manifest", "f30k", "--root", str(root), "--source-root", str(f30k_src)]) == 1
    assert "image folder not found" in capsys.readouterr().err
    assert cli(["ingest", "--manifest", "f30k", "--root", str(root), "--source-root", str(f30k_src),
                "--without-images"]) == 0
    assert "images not checked" in capsys.readouterr().out
    assert {(r["width"], r["height"]) for r in rows(root, "f30k", "images")} == {(0, 0)}


def test_manifests_validate_and_name_the_field(tmp_path, monkeypatch):
    for name in ("coco", "f30k", "demo"):
        m = manifests.load(name)
        assert m.name == name
    coco = manifests.load("coco")
    assert coco["expected"] == {"images": 123287, "splits": {"train": 113287, "val": 5000, "test": 5000}}
    assert coco["splits"]["restval"] == "train" and coco["folds"] == {"size": 1000, "count": 5}
    f30k = manifests.load("f30k")
    assert f30k["expected"] == {"images": 31783, "splits": {"train": 29000, "val": 1014, "test": 1000}}
    with pytest.raises(ManifestError, match=r"field 'splits.restval': 'training' is not one of"):
        manifests.load("coco", sets=["splits.restval=training"])
    with pytest.raises(ManifestError, match=r"field '\(top level\)': 'image_id' is a required property"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("name: x\nformat: karpathy\nimages: i\nannotations: a.json\nsplits: {train: train}\n")
        manifests.load(bad)
    with pytest.raises(ManifestError, match="field 'name'"):
        manifests.load("f30k", sets=["name=../escape"])
    monkeypatch.chdir(tmp_path)  # the shipped manifests are found from anywhere
    (tmp_path / "f30k").mkdir()  # a folder named like the manifest is not taken for it
    assert manifests.load("manifests/f30k.yaml").name == "f30k" == manifests.load("f30k.yaml").name
    assert manifests.load("f30k").file == manifests.MANIFEST_DIR / "f30k.yaml"
    with pytest.raises(ManifestError, match="manifest not found"):
        manifests.load("nonexistent")
    with pytest.raises(ManifestError, match="expected KEY=VALUE"):
        manifests.load("coco", sets=["novalue"])


def test_demo_manifest_generates_the_demo(tmp_path, capsys):
    assert cli(["ingest", "--manifest", "manifests/demo.yaml", "--root", str(tmp_path), "--quiet",
                "--set", "demo.images=8", "--set", "expected.images=8",
                "--set", "expected.splits={train: 3, val: 1, test: 4}"]) == 0
    assert "wrote 8 images (3 train / 1 val / 4 test)" in capsys.readouterr().out
    assert len(rows(tmp_path, "demo", "captions")) == 40
    with pytest.raises(IngestError, match="always named 'demo'"):
        ingest(manifests.load("demo", name="other"), tmp_path, progress=False)


# ---------------------------------------------------------------------------------------------
# image paths, identical files and bad images

def write_captions_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    """Five captions per (file, split) row, numbered so that every image's captions differ."""
    path.write_text("file,caption,split\n" + "".join(
        f'{f},"photo {i} caption {k}",{split}\n' for i, (f, split) in enumerate(rows) for k in range(5)))


def test_image_paths_must_resolve_inside_the_image_folder(tmp_path):
    src = tmp_path / "mine"
    for name in ("a.png", "b.png"):
        write_image(src / "photos" / name)
    secret = tmp_path / "outside" / "secret.png"
    write_image(secret, size=(20, 20))
    (src / "photos" / "link.png").symlink_to(secret)                 # a symlink out of the folder
    (src / "photos" / "alias.png").symlink_to(src / "photos" / "a.png")   # a second name of a.png
    write_captions_csv(src / "captions.csv", [
        ("a.png", "train"), (str(secret), "train"), ("../../outside/secret.png", "test"),
        ("link.png", "val"), ("alias.png", "test"), ("b.png", "train")])
    m = manifests.load(folder_manifest(tmp_path, src, "captions.csv"))
    r = ingest(m, tmp_path / "data", progress=False)
    assert r.problems == {"outside image folder": 3, "duplicate file": 1}, r.messages
    assert any(msg.startswith("captions.csv line 12 (../../outside/secret.png): image path resolves to "
                              f"{secret}, outside the image folder") for msg in r.messages), r.messages
    assert any(msg.startswith("captions.csv line 22 (alias.png): image file") and "already image" in msg
               and "line 2 (a.png)" in msg for msg in r.messages), r.messages
    images = rows(tmp_path / "data", "mine", "images")
    assert sorted(Path(x["path"]).name for x in images) == ["a.png", "b.png"]

    # an allow-listed folder is accepted; the same file under a second name is still refused
    m = manifests.load(folder_manifest(tmp_path, src, "captions.csv", allowed_image_dirs=["../outside"]))
    r = ingest(m, tmp_path / "data", progress=False)
    assert r.problems == {"duplicate file": 3}, r.messages
    images = rows(tmp_path / "data", "mine", "images")
    assert sorted(Path(x["path"]).name for x in images) == ["a.png", "b.png", "secret.png"]
    assert {x["split"] for x in images if x["path"] == str(secret)} == {"train"}   # the first row's
    caps = rows(tmp_path / "data", "mine", "captions")
    assert len(caps) == 15 and {c["image_id"] for c in caps} == {x["image_id"] for x in images}


def test_one_file_named_in_two_splits_keeps_its_first_split_and_reports_the_other(tmp_path):
    src = tmp_path / "mine"
    for name in ("a.png", "b.png"):
        write_image(src / "photos" / name)
    write_captions_csv(src / "captions.csv", [("a.png", "test"), ("b.png", "train"),
                                              ("sub/../a.png", "train"), ("a.png", "test")])
    r = ingest(manifests.load(folder_manifest(tmp_path, src, "captions.csv")), tmp_path / "data", progress=False)
    assert r.problems == {"split conflict": 5}, r.messages           # the five captions of row 3
    assert any(msg.startswith("captions.csv line 12: 'sub/../a.png' is the image of captions.csv line 2 (a.png)")
               and msg.endswith("in test, not train")
               for msg in r.messages), r.messages
    images = rows(tmp_path / "data", "mine", "images")
    assert {Path(x["path"]).name: x["split"] for x in images} == {"a.png": "test", "b.png": "train"}
    caps = rows(tmp_path / "data", "mine", "captions")
    assert len(caps) == 15                                           # rows 1 and 4 are one image


def test_karpathy_and_coco_paths_cannot_leave_the_image_folder(f30k_src, tmp_path):
    outside = tmp_path / "outside.jpg"
    write_image(outside)
    ann = f30k_src / "dataset_flickr30k.json"
    data = json.loads(ann.read_text())
    data["images"][0]["filename"] = "../../outside.jpg"
    data["images"][4]["filename"] = str(outside)
    ann.write_text(json.dumps(data))
    r = ingest(manifests.load("f30k", source_root=str(f30k_src), sets=["expected=null"]),
               tmp_path / "data", progress=False)
    assert r.problems == {"outside image folder": 2}, r.messages
    assert r.split_counts == {"train": 2, "val": 1, "test": 1}
    assert "dataset_flickr30k.json images[0] (../../outside.jpg): image path resolves to" in r.messages[0]

    coco = tmp_path / "coco"
    write_image(coco / "images" / "val2014" / "in.jpg")
    images = [{"id": 1, "file_name": "in.jpg"}, {"id": 2, "file_name": "../../outside.jpg"},
              {"id": 3, "file_name": str(outside)}]
    anns = [{"id": 10 * i + k, "image_id": i, "caption": f"a photo {i} {k}"} for i in (1, 2, 3) for k in range(5)]
    (coco / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": anns}))
    m = manifests.load("coco", source_root=str(coco), sets=[
        "format=coco", "expected=null", "annotations=[{file: captions_val2014.json, split: val, images: val2014}]"])
    r = ingest(m, tmp_path / "data", progress=False)
    assert r.problems == {"outside image folder": 2}, r.messages
    assert [x["image_id"] for x in rows(tmp_path / "data", "coco", "images")] == [1]


def test_identical_images_are_reported_and_can_be_skipped(tmp_path, capsys):
    src = tmp_path / "mine"
    # BMP files of one size have one byte length whatever the colour: z is a same-size non-copy
    for name, colour in (("x.bmp", (200, 10, 10)), ("z.bmp", (10, 10, 200))):
        src_file = src / "photos" / name
        src_file.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 8), colour).save(src_file)
    (src / "photos" / "y.bmp").write_bytes((src / "photos" / "x.bmp").read_bytes())  # a copy in test
    (src / "photos" / "w.bmp").write_bytes((src / "photos" / "x.bmp").read_bytes())  # a copy in train
    assert len({(src / "photos" / n).stat().st_size for n in ("x.bmp", "y.bmp", "z.bmp", "w.bmp")}) == 1
    write_captions_csv(src / "captions.csv", [("y.bmp", "test"), ("x.bmp", "train"), ("z.bmp", "val"),
                                              ("w.bmp", "train")])
    manifest = folder_manifest(tmp_path, src, "captions.csv")
    root = tmp_path / "data"
    base = ["ingest", "--manifest", str(manifest), "--root", str(root), "--quiet"]
    assert cli(base) == 0                      # reported, every image kept
    out = capsys.readouterr().out
    assert "wrote 4 images" in out
    assert "kept 1 duplicate content, 1 duplicate content across splits (listed in" in out, out
    report = (root / "mine" / "ingest-report.txt").read_text()
    assert "[duplicate content across splits] captions.csv line 2 (y.bmp): same content as captions.csv " \
           "line 7 (x.bmp) (image" in report, report
    assert "[duplicate content] captions.csv line 17 (w.bmp): same content as captions.csv line 7" in report
    assert "z.bmp" not in report
    assert cli(base + ["--strict", "--force"]) == 0    # reporting alone does not fail --strict

    assert cli(base + ["--set", "content_duplicates=skip"]) == 0
    out = capsys.readouterr().out
    assert "wrote 2 images" in out and "skipped 1 duplicate content, 1 duplicate content across splits" in out
    assert sorted(Path(x["path"]).name for x in rows(root, "mine", "images")) == ["x.bmp", "z.bmp"]
    assert cli(base + ["--set", "content_duplicates=skip", "--strict", "--name", "strict"]) == 1
    assert "(w.bmp): same content as captions.csv line 7 (x.bmp)" in capsys.readouterr().err
    assert not (root / "strict").exists()


def write_blank_png(path: Path, side: int) -> None:
    """A valid all-zero 8-bit grayscale PNG of side x side pixels, compressed row block by row block
    (a 20000 x 20000 one is ~389 KB on disk and 400 MB once decoded: a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z, block = zlib.compressobj(9), bytes(side + 1) * 500     # filter byte 0 + a zero row, 500 rows
    data = b"".join(z.compress(block) for _ in range(side // 500)) + z.compress(bytes(side + 1) * (side % 500))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data + z.flush()) + chunk(b"IEND", b""))


def test_decompression_bomb_is_skipped_and_the_run_completes(tmp_path, capsys):
    src = tmp_path / "mine"
    for name in ("a.png", "b.png"):
        write_image(src / "photos" / name)
    write_blank_png(src / "photos" / "bomb.png", 20000)
    assert (src / "photos" / "bomb.png").stat().st_size < 500_000
    (src / "photos" / "notes.png").write_text("not an image\n")
    write_captions_csv(src / "captions.csv", [("a.png", "train"), ("bomb.png", "train"), ("b.png", "test"),
                                              ("notes.png", "val")])
    root = tmp_path / "data"
    assert cli(["ingest", "--manifest", str(folder_manifest(tmp_path, src, "captions.csv")),
                "--root", str(root), "--quiet"]) == 0
    err, out = capsys.readouterr()[::-1]
    assert "wrote 2 images" in out and "skipped 2 bad image" in out, out
    assert "captions.csv line 7 (bomb.png): image file" in err and "too large" in err, err
    assert "not an image" in err
    assert sorted(Path(x["path"]).name for x in rows(root, "mine", "images")) == ["a.png", "b.png"]

    # the same policy when the annotations give the size (official COCO files): the header is still read
    coco = tmp_path / "coco"
    (coco / "images").mkdir(parents=True)
    (coco / "images" / "bomb.png").symlink_to(src / "photos" / "bomb.png")
    write_image(coco / "images" / "ok.png")
    images = [{"id": 1, "file_name": "bomb.png", "width": 20000, "height": 20000},
              {"id": 2, "file_name": "ok.png", "width": 12, "height": 8}]
    anns = [{"id": 10 * i + k, "image_id": i, "caption": f"a photo {i} {k}"} for i in (1, 2) for k in range(5)]
    (coco / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    m = manifests.load("coco", source_root=str(coco), sets=[
        "format=coco", "expected=null", "annotations=[{file: captions.json, split: val}]",
        f"allowed_image_dirs=[{src / 'photos'}]"])
    r = ingest(m, tmp_path / "data", progress=False)
    assert r.problems == {"bad image": 1} and "too large" in r.messages[0], r.messages


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_captions_file_with_a_byte_order_mark_is_read(tmp_path, fmt):
    """Spreadsheet programs start a UTF-8 file with a byte-order mark: it is not part of the
    first column's name (or the first JSON line)."""
    src = tmp_path / "mine"
    for name in ("a.png", "b.png"):
        write_image(src / "photos" / name)
    lines = [(f, f"photo {f} caption {k}") for f in ("a.png", "b.png") for k in range(5)]
    if fmt == "jsonl":
        body = "".join(json.dumps({"file": f, "caption": t}) + "\n" for f, t in lines)
    else:
        sep = "\t" if fmt == "tsv" else ","
        body = f"file{sep}caption\n" + "".join(f"{f}{sep}{t}\n" for f, t in lines)
    (src / f"captions.{fmt}").write_bytes(b"\xef\xbb\xbf" + body.encode())
    r = ingest(manifests.load(folder_manifest(tmp_path, src, f"captions.{fmt}")), tmp_path / "data",
               progress=False)
    assert r.images == 2 and r.captions == 10 and not r.problems, r.messages


def test_karpathy_file_with_a_byte_order_mark_is_read(f30k_src, tmp_path):
    ann = f30k_src / "dataset_flickr30k.json"
    ann.write_bytes(b"\xef\xbb\xbf" + ann.read_bytes())
    r = ingest(manifests.load("f30k", source_root=str(f30k_src)), tmp_path / "data", progress=False)
    assert r.images > 0 and not r.problems, r.messages


def test_short_and_long_csv_rows_name_their_field_counts(tmp_path):
    """A row without its caption is a malformed row that says what the format needs, not a
    split conflict of its file (its split would be hashed, unlike the file's other rows)."""
    src = tmp_path / "mine"
    for name in ("a.png", "b.png"):
        write_image(src / "photos" / name)
    write_captions_csv(src / "captions.csv", [("a.png", "test"), ("b.png", "train")])
    with open(src / "captions.csv", "a") as f:
        f.write("a.png\n")                             # line 12
        f.write('b.png,"one more caption",train,x\n')  # line 13
    r = ingest(manifests.load(folder_manifest(tmp_path, src, "captions.csv")), tmp_path / "data", progress=False)
    assert r.problems == {"malformed entry": 2}, r.messages
    assert "captions.csv line 12: row has 1 field, needs 2–3" in r.messages
    assert "captions.csv line 13: row has 4 fields, needs 2–3" in r.messages
    assert r.images == 2 and r.captions == 10

    # the counts follow the header: the caption in the third of four columns
    (src / "captions.csv").write_text("id,file,caption,split\n" + "".join(
        f"{k},{f},photo {f} {k},train\n" for f in ("a.png", "b.png") for k in range(5)) + "9,a.png\n")
    r = ingest(manifests.load(folder_manifest(tmp_path, src, "captions.csv")), tmp_path / "data2", progress=False)
    assert r.messages == ["captions.csv line 12: row has 2 fields, needs 3–4"]


def test_the_dataset_records_its_family_and_protocols(tmp_path, f30k_src):
    """Evaluate's and report's protocols and train's per-family defaults come from what ingest
    recorded of the manifest, never from the dataset's name."""
    from pipeline.manifest import DatasetDefaults, dataset_defaults

    src, ann = folder_fixture(tmp_path, "jsonl")
    root = tmp_path / "data"
    for name, extra, family, protocols in (
            ("f30k_like", {}, None, ("whole",)),                       # no family: the whole split
            ("mine", {"family": "coco"}, "coco", ("coco-1k", "coco-5k")),
            ("cocoish", {"protocols": ["eccv", "coco-5k"]}, None, ("eccv", "coco-5k"))):
        m = manifests.load(folder_manifest(tmp_path, src, ann, **extra), name=name)
        ingest(m, root, progress=False)
        assert dataset_defaults(root, name) == DatasetDefaults(family, protocols)
    ingest(manifests.load("f30k", source_root=str(f30k_src), sets=["expected=null"]), root, progress=False)
    assert dataset_defaults(root, "f30k").family == "f30k"
    assert dataset_defaults(root, "f30k").protocols == ("f30k-1k",)
    # a dataset written before the record: judged by its name, as before
    (root / "old_coco").mkdir()
    old = dataset_defaults(root, "old_coco")
    assert (old.family, old.protocols, old.recorded) == ("coco", ("coco-1k", "coco-5k"), False)


def test_the_schema_lists_every_registered_protocol():
    import yaml

    from training.evaluation import PROTOCOLS

    schema = yaml.safe_load(manifests.SCHEMA_FILE.read_text())
    assert set(schema["properties"]["protocols"]["items"]["enum"]) == set(PROTOCOLS)
    assert set(schema["properties"]["family"]["enum"]) == set(manifests.FAMILY_PROTOCOLS)
