"""docs/troubleshooting.md lists every message the code can show a user, and nothing the code
no longer says; the catalogue behind it reads messages from the source as they are printed."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from clipviz.error_messages import catalogue, entry, missing, normalise, page_entries, stale

PAGE = Path(__file__).parent.parent / "docs" / "troubleshooting.md"

# Errors whose whole message is another error's, passed on: the message is catalogued where it
# is made, so these sites have nothing of their own to list. Key: "path: message expression".
PASSED_ON = {
    # the concept search's own ClipvizError, re-raised by the app for the status line
    "clipviz/app/segmentation.py: str(found.error)",
}


@pytest.fixture(scope="module")
def code_catalogue():
    return catalogue()


@pytest.fixture(scope="module")
def entries():
    return page_entries(PAGE.read_text(encoding="utf-8"))


def test_page_lists_every_message_of_the_code(code_catalogue, entries):
    lacking = missing(code_catalogue, entries)
    lines = [
        f"{entry(template)}  ({', '.join(str(m.site) for m in messages)})"
        for template, messages in sorted(lacking.items())
    ]
    if lacking:
        pytest.fail(f"{PAGE.name} lacks {len(lines)} message(s):\n" + "\n".join(lines))


def test_page_lists_no_message_the_code_no_longer_gives(code_catalogue, entries):
    gone = stale(code_catalogue, entries)
    lines = [f"{PAGE.name}:{number}: {text}" for number, text in gone]
    if gone:
        pytest.fail("entries that no message of the code gives any more:\n" + "\n".join(lines))


def test_page_lists_each_message_once(entries):
    texts = [text for _, text in entries]
    assert sorted({t for t in texts if texts.count(t) > 1}) == []


def test_every_error_message_is_read_or_known_to_be_passed_on(code_catalogue):
    assert {u.key for u in code_catalogue.unresolved} == PASSED_ON


def _package(tmp_path: Path, source: str) -> Path:
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "mod.py").write_text(textwrap.dedent(source), encoding="utf-8")
    return root


def test_templates_keep_literal_text_and_mark_each_value(tmp_path):
    root = _package(
        tmp_path,
        """
        HINT = "install it with `apt`"

        class ClipvizError(Exception): ...
        class ImageError(Exception): ...
        class JobError(ClipvizError): ...

        def _needs(what):
            return f"this needs {what} tower, and {model}'s is {family}"

        def f(path, n, e, ok):
            raise ClipvizError(f"{path}: no such file ({n:,} left); {HINT}")
            raise ClipvizError("a " + f"{path}" + " b" + (f" (skipped {n})" if n else ""))
            raise ClipvizError("one" if ok else f"two {n}")
            raise JobError("%s is %d wide" % (path, n))
            raise ClipvizError("{} of {}".format(path, n))
            raise ClipvizError(_needs("a ViT"))
            message = f"cannot read {path}"
            raise ClipvizError(message)
            raise ClipvizError(str(e))
            raise ImageError("not a file")
            yield Sample(error=f"shard cannot be read: {e}")
            yield {"error": f"{type(e).__name__}: {e}"}
            err_console.print(f"[yellow]warning:[/] {path} is given {n} times")
        """,
    )
    cat = catalogue(root)
    found = {(m.template, m.kind, m.site.line) for m in cat.messages}
    assert found == {
        ("…: no such file (… left); install it with `apt`", "error", 12),
        ("a … b (skipped …)", "error", 13),
        ("one", "error", 14),
        ("two …", "error", 14),
        ("… is … wide", "error", 15),
        ("… of …", "error", 16),
        ("this needs a ViT tower, and …'s is …", "error", 9),
        ("cannot read …", "error", 19),
        ("not a file", "input", 21),
        ("shard cannot be read: …", "input", 22),
        ("warning: … is given … times", "stderr", 24),
    }
    assert [u.key for u in cat.unresolved] == ["pkg/mod.py: str(e)"]


def test_page_entries_are_list_items_of_one_code_span_read_as_the_cli_prints_them():
    page = textwrap.dedent(
        """\
        # Title
        - `unknown --device …; use auto, cpu, cuda or mps`
        - `` `model_config` … is not valid UTF-8 JSON (…) ``
        - `a` and some prose: not an entry
        Run `clipviz models`.
        * `no   such
        """
    )
    assert page_entries(page + entry("`pretrained` … is ``odd``") + "\n")[2:] == [
        (7, "--pretrained … is ``odd``")
    ]
    assert page_entries(page) == [
        (2, "unknown --device …; use auto, cpu, cuda or mps"),
        (3, "--model-config … is not valid UTF-8 JSON (…)"),
    ]
    assert normalise("`batch_size` {…}…  … and\n `foo`") == "--batch-size {…}… and `foo`"


def test_missing_and_stale_name_what_differs(tmp_path):
    root = _package(
        tmp_path,
        """
        def f(path):
            raise ClipvizError(f"{path} is not a folder")
            raise ClipvizError("no input given")
        """,
    )
    cat = catalogue(root)
    entries = [(5, "… is not a folder"), (9, "no inputs given")]
    assert {t: [str(m.site) for m in ms] for t, ms in missing(cat, entries).items()} == {
        "no input given": ["pkg/mod.py:4"]
    }
    assert stale(cat, entries) == [(9, "no inputs given")]
