"""Image–caption readers: every format, bad rows skipped and counted, never fatal."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from clipviz import ClipvizError
from clipviz.backend import Preprocess
from clipviz.data.captions import CaptionImages, describe_skipped, read_captions
from clipviz.testbed.world import write_captions_csv


def _png(path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def test_synthetic_csv_with_filepath_header_reads_every_scene(tmp_path):
    scenes = write_captions_csv(tmp_path, 5, seed=0, size=32)
    data = read_captions(tmp_path / "captions.csv")
    assert data.format == "csv" and len(data) == 5 and not data.skipped
    assert data.captions == [s.caption for s in scenes]
    assert data.images[0] == tmp_path / "images" / "synth_00000.png"  # relative to the CSV
    assert all(p.is_file() for p in data.images)


def test_csv_bad_rows_are_skipped_and_counted_by_reason(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "sub" / "b.png")
    (tmp_path / "pairs.csv").write_text(
        "image,caption\n"
        "a.png,a red square\n"
        "sub/b.png,  a   red square \n"  # same caption after whitespace is collapsed
        "gone.png,a cat\n"  # missing image
        "a.png,\n"  # empty caption
        "a.png\n"  # malformed: one field
        ",a dog\n"  # no image path
        "sub/b.png,a blue square\n",
        encoding="utf-8",
    )
    data = read_captions(tmp_path / "pairs.csv")
    assert data.captions == ["a red square", "a red square", "a blue square"]
    assert data.caption_ids == [0, 0, 1]
    assert data.unique_captions == ["a red square", "a blue square"]
    assert dict(data.skipped) == {"missing image": 2, "empty caption": 1, "malformed row": 1}
    assert describe_skipped(data.skipped) == "1 empty caption, 1 malformed row, 2 missing image"


def test_a_caption_over_128_kb_or_an_image_name_too_long_is_one_skipped_row(tmp_path):
    import csv

    _png(tmp_path / "a.png")
    huge = "a red square " * 11_000  # 143,000 characters, past csv's 131,072 field limit
    (tmp_path / "pairs.csv").write_text(
        "image,caption\n"
        "a.png,a red square\n"
        f'a.png,"{huge}\non two lines"\n'
        f"{'x' * 300}.png,a long name\n"  # longer than a file name may be
        "a.png,a blue square\n",
        encoding="utf-8",
    )
    limit = csv.field_size_limit()
    data = read_captions(tmp_path / "pairs.csv")
    assert data.captions == ["a red square", "a blue square"]
    assert dict(data.skipped) == {"caption too long": 1, "missing image": 1}
    assert csv.field_size_limit() == limit
    rows = [{"image": "a.png", "caption": ["a cat", huge]}, {"image": "a.png", "caption": "a dog"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(map(json.dumps, rows)), encoding="utf-8")
    data = read_captions(tmp_path / "pairs.jsonl")
    assert data.captions == ["a cat", "a dog"] and dict(data.skipped) == {"caption too long": 1}


def test_tsv_and_csv_need_a_header_naming_both_columns(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "pairs.tsv").write_text("image\tcaption\na.png\ta, b and c\n", encoding="utf-8")
    data = read_captions(tmp_path / "pairs.tsv")
    assert data.format == "tsv" and data.captions == ["a, b and c"]
    (tmp_path / "bad.csv").write_text("a.png,a cat\n", encoding="utf-8")
    with pytest.raises(ClipvizError, match="header naming an image column"):
        read_captions(tmp_path / "bad.csv")


def test_jsonl_reads_lists_of_captions_and_counts_broken_lines(tmp_path):
    _png(tmp_path / "img" / "a.png")
    lines = [
        json.dumps({"image": "img/a.png", "caption": ["a red square", "red block"]}),
        "{not json",
        json.dumps({"image": "img/missing.png", "caption": "x"}),
        json.dumps({"filepath": "img/a.png", "text": "   "}),
        json.dumps(["img/a.png", "a list, not an object"]),
        "",
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines), encoding="utf-8")
    data = read_captions(tmp_path / "pairs.jsonl")
    assert data.captions == ["a red square", "red block"]
    assert dict(data.skipped) == {"malformed row": 2, "missing image": 1, "empty caption": 1}


def test_coco_captions_find_the_split_folder_or_the_given_one(tmp_path):
    _png(tmp_path / "train2017" / "000001.jpg")
    _png(tmp_path / "elsewhere" / "000002.jpg")
    coco = {
        "images": [{"id": 1, "file_name": "000001.jpg"}, {"id": 2, "file_name": "000002.jpg"}],
        "annotations": [
            {"image_id": 1, "caption": "A dog on grass."},
            {"image_id": 1, "caption": "a brown dog"},
            {"image_id": 2, "caption": "a cat"},  # not under the guessed folders
            {"image_id": 7, "caption": "no such image id"},
            {"image_id": 1, "caption": ""},
        ],
    }
    path = tmp_path / "annotations" / "captions_train2017.json"
    path.parent.mkdir()
    path.write_text(json.dumps(coco), encoding="utf-8")
    data = read_captions(path)
    assert data.format == "coco"
    assert data.captions == ["A dog on grass.", "a brown dog"]
    assert data.images == [tmp_path / "train2017" / "000001.jpg"] * 2
    assert dict(data.skipped) == {"missing image": 1, "malformed row": 1, "empty caption": 1}
    given = read_captions(path, images_dir=tmp_path / "elsewhere")
    assert given.captions == ["a cat"]
    with pytest.raises(ClipvizError, match="not a COCO captions file"):
        (tmp_path / "x.json").write_text('{"images": []}', encoding="utf-8")
        read_captions(tmp_path / "x.json")


def test_folder_with_sidecar_captions(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red\nsquare\n", encoding="utf-8")
    _png(tmp_path / "deep" / "b.jpg")
    (tmp_path / "deep" / "b.txt").write_text("a blue square", encoding="utf-8")
    _png(tmp_path / "c.png")  # no sidecar
    _png(tmp_path / "d.png")
    (tmp_path / "d.txt").write_text("\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    data = read_captions(tmp_path)
    assert data.format == "folder"
    assert data.captions == ["a red square", "a blue square"]
    assert data.images == [tmp_path / "a.png", tmp_path / "deep" / "b.jpg"]
    assert dict(data.skipped) == {"no caption file": 1, "empty caption": 1}


def test_an_unreadable_image_is_returned_as_an_error_not_raised(tmp_path):
    good = _png(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    images = CaptionImages([good, bad], Preprocess((16, 16), (0.5,) * 3, (0.5,) * 3))
    i, x, err = images[0]
    assert i == 0 and err is None and x is not None and tuple(x.shape) == (3, 16, 16)
    i, x, err = images[1]
    assert i == 1 and x is None and err is not None and "image" in err


def test_missing_data_path_is_a_usage_error(tmp_path):
    with pytest.raises(ClipvizError, match="does not exist") as info:
        read_captions(tmp_path / "nope.csv")
    assert info.value.exit_code == 2
