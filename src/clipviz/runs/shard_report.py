"""One static page over a shard run: what was asked, per shard its samples, failures and
most probable prompts (read from the parquet tables), the prompts' share over the run, and
the failed samples with their reasons. Shard runs write maps, not pictures: the page shows
numbers and points to the files."""

from __future__ import annotations

import collections
import html
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

from ..files import write_text_atomic
from .manifest import latest_records
from .report_assets import STYLE
from .report_files import inside, page_link, read_run_info

MAX_FAILURES = 500  # listed on the page; the tables hold them all


def _table_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=["key", "status", "error", "top", "probs"]).to_pylist()
    except Exception:  # noqa: BLE001 - a missing or damaged table is shown as such
        return []


def _shard_files(run_dir: Path, rec: dict[str, Any]) -> dict[str, Path] | None:
    """A shard's output files by name, each inside the run folder; None when one is not."""
    output = rec.get("output")
    if inside(run_dir, output) is None:
        return None
    files = {}
    for name in rec.get("outputs") or []:
        path = inside(run_dir, str(PurePath(str(output)).parent), name)
        if path is None:
            return None
        files[name] = path
    return files


def build_shard_report(
    run_dir: Path, out: Path | None = None, warn: Callable[[str], None] | None = None
) -> Path:
    """Write `RUN_DIR/report.html` (or `out`) over a shard run (see the module). A shard whose
    files are not inside the run folder (an absolute path, `..`, a link out) is neither read
    nor linked: its row says so, and `warn` is told."""
    target = out if out is not None else run_dir / "report.html"
    run = read_run_info(run_dir)
    prompts: list[str] = [str(p) for p in run.get("prompts", [])]
    records = sorted(latest_records(run_dir).values(), key=lambda r: str(r.get("output", "")))
    overall: collections.Counter[str] = collections.Counter()
    shard_rows: list[str] = []
    failures: list[tuple[str, Any, Any]] = []
    for rec in records:
        name = Path(str(rec.get("output", ""))).name
        files = _shard_files(run_dir, rec)
        if files is None:
            reason = f"{rec.get('output')} is outside the run folder"
            if warn:
                warn(f"left out of the report: {rec.get('input')}: {reason}")
            failures.append((name, "(the whole shard, left out)", reason))
            rec = {**rec, "outputs": [], "samples": 0, "failed_samples": 0}
            files = {}
        parquet = files.get(f"{name}.parquet")
        rows = _table_rows(parquet) if parquet else []
        ok = [r for r in rows if r["status"] == "ok"]
        tops = collections.Counter(str(r["top"]) for r in ok)
        overall.update(tops)
        failures += [(name, r["key"], r["error"]) for r in rows if r["status"] == "failed"]
        if rec.get("status") == "failed":
            failures.append((name, "(the whole shard)", rec.get("error")))
        links = " ".join(
            f"<a href='{page_link(path, target.parent)}'>{html.escape(f)}</a>"
            for f, path in files.items()
        )
        common = ", ".join(f"{html.escape(p)} ({n})" for p, n in tops.most_common(3))
        shard_rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{html.escape(str(rec.get('status')))}</td>"
            f"<td>{html.escape(str(rec.get('samples', 0)))}</td><td>{len(ok)}</td>"
            f"<td>{html.escape(str(rec.get('failed_samples', 0)))}</td><td>{common}</td>"
            f"<td>{links}</td></tr>"
        )
    total = sum(overall.values())
    shares = "".join(
        f"<tr><td>{html.escape(p)}</td><td>{overall[p]}</td>"
        f"<td>{overall[p] / total:.1%}</td></tr>"
        for p in sorted(prompts or overall, key=lambda p: -overall[p])
    ) if total else ""  # fmt: skip
    meta = (
        f"model {run.get('model', {}).get('model', '?')} ({run.get('model', {}).get('pretrained', '?')}), "
        f"methods {', '.join(run.get('methods', []))}, {len(prompts)} prompts, maps as "
        f"{run.get('maps', '?')}, {len(records)} shards, {total} samples explained"
    )
    parts = [
        "<!doctype html><meta charset='utf-8'><title>clipviz shards</title>",
        f"<style>{STYLE}</style><h1>clipviz report — {html.escape(run_dir.name)}</h1>",
        f"<p class='meta'>{html.escape(meta)}</p>",
        "<h2>Most probable prompt, over every sample</h2>",
        "<table><tr><th>prompt</th><th>samples</th><th>share</th></tr>" + shares + "</table>",
        "<h2>Shards</h2><table><tr><th>shard</th><th>status</th><th>samples</th><th>ok</th>"
        "<th>failed</th><th>most probable prompts</th><th>files</th></tr>"
        + "".join(shard_rows)
        + "</table>",
        f"<h2>Failures ({len(failures)})</h2><table><tr><th>shard</th><th>key</th><th>reason</th></tr>",
    ]
    for shard, key, error in failures[:MAX_FAILURES]:
        parts.append(
            f"<tr><td>{html.escape(shard)}</td><td>{html.escape(str(key))}</td>"
            f"<td class='failed'>{html.escape(str(error))}</td></tr>"
        )
    parts.append("</table>")
    if len(failures) > MAX_FAILURES:
        parts.append(f"<p>… {len(failures) - MAX_FAILURES} more in the parquet tables</p>")
    write_text_atomic(target, "\n".join(parts) + "\n")
    return target
