"""training/retrieve.py: text and image queries against a split, through the run's own text path;
FAISS indexes that rank as brute force does; cross-attention scoring of any rows that equals
evaluation's; shortlist-and-rerank; an image file extracted as the dataset's images were; errors."""

import contextlib
import dataclasses
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from itmkit.cli import main as itmkit
from pipeline import shards
from pipeline.shards import Layout
from training import models, retrieve
from training.data import (CaptionDataset, DataConfig, ImageDataset, ShardData, collate_images, collate_text,
                           make_loader)
from training.evaluation import compute_sims
from training.run import LoadedRun, load_run
from training.shortlist import Shortlist, rerank_split

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = itmkit(["retrieve", *[str(a) for a in argv], "--quiet"])
        except SystemExit as e:      # argparse usage errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def cli_json(*argv) -> dict:
    rc, out, err = cli(*argv, "--json")
    assert rc == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def run(tiny_run):
    root, out = tiny_run
    return root, out, load_run(out, root, split="test")


@pytest.fixture(scope="module")
def sims(run):
    root, out, loaded = run
    data = loaded.data
    return compute_sims(loaded.model, make_loader(ImageDataset(data), collate_images, 3),
                        make_loader(CaptionDataset(data), collate_text, 7), progress=False)


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory):
    """What a two-tower search ranks by, computed here: the model's float32 query embedding
    against the gallery's exported float16 embeddings. (t2i [images, captions], i2t [images, captions])"""
    root, out, loaded = run
    data, model = loaded.data, loaded.model
    with torch.no_grad():
        img = torch.cat([model.encode_image(b) for b in make_loader(ImageDataset(data), collate_images, 3)]).numpy()
        txt = torch.cat([model.encode_text(b) for b in make_loader(CaptionDataset(data), collate_text, 7)]).numpy()
    half = lambda a: a.astype(np.float16).astype(np.float32)  # noqa: E731
    return half(img) @ txt.T, img @ half(txt).T


def assert_ranked_by(rows, scores: np.ndarray, k: int) -> None:
    """``rows`` are the top ``k`` of ``scores``, best first (near-ties, 1e-6, in either order)."""
    rows = np.asarray(rows)
    assert len(rows) == k == len(set(rows.tolist()))
    assert np.all(np.diff(scores[rows]) <= 1e-6)
    assert scores[rows[-1]] >= np.sort(scores)[::-1][k - 1] - 1e-6


def test_a_dataset_caption_finds_its_own_image_in_the_top_k(run, sims, reference, tmp_path):
    """k is the rank the model's own scores give the caption's image (ties against it), so the
    image must be in the results, marked once, among images ranked by those scores."""
    root, out, loaded = run
    data = loaded.data
    t2i = reference[0]
    for j in (0, 17, 39):
        caption_id, image_id = int(data.text.caption_ids[j]), int(data.text.image_ids[j])
        row = int(np.flatnonzero(data.image_ids == image_id)[0])
        k = int((t2i[:, j] >= t2i[row, j]).sum())
        res = cli_json(out, "--root", root, "--caption-id", caption_id, "-k", k, "--index-dir", tmp_path / "idx")
        assert res["query"] == {"kind": "caption", "text": res["query"]["text"], "caption_id": caption_id,
                                "image_id": image_id}
        assert res["gallery"] == "images" and res["gallery_size"] == 8 and res["truth"] == [image_id]
        ids = [r["image_id"] for r in res["results"]]
        assert [r["rank"] for r in res["results"] if r["ground_truth"]] == [ids.index(image_id) + 1]
        rows = [int(np.flatnonzero(data.image_ids == i)[0]) for i in ids]
        assert_ranked_by(rows, t2i[:, j], k)
        assert np.allclose([r["score"] for r in res["results"]], sims[rows, j], atol=2e-3)
        assert all(r["path"] == f"{r['image_id']}.png" for r in res["results"])


def test_an_image_returns_its_top_captions_with_its_own_marked(run, sims, reference, tmp_path):
    root, out, loaded = run
    data = loaded.data
    image_id = int(data.image_ids[3])
    res = cli_json(out, "--root", root, "--image-id", image_id, "-k", 12, "--index-dir", tmp_path / "idx")
    assert res["gallery"] == "captions" and res["query"] == {"kind": "image", "image_id": image_id}
    rows = [int(np.flatnonzero(data.text.caption_ids == r["caption_id"])[0]) for r in res["results"]]
    assert_ranked_by(rows, reference[1][3], 12)
    assert np.allclose([r["score"] for r in res["results"]], sims[3, rows], atol=2e-3)
    own = {int(c) for c, i in zip(data.text.caption_ids, data.text.image_ids) if i == image_id}
    assert res["truth"] == sorted(own) and len(own) == 5
    assert all(r["ground_truth"] == (r["caption_id"] in own) for r in res["results"])
    captions = shards.read_table(Layout(root, "synth").captions).to_pylist()
    text = {c["caption_id"]: c["text"] for c in captions}
    assert all(r["text"] == text[r["caption_id"]] and r["image_id"] == int(data.text.image_ids[j])
               for r, j in zip(res["results"], rows))
    rc, table, _ = cli(out, "--root", root, "--image-id", image_id, "-k", 3, "--index-dir", tmp_path / "idx")
    lines = table.splitlines()
    assert rc == 0 and lines[0] == f"query [image {image_id}]" and lines[1].split() == \
        ["rank", "caption_id", "image_id", "score", "text"]
    assert [int(x.split()[1]) for x in lines[2:5]] == [r["caption_id"] for r in res["results"][:3]]
    assert lines[-1].startswith("retrieve: ") and "top 3 of 40 captions by faiss-flat" in lines[-1]


def test_a_text_query_goes_through_the_runs_parser_and_vocabulary(run, tmp_path):
    """A free-text query equal to a dataset caption is tokenised and encoded as that caption was,
    so it retrieves the same images with the same scores; unknown words are named."""
    root, out, loaded = run
    captions = shards.read_table(Layout(root, "synth").captions).to_pylist()
    cap = next(c for c in captions if c["split"] == "test" and len(c["text"].split()) > 3)
    q = retrieve.text_query(loaded, cap["text"] + " zebra")
    assert any("zebra" in n for n in q.notes)
    j = int(np.flatnonzero(loaded.data.text.caption_ids == cap["caption_id"])[0])
    mine = retrieve.query_batch(loaded, retrieve.text_query(loaded, cap["text"])).tokens[0]
    assert mine.tolist() == loaded.data.caption(j)["tokens"].tolist()
    by_text = cli_json(out, "--root", root, "--query", cap["text"], "-k", 8, "--index-dir", tmp_path / "i")
    by_id = cli_json(out, "--root", root, "--caption-id", cap["caption_id"], "-k", 8, "--index-dir", tmp_path / "i")
    assert [r["image_id"] for r in by_text["results"]] == [r["image_id"] for r in by_id["results"]]
    assert np.allclose([r["score"] for r in by_text["results"]], [r["score"] for r in by_id["results"]], atol=1e-5)
    assert by_text["query"] == {"kind": "text", "text": cap["text"]} and by_text["truth"] == []


def test_a_model_that_reads_no_graph_gets_the_tokens_of_the_full_parse(run):
    root, out, loaded = run
    layout = Layout(root, "synth")
    full, _ = retrieve.query_parser(layout)
    words, _ = retrieve.query_parser(layout, graph=False)
    for text in ("A man's  dog, running!\n near the car.", "two red circles left of a blue square", " x "):
        got, want = words(text), full(text)
        assert got["tokens"] == want["tokens"] and got["objects"] == []
        assert want["objects"] or text == " x "


def test_faiss_indexes_rank_as_brute_force_and_are_cached(run, tmp_path):
    root, out, loaded = run
    query = retrieve.caption_query(loaded, int(loaded.data.text.caption_ids[11]))
    flat = retrieve.IndexSearch(loaded, "images", retrieve.IndexConfig(), tmp_path)
    exported = np.load(tmp_path / "images.npy").astype(np.float32)
    brute = exported @ flat.embed(query)[0]
    got = flat.search(query, 8)
    assert got.rows.tolist() == np.argsort(-brute, kind="stable").tolist()
    assert np.allclose(got.scores, brute[got.rows], atol=1e-5)
    for kind in ("ivf", "hnsw"):   # on 8 vectors both find the exact answer
        cfg = retrieve.IndexConfig(kind)
        first = retrieve.IndexSearch(loaded, "images", cfg, tmp_path)
        again = retrieve.IndexSearch(loaded, "images", cfg, tmp_path)
        assert first.method["index"].startswith("built") and again.method["index"].startswith("cached")
        assert again.search(query, 8).rows.tolist() == got.rows.tolist()


def test_the_exact_index_scores_float16_vectors_as_a_flat_inner_product_does():
    """``--index flat`` keeps the exported float16 vectors as float16: on them it ranks and scores
    as FAISS's IndexFlatIP does."""
    import faiss
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 48)).astype(np.float16).astype(np.float32)
    q = rng.standard_normal((5, 48)).astype(np.float32)
    index = retrieve.build_index(x, retrieve.IndexConfig("flat"))
    reference = faiss.IndexFlatIP(48)
    reference.add(x)
    (scores, rows), (want_scores, want_rows) = index.search(q, 20), reference.search(q, 20)
    assert index.ntotal == 3000 and rows.tolist() == want_rows.tolist()
    assert np.allclose(scores, want_scores, atol=1e-5)


def test_block_scoring_of_any_rows_equals_evaluation(run):
    """A cross-attention model's ``score_rows`` on all rows, on a subset in any order, and in
    both directions equals ``compute_sims`` on the same pairs."""
    root, out, loaded = run
    torch.manual_seed(0)
    model = models.build("resg", {"embed_dim": 16, "word_dim": 8}, loaded.vocab).eval()
    data = loaded.data
    full = compute_sims(model, make_loader(ImageDataset(data), collate_images, 3),
                        make_loader(CaptionDataset(data), collate_text, 7), progress=False)
    texts = collate_text([data.caption(j) for j in (4, 30)])
    assert np.allclose(retrieve.score_rows(model, texts, "images", data, batch_size=3, progress=False),
                       full[:, [4, 30]].T, atol=1e-5)
    rows = [6, 1, 2]
    assert np.allclose(retrieve.score_rows(model, texts, "images", data, rows, batch_size=2, progress=False),
                       full[rows][:, [4, 30]].T, atol=1e-5)
    image = collate_images([data.image(5)])
    assert np.allclose(retrieve.score_rows(model, image, "captions", data, [39, 0, 25], batch_size=1,
                                           progress=False), full[5, [39, 0, 25]][None], atol=1e-5)


def test_shortlist_rescores_the_two_tower_top_k_and_keeps_the_rest_in_its_order(run, tmp_path):
    root, out, loaded = run
    torch.manual_seed(0)
    cross = LoadedRun(loaded.dir, loaded.root, loaded.config, loaded.vocab,
                      models.build("resg", {"embed_dim": 16, "word_dim": 8}, loaded.vocab).eval(),
                      {}, "best", loaded.data)
    first = retrieve.IndexSearch(loaded, "images", retrieve.IndexConfig(), tmp_path)
    blocks = retrieve.BlockSearch(cross, "images", progress=False)
    query = retrieve.caption_query(loaded, int(loaded.data.text.caption_ids[20]))
    two_tower = first.search(query, 8)
    got = retrieve.ShortlistSearch(blocks, first, topk=3).search(query, 6)
    rescored = blocks.scores(query)[two_tower.rows[:3]]
    assert got.rows[:3].tolist() == two_tower.rows[:3][np.argsort(-rescored, kind="stable")].tolist()
    assert np.allclose(got.scores[:3], np.sort(rescored)[::-1], atol=1e-6)
    assert got.rows[3:].tolist() == two_tower.rows[3:6].tolist() and got.rescored == 3
    assert np.allclose(got.scores[3:], two_tower.scores[3:6])


def test_a_query_is_reranked_as_the_evaluation_ranks_it(run, tmp_path):
    """One shortlist implementation: retrieval's top K of a caption, plain and fused, come in the
    order of that caption's column of a shortlisted evaluation (``Shortlist.rankings``)."""
    root, out, loaded = run
    torch.manual_seed(1)
    cross = LoadedRun(loaded.dir, loaded.root, loaded.config, loaded.vocab,
                      models.build("resg", {"embed_dim": 16, "word_dim": 8}, loaded.vocab).eval(),
                      {}, "best", loaded.data)
    data, k = loaded.data, 4
    images = make_loader(ImageDataset(data), collate_images, 3)
    texts = make_loader(CaptionDataset(data), collate_text, 7)
    sl = Shortlist.from_sims(compute_sims(loaded.model, images, texts, progress=False), k)
    scores = rerank_split(cross.model, images, texts, sl, progress=False).scores
    first = retrieve.IndexSearch(loaded, "images", retrieve.IndexConfig(), tmp_path)
    blocks = retrieve.BlockSearch(cross, "images", progress=False)
    for j in (3, 20, 33):
        query = retrieve.caption_query(loaded, int(data.text.caption_ids[j]))
        assert first.search(query, k).rows.tolist() == sl.t2i[j].tolist()   # the same shortlist
        for fuse in (None, 0.5):
            got = retrieve.ShortlistSearch(blocks, first, topk=k, fuse=fuse).search(query, k)
            t2i = sl.rankings(scores, fuse)[1][:, j]
            assert got.rows.tolist() == np.argsort(-t2i, kind="stable")[:k].tolist(), (j, fuse)


def test_bad_input_gets_one_line_and_exit_1_or_2(run, tmp_path):
    root, out, loaded = run
    cases = [
        ((out, "--root", root, "--caption-id", 99999), 1, "no caption_id 99999 in"),
        ((out, "--root", root, "--image-id", 0), 1, "image_id 0 is in split 'train', not 'test' (pass --split train)"),
        ((out, "--root", root, "--image-id", 35, "--max-images", 2), 1, "not searched"),
        ((out, "--root", root, "--query", "   "), 2, "--query is empty"),
        ((out, "--root", root), 2, "give one query"),
        ((out, "--root", root, "--query", "a", "--image-id", 33), 2, "give one query"),
        ((out, "--root", root, "--image", "x.png"), 2, "--image needs --weights"),
        ((out, "--root", root, "-k", 0, "--image-id", 33), 2, "argument -k: must be at least 1"),
        ((tmp_path, "--image-id", 33), 1, "not a run dir (no config.json)"),
        ((out, "--root", root, "--image-id", 33, "--shortlist", out), 1, "is a two-tower run"),
        ((out, "--root", root, "--image-id", 33, "--split", "nope"), 1, "no regions registered for split 'nope'"),
        ((out, "--root", root, "--image-id", 33, "--index", "ivf", "--nlist", 50,
          "--index-dir", tmp_path / "i"), 1, "--nlist 50 is more than the 40 vectors"),
    ]
    for argv, code, message in cases:
        rc, stdout, stderr = cli(*argv)
        assert rc == code and message in stderr and stdout == "", (argv, rc, stderr)
        if code == 1:
            assert stderr.strip().startswith("retrieve: error:") and len(stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# an image that is not in the dataset: a dataset whose regions were extracted from image files

def test_an_image_file_is_extracted_as_the_dataset_was_and_searched(extracted_run, tmp_path):
    """A dataset image given as a file gets the captions, order and scores of --image-id: same
    extractor config (read from the shards), same weights and seed (the recorded one)."""
    root, out, rows = extracted_run
    image = next(r for r in rows if r["split"] == "test")
    by_file = cli_json(out, "--image", image["path"], "--weights", "random", "-k", 15)
    by_id = cli_json(out, "--image-id", image["image_id"], "-k", 15)
    assert [r["caption_id"] for r in by_file["results"]] == [r["caption_id"] for r in by_id["results"]]
    assert np.allclose([r["score"] for r in by_file["results"]], [r["score"] for r in by_id["results"]],
                       atol=2e-3)
    assert by_file["query"] == {"kind": "file", "path": image["path"]} and by_file["gallery_size"] == 15
    assert any("RANDOM (seed 3)" in n for n in by_file["notes"])
    other = tmp_path / "other.png"
    Image.fromarray(np.full((50, 70, 3), 128, np.uint8)).save(other)
    assert len(cli_json(out, "--image", other, "--weights", "random", "-k", 4)["results"]) == 4
    rc, _, err = cli(out, "--image", other, "--weights", "random", "--seed", "4")
    assert rc == 1 and "were not extracted with random weights of seed 4" in err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rc, _, err = cli(out, "--image", tmp_path / "bad.png", "--weights", "random")
    assert rc == 1 and "bad.png" in err and len(err.strip().splitlines()) == 1
    rc, _, err = cli(out, "--image", tmp_path / "missing.png", "--weights", "random")
    assert rc == 1 and "missing.png" in err


def test_a_model_that_reads_grid_features_gets_them_from_the_image_file_too(extracted_run):
    root, out, rows = extracted_run
    loaded = load_run(out, root)
    data = ShardData(root, "toy", loaded.vocab, DataConfig(split="test", grid=True))
    torch.manual_seed(0)
    model = models.build("dsrln", {"embed_dim": 16, "word_dim": 8, "heads": 2, "geo_dim": 8}, loaded.vocab)
    run = LoadedRun(loaded.dir, root, dataclasses.replace(loaded.config, model="dsrln"), loaded.vocab,
                    model.eval(), {}, "best", data)
    image = next(r for r in rows if r["split"] == "test")
    by_file = retrieve.file_query(run, image["path"], "random")
    stored = data.image(int(np.flatnonzero(data.image_ids == image["image_id"])[0]))
    assert by_file.image["grid"].shape == stored["grid"].shape == (49, 2048)
    assert np.allclose(by_file.image["grid"], stored["grid"], atol=1e-2)
    assert np.allclose(by_file.image["features"], stored["features"], atol=1e-2)
    blocks = retrieve.BlockSearch(run, "captions", progress=False)
    assert np.allclose(blocks.scores(by_file), blocks.scores(retrieve.image_query(run, image["image_id"])),
                       atol=1e-3)


def test_shards_without_an_extractor_config_are_refused_for_image_files(run, tmp_path):
    root, out, loaded = run
    other = tmp_path / "x.png"
    Image.fromarray(np.full((50, 70, 3), 128, np.uint8)).save(other)
    rc, _, err = cli(out, "--root", root, "--image", other, "--weights", "random")
    assert rc == 1 and "records no extractor config" in err


def test_the_table_fits_19_digit_ids_and_the_summary_names_the_index_folder(run, tmp_path):
    """Ids hashed from file names (ingest.stable_id) take up to 19 digits: every column is as wide
    as its widest cell, so the columns stay under their headers; the last line names the folder
    the embeddings were exported to (RUN/index-SPLIT by default)."""
    root, out, loaded = run
    image_id = int(loaded.data.image_ids[3])
    res = cli_json(out, "--root", root, "--image-id", image_id, "-k", 3)
    big = 2 ** 60 - 1 - np.arange(3)
    for r, caption_id, image in zip(res["results"], big, big[::-1]):
        r.update(caption_id=int(caption_id), image_id=int(image))
    lines = retrieve.format_text(res).splitlines()
    header, rows = lines[1], lines[2:5]
    for row in rows:   # right-aligned: each cell ends where its header ends
        assert [m.end() for m in re.finditer(r"\S+", row)][:4] == \
            [m.end() for m in re.finditer(r"\S+", header)][:4], (header, row)
    assert str(2 ** 60 - 1) in rows[0]
    index_dir = out / "index-test"
    assert lines[-1].endswith(f"; embeddings in {index_dir} (index built)"), lines[-1]
    assert (index_dir / "index.json").is_file()
