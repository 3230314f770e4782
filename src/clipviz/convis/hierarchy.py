"""ConVis vocabularies and the hierarchy they span: a vocabulary's noun synsets and all their
hypernyms, with edges from hypernym to hyponym."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ClipvizError
from .nouns import ROOT, SYNSET_NAME, NounDatabase, closure, noun_database

# the unknown entries of a vocabulary file an error shows, with spelling suggestions
SHOWN_PROBLEMS = 5


@dataclass(frozen=True, eq=False)
class Hierarchy:
    """The synsets ConVis ranks: a vocabulary's noun synsets and all their hypernyms.

    names: synset names, position = hierarchy index; members: indices of the vocabulary's
    own synsets; edges (`parents[e]` -> `children[e]`) go from hypernym to hyponym.
    """

    vocabulary: str
    words: tuple[str, ...]
    names: tuple[str, ...]
    db_index: np.ndarray  # [U] position in the noun database
    members: np.ndarray  # [V]
    parents: np.ndarray  # [E]
    children: np.ndarray  # [E]

    def __len__(self) -> int:
        return len(self.names)

    @functools.cached_property
    def position(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def index(self, name: str) -> int:
        """Hierarchy index of synset `name` (`ClipvizError` if it is not in the hierarchy)."""
        if (i := self.position.get(name)) is None:
            noun_database().synset(name)  # unknown to WordNet: the error with suggestions
            raise ClipvizError(
                f"{name} is not in the {self.vocabulary} vocabulary's hierarchy; "
                "add it to the vocabulary or choose another `vocabulary`"
            )
        return i

    @functools.cached_property
    def _hyponyms(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.names]
        for p, c in zip(self.parents.tolist(), self.children.tolist(), strict=True):
            out[p].append(c)
        return out

    def subtree(self, concept: str | int) -> list[int]:
        """`S(s)`: indices of a synset (name or index) and all its hyponyms here, sorted."""
        i = self.index(concept) if isinstance(concept, str) else concept
        return sorted(closure([i], self._hyponyms))


@functools.lru_cache(maxsize=1)
def _under_entity(db: NounDatabase) -> frozenset[int]:
    return frozenset(db.descendants([db.position[ROOT]]))


def _read_words_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ClipvizError(f"cannot read vocabulary file {path}: {e}") from e
    return [s for line in lines if (s := line.split("#", 1)[0].strip())]


@functools.lru_cache(maxsize=8)
def vocabulary_synsets(vocabulary: str = "default") -> tuple[tuple[str, ...], frozenset[int]]:
    """A vocabulary's words and noun synsets (database positions): `default`, `all` (every
    noun synset) or a file with one word or synset name per line (`#` starts a comment)."""
    db = noun_database()
    if vocabulary == "default":
        words = db.default_vocabulary()
        return tuple(words), frozenset(s for w in words for s in db.words[w])
    if vocabulary == "all":
        return (), frozenset(range(len(db)))
    path = Path(vocabulary)
    if not path.is_file():
        raise ClipvizError(
            f"`vocabulary` {vocabulary!r} is neither default, all nor a file of words"
        )
    words, members = [], set()
    problems: list[str] = []
    for entry in _read_words_file(path):
        # spelling suggestions cost a fraction of a second each: only for the entries shown
        suggest = len(problems) < SHOWN_PROBLEMS
        try:
            if SYNSET_NAME.match(entry):
                members.add(db.synset(entry, suggest))
            else:
                members.update(db.resolve_word(entry, suggest))
                words.append(entry)
        except ClipvizError as e:
            problems.append(str(e))
    if problems:
        more = len(problems) - SHOWN_PROBLEMS
        raise ClipvizError(
            f"{path}: "
            + "; ".join(problems[:SHOWN_PROBLEMS])
            + (f" (and {more:,} more entries WordNet does not know)" if more > 0 else "")
        )
    if not members:
        raise ClipvizError(f"vocabulary file {path} lists no words")
    return tuple(words), frozenset(members)


@functools.lru_cache(maxsize=8)
def load_hierarchy(vocabulary: str = "default", extra: tuple[str, ...] = ()) -> Hierarchy:
    """The hierarchy of a vocabulary (see `vocabulary_synsets`) with the `extra` synsets
    (e.g. requested concepts) added to it."""
    db = noun_database()
    words, vocab = vocabulary_synsets(vocabulary)
    members = set(vocab) | {db.synset(name) for name in extra}
    members &= _under_entity(db)  # keep synsets with a hypernym path to entity.n.01
    nodes = sorted(db.ancestors(members))
    local = {g: i for i, g in enumerate(nodes)}
    edges = [(local[p], local[c]) for c in nodes for p in db.hypernyms[c]]
    parents, children = (np.array(x, dtype=np.int64).reshape(-1) for x in zip(*edges, strict=True))
    return Hierarchy(
        vocabulary=vocabulary,
        words=words,
        names=tuple(db.names[g] for g in nodes),
        db_index=np.array(nodes, dtype=np.int64),
        members=np.array(sorted(local[m] for m in members), dtype=np.int64),
        parents=parents,
        children=children,
    )


def resolve_concepts(
    synsets: Sequence[str] = (), words: Sequence[str] = ()
) -> tuple[list[str], dict[str, list[str]]]:
    """Validate synset names and resolve words to their most frequent noun sense.

    Returns the concepts (synset names, in order, without repeats) and, for each ambiguous
    word, all its senses, so the caller can list the choices.
    """
    db = noun_database()
    concepts = [db.names[db.synset(s)] for s in synsets]
    ambiguous: dict[str, list[str]] = {}
    for w in words:
        senses = db.resolve_word(w)
        concepts.append(db.names[senses[0]])
        if len(senses) > 1:
            ambiguous[w] = [db.names[s] for s in senses]
    return list(dict.fromkeys(concepts)), ambiguous


def leaves(name: str) -> list[str]:
    """Synsets without hyponyms in the full WordNet subtree of `name` (itself if a leaf)."""
    db = noun_database()
    subtree = db.descendants([db.synset(name)])
    return sorted(db.names[s] for s in subtree if not db.hyponyms[s])
