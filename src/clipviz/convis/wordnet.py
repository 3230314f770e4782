"""WordNet 3.0 nouns for ConVis: finding WordNet, vocabularies, the hypernym hierarchy.

WordNet is found, in this order, in nltk's own data folders; in a Princeton WordNet 3.0
`dict` folder on the system (`$WNSEARCHDIR`, `$WNHOME/dict`, `/usr/share/wordnet`, …; Debian's
`wordnet-base` package), copied once into an nltk data folder under the clipviz cache with
the `lexnames` file nltk needs and Debian leaves out; then through `nltk.download`.

The noun database (`nouns.py`) is read straight from the files found here; nltk's reader
(`ensure_wordnet()`) still resolves inflected words ("geese" -> goose).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import threading
import warnings
from pathlib import Path
from typing import Any

from ..errors import ClipvizError
from ..files import cache_root

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
# What to do about a WordNet that was found but cannot be read.
REPAIR_HINT = (
    "the copy is incomplete: delete that folder, and clipviz finds, copies or downloads "
    "WordNet again"
)


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
                raise ClipvizError(
                    f"could not copy WordNet from {folder} into {ours}: {e}; make that folder "
                    "writable, or set $CLIPVIZ_CACHE to a writable folder"
                ) from e
            if (root := _find_in_nltk()) is not None:
                return root
    if _download() and (root := _find_in_nltk()) is not None:
        return root
    raise ClipvizError(INSTALL_HINT)


def _reader_class() -> type:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class Reader(WordNetCorpusReader):
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
            raise ClipvizError(f"WordNet at {root} is unreadable ({e}); {REPAIR_HINT}") from e
