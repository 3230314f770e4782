"""WordNet 3.0's noun synsets as plain lists: names, definitions, lemmas, hypernyms and sense
counts, read straight from the dict files and cached as JSON.

nltk builds a Python object per synset, which costs seconds for the tens of thousands of
synsets a vocabulary touches; `NounDatabase` has the same names, definitions and hypernyms
as nltk's reader.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ClipvizError
from ..files import atomic_path, cache_root
from .wordnet import REPAIR_HINT, ensure_wordnet, wordnet_root

# Default vocabulary: every noun whose most frequent sense (sense 1, WordNet's order) is a
# physical entity (a hyponym of physical_entity.n.01) and was tagged at least
# DEFAULT_MIN_COUNT times in the semantic concordance (cntlist.rev). Measured on WordNet
# 3.0: DEFAULT_VOCABULARY_SIZE words, with 5,256 noun synsets and 7,700 synsets in their
# hierarchy (the ConVis paper: 1,979 words, about 7,000 synsets).
DEFAULT_ROOT = "physical_entity.n.01"
DEFAULT_MIN_COUNT = 3
DEFAULT_VOCABULARY_SIZE = 2066
ALL_NOUN_SYNSETS = 82115
ROOT = "entity.n.01"
SYNSET_NAME = re.compile(r"^(.+)\.([nvasr])\.(\d+)$")
_DB_FORMAT = 1


def _read_text(root: Any, name: str) -> str:
    with contextlib.closing(root.join(name).open()) as f:
        data = f.read()
    return data.decode("ascii", errors="replace") if isinstance(data, bytes) else data


def _parse(root: Any) -> dict[str, Any]:
    """WordNet's noun files -> plain lists (synsets in data.noun order)."""
    offsets: list[int] = []
    lexnums: list[int] = []
    lemmas: list[list[str]] = []
    lex_ids: list[list[int]] = []
    hypernym_offsets: list[list[int]] = []
    definitions: list[str] = []
    for line in _read_text(root, "data.noun").splitlines():
        if not line or line[0] == " ":
            continue
        head, _, gloss = line.strip().partition("|")
        f = head.split()
        n = int(f[3], 16)
        offsets.append(int(f[0]))
        lexnums.append(int(f[1]))
        lemmas.append(f[4 : 4 + 2 * n : 2])
        lex_ids.append([int(x, 16) for x in f[5 : 5 + 2 * n : 2]])
        p = 4 + 2 * n
        ptrs = f[p + 1 : p + 1 + 4 * int(f[p])]
        hypernym_offsets.append(
            [int(ptrs[j + 1]) for j in range(0, len(ptrs), 4) if ptrs[j] in ("@", "@i")]
        )
        # as nltk: examples are the quoted parts of the gloss, the definition the rest
        definitions.append(re.sub(r"[\"].*?[\"]", "", gloss).strip().strip("; "))
    position = {off: i for i, off in enumerate(offsets)}
    words: dict[str, list[int]] = {}
    for line in _read_text(root, "index.noun").splitlines():
        if not line or line[0] == " ":
            continue
        f = line.split()
        words[f[0]] = [position[int(x)] for x in f[4 + int(f[3]) + 2 :]]
    tagged: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError, LookupError):
        for line in _read_text(root, "cntlist.rev").splitlines():
            key, _, count = line.split()
            tagged[key] = int(count)
    names = []
    for i, lem in enumerate(lemmas):
        first = lem[0].lower()
        names.append(f"{first}.n.{words[first].index(i) + 1:02d}")
    counts = {}
    for w, senses in words.items():
        counts[w] = [
            sum(
                tagged.get(f"{lemma}%1:{lexnums[s]:02d}:{lex_id:02d}::".lower(), 0)
                for lemma, lex_id in zip(lemmas[s], lex_ids[s], strict=True)
                if lemma.lower() == w
            )
            for s in senses
        ]
    return {
        "format": _DB_FORMAT,
        "names": names,
        "definitions": definitions,
        "lemmas": lemmas,
        "hypernyms": [[position[o] for o in hs] for hs in hypernym_offsets],
        "words": words,
        "counts": counts,
    }


@dataclass(frozen=True, eq=False)
class NounDatabase:
    """All 82,115 noun synsets of WordNet 3.0 as plain lists, indexed by position.

    names: nltk's synset names ("dog.n.01"); lemmas: their lemma names ("Canis_familiaris");
    hypernyms: positions of each synset's hypernyms and instance hypernyms; words: every noun
    (index.noun's lowercase form) -> its synsets, most frequent sense first; counts: the
    tagged-sense count of each of those senses for that word.
    """

    names: list[str]
    definitions: list[str]
    lemmas: list[list[str]]
    hypernyms: list[list[int]]
    words: dict[str, list[int]]
    counts: dict[str, list[int]]

    def __len__(self) -> int:
        return len(self.names)

    @functools.cached_property
    def position(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    @functools.cached_property
    def hyponyms(self) -> list[list[int]]:
        children: list[list[int]] = [[] for _ in self.names]
        for child, parents in enumerate(self.hypernyms):
            for p in parents:
                children[p].append(child)
        return children

    def ancestors(self, starts: Iterable[int]) -> set[int]:
        """The synsets themselves and every hypernym above them."""
        return closure(starts, self.hypernyms)

    def descendants(self, starts: Iterable[int]) -> set[int]:
        """The synsets themselves and every hyponym below them (the WordNet subtree)."""
        return closure(starts, self.hyponyms)

    def text(self, i: int, embed: str = "definitions") -> str:
        """What ConVis embeds for synset `i`: its gloss, or its lemma names."""
        if embed == "lemmas":
            return ", ".join(name.replace("_", " ") for name in self.lemmas[i])
        return self.definitions[i]

    def synset(self, name: str, suggest: bool = True) -> int:
        """Position of synset `name`, or a `ClipvizError` (with close matches if `suggest`:
        they cost a fraction of a second a name)."""
        name = name.strip()
        if (i := self.position.get(name)) is not None:
            return i
        m = SYNSET_NAME.match(name)
        if m and m.group(2) != "n":
            raise ClipvizError(f"{name} is not a noun synset; ConVis concepts are nouns (x.n.NN)")
        word = (m.group(1) if m else name).lower().replace(" ", "_")
        if word in self.words:
            choices = ", ".join(self.names[s] for s in self.words[word])
            raise ClipvizError(f"unknown synset {name!r}; the noun {word!r} has: {choices}")
        raise ClipvizError(
            f"unknown synset {name!r}{self._suggestions(word, suggest)}; synsets are named "
            "NOUN.n.NN: `word` NOUN uses a noun's first sense and lists its others"
        )

    def resolve_word(self, word: str, suggest: bool = True) -> list[int]:
        """The noun synsets of `word` (inflected forms too), most frequent sense first; for
        an unknown word a `ClipvizError`, with close matches if `suggest`."""
        key = word.strip().lower().replace(" ", "_")
        if key in self.words:
            return list(self.words[key])
        found = []
        if key:
            found = [s.name() for s in ensure_wordnet().synsets(key, pos="n")]
        if not found:
            raise ClipvizError(f"{word!r} is not a WordNet noun{self._suggestions(key, suggest)}")
        return [self.position[n] for n in found]

    def _suggestions(self, word: str, suggest: bool = True) -> str:
        if not suggest:
            return ""
        close = difflib.get_close_matches(word, list(self.words), n=5, cutoff=0.7)
        if not close:
            return ""
        return "; did you mean " + ", ".join(f"{self.names[self.words[w][0]]}" for w in close)

    def default_vocabulary(self) -> list[str]:
        """The default vocabulary's words (see DEFAULT_MIN_COUNT for the rule)."""
        physical = self.descendants([self.position[DEFAULT_ROOT]])
        return [
            w
            for w, senses in sorted(self.words.items())
            if senses[0] in physical and self.counts[w][0] >= DEFAULT_MIN_COUNT
        ]


def closure(starts: Iterable[int], edges: Sequence[Sequence[int]]) -> set[int]:
    seen = set(starts)
    stack = list(seen)
    while stack:
        for nxt in edges[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _db_cache_file(root: Any) -> Path:
    import hashlib

    stamp = str(root)
    with contextlib.suppress(OSError, AttributeError):
        st = Path(root.path, "data.noun").stat()
        stamp += f":{st.st_size}:{int(st.st_mtime)}"
    digest = hashlib.sha1(stamp.encode()).hexdigest()[:12]
    return cache_root() / "wordnet" / f"nouns-{digest}.json"


@functools.lru_cache(maxsize=1)
def noun_database() -> NounDatabase:
    """The WordNet 3.0 noun database (parsed once, then read from the clipviz cache)."""
    root = wordnet_root()
    path = _db_cache_file(root)
    data: dict[str, Any] | None = None
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text(encoding="utf-8"))
    if not data or data.get("format") != _DB_FORMAT:
        try:
            data = _parse(root)
        except (OSError, ValueError, KeyError, IndexError, LookupError) as e:
            raise ClipvizError(f"WordNet at {root} is unreadable ({e}); {REPAIR_HINT}") from e
        with contextlib.suppress(OSError), atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
    return NounDatabase(
        data["names"],
        data["definitions"],
        data["lemmas"],
        data["hypernyms"],
        data["words"],
        data["counts"],
    )
