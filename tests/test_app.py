"""`clipviz app` in three layers: its functions against the library's own outputs, the
launched app through `gradio_client`, and the page in headless Debian chromium (upload, run
two methods, read the grid, change alpha, download) with no console error and no request
leaving 127.0.0.1."""

from __future__ import annotations

import io
import shutil
import zipfile
from urllib.parse import urlparse

import numpy as np
import pytest
from conftest import random_image
from PIL import Image
from typer.testing import CliRunner

import clipviz
from clipviz.app import session
from clipviz.cli import app as cli
from clipviz.errors import ClipvizError

pytestmark = pytest.mark.usefixtures("one_thread")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROMPTS = ["a <b>dog</b>", "grass"]


@pytest.fixture(scope="module")
def explained(vit_backend):
    image = random_image(seed=3, size=(96, 72))
    result = session.explain_image(
        vit_backend, image, PROMPTS, ["itsm", "gradcam", "gradeclip", "textspan"], {}
    )
    return image, result


def test_grid_shows_each_methods_overlay_as_the_library_draws_it(vit_backend, explained):
    image, result = explained
    cells = session.grid(result, "viridis", 0.3)
    assert len(cells) == len(PROMPTS) * 4  # one row per prompt, one column per method
    for i, method in enumerate(["itsm", "gradcam", "gradeclip", "textspan"]):
        exp = clipviz.explain(vit_backend, [image], PROMPTS, method)
        for t, prompt in enumerate(PROMPTS):
            shown, caption = cells[t * 4 + i]
            expected = exp.overlay(0, t, colormap="viridis", alpha=0.3)
            assert np.array_equal(np.asarray(shown), np.asarray(expected)), (method, prompt)
            assert caption == f"{method} · {prompt} · p={float(exp.probs[0, t]):.2f}"


def test_alpha_and_colormap_change_without_recomputing(explained):
    image, result = explained
    opaque = session.grid(result, "jet", 1.0)
    clear = session.grid(result, "jet", 0.0)
    # alpha 0 shows the photo itself; alpha 1 the heatmap only
    assert np.array_equal(np.asarray(clear[0][0]), np.asarray(image))
    assert not np.array_equal(np.asarray(opaque[0][0]), np.asarray(image))
    assert not np.array_equal(
        np.asarray(session.grid(result, "gray", 1.0)[0][0]), np.asarray(opaque[0][0])
    )
    with pytest.raises(ClipvizError, match="colormap 'nope' unknown"):
        session.grid(result, "nope", 0.5)


def test_download_holds_the_raw_maps_and_every_png(vit_backend, explained, tmp_path):
    image, result = explained
    path = session.bundle(result, tmp_path, "jet", 0.5)
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        arrays = np.load(io.BytesIO(zf.read("maps.npz")))
        for method in result.methods:
            exp = clipviz.explain(vit_backend, [image], PROMPTS, method)
            assert np.allclose(arrays[method], exp.maps[0].numpy(), atol=1e-6)
            assert np.allclose(arrays[f"{method}.probs"], exp.probs[0].numpy(), atol=1e-6)
        assert list(arrays["prompts"]) == PROMPTS
        pngs = {n for n in names if n.endswith(".png")}
        assert len(pngs) == len(PROMPTS) * len(result.methods)
        first = Image.open(io.BytesIO(zf.read(sorted(pngs)[0])))
        assert first.size == image.size


def test_token_weights_are_grad_eclips_and_escaped(vit_backend, explained):
    image, result = explained
    exp = clipviz.explain(vit_backend, [image], PROMPTS, "gradeclip")
    page = session.token_weights_html(result)
    assert "<b>dog</b>" not in page and "&lt;b&gt;" in page
    weights = exp.extras["text_importance"][0, 0]
    tokens = exp.labels["text_tokens"][0]
    top = int(np.argmax(weights[: len(tokens)].numpy()))
    assert f'title="{float(weights[top]):.3f}" style="background: rgba(255, 80, 0, 1.00)' in page


def test_textspan_heads_are_shown_per_prompt(explained):
    image, result = explained
    maps, names = result.head_maps["textspan"]
    assert maps.shape[:2] == (len(PROMPTS), len(names))
    first = session.head_gallery(result, PROMPTS[0], "jet", 0.5)
    second = session.head_gallery(result, PROMPTS[1], "jet", 0.5)
    assert len(first) == len(names)
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for (a, _), (b, _) in zip(first, second, strict=True)
    )


def test_layer_sweep_is_the_method_at_each_block(vit_backend):
    image = random_image(seed=4)
    maps = session.layer_sweep(vit_backend, image, "grass", "gradcam")
    assert len(maps) == vit_backend.vision.depth
    for layer in (0, vit_backend.vision.depth - 1):
        exp = clipviz.explain(vit_backend, [image], ["grass"], "gradcam", options={"layer": layer})
        norm = session._display_maps(exp, exp.maps[0], (image.height, image.width))[0]
        assert np.array_equal(maps[layer][0], norm, equal_nan=True)
    with pytest.raises(ClipvizError, match="itsm has no layer option"):
        session.layer_sweep(vit_backend, image, "grass", "itsm")


def test_options_come_from_the_registry_and_are_checked():
    assert session.parse_options("gem", {"iterations": "", "temperature": None}) == {}
    assert session.parse_options("gem", {"iterations": "2"}) == {"iterations": 2}
    assert session.parse_options("legrad", {"feature": "class", "correction": True}) == {
        "feature": "class"
    }
    with pytest.raises(ClipvizError, match="iterations"):
        session.parse_options("gem", {"iterations": "21"})
    with pytest.raises(ClipvizError, match="temperature"):
        session.parse_options("gem", {"temperature": "nan"})


def test_one_request_cannot_exhaust_the_machine(vit_backend):
    limits = session.Limits(max_pixels=100, max_prompts=2, max_methods=1)
    with pytest.raises(ClipvizError, match="at most 2 per request"):
        session.parse_prompts("a\nb\nc", limits)
    with pytest.raises(ClipvizError, match="more than this app's cap of 100"):
        session.check_image(Image.new("RGB", (20, 10)), limits)
    with pytest.raises(ClipvizError, match="at most 1 per request"):
        session.explain_image(vit_backend, random_image(), ["a"], ["itsm", "gem"], {}, limits)
    with pytest.raises(ClipvizError, match="blank prompt"):
        session.parse_prompts("\x1b\x07\n", session.Limits())


def test_errors_reach_the_page_as_one_line():
    from clipviz.app.widgets import guarded

    def fails(kind):
        raise ClipvizError("bad option; pass another") if kind else KeyError("x\ny")

    status, rest = guarded(fails, 1)(True)
    assert status == "error: bad option; pass another"
    status, rest = guarded(fails, 1)(False)
    assert status.startswith("error: internal error: KeyError") and "\n" not in status


def test_the_model_slot_keeps_one_model_and_replaces_it():
    loads: list[session.ModelSpec] = []
    slot = session.ModelSlot(loader=lambda spec: loads.append(spec) or spec.model)
    a, b = session.ModelSpec("a"), session.ModelSpec("b")
    assert slot.get(a) == "a" and slot.get(a) == "a" and slot.get(b) == "b"
    assert loads == [a, b] and slot.loaded == b


def test_the_command_refuses_bad_limits_in_one_line():
    result = CliRunner().invoke(cli, ["app", "--max-prompts", "0"])
    assert result.exit_code == 2 and "--max-prompts 0 is out of range" in result.output


# -- the launched app ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(vit_backend, tmp_path_factory):
    from clipviz.app.ui import launch

    slot = session.ModelSlot(loader=lambda spec: vit_backend)
    app = launch(slot, session.ModelSpec("tiny"), session.Limits(), port=None, block=False)
    photo = tmp_path_factory.mktemp("app") / "photo.png"
    random_image(seed=5, size=(96, 72)).save(photo)
    yield app, photo
    app.close()


def test_client_explains_through_the_served_api(served):
    from gradio_client import Client, handle_file

    app, photo = served
    assert urlparse(app.local_url).hostname == "127.0.0.1"
    client = Client(app.local_url, verbose=False)
    out = client.predict(
        image=handle_file(str(photo)),
        prompts="grass\nsky",
        methods=["itsm", "gem"],
        api_name="/explain",
    )
    status, gallery, probs = out[0], out[1], out[2]
    assert status.startswith("done: 2 method(s) × 2 prompt(s)"), status
    cells = gallery["value"]
    assert [c["caption"].split(" · p=")[0] for c in cells] == [
        "itsm · grass",
        "gem · grass",
        "itsm · sky",
        "gem · sky",
    ]
    assert all(c["image"].endswith(".png") for c in cells)  # lossless, as the CLI writes them
    assert [row[0] for row in probs["data"]] == ["grass", "sky"]
    bad = client.predict(
        image=handle_file(str(photo)), prompts="a", methods=[], api_name="/explain"
    )
    assert bad[0] == "error: no method chosen; tick at least one method"
    status, shown, legend = client.predict(
        image=handle_file(str(photo)),
        classes="background\ngrass; lawn\nsky",
        method="sclip",
        api_name="/segment",
    )
    assert status.endswith("of 3 classes present"), status
    assert shown.endswith(".png") and Image.open(shown).size[1] == 72  # the photo's height
    assert {row[1] for row in legend["data"]} <= {"background", "grass, lawn", "sky"}
    bad = client.predict(image=handle_file(str(photo)), classes="", api_name="/segment")
    assert bad[0] == "error: the classes box names no class; give one class per line"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make install)")
def test_page_runs_two_methods_changes_alpha_and_downloads(served, tmp_path):
    from playwright.sync_api import sync_playwright

    app, photo = served
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-background-networking", "--disable-component-update"],
        )  # fmt: skip
        page = browser.new_page(viewport={"width": 1400, "height": 2200})
        errors: list[str] = []
        hosts: set[str] = set()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: hosts.add(urlparse(r.url).hostname or r.url[:20]))
        page.goto(app.local_url)
        page.locator("input[type=file]").first.set_input_files(str(photo))
        page.get_by_label("prompts").fill("grass\nsky")
        page.get_by_role("button", name="Explain", exact=True).click()
        status = page.get_by_label("status").first
        page.wait_for_function(
            "() => [...document.querySelectorAll('input, textarea')]"
            ".some(t => t.value.startsWith('done'))",
            timeout=60_000,
        )
        assert "2 method(s) × 2 prompt(s)" in status.input_value()
        grid = page.locator(".gallery-container img, .grid-wrap img")
        grid.first.wait_for()
        before = [grid.nth(i).get_attribute("src") for i in range(grid.count())]
        assert len(before) == 4
        slider = page.get_by_label("alpha").locator("xpath=..").locator("input[type=number]")
        slider.first.fill("0.9")
        slider.first.press("Enter")
        page.wait_for_function(
            "(old) => { const s = [...document.querySelectorAll('.gallery-container img, .grid-wrap img')]"
            ".map(i => i.src); return s.length === 4 && s[0] !== old; }",
            arg=before[0],
            timeout=30_000,
        )
        with page.expect_download() as download:
            page.locator("a[href*='clipviz-maps.zip']").first.click()
        saved = tmp_path / "maps.zip"
        download.value.save_as(saved)
        assert "maps.npz" in zipfile.ZipFile(saved).namelist()
        browser.close()
    assert not errors, errors
    assert hosts <= {"127.0.0.1"}, hosts
