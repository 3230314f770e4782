"""Options shared by the commands, declared once, and the few steps every command takes with
them (loading the model, gathering method options). Nothing here imports torch at import
time: `--help` must stay fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape

from ..methods.catalog import catalog
from .output import err_console

# -- loading a model ---------------------------------------------------------------------------
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="open_clip architecture (ViT-B-16, RN50, …), hf-hub:org/repo or local-dir:PATH "
        "(default: ViT-B-16, or the --model-config stem)",
        show_default=False,
    ),
]
PretrainedOpt = Annotated[
    str | None,
    typer.Option(
        "--pretrained",
        help="open_clip tag (openai, laion2b_s34b_b88k, …), a weights file "
        "(.safetensors/.pt/.bin) or 'random' (default: openai where available)",
        show_default=False,
    ),
]
ModelConfigOpt = Annotated[
    Path | None,
    typer.Option("--model-config", help="custom architecture JSON, registered under its stem"),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps")]
PrecisionOpt = Annotated[
    Literal["auto", "fp32", "bf16", "fp16"],
    typer.Option(
        "--precision",
        help="autocast dtype on CUDA (auto: bf16 where supported); CPU always runs fp32",
    ),
]
ResolutionOpt = Annotated[
    int | None,
    typer.Option(
        "--resolution", help="run the image tower at this size, e.g. 448 (default: the model's)"
    ),
]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="compile the image tower's blocks with torch.compile (a GPU speed option; the "
        "first batch waits for the compiler)",
    ),
]
ChannelsLastOpt = Annotated[
    bool | None,
    typer.Option(
        "--channels-last/--no-channels-last",
        help="convolutions in channels-last memory (default: on for convolutional towers on CUDA)",
        show_default=False,
    ),
]
CropOpt = Annotated[
    Literal["none", "center"],
    typer.Option("--crop", help="none: resize the whole image; center: open_clip's eval crop"),
]

# -- output and behaviour ------------------------------------------------------------------------
DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks of errors")]
ColormapOpt = Annotated[
    str, typer.Option(help="jet, turbo, viridis, inferno, gray, or any matplotlib colormap")
]
AlphaOpt = Annotated[float, typer.Option(help="overlay opacity of the heatmap, 0–1")]
MaxPixelsOpt = Annotated[
    int, typer.Option("--max-pixels", help="refuse images with more pixels than this")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar or table")]
TableFormatOpt = Annotated[
    str,
    typer.Option(
        "--table-format", help="tables as table (rich), md, csv or json (one object a table)"
    ),
]
ReportOpt = Annotated[
    bool, typer.Option("--report", help="write the run's HTML report at the end (clipviz report)")
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json", help="print the result as one JSON object on stdout (tables off; progress "
        "stays on stderr)",
    ),
]  # fmt: skip

# -- methods and their options -------------------------------------------------------------------
METHOD_NAMES = tuple(catalog())
MethodOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--method",
        "-m",
        help=f"method(s) to run: {', '.join(METHOD_NAMES)} (default: itsm; "
        "`clipviz methods` lists them)",
        show_default=False,
    ),
]
OptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--option",
        "-O",
        help="a method option KEY=VALUE, or METHOD.KEY=VALUE for one method (repeatable), "
        "e.g. -O layer=-2; the options of each method are listed below",
        show_default=False,
    ),
]
ProxyOpt = Annotated[
    str | None,
    typer.Option(
        "--proxy",
        help="the proxy model of a method that has one (proxyclip, cass): a timm name whose "
        "weights are cached, NAME=FILE, or a folder with config.json and model.safetensors "
        "(the same as -O proxy=…)",
    ),
]


def with_proxy(option: list[str] | None, proxy: str | None) -> list[str]:
    """The `-O` options with `--proxy` as `proxy=…` (which reaches every method that has one)."""
    return [*(option or []), *([f"proxy={proxy}"] if proxy is not None else [])]


# named flags from before -O, still accepted for scripts that use them but hidden from --help
SurgeryDepthOpt = Annotated[
    int | None, typer.Option("--surgery-depth", help="= -O surgery.depth=K", hidden=True)
]
GaeStartOpt = Annotated[
    int | None, typer.Option("--gae-start-layer", help="= -O gae.start_layer=L", hidden=True)
]
LegradLayersOpt = Annotated[
    int | None, typer.Option("--legrad-layers", help="= -O legrad.layers=L", hidden=True)
]
GscorecamTopkOpt = Annotated[
    int | None, typer.Option("--gscorecam-topk", help="= -O gscorecam.topk=K", hidden=True)
]
EclipOpt = Annotated[
    Path | None,
    typer.Option(
        "--eclip",
        help="checkpoint from `clipviz train` (= -O eclip.checkpoint=FILE; alone, it runs "
        "the eclip method)",
        show_default=False,
    ),
]


def methods_epilog() -> str:
    """Every method with its options and defaults, for the end of a command's `--help`."""
    lines = ["Method options (-O KEY=VALUE):"]
    for info in catalog().values():
        opts = ", ".join(
            f"{o.name}={o.default!r} ({o.type}{f', {o.range}' if o.range else ''})"
            for o in info.options
        )
        lines.append(f"{info.name} ({'/'.join(info.towers)}): {opts or 'none'}")
    # click rewraps paragraphs (a \b line keeps these as they are); rich reads [..] as markup
    return "\b\n" + escape("\n".join(lines))


def chosen_methods(
    methods: list[str] | None, eclip: Path | None, default: str = "itsm"
) -> list[str]:
    """The methods asked for, once each; `--eclip` alone means the eclip method."""
    if not methods:
        return ["eclip"] if eclip is not None else [default]
    return list(dict.fromkeys(m.lower() for m in methods))


def gather_method_options(
    methods: list[str],
    raw: list[str] | None,
    surgery_depth: int | None = None,
    gae_start_layer: int | None = None,
    legrad_layers: int | None = None,
    gscorecam_topk: int | None = None,
    eclip: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-method options from `-O` and the named flags (a named flag for a method that is
    not run is a usage error, like any option)."""
    from ..methods import method_options

    named: dict[str, Any] = {
        key: value
        for key, value in {
            "surgery.depth": surgery_depth,
            "gae.start_layer": gae_start_layer,
            "legrad.layers": legrad_layers,
            "gscorecam.topk": gscorecam_topk,
            "eclip.checkpoint": str(eclip) if eclip is not None else None,
            **(extra or {}),
        }.items()
        if value is not None
    }
    return method_options(methods, list(raw or []), named)


def load(
    model: str | None,
    pretrained: str | None,
    model_config: Path | None,
    device: str,
    precision: str,
    resolution: int | None = None,
    crop: str = "none",
    compile: bool = False,
    channels_last: bool | None = None,
) -> Any:
    """The backend of the model options, with a spinner while it loads (and compiles)."""
    from ..backend import load_backend

    with err_console.status("loading and compiling model…" if compile else "loading model…"):
        return load_backend(
            model=model,
            pretrained=pretrained,
            model_config=model_config,
            device=device,
            precision=precision,  # type: ignore[arg-type]
            resolution=resolution,
            crop=crop,  # type: ignore[arg-type]
            compile=compile,
            channels_last=channels_last,
        )


def unique_prompts(prompts: list[str]) -> list[str]:
    """The prompts once each, in order, with a warning for repeats; blank ones and any with a
    NUL byte refused (their files and scores are keyed by the prompt's text)."""
    from collections import Counter

    from ..explanation import check_prompt_text

    check_prompt_text(prompts, " (check the prompts file for empty quotes)")
    for prompt, n in Counter(prompts).items():
        if n > 1:
            err_console.print(
                f"[yellow]warning:[/] {escape(repr(prompt))} is given {n} times; using it once",
                highlight=False,
            )
    return list(dict.fromkeys(prompts))


def warn_truncated(backend: Any, prompts: list[str], ensemble: bool) -> None:
    """One warning for prompts longer than the text tower's context (they are cut)."""
    cut = backend.truncated(prompts, ensemble)
    if cut:
        more = f" and {len(cut) - 1} more" if len(cut) > 1 else ""
        err_console.print(
            f"[yellow]warning:[/] {escape(repr(cut[0][:60]))}{more} exceed the text tower's "
            "context length and are cut; shorten them or pass --no-ensemble",
            highlight=False,
            soft_wrap=True,
        )


def encode_with_progress(backend: Any, prompts: list[str], ensemble: bool, quiet: bool) -> Any:
    """Text embeddings of the prompts, with a progress bar when many must be computed."""
    from .output import lazy_progress

    with lazy_progress("embedding prompts", quiet) as update:
        return backend.encode_texts(prompts, ensemble=ensemble, progress=update)
