"""The report in a real browser: Debian's chromium, headless, driven by playwright (no
browser download). Every image loads, nothing logs an error, and the filters, sorting and
the large view change what is shown."""

from __future__ import annotations

import re
import shutil

import pytest
from conftest import random_image
from typer.testing import CliRunner

from clipviz.cli import app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "the browser tests need Debian's chromium: make install installs it"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--allow-file-access-from-files"])  # fmt: skip
        yield b
        b.close()


@pytest.fixture(scope="module")
def explain_report(tmp_path_factory, tiny_weights):
    root = tmp_path_factory.mktemp("browser")
    photos = root / "photos"
    photos.mkdir()
    for i in range(3):
        random_image(seed=20 + i, size=(96, 64)).save(photos / f"p{i}.png")
    (photos / "bad.jpg").write_text("not an image")
    config, weights = tiny_weights["vit"]
    out = root / "run"
    result = CliRunner().invoke(app, [
        "explain", str(photos), "a dog", "grass", "-m", "itsm", "-m", "gradeclip", "-o", str(out),
        "--no-ensemble", "-q", "--model-config", str(config), "--pretrained", str(weights),
    ])  # fmt: skip
    assert result.exit_code == 1, result.output  # bad.jpg
    assert CliRunner().invoke(app, ["report", str(out)]).exit_code == 0
    return out / "report.html"


def _open(browser, path):
    page = browser.new_page(viewport={"width": 1600, "height": 2400})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, errors


def _all_images_loaded(page):
    page.wait_for_function(
        "Array.from(document.images).filter(i => i.offsetParent !== null).every(i => i.complete)"
    )
    return page.evaluate(
        "Array.from(document.images).filter(i => i.offsetParent !== null)"
        ".map(i => [i.getAttribute('src'), i.naturalWidth])"
    )


def test_explain_report_loads_every_image_without_errors(browser, explain_report):
    page, errors = _open(browser, explain_report)
    shown = _all_images_loaded(page)
    assert len(shown) == 3 * 2 * 2  # images x prompts x methods
    assert all(width > 0 for _, width in shown), shown
    assert "bad.jpg" in page.inner_text("body") and errors == []


def test_filters_sorting_and_pages_change_what_is_shown(browser, explain_report):
    page, errors = _open(browser, explain_report)
    figures = page.locator("#grid figure")
    assert figures.count() == 12 and "12 overlays" in page.inner_text("#count")
    page.select_option("#method", "itsm")
    assert figures.count() == 6
    assert all(" — itsm — " in t for t in figures.locator("figcaption").all_inner_texts())
    page.select_option("#prompt", "grass")
    assert figures.count() == 3
    page.select_option("#prompt", "")
    page.select_option("#sort", "p-desc")
    probs = [float(re.search(r"p = ([0-9.]+)", t).group(1))
             for t in figures.locator("figcaption").all_inner_texts()]  # fmt: skip
    assert probs == sorted(probs, reverse=True) and len(set(probs)) > 1
    page.select_option("#sort", "p-asc")
    first = float(re.search(r"p = ([0-9.]+)", figures.first.inner_text()).group(1))
    assert first == min(probs)
    assert page.inner_text("#page") == "page 1 of 1" and page.is_disabled("#next")
    assert errors == []


def test_the_large_view_shows_the_original_every_file_and_the_token_weights(
    browser, explain_report
):
    page, errors = _open(browser, explain_report)
    page.locator("#grid figure").first.click()
    assert page.is_visible("#view")
    shown = _all_images_loaded(page)
    view = [s for s, w in shown if w > 0]
    assert any(s.endswith("comparison.png") for s in view)
    assert any("photos/p0.png" in s for s in view)  # the original
    # 2 prompts x 2 methods x (overlay, heatmap) in the view
    assert page.locator("#view .row figure").count() == 8
    tokens = page.locator("#view .tokens span").all_inner_texts()
    assert tokens[:2] == ["a", "dog"] or "grass" in tokens
    page.click("#close")
    assert not page.is_visible("#view") and errors == []


@pytest.fixture(scope="module")
def eval_report(tmp_path_factory, tiny_weights):
    from clipviz.testbed.world import write_voc

    root = tmp_path_factory.mktemp("eval-browser")
    write_voc(root / "voc", 8, seed=5, size=64)
    config, weights = tiny_weights["vit"]
    out = root / "res.json"
    result = CliRunner().invoke(app, [
        "eval", str(root / "voc"), "-m", "itsm", "-m", "random", "--metric", "miou", "--metric",
        "msc", "--metric", "maxboxacc", "--metric", "deletion", "--json", str(out), "--report",
        "-q", "--model-config", str(config), "--pretrained", str(weights),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out.with_suffix(".html")


def test_eval_report_shows_intervals_plots_and_images_without_errors(browser, eval_report):
    page, errors = _open(browser, eval_report)
    shown = _all_images_loaded(page)
    plots = [s for s, _ in shown if ".plots/" in s]
    assert sorted(p.rsplit("/", 1)[-1] for p in plots) == ["deletion.png", "maxboxacc.png",
                                                           "miou.png"]  # fmt: skip
    assert all(width > 0 for _, width in shown) and len(shown) > len(plots)  # best/worst images
    text = page.inner_text("body")
    assert "mIoU per class" in text and "best and worst images" in text and " – " in text
    assert "thresholds chosen on the scored images" in text
    assert errors == []


HOSTILE_PROMPTS = ["</script><script>window.ran = 1</script>", "<!--<script> & grass"]


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory, tiny_weights):
    """A run whose file name and prompts hold what ends or comments out a script element."""
    root = tmp_path_factory.mktemp("hostile")
    photos = root / "photos"
    photos.mkdir()
    random_image(seed=30, size=(96, 64)).save(photos / "<!--<script>x.png")
    random_image(seed=31, size=(96, 64)).save(photos / "<img src=y onerror=window.ran=2>.png")
    config, weights = tiny_weights["vit"]
    out = root / "run"
    result = CliRunner().invoke(app, [
        "explain", str(photos), *HOSTILE_PROMPTS, "-o", str(out), "--no-ensemble", "-q",
        "--model-config", str(config), "--pretrained", str(weights),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(app, ["report", str(out)]).exit_code == 0
    return out / "report.html"


def test_a_report_of_hostile_names_shows_every_image_and_runs_no_script_of_them(
    browser, hostile_report
):
    page, errors = _open(browser, hostile_report)
    shown = _all_images_loaded(page)
    assert len(shown) == 2 * 2 and all(width > 0 for _, width in shown), shown
    captions = page.locator("#grid figcaption").all_inner_texts()
    for prompt in HOSTILE_PROMPTS:
        assert sum(prompt in c for c in captions) == 2, captions
    assert any(c.startswith("<!--<script>x.png: ") for c in captions)
    assert page.evaluate("window.ran") is None
    page.locator("#grid figure").first.click()
    assert len([s for s, w in _all_images_loaded(page) if w > 0]) >= 2 * 2
    assert page.evaluate("window.ran") is None and errors == []
