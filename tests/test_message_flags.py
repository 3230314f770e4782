"""Messages name command-line flags as they are typed (`--top 0 must be positive`); backticks
mark the library's parameter names, which the command line prints as flags."""

from __future__ import annotations

import re

from clipviz.cli.output import as_flags
from clipviz.error_messages import catalogue


def test_no_message_wraps_a_flag_in_backticks():
    printed = {(as_flags(m.template), str(m.site)) for m in catalogue().messages}
    wrapped = sorted(f"{site}: {text}" for text, site in printed if re.search(r"`-", text))
    assert wrapped == []


def test_the_segmentation_layouts_name_their_flags_on_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from clipviz.cli import app
    from clipviz.testbed.world import write_voc

    write_voc(tmp_path / "voc", 1, seed=0, size=32)
    runner = CliRunner()
    base = ["eval", str(tmp_path / "voc"), "--task", "segment"]
    split = runner.invoke(app, [*base, "--split", "nosuch"])
    assert split.exit_code == 2, split.output
    assert "choose another --split (available: " in split.output, split.output
    reduce = runner.invoke(app, [*base, "--format", "cityscapes", "--reduce-zero-label"])
    assert reduce.exit_code == 2, reduce.output
    assert "drop --reduce-zero-label" in reduce.output and "`" not in reduce.output, reduce.output
