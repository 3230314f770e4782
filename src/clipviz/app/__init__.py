"""`clipviz app`: a local web app over the library — explain an image with several methods
and prompts, compare a method's layers, discover ConVis concepts.

`session.py` computes (no web code), `ui.py` lays it out in Gradio (the `app` extra:
`pip install 'clipviz[app]'`).
"""
