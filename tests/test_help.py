"""The command line's help reads as text: paragraphs wrap at the terminal's width, and the
flags that -O replaced are accepted but not listed."""

from __future__ import annotations

from typer.testing import CliRunner

from clipviz.cli import app


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result.output


def test_command_summaries_wrap_at_the_terminal_not_at_the_source_line_breaks():
    lines = _help().splitlines()
    # each of these sentences is broken across two source lines of its command's docstring
    for command, start, end in [
        ("concepts ", "--synset dog.n.01", "--top 5"),
        ("sanity ", "re-draw the image tower", "layer by layer"),
        ("bench ", "(default:", "every method"),
    ]:
        row = next(line for line in lines if line.lstrip("│ ").startswith(command))
        assert start in row and end in row, row


def test_flags_that_options_replaced_are_not_listed():
    text = _help("explain")
    for flag in ("--surgery-depth", "--gae-start-layer", "--legrad-layers", "--gscorecam-topk"):
        assert flag not in text
    assert "-O" in text and "--eclip" in text
