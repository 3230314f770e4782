"""One static HTML page over the outputs of a `clipviz explain` run directory."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import ClipvizError
from ..files import write_text_atomic
from .manifest import MANIFEST, latest_records

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 15px; margin: 24px 0 6px; word-break: break-all; }
.meta { color: #555; } .failed { color: #b00; }
.row { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 240px; } figure img { width: 240px; border: 1px solid #ddd; }
figcaption { font-size: 12px; } .top { font-weight: bold; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; border-bottom: 1px solid #eee; }
.tokens { margin: 4px 0; } .tokens span { padding: 1px 3px; border-radius: 3px; }
"""


def _latest_records(run_dir: Path) -> list[dict[str, Any]]:
    return sorted(latest_records(run_dir).values(), key=lambda r: str(r.get("output", "")))


def build_report(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None
) -> Path:
    """Write `RUN_DIR/report.html` (or `out`): per image, its overlays with the prompts'
    probabilities, the comparison sheet if there is one, and the failures with reasons."""
    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).is_file():
        raise ClipvizError(
            f"{run_dir} has no {MANIFEST}; pass the `out` folder of a `clipviz explain` run"
        )
    target = Path(out) if out is not None else run_dir / "report.html"
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    records = _latest_records(run_dir)
    ok = [r for r in records if r.get("status") in ("ok", "skipped")]
    failed = [r for r in records if r.get("status") == "failed"]
    base = os.path.relpath(run_dir, target.parent)

    def src(rec: dict[str, Any], name: str) -> str:
        # percent-encoded bytes: any file name (UTF-8 or not) resolves to its file
        return quote(os.fsencode(Path(base, rec["output"], name).as_posix()))

    model = run.get("model", {})
    parts = [
        "<!doctype html><meta charset='utf-8'><title>clipviz report</title>",
        f"<style>{STYLE}</style><h1>clipviz report — {html.escape(run_dir.name)}</h1>",
        "<p class='meta'>"
        + html.escape(
            f"model {model.get('model')} ({model.get('pretrained') or model.get('weights')}), "
            f"methods {', '.join(run.get('methods', []))}, {len(ok)} images, "
            f"{len(failed)} failed"
        )
        + "</p>",
    ]
    for rec in ok:
        parts.append(f"<h2>{html.escape(rec['output'])}</h2>")
        probs: dict[str, float] = rec.get("probs", {})
        files = rec.get("outputs", [])
        if "comparison.png" in files:
            parts.append(f"<img src='{src(rec, 'comparison.png')}' style='max-width:100%'>")
        parts.append("<div class='row'>")
        for prompt, name, label in _overlays(rec):
            p = probs.get(prompt)
            text = html.escape(label) + (f" — p = {p:.3f}" if p is not None else "")
            cls = " class='top'" if prompt == rec.get("top") else ""
            parts.append(
                f"<figure><img loading='lazy' src='{src(rec, name)}'>"
                f"<figcaption{cls}>{text}</figcaption></figure>"
            )
        parts.append("</div>")
        parts += _text_importance(rec)
    if failed:
        parts.append("<h2 class='failed'>Failed inputs</h2><table>")
        for rec in failed:
            parts.append(
                f"<tr><td>{html.escape(rec['input'])}</td>"
                f"<td class='failed'>{html.escape(str(rec.get('error')))}</td></tr>"
            )
        parts.append("</table>")
    write_text_atomic(target, "\n".join(parts) + "\n")
    return target


def _text_importance(rec: dict[str, Any]) -> list[str]:
    """Each explained prompt's tokens shaded by their importance (Grad-ECLIP's text side),
    the weight in each token's tooltip."""
    parts = []
    for method, prompts in rec.get("text_importance", {}).items():
        for prompt, tokens in prompts.items():
            top = max((w for _, w in tokens), default=0.0) or 1.0
            spans = "".join(
                f"<span title='{w:.3f}' style='background: rgba(220, 40, 40, {w / top:.2f})'>"
                f"{html.escape(tok)}</span> "
                for tok, w in tokens
            )
            label = html.escape(f"{method}, text side — {prompt}:")
            parts.append(f"<p class='tokens'>{label} {spans}</p>")
    return parts


def _overlays(rec: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(prompt, overlay file, caption) of a record: from its `prompt_files`, which name each
    prompt's files (and method, when several ran); older records are read by file name."""
    if "prompt_files" in rec:
        out = []
        for prompt, files in rec["prompt_files"].items():
            for kind, name in files.items():
                if kind.endswith("overlay"):
                    method = kind[: -len(".overlay")] if "." in kind else ""
                    out.append((prompt, name, f"{prompt} — {method}" if method else prompt))
        return out
    from ..render import prompt_slugs

    probs: dict[str, float] = rec.get("probs", {})
    slug_to_prompt = dict(zip(prompt_slugs(list(probs)), probs, strict=True))
    return [
        (
            slug_to_prompt.get(name.split(".")[0], name),
            name,
            slug_to_prompt.get(name.split(".")[0], name),
        )
        for name in rec.get("outputs", [])
        if name.endswith(".overlay.png")
    ]
