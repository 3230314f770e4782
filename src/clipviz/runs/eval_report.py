"""One static HTML page over a `clipviz eval` result: the methods × metrics table with 95 %
intervals, mIoU per class, the threshold sweeps and the deletion/insertion curves as plots,
and the images each method does best and worst on (by score contrast)."""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import ClipvizError
from ..files import atomic_path, read_jsonl, write_text_atomic
from .report_assets import STYLE
from .report_files import inside, page_link

SHOWN = 6  # best and worst images per method
COLUMNS = [("miou", "mIoU %", 1), ("msc", "mSC %", 1), ("pointing", "pointing", 3),
           ("energy", "energy", 3), ("maxboxacc", "MaxBoxAcc %", 1),
           ("deletion", "deletion ↓", 3), ("insertion", "insertion ↑", 3),
           ("aacc", "aAcc %", 2), ("macc", "mAcc %", 2)]  # fmt: skip


def _number(value: Any, digits: int) -> str:
    """A number with `digits` decimals; anything else (a results JSON may come from someone
    else) as escaped text."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _cell(res: dict[str, Any], key: str, digits: int) -> str:
    value, ci = res.get(key), res.get(f"{key}_ci")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    text = _number(value, digits)
    if key in ("miou", "maxboxacc") and res.get(f"{key}_threshold") is not None:
        text += f" (τ {_number(res[f'{key}_threshold'], 2)})"
    if isinstance(ci, list | tuple) and len(ci) == 2:
        text += f"<br><small>{_number(ci[0], digits)} – {_number(ci[1], digits)}</small>"
    return text


def eval_results_in(folder: Path) -> list[Path]:
    """The `clipviz eval` results JSONs in `folder` (JSON objects with `results`), by name."""
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("results"), dict):
            found.append(path)
    return found


def build_eval_report(
    json_path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None
) -> Path:
    """Write `<json>.html` (or `out`) and its plots beside it, from an eval results JSON and
    its `.records.jsonl`."""
    json_path = Path(json_path)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ClipvizError(f"cannot read the eval results {json_path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ClipvizError(
            f"{json_path} is not a `clipviz eval` results JSON (no results); pass the JSON that "
            "`clipviz eval` wrote"
        )
    target = Path(out) if out is not None else json_path.with_suffix(".html")
    try:
        page = _page(json_path, target, data)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise ClipvizError(
            f"{json_path} is not a results JSON as `clipviz eval` writes it ({type(e).__name__}: "
            f"{e}); run the eval again to write it afresh"
        ) from None
    write_text_atomic(target, page)
    return target


def _page(json_path: Path, target: Path, data: dict[str, Any]) -> str:
    """The page's HTML (its plots written beside `target`)."""
    results = {m: r for m, r in data["results"].items() if isinstance(r, dict)}
    metrics = [c for c in COLUMNS if c[0] in data.get("metrics", [])]
    parts = [
        "<!doctype html><meta charset='utf-8'><title>clipviz eval report</title>",
        f"<style>{STYLE}</style>",
        f"<h1>clipviz eval — {html.escape(data.get('dataset', {}).get('name', json_path.stem))}</h1>",
        "<p class='meta'>" + html.escape(_meta(data)) + "</p>",
        "<table><tr><th>method</th>"
        + "".join(f"<th>{h}</th>" for _, h, _ in metrics)
        + "<th>pairs</th></tr>",
    ]
    for method, res in results.items():
        cells = "".join(f"<td>{_cell(res, k, d)}</td>" for k, _, d in metrics)
        parts.append(f"<tr><td>{html.escape(method)}</td>{cells}"
                     f"<td>{html.escape(str(res.get('pairs', 0)))}</td></tr>")  # fmt: skip
    parts.append("</table><p class='meta'>Under each number: its 95 % interval, a percentile bootstrap "
                 "over images (threshold search included).</p>")  # fmt: skip
    parts += _per_class(results)
    for name in _plots(target, data):
        rel = page_link(name, target.parent)
        parts.append(f"<figure style='width:auto'><img src='{rel}' alt='{name.stem}' "
                     "style='width:720px'></figure>")  # fmt: skip
    parts += _extremes(json_path, target, results)
    failed = data.get("dataset", {}).get("failed", [])
    if failed:
        parts.append("<h2 class='failed'>Failed images</h2><table>")
        for f in failed:
            parts.append(f"<tr><td>{html.escape(f['image'])}</td>"
                         f"<td class='failed'>{html.escape(str(f['error']))}</td></tr>")  # fmt: skip
        parts.append("</table>")
    return "\n".join(parts) + "\n"


def _meta(data: dict[str, Any]) -> str:
    model = data.get("model", {})
    ds = data.get("dataset", {})
    if data.get("task") == "segment":
        return (f"model {model.get('model')} ({model.get('pretrained') or model.get('weights')}), "
                f"{ds.get('scored')} of {ds.get('size')} images scored, preset "
                f"{data.get('preset')}, protocol {json.dumps(data.get('protocol'))}, "
                f"reduce_zero_label {ds.get('reduce_zero_label')}")  # fmt: skip
    chosen = data.get("thresholds_chosen_on", "the scored images")
    where = chosen if isinstance(chosen, str) else f"{chosen['split']} ({chosen['images']} images)"
    return (f"model {model.get('model')} ({model.get('pretrained') or model.get('weights')}), "
            f"{ds.get('scored')} of {ds.get('size')} images scored, thresholds chosen on "
            f"{where}, pointing tolerance {data.get('pointing_tolerance_px')} px")  # fmt: skip


def _per_class(results: dict[str, Any]) -> list[str]:
    with_classes = {m: r["miou_per_class"] for m, r in results.items() if r.get("miou_per_class")}
    if not with_classes:
        return []
    classes = sorted({c for per in with_classes.values() for c in per})
    parts = ["<h2>mIoU per class (%)</h2><table><tr><th>class</th>"
             + "".join(f"<th>{html.escape(m)}</th>" for m in with_classes) + "</tr>"]  # fmt: skip
    for c in classes:
        cells = "".join(
            f"<td>{_number(per[c], 1)}</td>" if c in per else "<td>—</td>"
            for per in with_classes.values()
        )
        parts.append(f"<tr><td>{html.escape(c)}</td>{cells}</tr>")
    parts.append("</table>")
    return parts


def _plots(target: Path, data: dict[str, Any]) -> list[Path]:
    """The threshold sweeps and the perturbation curves, one PNG each, beside the page."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    curves = data.get("curves", {})
    results = data["results"]
    folder = target.with_suffix(".plots")
    specs = [
        ("miou", "miou_curve", curves.get("miou_thresholds"), "threshold τ", "mIoU %"),
        ("maxboxacc", "maxboxacc_curve", curves.get("maxboxacc_thresholds"), "threshold τ",
         "MaxBoxAcc %"),
        ("deletion", "deletion_curve", curves.get("deletion_insertion_fractions"),
         "share of pixels blurred away", "cos(image, text), relative"),
        ("insertion", "insertion_curve", curves.get("deletion_insertion_fractions"),
         "share of pixels revealed", "cos(image, text), relative"),
    ]  # fmt: skip
    written = []
    for name, key, grid, xlabel, ylabel in specs:
        lines = {m: r[key] for m, r in results.items() if r.get(key)}
        if not lines or not grid:
            continue
        fig, ax = plt.subplots(figsize=(7.2, 3.6))
        for method, values in lines.items():
            ax.plot(grid[: len(values)], values, label=method, linewidth=1.4)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.tight_layout()
        path = inside(target.parent, folder.name, f"{name}.png")
        if path is None:  # a link beside the page pointing elsewhere: not followed
            plt.close(fig)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _extremes(json_path: Path, target: Path, results: dict[str, Any]) -> list[str]:
    """Per method the images with the highest and lowest mean score contrast."""
    records_path = json_path.with_suffix(".records.jsonl")
    if not records_path.is_file():
        return []
    records = [r for r in read_jsonl(records_path) if r.get("status") == "ok" and r.get("pairs")]
    parts: list[str] = []
    for method in results:
        scored = []
        for r in records:
            values = [
                p["msc"] for p in r["pairs"] if p["method"] == method and _finite(p.get("msc"))
            ]
            if values:
                scored.append((sum(values) / len(values), r["image"]))
        if not scored:
            continue
        scored.sort()
        parts.append(f"<h2>{html.escape(method)}: best and worst images (mSC %)</h2>"
                     "<div class='grid'>")  # fmt: skip
        for label, chosen in (("best", scored[::-1][:SHOWN]), ("worst", scored[:SHOWN])):
            for score, image in chosen:
                rel = page_link(Path(image), target.parent)
                parts.append(f"<figure><img loading='lazy' src='{rel}' alt='{label}'>"
                             f"<figcaption>{label}: {html.escape(Path(image).name)} — mSC "
                             f"{score:+.1f}</figcaption></figure>")  # fmt: skip
        parts.append("</div>")
    return parts


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not math.isnan(value)
