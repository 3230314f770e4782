"""Sphinx configuration of clipviz's documentation: furo, MyST Markdown pages, the API from
the docstrings, and the example notebooks executed by myst-nb.

Build it with `make docs` (warnings are errors). Nothing is fetched from the network: no
intersphinx, no analytics, no MathJax from a CDN; furo serves its own files.

The notebooks (`examples/notebooks/*.py`, jupytext `py:percent`) are staged into
`docs/notebooks/` at every build. Where `tests/test_notebooks.py` has already executed one
(`docs/_build/executed/<name>.ipynb`) with the same code cells as the `.py` holds now, its
outputs are reused; otherwise myst-nb executes the notebook on the test bed's tiny CLIP.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT / "src"))

from clipviz.docs import stage_notebooks  # noqa: E402

project = "clipviz"
author = "clipviz's authors"
copyright = "clipviz's authors"  # noqa: A001

extensions = ["myst_nb", "sphinx.ext.autodoc"]
exclude_patterns = ["_build", "conf.py", "Thumbs.db", ".DS_Store"]

html_theme = "furo"
html_title = "clipviz"
html_static_path: list[str] = []
html_show_sourcelink = False
html_copy_source = False
# MathJax is loaded only by pages with formulas (none now); never from a CDN
mathjax_path = "mathjax/tex-chtml.js"

myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# docstrings write code in single backquotes, and `--option` as it is typed
default_role = "literal"
smartquotes = False
autodoc_default_options = {"members": True, "undoc-members": False}

# the notebooks: jupytext `.py` files executed here, or `.ipynb` copies the tests executed
nb_custom_formats = {".py": ["jupytext.reads", {"fmt": "py:percent"}]}
nb_execution_mode = "force"
nb_execution_excludepatterns = ["*.ipynb"]
nb_execution_timeout = 300
nb_execution_raise_on_error = True
nb_merge_streams = True

if stage_notebooks():
    # the notebooks left to execute run in a kernel of this Python, one thread each
    import shutil

    from ipykernel.kernelspec import write_kernel_spec

    kernels = DOCS / "_build" / "jupyter"
    shutil.rmtree(kernels, ignore_errors=True)
    write_kernel_spec(kernels / "kernels" / "python3")
    os.environ["JUPYTER_PATH"] = str(kernels)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# clipviz's docstrings describe arguments and attributes as `name: text` lines, the text's
# continuation indented below it: shown as a definition list
_FIELD = re.compile(r"^([A-Za-z_][\w.]*(?:, [A-Za-z_][\w.]*)*): (\S.*)$")


def fields_as_definitions(app, what, name, obj, options, lines: list[str]) -> None:
    out: list[str] = []
    in_list = False
    for line in lines:
        field = _FIELD.match(line)
        if field:
            if out and out[-1].strip() and not in_list:
                out.append("")
            names = ", ".join(f"``{name}``" for name in field.group(1).split(", "))
            out += [names, f"    {field.group(2)}"]
            in_list = True
        elif in_list and line.strip() and not line[0].isspace():
            if out[-1].strip():
                out.append("")
            out.append(line)
            in_list = False
        else:
            out.append(line)
    lines[:] = out


def setup(app) -> None:
    app.connect("autodoc-process-docstring", fields_as_definitions)
