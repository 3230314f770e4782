"""The example notebooks (jupytext `py:percent` files) run from top to bottom in a fresh
kernel, on the trained test bed, and each finds what its text says it shows.

Each notebook ends with a cell that displays a `summary` dict of plain Python values; the
tests read it back from that cell's output. Each executed notebook is kept in
`docs/_build/executed/`, where the docs build takes its outputs instead of running it again."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

import conftest
import jupytext
import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

from clipviz.docs import EXECUTED_NOTEBOOKS

NOTEBOOKS = Path(__file__).parents[1] / "examples" / "notebooks"


@pytest.fixture(scope="module")
def kernel_env(trained_clip, tmp_path_factory, monkeypatch_module) -> None:
    """The kernels' environment: this Python's ipykernel as `python3`, the trained test bed,
    one thread, and temporary files under the test's folder."""
    root = tmp_path_factory.mktemp("notebooks")
    write_kernel_spec(root / "jupyter" / "kernels" / "python3")
    (root / "tmp").mkdir()
    monkeypatch_module.setenv("JUPYTER_PATH", str(root / "jupyter"))
    monkeypatch_module.setenv("CLIPVIZ_TESTBED_CACHE", str(conftest.testbed_cache()))
    monkeypatch_module.setenv("OMP_NUM_THREADS", "1")
    monkeypatch_module.setenv("TMPDIR", str(root / "tmp"))


@pytest.fixture(scope="module")
def monkeypatch_module():
    """Environment changes for the module's tests, undone after the last."""
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def run_notebook(name: str) -> tuple[dict[str, Any], Any]:
    """Execute `examples/notebooks/<name>.py` in its folder, keep it for the docs; return its
    final `summary` and the executed notebook."""
    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    NotebookClient(
        nb,
        kernel_name="python3",
        timeout=120,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    ).execute()
    EXECUTED_NOTEBOOKS.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, EXECUTED_NOTEBOOKS / f"{name}.ipynb")
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    shown = [o for o in last.outputs if "text/plain" in o.get("data", {})]
    assert shown, f"{name}: its last cell shows no value"
    return ast.literal_eval(shown[-1]["data"]["text/plain"]), nb


def pictures(nb: Any, code: str) -> int:
    """How many images the cells whose source holds `code` displayed."""
    cells = [c for c in nb.cells if c.cell_type == "code" and code in c.source]
    assert cells, f"no cell runs {code!r}"
    return sum("image/png" in o.get("data", {}) for c in cells for o in c.outputs)


def test_kernel_is_this_python(kernel_env) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable


def test_your_photo_ranks_the_drawn_object_first_and_surgery_finds_it(kernel_env) -> None:
    summary, nb = run_notebook("01_your_photo")
    assert summary["top_prompt"] == summary["prompts"][0]
    assert summary["contrast"]["surgery"] > 0.2
    # an explanation and its figure show as pictures, not as their text
    assert pictures(nb, "display(exp)") == 1
    assert pictures(nb, ".show()") == 1


def test_methods_notebook_finds_itsm_on_the_background_and_surgery_on_the_object(kernel_env):
    summary, nb = run_notebook("02_methods_and_prompts")
    contrast = summary["contrast"]
    assert contrast["itsm"] < 0 and abs(contrast["random"]) < 0.1
    assert contrast["surgery"] > 0.4
    assert min(contrast[m] for m in ("gradcam", "legrad", "textspan")) > 0.2
    assert pictures(nb, "plt.subplots(len(PROMPTS)") == 1  # the methods x prompts grid


def test_heads_notebook_sums_the_heads_to_textspans_map_and_describes_each(kernel_env):
    summary, nb = run_notebook("03_layers_and_heads")
    assert summary["heads"] == summary["described"] == 16  # 4 blocks of 4 heads
    assert summary["sum_gap"] < 1e-5
    assert summary["best_head_contrast"] > 0.3
    assert all(0 < e <= 1 for e in summary["explained"])
    assert summary["gradcam_contrast"][-1] > 0.3
    assert pictures(nb, "head_maps[k]") == 1


def test_evaluation_notebook_separates_surgery_from_random_and_flags_random(kernel_env):
    summary, nb = run_notebook("04_evaluation")
    low, high = summary["msc_ci"]["surgery"][0], summary["msc_ci"]["random"][1]
    assert low > high  # the intervals do not overlap
    assert summary["msc"]["itsm"] < 0  # ITSM prefers the background
    assert summary["flagged"] == {"surgery": False, "gradcam": False, "attention": False,
                                  "random": True}  # fmt: skip
    assert pictures(nb, "sanity.png") == 1


def test_segmentation_notebook_repaired_attention_beats_itsm(kernel_env):
    summary, nb = run_notebook("05_segmentation")
    miou = summary["miou"]
    assert min(miou["clearclip"], miou["naclip"]) > miou["itsm"] + 10
    assert pictures(nb, "palette[truth[row]]") == 1
