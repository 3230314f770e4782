"""WordNet 3.0 nouns for ConVis: finding WordNet, vocabularies, the hypernym hierarchy.

WordNet is found, in this order, in nltk's own data folders; in a Princeton WordNet 3.0
`dict` folder on the system (`$WNSEARCHDIR`, `$WNHOME/dict`, `/usr/share/wordnet`, …; Debian's
`wordnet-base` package), copied once into an nltk data folder under the clipviz cache with
the `lexnames` file nltk needs and Debian leaves out; then through `nltk.download`.

nltk builds a Python object per synset, which costs seconds for the tens of thousands of
synsets a vocabulary touches, so the noun database is read once straight from the same
files (`NounDatabase`, same names, definitions and hypernyms as nltk) and cached as JSON.
nltk's reader (`ensure_wordnet()`) still resolves inflected words ("geese" -> goose).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import os
import re
import shutil
import socket
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ClipvizError
from .files import atomic_path, cache_root

# The 45 lexicographer files of WordNet 3.0 (lexnames(5WN)), numbered 00-44; nltk reads them
# from a `lexnames` file, which Debian's wordnet-base does not ship.
LEXNAMES = (  # noqa: SIM905 - as the man page lists them
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food "
    "noun.group noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_LEX_POS = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

INSTALL_HINT = (
    "WordNet 3.0 was not found; install it with `sudo apt install wordnet-base "
    "wordnet-sense-index` (Debian/Ubuntu; `make install` does this when run as root) or "
    "`python -m nltk.downloader wordnet` (needs network), or point $WNHOME at a Princeton "
    "WordNet 3.0 folder"
)

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
_SYNSET_NAME = re.compile(r"^(.+)\.([nvasr])\.(\d+)$")
_DB_FORMAT = 1


# -- finding WordNet -------------------------------------------------------------------------


def _nltk_data_dir() -> Path:
    return cache_root() / "nltk_data"


def _system_dirs() -> list[Path]:
    dirs = []
    if env := os.environ.get("WNSEARCHDIR"):
        dirs.append(Path(env))
    if env := os.environ.get("WNHOME"):
        dirs.append(Path(env) / "dict")
    dirs += [
        Path("/usr/share/wordnet"),
        Path("/usr/local/WordNet-3.0/dict"),
        Path("/usr/local/share/wordnet"),
        Path("/opt/homebrew/share/wordnet"),
    ]
    return dirs


def _is_wordnet30(folder: Path) -> bool:
    """A Princeton dict folder with the files nltk reads, of version 3.0 (offsets differ in 3.1)."""
    needed = ("data.noun", "index.noun", "noun.exc", "data.verb", "data.adj", "data.adv")
    if not all((folder / name).is_file() for name in needed):
        return False
    with open(folder / "data.noun", encoding="ascii", errors="replace") as f:
        header = "".join(f.readline() for _ in range(40))
    return "WordNet 3.0 Copyright" in header


def _install_from_dict(source: Path, target: Path) -> None:
    """Copy a system dict folder into an nltk data folder, adding `lexnames` if missing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for f in source.iterdir():
            if f.is_file():
                shutil.copyfile(f, tmp / f.name)
        if not (tmp / "lexnames").is_file():
            (tmp / "lexnames").write_text(
                "".join(
                    f"{i:02d}\t{name}\t{_LEX_POS[name.split('.')[0]]}\n"
                    for i, name in enumerate(LEXNAMES)
                ),
                encoding="ascii",
            )
        os.replace(tmp, target)  # atomic; fails if another process got there first
    except OSError:
        if not (target / "lexnames").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _find_in_nltk() -> Any | None:
    import nltk

    try:
        root = nltk.data.find("corpora/wordnet")
    except LookupError:
        return None
    try:
        with contextlib.closing(root.join("lexnames").open()):
            return root
    except (OSError, ValueError, LookupError):
        return None


def _network_allowed() -> bool:
    offline = ("CLIPVIZ_OFFLINE", "HF_HUB_OFFLINE")
    return not any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in offline)


def _download(seconds: float = 3.0) -> bool:
    """`nltk.download('wordnet')` into the clipviz cache, if nltk's server answers quickly."""
    if not _network_allowed():
        return False
    reachable = [False]

    def probe() -> None:
        with contextlib.suppress(OSError):
            socket.create_connection(("raw.githubusercontent.com", 443), timeout=seconds).close()
            reachable[0] = True

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(seconds + 0.5)
    if not reachable[0]:
        return False
    import nltk

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15.0)  # nltk's downloader has no timeout of its own
    try:
        return bool(nltk.download("wordnet", download_dir=str(_nltk_data_dir()), quiet=True))
    except Exception:  # noqa: BLE001 - any download failure falls through to the hint
        return False
    finally:
        socket.setdefaulttimeout(previous)


@functools.lru_cache(maxsize=1)
def wordnet_root() -> Any:
    """nltk's path pointer to a WordNet 3.0 corpus folder, installing one as needed.

    Raises `ClipvizError` with install instructions when none can be found or fetched.
    """
    import nltk

    ours = str(_nltk_data_dir())
    if ours not in nltk.data.path:
        nltk.data.path.append(ours)  # after the user's own folders, which take precedence
    if (root := _find_in_nltk()) is not None:
        return root
    for folder in _system_dirs():
        if folder.is_dir() and _is_wordnet30(folder):
            try:
                _install_from_dict(folder, _nltk_data_dir() / "corpora" / "wordnet")
            except OSError as e:
                raise ClipvizError(f"could not copy WordNet from {folder} into {ours}: {e}") from e
            if (root := _find_in_nltk()) is not None:
                return root
    if _download() and (root := _find_in_nltk()) is not None:
        return root
    raise ClipvizError(INSTALL_HINT)


def _reader_class() -> type:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class Reader(WordNetCorpusReader):  # type: ignore[misc]
        def map_wn(self, version: str = "wordnet") -> Any:
            # nltk >= 3.9 compares the version number with the corpus *name* and so maps
            # WordNet 3.0 onto itself at start-up (reading index.sense twice, ~10 s).
            if self.get_version() == "3.0":
                return None
            return super().map_wn(version)

    return Reader


@functools.lru_cache(maxsize=1)
def ensure_wordnet() -> Any:
    """nltk's `WordNetCorpusReader` on WordNet 3.0 (see `wordnet_root` for where it looks)."""
    root = wordnet_root()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available"
        try:
            return _reader_class()(root, None)
        except (OSError, ValueError, LookupError) as e:
            raise ClipvizError(f"WordNet at {root} is unreadable ({e}); {INSTALL_HINT}") from e


# -- the noun database -----------------------------------------------------------------------


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
        return _closure(starts, self.hypernyms)

    def descendants(self, starts: Iterable[int]) -> set[int]:
        """The synsets themselves and every hyponym below them (the WordNet subtree)."""
        return _closure(starts, self.hyponyms)

    def text(self, i: int, embed: str = "definitions") -> str:
        """What ConVis embeds for synset `i`: its gloss, or its lemma names."""
        if embed == "lemmas":
            return ", ".join(name.replace("_", " ") for name in self.lemmas[i])
        return self.definitions[i]

    def synset(self, name: str) -> int:
        """Position of synset `name`, or a `ClipvizError` with close matches."""
        name = name.strip()
        if (i := self.position.get(name)) is not None:
            return i
        m = _SYNSET_NAME.match(name)
        if m and m.group(2) != "n":
            raise ClipvizError(f"{name} is not a noun synset; ConVis concepts are nouns (x.n.NN)")
        word = (m.group(1) if m else name).lower().replace(" ", "_")
        if word in self.words:
            choices = ", ".join(self.names[s] for s in self.words[word])
            raise ClipvizError(f"unknown synset {name!r}; the noun {word!r} has: {choices}")
        raise ClipvizError(f"unknown synset {name!r}{self._suggestions(word)}")

    def resolve_word(self, word: str) -> list[int]:
        """The noun synsets of `word` (inflected forms too), most frequent sense first."""
        key = word.strip().lower().replace(" ", "_")
        if key in self.words:
            return list(self.words[key])
        found = []
        if key:
            found = [s.name() for s in ensure_wordnet().synsets(key, pos="n")]
        if not found:
            raise ClipvizError(f"{word!r} is not a WordNet noun{self._suggestions(key)}")
        return [self.position[n] for n in found]

    def _suggestions(self, word: str) -> str:
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


def _closure(starts: Iterable[int], edges: Sequence[Sequence[int]]) -> set[int]:
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
            raise ClipvizError(f"WordNet at {root} is unreadable ({e}); {INSTALL_HINT}") from e
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


# -- vocabularies and the hierarchy ----------------------------------------------------------


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
                "add it to the vocabulary or choose another --vocabulary"
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
        return sorted(_closure([i], self._hyponyms))


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
            f"--vocabulary {vocabulary!r} is neither default, all nor a file of words"
        )
    words, members, problems = [], set(), []
    for entry in _read_words_file(path):
        try:
            if _SYNSET_NAME.match(entry):
                members.add(db.synset(entry))
            else:
                members.update(db.resolve_word(entry))
                words.append(entry)
        except ClipvizError as e:
            problems.append(str(e))
    if problems:
        raise ClipvizError(f"{path}: " + "; ".join(problems[:5]))
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
