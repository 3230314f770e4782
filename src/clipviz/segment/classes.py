"""Class names of a segmentation: one line per class in label order, synonyms on a line.

A classes file holds one class per line; line i is class i, and class 0 is where pixels whose
best probability stays under `prob_thd` fall (the background of VOC21, PC60 and COCO-Object).
Several names for one class share its line, separated by `,` or `;` (with or without spaces):
every name is scored, and the class takes the best of its names' probabilities.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import ClipvizError

# labels are written as 16-bit PNGs: classes 0 … 65534
MAX_CLASSES = 65_535
_SEPARATOR = re.compile(r"\s*[,;]\s*")


@dataclass(frozen=True)
class ClassNames:
    """The names of each class, in label order: `lines[c]` are the names of class `c`."""

    lines: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def names(self) -> list[str]:
        """Every name, line after line: the queries scored against the image."""
        return [name for line in self.lines for name in line]

    @property
    def name_class(self) -> list[int]:
        """The class of each name of `names`."""
        return [c for c, line in enumerate(self.lines) for _ in line]

    @property
    def labels(self) -> list[str]:
        """One label per class (its first name), for legends and tables."""
        return [line[0] for line in self.lines]


def _checked(lines: list[list[str]], source: str) -> ClassNames:
    if not lines:
        raise ClipvizError(f"{source} names no class; give one class per line")
    if len(lines) > MAX_CLASSES:
        raise ClipvizError(
            f"{source} has {len(lines):,} classes; at most {MAX_CLASSES:,} are supported"
        )
    seen: dict[str, int] = {}
    for number, names in enumerate(lines, 1):
        for name in names:
            if name in seen:
                where = "twice on" if seen[name] == number else f"on lines {seen[name]} and"
                raise ClipvizError(
                    f"{source}: name {name!r} is {where} line {number}; every name belongs to "
                    "one class: keep it on one line"
                )
            seen[name] = number
    return ClassNames(tuple(tuple(names) for names in lines))


def parse_classes(text: str, source: str = "the classes") -> ClassNames:
    """Classes from the text of a classes file (one class per line, synonyms separated by `,`
    or `;`); a blank line, an empty name or a name on two lines is a usage error."""
    rows = text.split("\n")
    if rows and rows[-1] == "":
        rows.pop()  # the final newline ends the last line
    lines = []
    for number, row in enumerate(rows, 1):
        row = row.strip()
        if not row:
            raise ClipvizError(
                f"{source}: line {number} is blank; every line names one class (line i is "
                "class i): remove the blank line"
            )
        names = _SEPARATOR.split(row)
        if "" in names:
            raise ClipvizError(
                f"{source}: line {number} has an empty name ({row!r}); separate names by one "
                "`,` or `;`"
            )
        lines.append(names)
    return _checked(lines, source)


def read_classes_file(path: str | Path) -> ClassNames:
    """Classes from a classes file (UTF-8)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClipvizError(f"classes file {path} does not exist; check the path") from None
    except UnicodeDecodeError:
        raise ClipvizError(f"classes file {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise ClipvizError(f"cannot read classes file {path}: {e.strerror}") from None
    return parse_classes(text.replace("\r\n", "\n"), f"classes file {path}")


def inline_classes(spec: str) -> ClassNames:
    """Classes from an inline list `a,b,c` (one name per class, in label order)."""
    names = [n.strip() for n in spec.split(",")]
    if not spec.strip():
        raise ClipvizError("`classes` is empty; list the class names, e.g. background,cat,dog")
    if "" in names:
        raise ClipvizError(
            f"`classes` {spec!r} has an empty name; separate the names by single commas"
        )
    return _checked([[n] for n in names], "`classes`")


BENCHMARK_CLASSES = ("voc21", "voc20", "context60", "context59", "coco_object",
                     "coco_stuff164k", "cityscapes", "ade20k")  # fmt: skip


def benchmark_classes(benchmark: str) -> ClassNames:
    """The class names clipviz ships for one of the eight benchmarks."""
    if benchmark not in BENCHMARK_CLASSES:
        raise ClipvizError(
            f"unknown benchmark {benchmark!r}; choose from: {', '.join(BENCHMARK_CLASSES)}"
        )
    text = resources.files(__package__).joinpath(f"data/classes/{benchmark}.txt").read_text()
    return parse_classes(text, f"the {benchmark} classes")
