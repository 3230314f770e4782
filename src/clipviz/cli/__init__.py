"""The `clipviz` command line (`app.py` registers one module per command)."""

from .app import app, main

__all__ = ["app", "main"]
