"""Open-vocabulary semantic segmentation by the field's training-free protocol
(docs/segmentation.md): the protocol as small pure steps, presets and the benchmarks' class names
as data, and a `Segmenter` that feeds any registered method's maps through them."""

from .classes import ClassNames, benchmark_classes, inline_classes, parse_classes, read_classes_file
from .metric import IoUMetric, intersect_and_union, reduce_zero_label
from .presets import Preset, get_preset, preset_names
from .protocol import Protocol
from .segmenter import Segmentation, Segmenter, segment

__all__ = [
    "ClassNames",
    "IoUMetric",
    "Preset",
    "Protocol",
    "Segmentation",
    "Segmenter",
    "benchmark_classes",
    "get_preset",
    "inline_classes",
    "intersect_and_union",
    "parse_classes",
    "preset_names",
    "read_classes_file",
    "reduce_zero_label",
    "segment",
]
