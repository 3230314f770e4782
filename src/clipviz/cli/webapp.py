"""`clipviz app`: the local web app (Gradio, the `app` extra)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import ClipvizError
from .options import DebugOpt, DeviceOpt, ModelConfigOpt, ModelOpt, PretrainedOpt
from .output import err_console, out_console


def serve(
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
    host: Annotated[
        str,
        typer.Option(help="address to listen on (0.0.0.0 opens the app to your network)"),
    ] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option(help="port (default: the first free one from 7860)")
    ] = None,
    share: Annotated[
        bool, typer.Option(help="also publish the app through a public Gradio share link")
    ] = False,
    max_pixels: Annotated[
        int, typer.Option("--max-pixels", help="refuse uploaded images with more pixels")
    ] = 40_000_000,
    max_prompts: Annotated[int, typer.Option(help="prompts one request may ask for")] = 8,
    max_methods: Annotated[int, typer.Option(help="methods one request may run")] = 6,
    debug: DebugOpt = False,
) -> None:
    """A local web app: explain an image with several methods and prompts side by side,
    compare one method's layers, discover ConVis concepts; maps and PNGs to download.

    Without model options it loads the default model (ViT-B-16, openai), or, when those
    weights are neither cached nor downloadable, the test bed's tiny CLIP. The model can be
    changed in the page; one is kept loaded at a time.
    """
    for name, value, low in (("--max-pixels", max_pixels, 1), ("--max-prompts", max_prompts, 1),
                             ("--max-methods", max_methods, 1), ("--port", port or 1, 1)):  # fmt: skip
        if value < low or (name == "--port" and value > 65535):
            raise ClipvizError(f"{name} {value} is out of range; pass a positive number")
    try:
        from ..app.ui import launch
    except ImportError as e:
        raise ClipvizError(
            f"clipviz app needs Gradio ({e.name or e} is missing): pip install 'clipviz[app]'"
        ) from None
    from ..app.session import TESTBED, Limits, ModelSlot, ModelSpec

    slot = ModelSlot(device)
    spec = ModelSpec(model or "", pretrained or "", str(model_config or ""))
    with err_console.status("loading model…"):
        try:
            slot.get(spec)
        except ClipvizError as e:
            if model or pretrained or model_config:
                raise
            err_console.print(f"note: {e}; the app starts on the test bed's tiny CLIP instead")
            spec = ModelSpec(TESTBED)
            slot.get(spec)
    limits = Limits(max_pixels, max_prompts, max_methods)
    app = launch(slot, spec, limits, host=host, port=port, share=share, block=False)
    out_console.print(f"clipviz app: {app.local_url} (Ctrl+C stops it)", highlight=False)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
