"""Image–caption sets for ECLIP training, read from the layouts people already have.

Formats (`fmt="auto"` picks by the path: a folder, `.jsonl`, `.json`, `.tsv`, else CSV):

- csv / tsv: a header row with an image column (`image`, `filepath`, `file`, `path` or
  `image_path`) and a caption column (`caption` or `text`); relative image paths are taken
  relative to the file's folder. `.csv` files whose header holds a tab are read as TSV.
- jsonl: one object per line, `{"image": ..., "caption": ...}` (`filepath`/`text` accepted);
  `caption` may be a list of strings, one pair each. Paths relative to the file's folder.
- coco: a COCO captions JSON (`images` with `id`/`file_name`, `annotations` with
  `image_id`/`caption`), one pair per annotation. Images are looked up under `images_dir`
  if given, else like the eval reader: `<split>/`, `images/<split>/`, `images/` and the
  folder itself, where the split is the JSON's stem without `captions_`
  (`annotations/captions_train2017.json` -> `train2017/`).
- folder: every image below the folder (recursively) with a `.txt` sidecar of the same stem;
  the sidecar's whole text is the caption.

Bad rows never stop a read: they are skipped and counted by reason in `CaptionSet.skipped`
(`missing image`, `empty caption`, `caption too long` (over `MAX_CAPTION_CHARS`),
`malformed row`, `no caption file`). Images that exist but
cannot be decoded are found when training loads them (`CaptionImages` returns the error
instead of raising) and counted as `unreadable image` there.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import ClipvizError
from .images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageError, load_image

CaptionFormat = Literal["auto", "csv", "tsv", "jsonl", "coco", "folder"]
IMAGE_COLUMNS = ("image", "filepath", "file", "path", "image_path")
CAPTION_COLUMNS = ("caption", "text")

MISSING_IMAGE = "missing image"
EMPTY_CAPTION = "empty caption"
CAPTION_TOO_LONG = "caption too long"
MALFORMED_ROW = "malformed row"
NO_CAPTION_FILE = "no caption file"
# 128 KiB, the csv module's default field limit: a text tower reads 77 tokens or so, and a
# caption this long is a broken row (a lost quote swallowing the file), not a description
MAX_CAPTION_CHARS = 131_072


@dataclass
class CaptionSet:
    """Image–caption pairs in file order, with identical captions sharing one id.

    caption_ids: `caption_ids[i]` indexes `unique_captions`; equal ids mean equal captions
        (the contrastive loss treats those as shared positives).
    skipped: rows dropped while reading, by reason.
    """

    source: Path
    format: str
    images: list[Path] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    caption_ids: list[int] = field(default_factory=list)
    unique_captions: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.images)

    def add(self, image: Path, caption: str) -> None:
        """Append one pair; `caption` gets the id of an identical earlier caption."""
        if caption not in self._index:
            self._index[caption] = len(self.unique_captions)
            self.unique_captions.append(caption)
        self.images.append(image)
        self.captions.append(caption)
        self.caption_ids.append(self._index[caption])

    def digest(self) -> str:
        """A short hash of the pairs, so a resumed run can tell that its data changed."""
        root = self.source if self.source.is_dir() else self.source.parent
        h = hashlib.sha1()
        for image, caption in zip(self.images, self.captions, strict=True):
            name = image.relative_to(root) if image.is_relative_to(root) else image
            h.update(f"{name}\0{caption}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()[:16]


def normalize_caption(text: Any) -> str:
    """Whitespace collapsed and trimmed; anything that is not a string counts as empty."""
    return " ".join(text.split()) if isinstance(text, str) else ""


def read_captions(
    path: str | Path, fmt: CaptionFormat = "auto", images_dir: str | Path | None = None
) -> CaptionSet:
    """Read an image–caption set; bad rows are skipped and counted, never fatal.

    images_dir: where relative image paths point (default: the file's folder; for COCO the
        guessed image folder).
    """
    path = Path(path)
    if not path.exists():
        raise ClipvizError(f"training data {path} does not exist; pass a caption file or folder")
    kind = _guess_format(path) if fmt == "auto" else fmt
    base = Path(images_dir) if images_dir is not None else None
    if base is not None and not base.is_dir():
        raise ClipvizError(
            f"`images` {base} is not a folder; pass the folder that the captions' image paths "
            "start from"
        )
    if kind == "folder":
        if not path.is_dir():
            raise ClipvizError(f"{path} is not a folder; `format` folder needs one")
        return _read_folder(path)
    if not path.is_file():
        raise ClipvizError(f"{path} is a folder; pass a caption file or use `format` folder")
    text = _read_text(path)
    if kind in ("csv", "tsv"):
        return _read_table(path, text, kind, base or path.parent)
    if kind == "jsonl":
        return _read_jsonl(path, text, base or path.parent)
    if kind == "coco":
        return _read_coco(path, text, base)
    raise ClipvizError(f"unknown caption format {kind!r}; use csv, tsv, jsonl, coco or folder")


def _guess_format(path: Path) -> str:
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".json": "coco", ".tsv": "tsv"}.get(suffix, "csv")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ClipvizError(f"{path} is not UTF-8 text ({e.reason}); save it as UTF-8") from e
    except OSError as e:
        raise ClipvizError(f"cannot read {path}: {e.strerror or e}") from e


def _resolve(base: Path, name: str) -> Path:
    p = Path(name).expanduser()
    return p if p.is_absolute() else base / p


def _add_checked(out: CaptionSet, image: Path | None, caption: Any) -> None:
    """Add one pair, or count why not."""
    text = normalize_caption(caption)
    # os.path.isfile: a name too long for the file system or holding a NUL is not a file
    if image is None or not os.path.isfile(image):
        out.skipped[MISSING_IMAGE] += 1
    elif not text:
        out.skipped[EMPTY_CAPTION] += 1
    elif len(text) > MAX_CAPTION_CHARS:
        out.skipped[CAPTION_TOO_LONG] += 1
    else:
        out.add(image, text)


@contextlib.contextmanager
def _field_limit(limit: int) -> Iterator[None]:
    """Let the csv module read fields up to `limit` characters (its default refuses a whole
    file for one field over 128 KiB); the old limit is restored after."""
    old = csv.field_size_limit(max(limit, csv.field_size_limit()))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _pick(names: Iterable[str], choices: tuple[str, ...]) -> str | None:
    lowered = {n.strip().lower(): n for n in names if n is not None}
    return next((lowered[c] for c in choices if c in lowered), None)


def _read_table(path: Path, text: str, fmt: str, base: Path) -> CaptionSet:
    first = text.split("\n", 1)[0]
    delimiter = "\t" if fmt == "tsv" or ("\t" in first and "," not in first) else ","
    out = CaptionSet(path, "tsv" if delimiter == "\t" else "csv")
    # no field is longer than the file: a long one is read whole and judged as a row
    with _field_limit(len(text) + 1):
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
            header = reader.fieldnames or []
            image_col, caption_col = _pick(header, IMAGE_COLUMNS), _pick(header, CAPTION_COLUMNS)
            if image_col is None or caption_col is None:
                raise ClipvizError(
                    f"{path}: the first row must be a header naming an image column "
                    f"({'/'.join(IMAGE_COLUMNS)}) and a caption column "
                    f"({'/'.join(CAPTION_COLUMNS)}); found {', '.join(header)[:200] or 'nothing'}"
                )
            for row in reader:
                if None in row or row.get(image_col) is None or row.get(caption_col) is None:
                    out.skipped[MALFORMED_ROW] += 1  # too many or too few fields
                    continue
                name = row[image_col].strip()
                _add_checked(out, _resolve(base, name) if name else None, row[caption_col])
        except csv.Error as e:
            raise ClipvizError(f"{path}: not a readable {out.format.upper()} file ({e})") from e
    return out


def _read_jsonl(path: Path, text: str, base: Path) -> CaptionSet:
    out = CaptionSet(path, "jsonl")
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            out.skipped[MALFORMED_ROW] += 1
            continue
        if not isinstance(row, dict):
            out.skipped[MALFORMED_ROW] += 1
            continue
        name = row.get("image", row.get("filepath"))
        image = _resolve(base, name) if isinstance(name, str) and name.strip() else None
        caption = row.get("caption", row.get("text"))
        for c in caption if isinstance(caption, list) else [caption]:
            _add_checked(out, image, c)
    return out


def coco_image_folders(json_path: Path) -> list[Path]:
    """Where a COCO captions JSON's images may live, in lookup order."""
    base = json_path.parent.parent if json_path.parent.name == "annotations" else json_path.parent
    stem = json_path.stem
    split = stem.removeprefix("captions_") if stem.startswith("captions_") else None
    folders = [base / split, base / "images" / split] if split else []
    return [*folders, base / "images", base]


def _read_coco(path: Path, text: str, images_dir: Path | None) -> CaptionSet:
    try:
        data = json.loads(text)
        images = {im["id"]: str(im["file_name"]) for im in data["images"]}
        annotations = list(data["annotations"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ClipvizError(
            f"{path} is not a COCO captions file ({type(e).__name__}: {e}); expected "
            "'images' (id, file_name) and 'annotations' (image_id, caption)"
        ) from e
    folders = [images_dir] if images_dir is not None else coco_image_folders(path)
    found: dict[Any, Path | None] = {}
    out = CaptionSet(path, "coco")
    for ann in annotations:
        if not isinstance(ann, dict) or ann.get("image_id") not in images:
            out.skipped[MALFORMED_ROW] += 1
            continue
        image_id = ann["image_id"]
        if image_id not in found:
            name = images[image_id]
            found[image_id] = next(
                (f / name for f in folders if (f / name).is_file()), folders[0] / name
            )
        _add_checked(out, found[image_id], ann.get("caption"))
    return out


def _read_folder(root: Path) -> CaptionSet:
    out = CaptionSet(root, "folder")
    for image in sorted(root.rglob("*")):
        rel = image.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not image.is_file():
            continue
        if image.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        sidecar = image.with_suffix(".txt")
        if not sidecar.is_file():
            out.skipped[NO_CAPTION_FILE] += 1
            continue
        try:
            caption = sidecar.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError):
            out.skipped[MALFORMED_ROW] += 1
            continue
        _add_checked(out, image, caption)
    return out


def describe_skipped(skipped: Counter[str] | dict[str, int]) -> str:
    """`"3 missing image, 1 empty caption"`, or an empty string."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()) if n)


class CaptionImages(torch.utils.data.Dataset):
    """Decodes and preprocesses images in DataLoader workers.

    Item i is `(i, tensor, None)` or, for a file that cannot be decoded, `(i, None, reason)`:
    a bad image is dropped from its batch and counted, never raised mid-epoch.
    """

    def __init__(self, images: list[Path], preprocess: Any, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.images, self.preprocess, self.max_pixels = images, preprocess, max_pixels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.preprocess(load_image(self.images[i], self.max_pixels)), None
        except ImageError as e:
            return i, None, str(e)
        except Exception as e:  # noqa: BLE001 - one bad file must not stop an epoch
            return i, None, f"{type(e).__name__}: {e}"


def as_list(batch: list[Any]) -> list[Any]:
    """Collate function that keeps a batch as its list of items (failures included)."""
    return batch
