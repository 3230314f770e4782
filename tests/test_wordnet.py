"""WordNet 3.0 as ConVis reads it: real WordNet (Debian's wordnet-base), found, parsed and
cross-checked against nltk's own reader."""

from __future__ import annotations

import random

import pytest

from clipviz.convis import wordnet
from clipviz.convis.hierarchy import leaves, load_hierarchy, resolve_concepts, vocabulary_synsets
from clipviz.convis.nouns import ALL_NOUN_SYNSETS, DEFAULT_VOCABULARY_SIZE, noun_database
from clipviz.convis.wordnet import LEXNAMES, ensure_wordnet
from clipviz.errors import ClipvizError


@pytest.fixture(scope="module")
def db():
    return noun_database()


@pytest.fixture
def vocab_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("dog\nwolf  # a comment\n\ncat.n.01\n", encoding="utf-8")
    return path


def test_dog_is_an_animal(db):
    dog = db.position["dog.n.01"]
    assert db.position["animal.n.01"] in db.ancestors([dog])
    assert db.position["canine.n.02"] in db.ancestors([dog])
    assert db.position["plant.n.02"] not in db.ancestors([dog])


def test_noun_database_matches_nltk(db):
    wn = ensure_wordnet()  # nltk's reader on the same files (lexnames generated if missing)
    assert wn.get_version() == "3.0"
    sample = random.Random(0).sample(range(len(db)), 150) + [db.position["dog.n.01"]]
    for i in sample:
        s = wn.synset(db.names[i])
        assert s.definition() == db.definitions[i]
        assert s.lemma_names() == db.lemmas[i]
        related = s.hypernyms() + s.instance_hypernyms()
        assert sorted(h.name() for h in related) == sorted(db.names[j] for j in db.hypernyms[i])
    dog = wn.synset("dog.n.01")
    assert db.counts["dog"][0] == dog.lemmas()[0].count() == 42


def test_subtree_of_canine_contains_dog_and_wolf_not_cat(vocab_file):
    h = load_hierarchy(str(vocab_file))
    names = {h.names[i] for i in h.subtree("canine.n.02")}
    assert {"canine.n.02", "dog.n.01", "wolf.n.01"} <= names
    assert "cat.n.01" not in names
    # the hierarchy holds every hypernym path, up to entity.n.01, with hypernym -> hyponym edges
    assert "entity.n.01" in h.position and "carnivore.n.01" in h.position
    edges = {(h.names[p], h.names[c]) for p, c in zip(h.parents, h.children, strict=True)}
    assert ("canine.n.02", "dog.n.01") in edges
    assert len(h.subtree("entity.n.01")) == len(h)


def test_default_vocabulary_size_is_the_documented_one(db):
    words, synsets = vocabulary_synsets("default")
    assert len(words) == DEFAULT_VOCABULARY_SIZE == 2066
    assert {"dog", "cat", "car", "tree", "person", "bird"} <= set(words)
    assert "table" not in words  # its most frequent sense is a table of data
    assert db.position["dog.n.01"] in synsets and db.position["frump.n.01"] in synsets
    assert len(load_hierarchy("default")) == 7700


def test_all_vocabulary_is_every_noun_synset():
    words, synsets = vocabulary_synsets("all")
    assert len(synsets) == ALL_NOUN_SYNSETS == 82115 and words == ()


def test_unknown_synsets_and_words_suggest_close_matches(db, tmp_path):
    with pytest.raises(ClipvizError, match=r"did you mean .*elephant\.n\.01"):
        db.synset("elefant.n.01")
    with pytest.raises(
        ClipvizError, match=r"the noun 'dog' has: dog\.n\.01, frump\.n\.01, .*andiron\.n\.01"
    ):
        db.synset("dog.n.99")
    with pytest.raises(ClipvizError, match="not a noun synset"):
        db.synset("run.v.01")
    with pytest.raises(ClipvizError, match=r"'elefant' is not a WordNet noun; did you mean"):
        resolve_concepts(words=["elefant"])
    bad = tmp_path / "bad.txt"
    bad.write_text("dog\nelefant\n")
    with pytest.raises(ClipvizError, match=r"bad\.txt: 'elefant'.*elephant"):
        load_hierarchy(str(bad))


def test_a_vocabulary_of_many_unknown_words_suggests_spellings_for_the_first_five(
    tmp_path, monkeypatch
):
    from clipviz.convis import nouns

    calls = []

    def close_matches(word, *args, **kwargs):
        calls.append(word)
        return ["dog"]

    monkeypatch.setattr(nouns.difflib, "get_close_matches", close_matches)
    path = tmp_path / "many.txt"
    path.write_text("dog\n" + "".join(f"zzq{i}x\n" for i in range(12)) + "zzq.n.01\n")
    with pytest.raises(ClipvizError) as e:
        vocabulary_synsets(str(path))
    text = str(e.value)
    assert calls == ["zzq0x", "zzq1x", "zzq2x", "zzq3x", "zzq4x"]
    assert text.count("did you mean dog.n.01") == 5 and "'zzq5x'" not in text
    assert "and 8 more entries WordNet does not know" in text and "\n" not in text


def test_words_resolve_to_their_most_frequent_sense_and_list_the_others():
    concepts, ambiguous = resolve_concepts(["wolf.n.01"], ["dog", "geese", "dog"])
    assert concepts == ["wolf.n.01", "dog.n.01", "goose.n.01"]  # "geese" through nltk's morphy
    assert ambiguous["dog"][:3] == ["dog.n.01", "frump.n.01", "dog.n.03"]
    assert len(ambiguous["dog"]) == 7


def test_leaves_of_a_subtree():
    found = leaves("canine.n.02")
    assert {"beagle.n.01", "toy_poodle.n.01"} <= set(found)
    assert "dog.n.01" not in found and "poodle.n.01" not in found  # they have hyponyms
    assert leaves("beagle.n.01") == ["beagle.n.01"]


def test_system_dict_is_copied_with_generated_lexnames(tmp_path):
    source = next((d for d in wordnet._system_dirs() if wordnet._is_wordnet30(d)), None)
    if source is None:
        pytest.skip("no Princeton WordNet 3.0 dict folder on this system")
    target = tmp_path / "corpora" / "wordnet"
    wordnet._install_from_dict(source, target)
    lines = (target / "lexnames").read_text().splitlines()
    assert len(lines) == len(LEXNAMES) == 45
    assert lines[0] == "00\tadj.all\t3" and lines[5] == "05\tnoun.animal\t1"
    assert lines[44] == "44\tadj.ppl\t3"
    assert (target / "data.noun").stat().st_size == (source / "data.noun").stat().st_size


def test_missing_wordnet_says_how_to_install(monkeypatch):
    monkeypatch.setattr(wordnet, "_find_in_nltk", lambda: None)
    monkeypatch.setattr(wordnet, "_system_dirs", lambda: [])
    monkeypatch.setattr(wordnet, "_network_allowed", lambda: False)
    wordnet.wordnet_root.cache_clear()
    try:
        with pytest.raises(ClipvizError, match="apt install wordnet-base wordnet-sense-index"):
            wordnet.wordnet_root()
    finally:
        wordnet.wordnet_root.cache_clear()
