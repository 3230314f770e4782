"""Presets: the protocol settings of each published method on each benchmark, as data
(`data/presets.json`, every row citing the authors' config it was read from).

A preset is named `<protocol>/<benchmark>` (`naclip/voc21`), or by the benchmark alone
(`voc21`), which takes the protocol of the method run. Explicit settings override a preset's.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from ..errors import ClipvizError
from .classes import BENCHMARK_CLASSES, ClassNames, benchmark_classes
from .protocol import Protocol

_FIELDS = {f.name for f in dataclasses.fields(Protocol)}


@cache
def _table() -> dict[str, Any]:
    text = resources.files(__package__).joinpath("data/presets.json").read_text()
    return json.loads(text)["protocols"]


@dataclass(frozen=True)
class Preset:
    """One method's settings on one benchmark.

    method: the clipviz method that computes the protocol's maps (None: none does, and a
    method must be chosen); sources: where each value was read; note: what is not reproduced;
    options: the method's options the authors set for the benchmark (given `-O` override them).
    """

    name: str
    method: str | None
    benchmark: str
    protocol: Protocol
    sources: tuple[str, ...]
    note: str = ""
    options: dict[str, Any] = field(default_factory=dict, hash=False)

    def classes(self) -> ClassNames:
        """The benchmark's class names as shipped."""
        return benchmark_classes(self.benchmark)

    def with_overrides(self, **settings: Any) -> Protocol:
        """The preset's protocol with the settings given (None: keep the preset's)."""
        return override(self.protocol, **settings)


def override(protocol: Protocol, **settings: Any) -> Protocol:
    """`protocol` with the settings given (None: keep its own)."""
    given = {k: v for k, v in settings.items() if v is not None}
    if unknown := set(given) - _FIELDS:
        raise ClipvizError(
            f"unknown protocol setting(s) {sorted(unknown)}; the settings are: "
            f"{', '.join(sorted(_FIELDS))}"
        )
    if "pamr_dilations" in given:
        given["pamr_dilations"] = tuple(given["pamr_dilations"])
    return dataclasses.replace(protocol, **given)


def preset_names() -> list[str]:
    """Every preset, `<protocol>/<benchmark>`."""
    return [f"{p}/{b}" for p, row in _table().items() for b in row["benchmarks"]]


def get_preset(name: str, method: str | None = None) -> Preset:
    """The preset `name` (`naclip/voc21`, or `voc21` for the protocol of `method`, default
    sclip); an unknown one is a usage error listing the choices."""
    table = _table()
    protocol, slash, benchmark = name.strip().lower().rpartition("/")
    if not slash:
        protocol = (method or "sclip").lower()
    if benchmark not in BENCHMARK_CLASSES:
        raise ClipvizError(
            f"unknown benchmark {benchmark!r} in preset {name!r}; benchmarks: "
            f"{', '.join(BENCHMARK_CLASSES)}"
        )
    if protocol not in table:
        for_method = "" if slash else f" for method {protocol}"
        raise ClipvizError(
            f"no preset {protocol}/{benchmark}{for_method}; presets for {benchmark}: "
            + ", ".join(f"{p}/{benchmark}" for p in table)
        )
    row = table[protocol]
    values = {**row["defaults"], **row["benchmarks"][benchmark]}
    options = {**row.get("options", {}), **values.pop("options", {})}
    sources = (row["source"], values.pop("source"), row.get("pamr_source", ""))
    settings = {k: v for k, v in values.items() if k in _FIELDS}
    settings["pamr_dilations"] = tuple(settings["pamr_dilations"])
    note = "; ".join(n for n in (row.get("note", ""), row.get("classes_note", "")) if n)
    return Preset(f"{protocol}/{benchmark}", row["method"], benchmark, Protocol(**settings),
                  tuple(s for s in sources if s), note, options)  # fmt: skip


def preset_options(preset: Preset | None, method: str) -> dict[str, Any]:
    """The method options `preset` sets when `method` is the preset's own (checked as `-O`
    ones are); none for another method, or without a preset. Given options go over them."""
    from ..methods import method_options

    if preset is None or not preset.options or preset.method != method:
        return {}
    return method_options([method], [], preset.options)[method]
