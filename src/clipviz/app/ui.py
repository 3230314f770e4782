"""The web app's page, laid out in Gradio over `session.py`: an Explain tab (several prompts ×
several methods, each method's options generated from the registry), Compare layers,
Concepts and Segment (class names → label overlay with a legend). Gradio because it is what the field's demos are written in (LeGrad's and GEM's
Spaces), it queues requests and ships its whole front end in the Python package: offline, the
page loads nothing from outside the machine.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from . import segmentation, session
from .examples import example_images
from .session import COLORMAPS, Limits, ModelSlot, ModelSpec
from .widgets import guarded, option_widget, theme


def build(
    slot: ModelSlot, spec: ModelSpec, limits: Limits = Limits(), work: Path | None = None
) -> gr.Blocks:
    """The app's page. `slot` holds the model; `spec` is the model shown at start."""
    from ..methods import METHODS

    work = work or Path(tempfile.mkdtemp(prefix="clipviz-app-"))
    examples = [[str(p)] for p in example_images(work / "examples")]
    methods = [name for name in METHODS if name not in ("convis",)]
    default_prompts = "red circle\nblue square" if spec.model == session.TESTBED else "a dog"
    default_classes = (
        "background\nred circle\nblue square"
        if spec.model == session.TESTBED
        else "background\nperson\ndog; puppy\ngrass"
    )

    with gr.Blocks(title="clipviz", analytics_enabled=False) as app:
        gr.Markdown("# clipviz — where does CLIP look?")
        with gr.Accordion("Model", open=False):
            with gr.Row():
                model = gr.Textbox(
                    value=spec.model,
                    label="model",
                    info="open_clip architecture, hf-hub:…, local-dir:…, transformers:FOLDER, "
                    "or testbed (the synthetic world's tiny CLIP)",
                )
                pretrained = gr.Textbox(
                    value=spec.pretrained, label="pretrained", info="tag or weights file"
                )
                model_config = gr.Textbox(
                    value=spec.model_config, label="model config", info="architecture JSON"
                )
            ensemble = gr.Checkbox(value=True, label="prompt ensemble (80+5 templates)")

        def current_backend(m: str, p: str, c: str) -> Any:
            return slot.get(ModelSpec(m.strip(), p.strip(), c.strip()))

        with gr.Tab("Explain"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(
                        type="pil", label="image", sources=["upload", "clipboard"], height=320
                    )
                    gr.Examples(examples=examples, inputs=[image], label="examples")
                with gr.Column(scale=1):
                    prompts = gr.Textbox(
                        value=default_prompts,
                        lines=4,
                        label="prompts",
                        info=f"one per line, at most {limits.max_prompts}",
                    )
                    chosen = gr.CheckboxGroup(
                        choices=methods,
                        value=["itsm", "gradcam"],
                        label="methods",
                        info=f"at most {limits.max_methods}",
                    )
                    run = gr.Button("Explain", variant="primary")
            with gr.Accordion("Method options", open=False):
                widgets: list[tuple[str, str, gr.components.Component]] = []
                for name in methods:
                    opts = METHODS[name].options
                    if not opts:
                        continue
                    with gr.Row():
                        for opt in opts:
                            widgets.append((name, opt.name, option_widget(name, opt)))
            status = gr.Textbox(label="status", interactive=False, max_lines=1)
            with gr.Row():
                colormap = gr.Dropdown(choices=list(COLORMAPS), value="jet", label="colormap")
                alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="alpha")
            gallery = gr.Gallery(
                label="prompts × methods",
                columns=2,
                object_fit="contain",
                height="auto",
                format="png",
            )
            probs = gr.Dataframe(
                headers=["prompt", "probability"], label="the model's probabilities"
            )
            tokens = gr.HTML(label="Grad-ECLIP: which words of each prompt matter")
            with gr.Accordion("TextSpan: per-head maps", open=False):
                head_prompt = gr.Dropdown(choices=[], label="prompt")
                heads = gr.Gallery(label="heads", columns=6, height="auto", format="png")
            download = gr.File(label="maps.npz and the PNGs (zip)")
            state = gr.State(None)

            def explain(
                model: str,
                pretrained: str,
                model_config: str,
                ensemble: bool,
                image: Any,
                prompts: str,
                methods: list[str],
                colormap: str,
                alpha: float,
                *options: Any,
            ) -> tuple[Any, ...]:
                m, p, c, ens, img, text, names, cmap, a = (model, pretrained, model_config,
                    ensemble, image, prompts, methods, colormap, alpha)  # fmt: skip
                backend = current_backend(m, p, c)
                values: dict[str, dict[str, Any]] = {}
                for (method, key, _), value in zip(widgets, options, strict=True):
                    values.setdefault(method, {})[key] = value
                bound = {
                    method: session.parse_options(method, values.get(method, {}))
                    for method in names
                }
                picture = session.check_image(img, limits)
                result = session.explain_image(
                    backend,
                    picture,
                    session.parse_prompts(text, limits),
                    list(names),
                    bound,
                    limits,
                    ensemble=bool(ens),
                )
                path = session.bundle(result, Path(tempfile.mkdtemp(dir=work)), cmap, a)
                result.shown = (cmap, a, result.prompts[0])
                return (
                    f"done: {len(result.methods)} method(s) × {len(result.prompts)} prompt(s) "
                    f"on {slot.loaded.describe() if slot.loaded else '?'}",
                    gr.Gallery(
                        value=session.grid(result, cmap, a),
                        columns=len(result.methods),
                        format="png",
                    ),
                    session.probability_rows(result),
                    session.token_weights_html(result),
                    gr.Dropdown(choices=result.prompts, value=result.prompts[0]),
                    session.head_gallery(result, result.prompts[0], cmap, a),
                    str(path),
                    result,
                )

            run.click(
                guarded(explain, 7),
                inputs=[
                    model,
                    pretrained,
                    model_config,
                    ensemble,
                    image,
                    prompts,
                    chosen,
                    colormap,
                    alpha,
                    *[w for _, _, w in widgets],
                ],  # fmt: skip
                outputs=[status, gallery, probs, tokens, head_prompt, heads, download, state],
                api_name="explain",
            )

            def recolour(result: Any, cmap: str, a: float, prompt: str) -> tuple[Any, ...]:
                if result is None or result.shown == (cmap, a, prompt):  # drawn as asked
                    return (gr.skip(), gr.skip(), gr.skip())
                result.shown = (cmap, a, prompt)
                return (
                    gr.skip(),  # the status of the run stays
                    session.grid(result, cmap, a),
                    session.head_gallery(result, prompt, cmap, a),
                )

            for control in (colormap, alpha, head_prompt):
                control.change(
                    guarded(recolour, 2),
                    inputs=[state, colormap, alpha, head_prompt],
                    outputs=[status, gallery, heads],
                    api_visibility="private",
                    show_progress="hidden",
                )

        with gr.Tab("Compare layers"):
            with gr.Row():
                layer_image = gr.Image(type="pil", label="image", sources=["upload", "clipboard"])
                with gr.Column():
                    layer_prompt = gr.Textbox(value=default_prompts.splitlines()[0], label="prompt")
                    layer_method = gr.Dropdown(
                        choices=session.layer_methods(), value="gradcam", label="method"
                    )
                    layer_run = gr.Button("Draw every layer", variant="primary")
            gr.Examples(examples=examples, inputs=[layer_image], label="examples")
            layer_status = gr.Textbox(label="status", interactive=False, max_lines=1)
            layer_gallery = gr.Gallery(
                label="first to last layer", columns=6, height="auto", format="png"
            )

            def layers(*args: Any) -> tuple[Any, ...]:
                m, p, c, ens, img, text, method, cmap, a = args
                backend = current_backend(m, p, c)
                picture = session.check_image(img, limits)
                prompt = session.parse_prompts(text, limits)[0]
                maps = session.layer_sweep(backend, picture, prompt, method, ensemble=bool(ens))
                holder = session.Result(np.asarray(picture), [prompt], [method])
                shown = [(session.colour(holder, norm, cmap, a), cap) for norm, cap in maps]
                return (f"done: {len(shown)} layers of {method}", shown)

            layer_run.click(
                guarded(layers, 1),
                inputs=[
                    model,
                    pretrained,
                    model_config,
                    ensemble,
                    layer_image,
                    layer_prompt,
                    layer_method,
                    colormap,
                    alpha,
                ],  # fmt: skip
                outputs=[layer_status, layer_gallery],
                api_name="layers",
            )

        with gr.Tab("Concepts"):
            with gr.Row():
                concept_image = gr.Image(type="pil", label="image", sources=["upload", "clipboard"])
                with gr.Column():
                    top = gr.Slider(1, 20, value=5, step=1, label="concepts to discover")
                    concept_run = gr.Button("Discover concepts (ConVis)", variant="primary")
            gr.Examples(examples=examples, inputs=[concept_image], label="examples")
            concept_status = gr.Textbox(label="status", interactive=False, max_lines=1)
            concept_table = gr.Dataframe(
                headers=["synset", "lemma", "definition", "best window rank"], label="concepts"
            )
            concept_gallery = gr.Gallery(label="their maps", columns=5, height="auto", format="png")

            def concepts(*args: Any) -> tuple[Any, ...]:
                m, p, c, img, k, cmap, a = args
                backend = current_backend(m, p, c)
                picture = session.check_image(img, limits)
                rows, shown = session.discover_concepts(backend, picture, int(k), cmap, a)
                return (f"done: {len(rows)} concepts", rows, shown)

            concept_run.click(
                guarded(concepts, 2),
                inputs=[model, pretrained, model_config, concept_image, top, colormap, alpha],
                outputs=[concept_status, concept_table, concept_gallery],
                api_name="concepts",
            )
        with gr.Tab("Segment"):
            with gr.Row():
                segment_image = gr.Image(type="pil", label="image", sources=["upload", "clipboard"])
                with gr.Column():
                    class_text = gr.Textbox(
                        value=default_classes,
                        lines=5,
                        label="classes",
                        info="one class per line in label order (line 0: the background), "
                        f"synonyms separated by , or ; — at most {limits.max_class_names} names",
                    )
                    segment_method = gr.Dropdown(choices=methods, value="sclip", label="method")
                    segment_run = gr.Button("Segment", variant="primary")
            gr.Examples(examples=examples, inputs=[segment_image], label="examples")
            segment_status = gr.Textbox(label="status", interactive=False, max_lines=1)
            segment_alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="alpha")
            segment_shown = gr.Image(label="labels", format="png", interactive=False)
            legend = gr.Dataframe(headers=["label", "names", "% of pixels"], label="legend")
            segmented = gr.State(None)

            def segment(
                model: str,
                pretrained: str,
                model_config: str,
                image: Any,
                classes: str,
                method: str,
                alpha: float,
            ) -> tuple[Any, ...]:
                backend = current_backend(model, pretrained, model_config)
                picture = session.check_image(image, limits)
                names = segmentation.parse_class_lines(classes, limits)
                result = segmentation.segment_image(backend, picture, names, method)
                shown, rows = segmentation.segment_view(result, alpha)
                return (f"done: {len(rows)} of {len(names)} classes present", shown, rows,
                        result)  # fmt: skip

            segment_run.click(
                guarded(segment, 3),
                inputs=[
                    model,
                    pretrained,
                    model_config,
                    segment_image,
                    class_text,
                    segment_method,
                    segment_alpha,
                ],  # fmt: skip
                outputs=[segment_status, segment_shown, legend, segmented],
                api_name="segment",
            )

            def relabel(result: Any, a: float) -> tuple[Any, ...]:
                if result is None:
                    return (gr.skip(), gr.skip())
                return (gr.skip(), segmentation.segment_view(result, a)[0])

            segment_alpha.change(
                guarded(relabel, 1),
                inputs=[segmented, segment_alpha],
                outputs=[segment_status, segment_shown],
                api_visibility="private",
                show_progress="hidden",
            )
    return app


def launch(
    slot: ModelSlot,
    spec: ModelSpec,
    limits: Limits = Limits(),
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    block: bool = True,
) -> gr.Blocks:
    """Build and serve the app (requests queued, one at a time); `block=False` returns once
    the server listens (tests)."""
    app = build(slot, spec, limits)
    app.queue(default_concurrency_limit=1, max_size=64)
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=not block,
        show_error=False,
        quiet=True,
        theme=theme(),
        ssr_mode=False,
        inbrowser=False,
    )
    return app
