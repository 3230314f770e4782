"""Which open_clip architectures clipviz explains, and with which methods: every registered
config's image tower built on the meta device (no weights, no memory), resolved to its
adapter, and matched against each method's needs.

`python -m clipviz.backend.support` prints the tables docs/models.md carries (`python -m
clipviz.docs --write` writes them); a test keeps them equal to what this computes.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import ClipvizError


@dataclass(frozen=True)
class Support:
    """One architecture: its tower family, and the methods that run on it (or why none)."""

    model: str
    family: str
    methods: tuple[str, ...]
    reason: str = ""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def architecture_support(name: str) -> Support:
    """The support of open_clip architecture `name` (its image tower only: text towers from
    Hugging Face need no download to be judged)."""
    import open_clip
    from open_clip.model import _build_vision_tower

    from ..methods.catalog import catalog
    from .towers import tower_adapter

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ClipvizError(
            f"unknown model {name!r}; `clipviz models` lists the architectures, or pass "
            "`model_config` FILE.json for a custom one"
        )
    try:
        with _quiet(), torch.device("meta"):
            visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"])
        adapter = tower_adapter(visual, lambda key, build: None, name)
    except ClipvizError as e:
        trunk = getattr(visual, "trunk", None)
        if trunk is not None:
            family = f"timm {type(trunk).__name__}"
        elif getattr(visual, "attn_pool", None) is not None:
            family = "open_clip ViT, attentional pool"
        else:
            family = type(visual).__name__
        return Support(name, family, (), str(e).split(": ", 1)[-1])
    methods = tuple(
        info.name for info in catalog().values() if info.fits(adapter.kind, adapter.capabilities)
    )
    return Support(name, adapter.family, methods)


def builtin_architectures() -> list[str]:
    """open_clip's own architectures, in its listing order (configs registered later with
    `--model-config` left out)."""
    from pathlib import Path

    import open_clip

    shipped = {p.stem for p in (Path(open_clip.__file__).parent / "model_configs").glob("*.json")}
    return [name for name in open_clip.list_models() if name in shipped]


def all_support() -> list[Support]:
    return [architecture_support(name) for name in builtin_architectures()]


def cached_support() -> list[Support]:
    """`all_support()`, remembered under the cache root per version of clipviz, open_clip
    and timm, per method catalogue and per source of the adapters (building 144 towers, even
    on the meta device, takes seconds)."""
    import hashlib
    import json
    from pathlib import Path

    from ..files import cache_root, package_version, write_json_atomic
    from ..methods.catalog import catalog

    adapters = hashlib.sha1()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        adapters.update(source.read_bytes())
    stamp = json.dumps(
        [package_version(p) for p in ("clipviz", "open_clip_torch", "timm")]
        + [repr(info) for info in catalog().values()]
        + [adapters.hexdigest()]
    )
    path = cache_root() / "support" / f"{hashlib.sha1(stamp.encode()).hexdigest()[:16]}.json"
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        return [Support(r["model"], r["family"], tuple(r["methods"]), r["reason"])
                for r in json.loads(path.read_text(encoding="utf-8"))]  # fmt: skip
    rows = all_support()
    with contextlib.suppress(OSError):
        write_json_atomic(path, [r.__dict__ | {"methods": list(r.methods)} for r in rows])
    return rows


def support_tables(rows: list[Support]) -> tuple[str, str]:
    """(docs/models.md's table of families, its table of every architecture)."""
    families: dict[str, list[Support]] = {}
    for r in rows:
        families.setdefault(r.family, []).append(r)
    summary = [
        "| tower family | architectures | methods |",
        "| --- | --- | --- |",
    ]
    for family, members in sorted(families.items(), key=lambda kv: -len(kv[1])):
        methods = sorted({m for r in members for m in r.methods}, key=[*catalog_order()].index)
        shown = ", ".join(f"`{m}`" for m in methods) or f"none: {members[0].reason}"
        summary.append(f"| {family} | {len(members)} | {shown} |")
    full = ["| architecture | tower family | methods |", "| --- | --- | --- |"]
    for r in rows:
        full.append(f"| `{r.model}` | {r.family} | {', '.join(r.methods) or r.reason} |")
    return "\n".join(summary) + "\n", "\n".join(full) + "\n"


def catalog_order() -> list[str]:
    from ..methods.catalog import catalog

    return list(catalog())


def documented_version() -> str | None:
    """The open_clip version the shipped tables were generated for."""
    from ..files import package_version

    return package_version("open_clip_torch")


if __name__ == "__main__":
    print("\n".join(support_tables(all_support())))
