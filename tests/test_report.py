"""training/report.py: the HTML report of trained runs, its pieces, and (slow, with Chromium) how
it renders; the label names it and `pipeline inspect` show."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itmkit.cli import main as itmkit
from pipeline import shards
from pipeline.labels import LabelNames, attribute_names, object_names
from pipeline.shards import Layout, RegionShard
from training import evaluate, report
from training.evaluation import recall_metrics

from conftest import EXTRACTOR, RANDOM

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(labelled_run):
    return labelled_run


@pytest.fixture(scope="module")
def page(run, tmp_path_factory) -> str:
    root, run_dir, _ = run
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert report.main([str(run_dir), "--out", str(out), "--workers", "0", "--device", "cpu"]) == 0
    return out.read_text()


def rows(page: str, cls: str) -> int:
    return len(re.findall(f'<tr class="{cls}">', page))


# ---------------------------------------------------------------------------------------------
# label names

def test_label_names_are_the_visual_genome_vocabularies():
    objects, attributes = object_names(), attribute_names()
    assert len(objects) == 1600 and len(attributes) == 400 and len(set(objects)) == 1600
    # line i names label i; synonyms after the comma are dropped
    assert objects[0] == "yolk" and "stop sign" in objects and "stopsign" not in objects
    assert attributes[:5] == ("gray", "multi colored", "double decker", "unmade", "red")
    vg = LabelNames.for_extractor(EXTRACTOR)
    assert vg.region(0, 4) == "red yolk" and vg.object(1599) == objects[-1]
    assert vg.region(3, -1) == objects[3] and vg.object(-1) == "?"


def test_another_label_set_gets_numbers_not_wrong_names():
    other = LabelNames.for_extractor({"num_classes": 80, "num_attributes": 400})
    assert other.object(3) == "#3" and other.attribute(4) == "red"
    assert LabelNames.for_extractor({}).object(0) == "yolk"   # shards that do not say: the default


def test_inspect_prints_the_top_labels_by_name(run):
    root, _, _ = run
    path = Layout(root, "synth").regions("test", 0)
    labels = np.concatenate([r.obj_labels for r in RegionShard(path)])
    ids, counts = np.unique(labels, return_counts=True)
    best = ids[np.argsort(-counts, kind="stable")[0]]
    text = shards.describe(path)
    objects = re.search(r"top objects +(.*)", text).group(1).split(", ")
    assert objects[0] == f"{object_names()[best]} {counts.max()}" and len(objects) == min(10, len(ids))
    assert re.search(r"top attributes +[a-z]", text) and "RANDOM weights" in text


def test_inspect_of_shards_without_labels_says_so(tiny_run):
    root, _ = tiny_run
    text = shards.describe(Layout(root, "synth").regions("train", 0))
    assert "labels       none" in text and "top objects" not in text


# ---------------------------------------------------------------------------------------------
# the pieces

def test_results_rank_the_ground_truth_and_pick_the_worst():
    rng = np.random.default_rng(0)
    n = 6
    sims = rng.uniform(0, 0.1, (n, 5 * n)).astype(np.float32)
    for j in range(5 * n):
        sims[j // 5, j] = 1.0               # every caption finds its image first ...
    sims[2, 13] = -1.0                      # ... except caption 13, whose image ranks last
    sims[4, 20:25] = -1.0                   # image 4 ranks its own captions last
    pairs = [{"image_id": 10, "partner_id": 11, "kind": "attribute"},
             {"image_id": 10, "partner_id": 99, "kind": "relation"}]   # partner outside the split
    res = report.results(sims, np.arange(10, 10 + n), pairs, queries=4, k=3, failures=2, n_pairs=5, seed=0)
    assert len(res.text_queries) == 4 and len(res.image_queries) == 4
    assert all(len(q["hits"]) == 3 for q in res.text_queries + res.image_queries)
    assert res.t2i_failures[0]["caption"] == 13 and res.t2i_failures[0]["gt_rank"] == n
    assert res.i2t_failures[0]["image"] == 4 and res.i2t_failures[0]["gt_rank"] == 5 * n - 4
    for q in res.text_queries:
        last = q["caption"] == 13 or q["caption"] // 5 == 4
        assert q["gt"] == q["caption"] // 5 and q["gt_rank"] == (n if last else 1)
        scores = [s for _, s in q["hits"]]
        assert scores == sorted(scores, reverse=True)
    (pair,) = res.pairs                     # the one whose images are both in the split
    assert (pair["a"], pair["b"]) == (0, 1)
    assert pair["scores"][0] == (0, float(sims[0, 0]), float(sims[1, 0]))


def test_queries_are_seeded_and_the_same_for_every_run_on_the_split():
    a = report.pick(1000, 10, seed=0, stream=0)
    assert len(set(a)) == 10 and np.array_equal(a, report.pick(1000, 10, seed=0, stream=0))
    assert not np.array_equal(a, report.pick(1000, 10, seed=1, stream=0))
    assert not np.array_equal(a, report.pick(1000, 10, seed=0, stream=1))   # images: another draw
    assert len(report.pick(3, 10, 0, 0)) == 3


def test_chance_size_finds_the_fold_of_a_coco_1k_entry():
    from training.evaluation import chance_metrics
    entry = {"images": 2500, "folds": 2, "chance_rsum": chance_metrics(1000)["rsum"]}
    assert report.chance_size(entry) == 1000
    assert report.chance_size({"images": 200, "chance_rsum": chance_metrics(200)["rsum"]}) == 200


def test_provenance_shouts_only_for_random_weights():
    base = {"root": "/d", "dataset": "x", "kinds": [], "weights_sha256": "", "extractor": {}, "parser": {},
            "vocab_words": 10, "vocab_fingerprint": "f", "software": {}}
    loud = report.provenance_html(dict(base, weights=RANDOM, random_weights=True))
    quiet = report.provenance_html(dict(base, weights="weights faster_rcnn.pkl", random_weights=False))
    assert "RANDOM EXTRACTOR WEIGHTS" in loud and "class=\"shout\"" in loud
    assert "shout" not in quiet and "faster_rcnn.pkl" in quiet


# ---------------------------------------------------------------------------------------------
# the page

def test_page_has_every_section_and_the_expected_rows(page):
    for title in ("Data and shards", "Recipe", "Recalls on test (8 images)", "Training curves",
                  "Text → image: 10 captions", "Image → text: 8 images", "Worst failures",
                  "Hard-negative pairs (4)"):
        assert title in page, title
    assert rows(page, "t2i") == 10 and rows(page, "i2t") == 8          # 8 test images, 40 captions
    assert rows(page, "t2i-fail") == 5 and rows(page, "i2t-fail") == 5
    assert rows(page, "pair") == 4 and rows(page, "recall") == 1 and rows(page, "hardneg") == 1
    assert rows(page, "compare") == 0                                   # one run: no comparison
    # every text query shows its ground truth framed, in the top 5 or after them
    for row in re.findall(r'<tr class="t2i">(.*?)</tr>', page):
        assert row.count('<figure class="gt">') == 1
        assert row.count("<figure") in (5, 6)


def test_page_is_self_contained_and_every_image_decodes(page):
    assert not re.search(r"<(script|link|iframe)\b", page)
    assert not re.search(r"(src|href)=\"(?!data:|#)", page)            # nothing fetched, anchors only
    assert "url(" not in page and "@import" not in page
    srcs = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert len(srcs) == page.count("<img") > 50
    for src in set(srcs):
        m = re.fullmatch(r"data:image/(jpeg|png);base64,([A-Za-z0-9+/=]+)", src)
        assert m, src[:60]
        im = Image.open(io.BytesIO(base64.b64decode(m.group(2))))
        im.load()
        assert im.format == m.group(1).upper() and min(im.size) > 10
    assert len(page.encode()) < 5e6


def test_page_labels_boxes_by_name(page, run):
    _, _, labels = run
    legends = re.findall(r'<div class="legend">(.*?)</div>', page)
    shown = [re.sub(r" [0-9.]+$", "", item.split("</span>", 1)[1]) for lg in legends if lg
             for item in lg.split("<br>")]
    every = {n for v in labels.values() for n in v}
    assert shown and set(shown) <= every
    assert not any(re.search(r"#\d|\?", name) for name in shown)
    assert "RANDOM EXTRACTOR WEIGHTS" in page and "The box labels below come from RANDOM" in page


def test_the_weights_scored_are_named_by_the_epoch_metrics_csv_counts(page, run):
    """The training log and metrics.csv count epochs from 1; so does the report (a checkpoint
    stores the 0-based index of the epoch it ends)."""
    _, run_dir, _ = run
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    best = max(rows, key=lambda r: float(r["rsum"]))   # the first best: a later equal one is not saved
    assert f"epoch {best['epoch']} (best.pt)" in page and "epoch 0 " not in page


def test_page_names_every_image_by_its_file(page, run):
    root, _, _ = run
    images = shards.read_table(Layout(root, "synth").images, "images").to_pylist()
    files = {r["image_id"]: Path(r["path"]).name for r in images if r["split"] == "test"}
    shown = re.findall(r'alt="([^"]*)" title="[^"]*"><figcaption>.*?<div class="file">(.*?)</div>', page)
    assert len(shown) == page.count("<figure")
    for alt, name in shown:
        image_id = int(re.fullmatch(r".* \(image (\d+)\)", alt).group(1))
        assert name == files[image_id] and alt.startswith(name)


def test_labels_stay_on_the_thumbnail_and_do_not_overlap():
    """Labels go inside a box's top edge, above it, inside its bottom edge or below it, wherever
    they overlap no label placed before (boxes come best first) and fit the thumbnail; a label
    that finds no place is left to the legend. Names wider than the thumbnail are cut."""
    rng = np.random.default_rng(0)
    W, H = 160, 120
    same = report.place_labels([(10, 10, 150, 110)] * 3, [(60, 12)] * 3, (W, H))
    assert same[0] == (12, 11) and same[1] == (12, 97) and same[2] is None
    for _ in range(200):
        n = int(rng.integers(1, 8))
        x1, y1 = rng.uniform(-5, W, n), rng.uniform(-5, H, n)
        boxes = list(zip(x1, y1, x1 + rng.uniform(1, W, n), y1 + rng.uniform(1, H, n)))
        sizes = list(zip(rng.uniform(10, W - 2, n), [report.LABEL_HEIGHT] * n))
        placed = [(x, y, x + w, y + h) for at, (w, h) in zip(report.place_labels(boxes, sizes, (W, H)), sizes)
                  if at is not None for x, y in [at]]
        assert all(0 <= a and 0 <= b and c <= W and d <= H for a, b, c, d in placed)
        assert not any(report.overlap(a, b) for i, a in enumerate(placed) for b in placed[i + 1:])
    assert report.fitted("a very long attribute object name", 60, lambda t: 6 * len(t)) == "a very lo…"
    assert report.fitted("red ball", 60, lambda t: 6 * len(t)) == "red ball"


def test_a_run_on_precomp_features_is_reported_without_images(tmp_path):
    """SCAN's precomp features come without images, boxes or image sizes (0 x 0): the report
    shows a grey thumbnail saying so, names the images by id, and draws no box."""
    from test_precomp import make_precomp
    make_precomp(tmp_path / "pc", splits=(("train", 8), ("dev", 2), ("test", 2)), boxes=4)
    root, run_dir, out = tmp_path / "data", tmp_path / "run", tmp_path / "r.html"
    assert itmkit(["import-precomp", "--dir", tmp_path / "pc", "--name", "pc", "--root", root, "--quiet"]) == 0
    assert itmkit(["parse", "--dataset", "pc", "--root", root, "--no-progress"]) == 0
    assert itmkit(["vocab", "--dataset", "pc", "--root", root, "--min-count", "1", "--no-progress"]) == 0
    assert itmkit(["train", "--model", "vsepp", "--dataset", "pc", "--root", root, "--out", run_dir,
                   "--epochs", "1", "--batch-size", "10", "--workers", "0", "--set", "embed_dim=16",
                   "--set", "word_dim=8", "--quiet"]) == 0
    assert itmkit(["report", run_dir, "--out", out, "--workers", "0", "--device", "cpu"]) == 0
    text = out.read_text()
    assert "<div class=\"legend\"></div>" in text and "<span style=" not in text   # no box drawn
    names = re.findall(r'<div class="file">(.*?)</div>', text)
    assert names and all(re.fullmatch(r"image \d+", n) for n in names)
    for src in set(re.findall(r'<img src="data:image/jpeg;base64,([^"]*)"', text)):
        thumb = Image.open(io.BytesIO(base64.b64decode(src)))
        assert thumb.size == (160, 120)


def test_page_recalls_are_computed_when_eval_json_has_none(page, run):
    """The run has no eval.json: the report computes the recalls, equal to evaluate's."""
    _, run_dir, _ = run
    assert not (run_dir / "eval.json").exists()
    assert "computed for this report" in page and "computed from best.pt" in page


def test_report_reads_eval_json_and_saved_sims(run, tmp_path):
    root, run_dir, _ = run
    copy = tmp_path / "run-b"
    shutil.copytree(run_dir, copy)
    args = ["--save-sims", "--hard-negatives", "--workers", "0", "--device", "cpu"]
    assert evaluate.main([str(copy), *args]) == 0
    saved = json.loads((copy / "eval.json").read_text())["test/f30k-1k"]
    sims = np.load(copy / "sims-test.npz")["sims"]
    assert saved["rsum"] == pytest.approx(recall_metrics(sims)["rsum"])
    out = tmp_path / "r.html"
    assert report.main([str(copy), "--out", str(out), "--workers", "0", "--device", "cpu"]) == 0
    text = out.read_text()
    assert "from eval.json" in text and "read from sims-test.npz" in text
    rsum = re.search(r'<tr class="recall">.*?</tr>', text).group(0)
    assert f"{saved['rsum']:.1f} <span class=\"chance\">({saved['chance_rsum']:.1f})" in rsum


def test_several_runs_get_one_comparison_table_and_the_same_queries(run, tmp_path):
    _, run_dir, _ = run
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    out = tmp_path / "both.html"
    assert report.main([str(run_dir), str(other), "--out", str(out), "--workers", "0", "--device", "cpu",
                        "--queries", "3", "--failures", "1", "--pairs", "1"]) == 0
    text = out.read_text()
    assert rows(text, "compare") == 2 and text.count('<section class="run"') == 2
    per_run = [re.findall(r'<tr class="t2i"><td>(.*?)<br>', part)
               for part in text.split('<section class="run"')[1:]]
    assert len(per_run[0]) == 3 and per_run[0] == per_run[1]          # the same seeded queries
    assert text.count("alt=\"training curves") == 3                     # both runs', and one per run


def test_quiet_draws_no_progress_bars(run, tmp_path, capsys):
    _, run_dir, _ = run
    args = [str(run_dir), "--workers", "0", "--device", "cpu", "--queries", "1", "--pairs", "0"]
    assert report.main([*args, "--out", str(tmp_path / "a.html")]) == 0
    assert "encode images" in capsys.readouterr().err
    assert report.main([*args, "--out", str(tmp_path / "b.html"), "--quiet"]) == 0
    assert "encode" not in capsys.readouterr().err


def test_the_protocols_are_those_the_dataset_recorded(run, tmp_path):
    """A dataset of no family that names no protocols (a folder of one's own) is scored on its
    whole split, under a name that claims no protocol of the literature; one that names its
    protocols gets those. Never decided by the dataset's name."""
    root, run_dir, _ = run
    for protocols, expected in (([], ["whole"]), (["coco-5k", "whole"], ["coco-5k", "whole"])):
        data = tmp_path / f"data-{len(protocols)}"
        shutil.copytree(root / "synth", data / "synth")
        layout = Layout(data, "synth")
        rows_ = shards.read_table(layout.images).to_pylist()
        shards.write_table(layout.images, rows_, "images",
                           metadata={"dataset": {"family": None, "protocols": protocols}})
        entry = layout.index.entry("images", layout.images)
        layout.index.register("images", layout.images, rows=len(rows_), config_hash=entry.config_hash)
        copy = tmp_path / f"run-{len(protocols)}"
        shutil.copytree(run_dir, copy)
        assert evaluate.main([str(copy), "--root", str(data), "--workers", "0", "--device", "cpu",
                              "--quiet"]) == 0
        assert sorted(json.loads((copy / "eval.json").read_text())) == [f"test/{p}" for p in expected]
        run_ = report.load_run(copy, str(data), which="best", device="cpu", split="test")
        computed, _ = report.evaluation(run_, "nosplit", np.eye(8, 40), [])
        assert sorted(computed) == expected


def test_a_folder_that_is_not_a_run_is_refused_in_one_line(tmp_path, capsys):
    assert itmkit(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err
    assert err == f"report: error: {tmp_path}: not a run dir (no config.json)\n"
    assert not (tmp_path / "r.html").exists()


def test_bad_counts_are_usage_errors(tmp_path):
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path), "--queries", "0"])
    assert e.value.code == 2


def test_every_flag_shows_its_default():
    text = report.build_parser().format_help().split("options:", 1)[1]
    for flag in ("--out", "--split", "--checkpoint", "--queries", "--top", "--failures", "--pairs", "--seed",
                 "--thumb", "--boxes", "--batch-size", "--workers", "--device", "--root"):
        block = text.split(f"\n  {flag}", 1)[1].split("\n  -", 1)[0]
        assert "default" in block, flag


# ---------------------------------------------------------------------------------------------
# rendering in a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROBE = """<script>
window.addEventListener("load", () => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;
  const out = document.createElement("div");
  out.id = "probe";
  out.textContent = JSON.stringify({images: document.images.length, broken: broken,
    t2i: document.querySelectorAll("tr.t2i").length, i2t: document.querySelectorAll("tr.i2t").length,
    pairs: document.querySelectorAll("tr.pair").length});
  document.body.appendChild(out);
});
</script>"""


def chromium(*args, cwd) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(dir=cwd)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(page, tmp_path):
    """The page as a browser sees it: every image decoded (naturalWidth > 0), the result rows
    there, and a screenshot that is not blank. The probe script is added to a copy: the report
    itself has none."""
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    r = chromium("--dump-dom", probed.as_uri(), cwd=tmp_path)
    m = re.search(r'<div id="probe">(.*?)</div>', r.stdout)
    assert m, r.stdout[-2000:] + r.stderr[-2000:]
    seen = json.loads(m.group(1))
    assert seen == {"images": page.count("<img"), "broken": 0, "t2i": 10, "i2t": 8, "pairs": 4}

    shot = tmp_path / "shot.png"
    r = chromium(f"--screenshot={shot}", "--window-size=1280,2000", probed.as_uri(), cwd=tmp_path)
    assert shot.exists(), r.stderr[-2000:]
    im = np.asarray(Image.open(shot).convert("RGB"))
    assert im.shape[:2] == (2000, 1280)
    assert im.std() > 20 and len(np.unique(im.reshape(-1, 3), axis=0)) > 100   # text, tables, thumbnails
