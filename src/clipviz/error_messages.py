"""Every message a user can meet, read from the source with `ast`: the catalogue that
docs/troubleshooting.md must list, entry for entry.

What counts as a message (its `kind`):
- `error`: the text of a `ClipvizError` or of a subclass (`JobError`): the CLI prints it as
  `error: …` and exits with its code; the app shows it as the status line.
- `input`: the text of an `ImageError`, and a failure reason written as text where a failed
  row is made (`error=` of a call, an `"error"` key of a dict, an assignment to `.error`):
  the CLI prints it as `failed PATH: …` and the run's manifest or results keep it.
- `stderr`: a line the CLI prints on stderr (`err_console.print`) and a `warn(...)` call
  (report warnings, printed as `warning: …`); rich markup is removed.
Not counted: `typer.Exit` (it carries an exit code after a summary, never a message of its
own), and `ValueError`/`TypeError` raised for programmers (registering methods, internal
shapes); where such an error can reach a user it is caught and re-raised as a
`ClipvizError`, whose text is catalogued.

A message is its template: literal text kept, every value filled in at run time (an
f-string's `{…}`, `%s`, `.format`'s fields, any expression that is not text) written `…`,
runs of `…` merged. Module constants and the constant arguments of a message-making
function are filled in. A conditional gives one template per branch, except that a branch
that adds nothing (`""`) gives none. A message that is a variable is followed to the
assignments of that name in its function or module; a message that is a call to a function
of this package is followed to that function's `return`s. Failure reasons with no literal
words (`f"{type(e).__name__}: {e}"`) pass on a message catalogued elsewhere and are left out.
So are the branches of an error's message that pass another message on
(`message if rank == 0 else f"rank {rank}: {message}"` keeps `rank …: …`). Where no part of an
error's message can be read this way (`str(e)`), the site is reported as unresolved.

`python -m clipviz.error_messages` prints what docs/troubleshooting.md lacks and what it
lists that the code no longer says; `--all` prints the whole catalogue.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from pathlib import Path

from .message_reader import Catalogue, Message, Site, SourceReader, Unresolved, normalise

__all__ = ["Catalogue", "Message", "Site", "Unresolved", "catalogue", "entry", "missing",
           "normalise", "page_entries", "stale"]  # fmt: skip

PACKAGE = Path(__file__).parent
PAGE = PACKAGE.parent.parent / "docs" / "troubleshooting.md"


def catalogue(root: Path = PACKAGE) -> Catalogue:
    """The messages of the package at `root` (by default this one)."""
    return SourceReader(root).read()


def entry(template: str) -> str:
    """A template as the page's list item: one inline code span, fenced by more backticks
    than the template holds in a row."""
    fence = "`" * (max((len(r) for r in re.findall("`+", template)), default=0) + 1)
    pad = " " if template.startswith("`") or template.endswith("`") else ""
    return f"- {fence}{pad}{template}{pad}{fence}"


_ENTRY = re.compile(r"^[-*] (`+) ?(.*?) ?\1\s*$")


def page_entries(markdown: str) -> list[tuple[int, str]]:
    """(line number, normalised template) of each entry of the page: a list item that is
    one inline code span and nothing else."""
    found = []
    for number, line in enumerate(markdown.splitlines(), 1):
        if match := _ENTRY.match(line):
            found.append((number, normalise(match.group(2))))
    return found


def missing(cat: Catalogue, entries: Iterable[tuple[int, str]]) -> dict[str, list[Message]]:
    """The templates the page does not list, with their sites."""
    listed = {text for _, text in entries}
    return {t: ms for t, ms in cat.templates().items() if t not in listed}


def stale(cat: Catalogue, entries: Iterable[tuple[int, str]]) -> list[tuple[int, str]]:
    """The page's entries that no message of the code gives any more."""
    templates = cat.templates()
    return [(n, text) for n, text in entries if text not in templates]


def main(argv: list[str]) -> int:
    """Print what the page lacks and what it lists that is gone; 1 when either is found."""
    cat = catalogue()
    if "--all" in argv:
        for template, messages in sorted(cat.templates().items()):
            sites = ", ".join(str(m.site) for m in messages)
            print(f"{template}\t{messages[0].kind}\t{sites}")
        return 0
    entries = page_entries(PAGE.read_text(encoding="utf-8")) if PAGE.is_file() else []
    lacking, gone = missing(cat, entries), stale(cat, entries)
    for template, messages in sorted(lacking.items()):
        sites = ", ".join(str(m.site) for m in messages)
        print(f"missing: {entry(template)}  ({sites})")
    for number, text in gone:
        print(f"stale: {PAGE.name}:{number}: {text}")
    for u in cat.unresolved:
        print(f"unresolved: {u.site}: {u.source}")
    print(
        f"{len(cat.templates())} messages, {len(entries)} entries on the page, "
        f"{len(lacking)} missing, {len(gone)} stale, {len(cat.unresolved)} unresolved",
        file=sys.stderr,
    )
    return 1 if lacking or gone else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
