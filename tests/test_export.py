"""evaluate.py --export-index: float16 embeddings with their ids, equal to the model's scores,
skipped when current, refused for cross-attention models (evaluation still runs), read back."""

import numpy as np
import pytest
import torch

from pipeline import shards
from training import evaluate, export, models
from training.run import load_run


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def test_export_writes_float16_embeddings_and_ids_that_reproduce_the_scores(run, tmp_path, capsys):
    root, out = run
    idx = tmp_path / "index"
    assert evaluate.main([str(out), "--root", str(root), "--workers", "0", "--save-sims",
                          "--export-index", str(idx)]) == 0
    assert "exported 8 image and 40 caption embeddings (dim 32)" in capsys.readouterr().out
    img, txt = np.load(idx / "images.npy"), np.load(idx / "captions.npy")
    assert img.dtype == txt.dtype == np.float16 and img.shape == (8, 32) and txt.shape == (40, 32)
    saved = evaluate.load_sims(evaluate.sims_path(out, "test"))
    assert np.array_equal(np.load(idx / "image_ids.npy"), saved["image_ids"])
    assert np.array_equal(np.load(idx / "caption_ids.npy"), saved["caption_ids"])
    assert np.array_equal(np.load(idx / "caption_image_ids.npy"), np.repeat(saved["image_ids"], 5))
    scores = img.astype(np.float32) @ txt.astype(np.float32).T
    assert np.abs(scores - saved["sims"]).max() < 2e-3          # float16 rounding only
    assert np.allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1, atol=2e-3)
    meta = shards.read_json(idx / "index.json")
    assert meta["model"] == "vsepp" and meta["split"] == "test" and meta["dim"] == 32


def test_export_is_skipped_when_current_and_redone_for_another_split(run, tmp_path):
    root, out = run
    idx = tmp_path / "index"
    test = load_run(out, root, split="test")
    files, _ = export.export_run(test, idx)
    assert len(files) == 6
    files, summary = export.export_run(test, idx)
    assert files == [] and "skipped" in summary
    files, _ = export.export_run(load_run(out, root, split="val"), idx)
    assert len(files) == 6 and shards.read_json(idx / "index.json")["split"] == "val"
    files, _ = export.export_run(load_run(out, root, split="val", max_images=3), idx)
    assert len(files) == 6 and export.read_index(idx)["images"].shape == (3, 32)


def test_cross_attention_models_are_refused():
    cross = [n for n in models.names() if not models.get(n).two_tower]
    if not cross:
        pytest.skip("no cross-attention model registered")
    with pytest.raises(ValueError, match="cross-attention model"):
        export.check_two_tower(cross[0])


def test_mismatched_ids_are_refused_and_nothing_is_written(tmp_path):
    emb = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="3 image / 3 caption embeddings for 2 image ids"):
        export.write_index(tmp_path / "x", emb, emb, [1, 2], [1, 2, 3], [1, 1, 2], {})
    assert not (tmp_path / "x").exists()


def test_embeddings_of_a_model_match_its_similarity():
    vocab = shards.Vocabulary({"words": [[w, 0] for w in shards.VOCAB_SPECIALS] + [["a", 1]],
                               "min_count": 1, "predicates": [], "attributes": []})
    torch.manual_seed(0)
    m = models.build("cimn", {"embed_dim": 8, "word_dim": 4, "feature_dim": 6}, vocab)
    from training.data import collate_images, collate_text
    rng = np.random.default_rng(0)
    images = [collate_images([{"image_id": i, "image_hw": (10, 10), "boxes_known": True,
                               "features": rng.normal(0, 1, (3, 6)).astype(np.float16),
                               "boxes": np.float32([[0, 0, .5, .5]] * 3)}]) for i in range(2)]
    empty = np.zeros(0, np.int64)
    texts = [collate_text([{"caption_id": j, "image_id": 0, "tokens": np.array([1, 4, 2]),
                            **{k: empty for k in ("obj_index", "obj_word", "attr_object", "attr_id",
                                                  "attr_word", "rel_subject", "rel_predicate",
                                                  "rel_object")}}]) for j in range(3)]
    img, txt = export.embeddings(m, images, texts)
    assert img.shape == (2, 8) and txt.shape == (3, 8)
    assert m.training                                  # the model's mode is given back
    m.eval()                                           # no dropout, as in embeddings()
    with torch.no_grad():
        expected = m.similarity(m.encode_image(images[0]), m.encode_text(texts[0]))
    assert np.allclose(img[0] @ txt[0], expected.item(), atol=1e-5)
