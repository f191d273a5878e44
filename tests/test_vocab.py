"""`itmkit vocab`: train-only words, specials, predicates/attributes, coverage,
GloVe vectors, skipping, and refusal of inconsistent graphs."""

import numpy as np
import pytest

from itmkit import cli
from pipeline import parse, shards, vocab

CAPTIONS = [  # (split, text)
    ("train", "A man riding a horse on a beach."),
    ("train", "A man riding a horse."),
    ("train", "Two dogs on a red couch."),
    ("train", "A red ball on a couch."),
    ("val", "A man on a horse near a zebra."),
    ("test", "A giraffe next to a man."),
]


def make_dataset(root, captions=CAPTIONS):
    layout = shards.Layout(root, "toy")
    rows = [{"caption_id": i, "image_id": i, "split": s, "text": t} for i, (s, t) in enumerate(captions)]
    shards.write_table(layout.captions, rows, "captions")
    assert cli.main(["parse", "--dataset", "toy", "--root", str(root), "--chunk-size", "4",
                     "--no-progress"]) == 0
    return layout


def run(root, *extra):
    return cli.main(["vocab", "--dataset", "toy", "--root", str(root), "--no-progress", *map(str, extra)])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    layout = make_dataset(root)
    assert run(root, "--min-count", 1) == 0
    return layout


def test_specials_and_train_only_words(built):
    v = shards.Vocabulary.load(built.vocab)
    assert v.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"] and v.stoi["<pad>"] == 0
    assert "man" in v.stoi and "couch" in v.stoi and "." in v.stoi
    assert "A" not in v.stoi and "a" in v.stoi  # lowercased
    # words seen only in val/test are unknown
    for word in ("giraffe", "zebra", "near", "next", "to"):
        assert word not in v.stoi
    assert v.encode(["A", "giraffe"], add_special=False) == [v.stoi["a"], v.UNK]
    assert v.decode(v.encode(["a", "man"])) == ["a", "man"]
    counts = dict(v.data["words"])
    assert counts["man"] == 2 and counts["a"] == 8 and counts["riding"] == 2


def test_predicates_and_attributes_from_train(built):
    v = shards.Vocabulary.load(built.vocab)
    preds = dict(v.data["predicates"])
    assert preds["ride"] == 2 and preds["on"] == 2 and "next to" not in preds
    attrs = dict(v.data["attributes"])
    assert attrs == {"red": 2, "two": 1}
    assert v.predicate_id("ride") > 0 and v.predicate_id("next to") == 0
    assert v.attribute_id("red") > 0


def test_coverage_is_recorded_and_printed(tmp_path, capsys):
    make_dataset(tmp_path)
    capsys.readouterr()
    assert run(tmp_path, "--min-count", 1) == 0
    out = capsys.readouterr().out
    data = shards.read_vocab(shards.Layout(tmp_path, "toy").vocab)
    # test caption "A giraffe next to a man ." -> giraffe, next and to are unknown: 3 of 7 tokens
    assert data["coverage"]["test"]["oov"] == 3 and data["coverage"]["test"]["tokens"] == 7
    assert data["coverage"]["train"]["oov"] == 0
    assert f"test {3 / 7:.2%}" in out and "OOV rate" in out


def test_min_count_and_rerun_skip(tmp_path, capsys):
    layout = make_dataset(tmp_path)
    assert run(tmp_path, "--min-count", 2) == 0
    v = shards.Vocabulary.load(layout.vocab)
    assert all(c >= 2 for w, c in v.data["words"][4:])
    assert "beach" not in v.stoi and "man" in v.stoi
    assert dict(v.data["attributes"]) == {"red": 2}
    capsys.readouterr()
    assert run(tmp_path, "--min-count", 2) == 0
    assert "vocabulary already current" in capsys.readouterr().out
    assert run(tmp_path, "--min-count", 1) == 0
    assert "wrote vocab.json" in capsys.readouterr().out
    assert layout.index.verify() == []


def test_glove_vectors(tmp_path, capsys):
    layout = make_dataset(tmp_path)
    glove = tmp_path / "glove.txt"
    glove.write_text("3 3\nman 0.5 0.25 -1\nHorse 9 9 9\nhorse 1 2 3\nthe red 7 7 7\nzebra 4 4 4\n")
    assert run(tmp_path, "--min-count", 1, "--vectors", glove) == 0
    assert "2/" in capsys.readouterr().out  # man and horse found
    v = shards.Vocabulary.load(layout.vocab)
    vec = shards.read_vectors(layout.vocab_vectors, len(v))
    assert vec.dtype == np.float32 and vec.shape == (len(v), 3)
    assert np.array_equal(vec[v.stoi["man"]], [0.5, 0.25, -1])
    assert np.array_equal(vec[v.stoi["horse"]], [1, 2, 3])  # the lowercase entry wins
    assert np.all(vec[0] == 0)  # <pad>
    assert np.any(vec[v.stoi["couch"]] != 0)  # not in GloVe: random
    entry = layout.index.entry("vocab", layout.vocab_vectors)
    assert entry.rows == len(v) and entry.extra["found"] == 2
    capsys.readouterr()
    assert run(tmp_path, "--min-count", 1, "--vectors", glove) == 0
    assert "vectors already current" in capsys.readouterr().out
    # a new vocabulary without --vectors drops the vectors that no longer match it
    assert run(tmp_path, "--min-count", 2) == 0
    assert not layout.vocab_vectors.exists() and layout.index.entry("vocab", layout.vocab_vectors) is None


def test_bad_glove_file_names_the_line(tmp_path, capsys):
    make_dataset(tmp_path)
    glove = tmp_path / "glove.txt"
    glove.write_text("man 1 2 3\nhorse 1 x 3\n")
    assert run(tmp_path, "--min-count", 1, "--vectors", glove) == 1
    assert "glove.txt:2" in capsys.readouterr().err
    glove.write_text("man 1 2 3\nhorse 1\n")
    assert run(tmp_path, "--min-count", 1, "--vectors", glove) == 1
    assert "glove.txt:2: 1 values, expected 3" in capsys.readouterr().err
    assert run(tmp_path, "--vectors", tmp_path / "missing.txt") == 1


def test_build_vectors_fills_missing_words():
    found = {4: np.array([1.0, -1.0], np.float32)}
    vec = vocab.build_vectors(["<pad>", "<start>", "<end>", "<unk>", "dog", "cat"], found, 2)
    assert vec.shape == (6, 2) and np.all(vec[0] == 0) and np.array_equal(vec[4], [1, -1])
    assert np.all(np.isfinite(vec)) and np.any(vec[5] != 0)


def test_refuses_missing_incomplete_or_mixed_graphs(tmp_path, capsys):
    layout = shards.Layout(tmp_path, "toy")
    rows = [{"caption_id": i, "image_id": i, "split": s, "text": t} for i, (s, t) in enumerate(CAPTIONS)]
    shards.write_table(layout.captions, rows, "captions")
    assert run(tmp_path) == 1
    assert f"run `itmkit parse --dataset toy --root {tmp_path}`" in capsys.readouterr().err
    cli.main(["parse", "--dataset", "toy", "--root", str(tmp_path), "--chunk-size", "4", "--chunk", "0",
              "--no-progress"])
    assert run(tmp_path) == 1
    assert f"finish `itmkit parse --dataset toy --root {tmp_path}`" in capsys.readouterr().err
    # a chunk written under another parser config must not be mixed in
    cfg = parse.ParseConfig(chunk_size=4)
    other = shards.config_hash(dict(cfg.identity(), parser="old"))
    path = layout.graphs(1)
    shards.write_table(path, [], "graphs")
    layout.index.register("graphs", path, rows=0, config_hash=other)
    assert run(tmp_path) == 1
    assert "parser configs" in capsys.readouterr().err


def test_a_graphs_row_with_a_null_is_one_line_naming_the_file_and_row(tmp_path, capsys):
    from test_training_data import with_graph_rows

    def edit(rows):
        rows[2]["tokens"] = None
    _, path = with_graph_rows(tmp_path, edit)
    assert cli.main(["vocab", "--dataset", "synth", "--root", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}: row 2 (caption_id 2): 'tokens' is null" in err[0], err


def test_a_high_out_of_vocabulary_rate_is_warned(tmp_path, capsys):
    """Val and test captions whose words train has not seen: each split over 10 % is warned
    about, on every run (also when the vocabulary is current); none when they share train's words."""
    layout = make_dataset(tmp_path)
    capsys.readouterr()
    for _ in range(2):
        assert run(tmp_path, "--min-count", 1) == 0
        err = capsys.readouterr().err
        coverage = shards.read_vocab(layout.vocab)["coverage"]
        for split in ("val", "test"):
            c = coverage[split]
            assert c["oov_rate"] > vocab.OOV_WARNING
            assert (f"vocab: warning: {c['oov_rate']:.1%} of the {split} tokens ({c['oov']} of {c['tokens']}) "
                    "are not in the vocabulary") in err
        assert "of the train tokens" not in err
    same = [(split, text) for split in ("train", "val", "test") for _, text in CAPTIONS[:4]]
    make_dataset(tmp_path / "same", same)
    assert run(tmp_path / "same", "--min-count", 1) == 0
    assert "warning" not in capsys.readouterr().err
