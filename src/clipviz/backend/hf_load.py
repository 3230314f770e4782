"""Checks on a `transformers:` model before and after transformers builds it, so that what
is wrong with a folder or its weights is said in one line instead of loading random tensors
or failing deep inside transformers.

Before: the path is a model folder (or a hub repository id), its config builds (on the meta
device, allocating nothing), its weights files hold tensors only and as many values as the
config asks for. After: transformers' own loading report has no missing, unexpected or
misshapen tensors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import ClipvizError

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
           "pytorch_model.bin.index.json")  # fmt: skip
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
SHOWN = 3  # tensor names shown in a message


def local_folder(spec: str, source: str) -> Path | None:
    """The folder `source` names, None for a hub repository id; refuses a path that is no
    model folder (a file, a folder without config.json, or nothing at all)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ClipvizError(
                f"{spec}: the folder has no config.json, so it is not a transformers model "
                "folder; pass a folder written by save_pretrained or a hub repository id org/name"
            )
        return path
    if path.exists():
        raise ClipvizError(
            f"{spec}: {source} is not a folder; pass a folder written by save_pretrained "
            "(config.json and model.safetensors) or a hub repository id org/name"
        )
    if not HUB_ID.fullmatch(source) or ".." in source:
        raise ClipvizError(
            f"{spec}: the folder {source} does not exist; pass a folder written by "
            "save_pretrained or a hub repository id org/name"
        )
    return None


def weights_files(fetch: Callable[[str], Path | None], where: str) -> list[Path]:
    """The weights files of a model: `fetch(name)` gives a file of the folder or repository
    (None where it has none); safetensors first, sharded ones through their index."""
    for name in WEIGHTS:
        found = fetch(name)
        if found is None:
            continue
        if not name.endswith(".index.json"):
            return [found]
        try:
            shards = sorted(
                set(json.loads(found.read_text(encoding="utf-8"))["weight_map"].values())
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ClipvizError(
                f"{where}: {name} is not a weights index ({e}); re-save the model"
            ) from e
        files = [fetch(s) for s in shards]
        missing = [s for s, f in zip(shards, files, strict=True) if f is None]
        if missing:
            raise ClipvizError(
                f"{where}: {name} lists {', '.join(missing[:SHOWN])}, which are absent; copy the "
                "folder again in full, or re-save the model with save_pretrained"
            )
        return [f for f in files if f is not None]
    raise ClipvizError(
        f"{where}: no weights file ({WEIGHTS[0]} or {WEIGHTS[2]}); pass a folder written by "
        "save_pretrained"
    )


def stored_values(files: Iterable[Path]) -> int:
    """How many values the weights files hold, read safely: the safetensors headers, or the
    tensors of a torch state dict (`weights_only`, memory-mapped)."""
    from safetensors import safe_open

    total = 0
    for path in files:
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                        total += _numel(f.get_slice(key).get_shape())
            else:
                state = read_state_dict(path)
                total += sum(t.numel() for t in state.values() if torch.is_tensor(t))
        except ClipvizError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors and torch raise many types
            raise ClipvizError(
                f"weights {path} cannot be read ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); the file is damaged or not a weights file"
            ) from e
    return total


def read_state_dict(path: Path) -> dict[str, Any]:
    """A torch state dict of tensors alone; anything pickled besides is refused."""
    import pickle

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # an old format
    except pickle.UnpicklingError as e:
        raise ClipvizError(pickled_message(str(path))) from e
    if not isinstance(state, dict):
        raise ClipvizError(
            f"weights {path} hold a {type(state).__name__}, not a state dict; save "
            "`model.state_dict()` alone (safetensors.torch.save_file, or torch.save)"
        )
    return state


def pickled_message(where: str) -> str:
    return (
        f"weights {where} hold pickled Python objects besides tensors, which clipviz never "
        "loads (they could run code); save the tensors alone (safetensors, or a state dict "
        "of tensors with torch.save)"
    )


def meta_values(config: Any, where: str) -> int:
    """How many values the model `config` describes, counted on the meta device."""
    from transformers import AutoModel

    try:
        with torch.device("meta"):
            model = AutoModel.from_config(config)
    except Exception as e:  # noqa: BLE001 - any config error surfaces as some exception
        raise ClipvizError(
            f"{where}: config.json does not build a model ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); fix or replace config.json"
        ) from e
    return sum(t.numel() for t in model.state_dict().values())


def check_sizes(config: Any, files: list[Path], where: str) -> None:
    """Refuse a config that asks for far more values than the weights hold (it would
    allocate them all before finding out)."""
    wanted, stored = meta_values(config, where), stored_values(files)
    if wanted > 2 * stored + 2**20:
        raise ClipvizError(
            f"{where}: config.json does not match the weights: it describes a model of "
            f"{wanted:.3g} values, the weights hold {stored:.3g}; use the config.json saved "
            "with these weights"
        )


def refuse_loading_report(info: dict[str, Any], where: str) -> None:
    """transformers' loading report: any missing, unexpected or misshapen tensor is an error
    (a model would otherwise run with random weights in their place)."""
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected")):
        names = sorted(info.get(key) or [])
        if names:
            problems.append(f"{what} {_count(names)}: {_some(names)}")
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: str(m[0]))
    if mismatched:
        shown = "; ".join(
            f"{m[0]} is {_shape(m[1])} in the weights, {_shape(m[2])} in the model"
            for m in mismatched[:SHOWN]
        )
        problems.append(f"misshapen {_count(mismatched)}: {shown}")
    if problems:
        raise ClipvizError(
            f"{where}: the weights do not match config.json ({'; '.join(problems)}); "
            "use the config.json saved with these weights"
        )


def _count(items: list[Any]) -> str:
    return f"{len(items)} tensor" + ("s" if len(items) != 1 else "")


def _some(names: list[str]) -> str:
    more = len(names) - SHOWN
    return ", ".join(names[:SHOWN]) + (f" and {more} more" if more > 0 else "")


def _shape(shape: Any) -> str:
    return "[" + ", ".join(str(int(n)) for n in shape) + "]"


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
