"""`clipviz app`: a local web app over the library — explain an image with several methods
and prompts, compare a method's layers, discover ConVis concepts.

`session.py` and `segmentation.py` compute (no web code), `ui.py` lays them out in Gradio
with `widgets.py`'s shared pieces (the `app` extra: `pip install 'clipviz[app]'`).
"""

import os

# before gradio is imported by any module of the app: no telemetry, no version check, no
# server-side rendering (which would need Node.js); the page is built from the package's files
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("GRADIO_SSR_MODE", "False")
