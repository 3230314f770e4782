"""Classes files, inline class lists, the shipped benchmark class names and the presets."""

from __future__ import annotations

import pytest

from clipviz.errors import ClipvizError
from clipviz.segment import (
    benchmark_classes,
    get_preset,
    inline_classes,
    parse_classes,
    preset_names,
    read_classes_file,
)
from clipviz.segment.classes import BENCHMARK_CLASSES


def test_synonyms_split_on_comma_or_semicolon_with_or_without_spaces(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("background\ncat, kitty;kitten ; tabby\ntelevision monitor,tv\n")
    classes = read_classes_file(path)
    assert classes.lines == (
        ("background",),
        ("cat", "kitty", "kitten", "tabby"),
        ("television monitor", "tv"),
    )
    assert classes.name_class == [0, 1, 1, 1, 1, 2, 2]
    assert classes.labels == ["background", "cat", "television monitor"]
    assert parse_classes("a\r\nb".replace("\r\n", "\n")).names == ["a", "b"]  # no final newline


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "names no class"),
        ("a\n\nb\n", "line 2 is blank"),
        ("a\nb\n\n", "line 3 is blank"),
        ("a\nb, a\n", "'a' is on lines 1 and line 2"),
        ("a, a\n", "twice on line 1"),
        ("a,,b\n", "empty name"),
        ("a, \n", "empty name"),
    ],
)
def test_bad_classes_files_are_one_line_usage_errors(tmp_path, text, says):
    path = tmp_path / "classes.txt"
    path.write_text(text)
    with pytest.raises(ClipvizError) as e:
        read_classes_file(path)
    assert says in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 2


def test_too_many_classes_missing_file_and_bad_encoding_are_usage_errors(tmp_path):
    with pytest.raises(ClipvizError, match="at most 65,535"):
        parse_classes("".join(f"c{i}\n" for i in range(65_536)))
    assert len(parse_classes("".join(f"c{i}\n" for i in range(65_535)))) == 65_535
    with pytest.raises(ClipvizError, match="does not exist"):
        read_classes_file(tmp_path / "missing.txt")
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ClipvizError, match="not UTF-8"):
        read_classes_file(tmp_path / "latin.txt")


def test_inline_classes_are_one_name_each():
    assert inline_classes("background, cat,dog").lines == (("background",), ("cat",), ("dog",))
    for bad in ("", "a,,b", "a,b,a"):
        with pytest.raises(ClipvizError):
            inline_classes(bad)


def test_shipped_benchmark_classes():
    sizes = {name: len(benchmark_classes(name)) for name in BENCHMARK_CLASSES}
    assert sizes == {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59,
                     "coco_object": 81, "coco_stuff164k": 171, "cityscapes": 19,
                     "ade20k": 150}  # fmt: skip
    voc = benchmark_classes("voc21")
    assert len(voc.lines[0]) == 26 and voc.lines[0][:3] == ("sky", "wall", "tree")
    assert voc.lines[15][:2] == ("person", "person in shirt") and len(voc.lines[15]) == 7
    assert voc.lines[20] == ("television monitor", "tv monitor", "monitor", "television", "screen")
    assert benchmark_classes("voc20").lines[0] == ("aeroplane",)  # no background class
    obj = benchmark_classes("coco_object")
    assert "body" in obj.lines[1] and obj.name_class[obj.names.index("bed")] == 60
    assert benchmark_classes("context60").lines[59] == ("wood",)


def test_presets_carry_the_papers_settings():
    sclip = get_preset("sclip/voc21")
    assert (sclip.method, sclip.protocol.short_side, sclip.protocol.window) == ("sclip", 336, 224)
    assert (sclip.protocol.logit_scale, sclip.protocol.prob_thd) == (65.0, 0.1)
    assert sclip.protocol.area_thd == 0.1 and sclip.protocol.pamr_steps == 0
    naclip = get_preset("naclip/voc21")
    assert (naclip.protocol.window, naclip.protocol.pamr_steps) == (0, 10)
    assert naclip.protocol.pamr_dilations == (8, 16) and naclip.protocol.prob_thd == 0.1
    assert get_preset("naclip/cityscapes").protocol.short_side == 560
    assert get_preset("sclip/coco_stuff164k").protocol.short_side == 448
    clear = get_preset("clearclip/cityscapes").protocol
    assert (clear.short_side, clear.window, clear.stride, clear.logit_scale) == (448, 224, 224, 50)
    assert get_preset("voc20", method="naclip").name == "naclip/voc20"
    assert get_preset("trident/ade20k").method is None  # no clipviz method computes it
    assert all(get_preset(n).sources for n in preset_names())
    assert len(preset_names()) == 11 * 8
    for name in preset_names():
        get_preset(name).protocol.check()


def test_explicit_settings_override_a_preset():
    preset = get_preset("sclip/voc21")
    protocol = preset.with_overrides(prob_thd=0.3, window=None, pamr_dilations=[1, 2])
    assert (protocol.prob_thd, protocol.window, protocol.logit_scale) == (0.3, 224, 65.0)
    assert protocol.pamr_dilations == (1, 2)
    assert preset.classes().labels[1] == "aeroplane"


@pytest.mark.parametrize(
    ("name", "method", "says"),
    [("gem/voc21", None, "no preset gem/voc21"), ("voc21", "gem", "for method gem"),
     ("sclip/pascal", None, "unknown benchmark 'pascal'")],
)  # fmt: skip
def test_unknown_presets_are_usage_errors(name, method, says):
    with pytest.raises(ClipvizError) as e:
        get_preset(name, method=method)
    assert says in str(e.value) and e.value.exit_code == 2
