"""`OUT/run.json`, what a run asked for: one writer for every kind of run and one reader.

Every run.json holds `schema_version`, the `versions` that wrote it, the run's `kind` (one of
`KINDS`), what that kind of run asked for, and when it started. A run.json written before
runs had a `kind` is read as the kind its fields show.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..files import provenance, write_json_atomic
from .manifest import disk_full_stops

RUN_JSON = "run.json"
# kind -> how a message names it
KINDS = {
    "explain": "explain run",
    "shards": "explain run over shards",
    "concepts": "concepts run",
    "train": "training run",
    "segment": "segment run",
    "segment_shards": "segment run over shards",
}


def write_run_json(out: Path, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Write `OUT/run.json` for a run of `kind` asking for `fields`; returns what was written
    (a full disk stops the run in one line)."""
    if kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r}")
    run = {**provenance(), "kind": kind, **fields,
           "started": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
    with disk_full_stops(out / RUN_JSON):
        write_json_atomic(out / RUN_JSON, run)
    return run


def _kind_of_fields(run: dict[str, Any]) -> str:
    """The kind of a run.json written before it had one, from the fields only it has."""
    if "shards" in run:
        return "segment_shards" if "protocol" in run else "shards"
    if "base" in run and "config" in run:
        return "train"
    if "protocol" in run and "classes" in run:
        return "segment"
    if "concepts" in run:
        return "concepts"
    return "explain"


def read_run_json(out: Path) -> dict[str, Any] | None:
    """`OUT/run.json` with its `kind`, or None where there is no run.json that clipviz wrote
    (none, unreadable, or without `schema_version`)."""
    try:
        run = json.loads((out / RUN_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(run, dict) or "schema_version" not in run:
        return None
    if run.get("kind") not in KINDS:
        run["kind"] = _kind_of_fields(run)
    return run


def run_kind(out: Path) -> str | None:
    """The kind of the clipviz run in `out` (None: not one)."""
    run = read_run_json(out)
    return None if run is None else str(run["kind"])
