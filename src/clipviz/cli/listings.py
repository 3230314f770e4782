"""`clipviz models` and `clipviz methods`: the listings of what can be explained, and how."""

from __future__ import annotations

from rich.table import Table

from ..methods.catalog import catalog
from .options import DebugOpt
from .output import err_console, print_table


def models(debug: DebugOpt = False) -> None:
    """List open_clip architectures: their image tower, the methods that run on it, their
    pretrained tags and which weights are cached."""
    import open_clip

    from ..backend.hub import cached_tags
    from ..backend.support import cached_support

    cached = cached_tags()
    with err_console.status("reading the architectures (once per version)…"):
        support = cached_support()
    table = Table(title="open_clip architectures (* = weights cached locally)")
    table.add_column("model", no_wrap=True)
    table.add_column("image tower")
    table.add_column("methods")
    table.add_column("pretrained tags", overflow="fold")
    for row in support:
        tags = open_clip.list_pretrained_tags_by_model(row.model)
        shown = [f"{t}*" if (row.model, t) in cached else t for t in tags]
        table.add_row(row.model, row.family, ", ".join(row.methods) or f"— {row.reason}",
                      ", ".join(shown) or "—")  # fmt: skip
    print_table(table)


def methods(debug: DebugOpt = False) -> None:
    """List the methods: the towers they run on, their options with defaults, their reference."""
    table = Table(title="clipviz methods (options: -O KEY=VALUE)", show_lines=True)
    table.add_column("method", no_wrap=True)
    table.add_column("towers", no_wrap=True)
    table.add_column("what it computes")
    table.add_column("options (default)")
    table.add_column("reference code")
    for info in catalog().values():
        opts = "\n".join(o.describe() for o in info.options)
        table.add_row(info.name, ", ".join(info.towers), info.summary, opts or "—", info.reference)
    print_table(table)
