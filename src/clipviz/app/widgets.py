"""The pieces every tab of the web app's page shares: Gradio's look with the system's fonts,
handlers whose errors become the status line, and a widget per method option."""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import Any

import gradio as gr

from ..errors import ClipvizError

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "Consolas", "monospace"]


def theme() -> gr.themes.Base:
    """Gradio's default look with the system's fonts (its own default fetches web fonts)."""
    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)


def one_line(error: BaseException) -> str:
    """What the page says about an error: a `ClipvizError`'s message, or one line naming an
    unexpected error (its traceback goes to the server's log, never to the page)."""
    if isinstance(error, ClipvizError):
        return f"error: {error}"
    traceback.print_exception(error, file=sys.stderr)
    text = " ".join(str(error).split())[:300]
    return (
        f"error: internal error: {type(error).__name__}: {text} (the server's log has the details)"
    )


def guarded(fn: Callable[..., tuple[Any, ...]], outputs: int) -> Callable[..., tuple[Any, ...]]:
    """`fn` returning (status, *outputs); an error becomes the status line, outputs unchanged."""

    @functools.wraps(fn)  # the API's parameters keep fn's names
    def run(*args: Any) -> tuple[Any, ...]:
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 — every error is shown as one line
            return (one_line(e), *([gr.skip()] * outputs))

    return run


def option_widget(method: str, opt: Any) -> gr.components.Component:
    """One widget for a method option: a dropdown for a choice, a checkbox for a flag, a text
    field (empty = default) for the rest, labelled and explained from the registry."""
    label = f"{method}: {opt.name}"
    info = opt.help + (f" (range {opt.range})" if opt.range else "")
    if opt.choices:
        return gr.Dropdown(choices=opt.choices, value=opt.default, label=label, info=info)
    if opt.type == "bool":
        return gr.Checkbox(value=bool(opt.default), label=label, info=info)
    return gr.Textbox(value="", label=label, info=info, placeholder=f"default: {opt.default!r}")
