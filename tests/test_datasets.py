"""Dataset readers on tiny VOC, COCO, CUB and generic folders built on the fly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipviz.data.datasets import (
    cub_display_name,
    decode_rle,
    open_dataset,
    rle_counts_from_string,
)
from clipviz.errors import ClipvizError

# --- helpers --------------------------------------------------------------------------


def write_image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (120, 60, 30)).save(path)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_palette_png(path: Path, labels: np.ndarray) -> None:
    height, width = labels.shape
    image = Image.frombytes("P", (width, height), labels.astype(np.uint8).tobytes())
    image.putpalette([(i * 37) % 256 for i in range(768)])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def column_major_runs(mask: np.ndarray) -> list[int]:
    """COCO run lengths of a mask: down the columns, starting with a run of 0s."""
    runs, current, length = [], False, 0
    for value in mask.T.reshape(-1):
        if bool(value) != current:
            runs.append(length)
            current, length = bool(value), 0
        length += 1
    return [*runs, length]


def encode_rle_string(counts: list[int]) -> str:
    """pycocotools' rleToString, written out independently of the reader."""
    chars = []
    for i, count in enumerate(counts):
        value = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            group = value & 0x1F
            value >>= 5
            more = value != -1 if group & 0x10 else value != 0
            chars.append(chr((group | 0x20 if more else group) + 48))
    return "".join(chars)


# --- VOC ------------------------------------------------------------------------------

BORDER = 255
VOC_LABELS = np.array(
    [
        [BORDER] * 6,
        [BORDER, 0, 15, 15, 0, BORDER],  # 15 = person
        [BORDER, 0, 15, 15, 12, BORDER],  # 12 = dog
        [BORDER, 0, 0, 12, 12, BORDER],
        [BORDER] * 6,
    ],
    dtype=np.uint8,
)


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "VOC2012"
    write_palette_png(root / "SegmentationClass" / "2007_000001.png", VOC_LABELS)
    write_palette_png(root / "SegmentationClass" / "2007_000002.png", np.full((5, 6), 3))
    write_image(root / "JPEGImages" / "2007_000001.jpg", 6, 5)
    write_image(root / "JPEGImages" / "2007_000002.png", 6, 5)
    write_text(root / "ImageSets" / "Segmentation" / "val.txt", "2007_000001\n2007_000002\n")
    write_text(root / "ImageSets" / "Segmentation" / "train.txt", "2007_000002\n")
    return root


def test_voc_masks_follow_label_values_and_border_is_invalid(voc_root: Path) -> None:
    dataset = open_dataset(voc_root, "voc")
    sample = dataset[0]

    assert len(dataset) == 2 and dataset.classes[14] == "person" and len(dataset.classes) == 20
    assert sample.image_path == voc_root / "JPEGImages" / "2007_000001.jpg"
    assert sample.size == (6, 5)
    assert sample.classes == ["dog", "person"]
    np.testing.assert_array_equal(sample.masks["person"], VOC_LABELS == 15)
    np.testing.assert_array_equal(sample.masks["dog"], VOC_LABELS == 12)
    assert sample.valid is not None
    np.testing.assert_array_equal(~sample.valid, VOC_LABELS == BORDER)
    assert sample.boxes == {"person": [(2.0, 1.0, 4.0, 3.0)], "dog": [(3.0, 2.0, 5.0, 4.0)]}


def test_voc_image_falls_back_to_png(voc_root: Path) -> None:
    sample = open_dataset(voc_root, "voc")[1]

    assert sample.image_path.name == "2007_000002.png"
    assert sample.classes == ["bird"]
    assert sample.masks["bird"].all() and sample.boxes["bird"] == [(0.0, 0.0, 6.0, 5.0)]


def test_voc_split_selects_listed_ids(voc_root: Path) -> None:
    dataset = open_dataset(voc_root, "voc", split="train")

    assert [s.image_path.stem for s in dataset] == ["2007_000002"]
    assert dataset.name == "VOC2012:train"


def test_voc_missing_split_lists_available_ones(voc_root: Path) -> None:
    with pytest.raises(ClipvizError, match="available splits: train, val") as err:
        open_dataset(voc_root, "voc", split="trainval")
    assert str(voc_root / "ImageSets" / "Segmentation" / "trainval.txt") in str(err.value)


def test_voc_without_image_sets_lists_every_label_png(voc_root: Path) -> None:
    for split_file in (voc_root / "ImageSets" / "Segmentation").iterdir():
        split_file.unlink()
    (voc_root / "ImageSets" / "Segmentation").rmdir()

    dataset = open_dataset(voc_root, "voc", limit=1)

    assert len(dataset) == 1 and dataset[0].image_path.stem == "2007_000001"


def test_voc_classes_txt_renames_labels(voc_root: Path) -> None:
    names = ["background"] + [f"shape{i}" for i in range(1, 16)]
    write_text(voc_root / "classes.txt", "\n".join(names) + "\n")

    dataset = open_dataset(voc_root, "voc")

    assert dataset.classes == names[1:]
    assert dataset[0].classes == ["shape12", "shape15"]


def test_voc_label_beyond_classes_txt_names_the_png(voc_root: Path) -> None:
    write_text(voc_root / "classes.txt", "background\nsquare\n")

    with pytest.raises(ClipvizError, match="has label 12") as err:
        open_dataset(voc_root, "voc")[0]
    assert "2007_000001.png" in str(err.value)


def test_voc_missing_image_fails_at_getitem_not_at_open(voc_root: Path) -> None:
    (voc_root / "JPEGImages" / "2007_000001.jpg").unlink()
    dataset = open_dataset(voc_root, "voc")

    with pytest.raises(ClipvizError) as err:
        dataset[0]
    assert err.value.exit_code == 1
    assert str(voc_root / "JPEGImages" / "2007_000001.jpg") in str(err.value)
    assert dataset[1].classes == ["bird"]


def test_voc_root_without_jpeg_images_says_what_is_expected(tmp_path: Path) -> None:
    (tmp_path / "SegmentationClass").mkdir()

    with pytest.raises(ClipvizError, match=r"has no JPEGImages/ folder; expected JPEGImages/") as e:
        open_dataset(tmp_path, "voc")
    assert str(tmp_path) in str(e.value) and e.value.exit_code == 2


# --- COCO -----------------------------------------------------------------------------

HEIGHT, WIDTH = 5, 10


def hand_mask(pixels: list[tuple[int, int]]) -> np.ndarray:
    """Bool [HEIGHT, WIDTH] with the given (x, y) pixels set."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    for x, y in pixels:
        mask[y, x] = True
    return mask


# "35S1OPO" holds runs [3, 5, 35, 4, 3]; worked out by hand from pycocotools' format,
# it has a two-group count (35), and negative differences in one (-1) and two (-32) groups.
COMPRESSED = "35S1OPO"
COMPRESSED_MASK = hand_mask(
    [(0, 3), (0, 4), (1, 0), (1, 1), (1, 2)] + [(8, 3), (8, 4), (9, 0), (9, 1)]
)
PLAIN_MASK = hand_mask([(0, y) for y in range(5)] + [(1, 0), (1, 1)])
SQUARE_MASK = hand_mask([(x, y) for x in range(1, 5) for y in range(1, 4)])


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    write_image(root / "val2017" / "a.jpg", WIDTH, HEIGHT)
    write_image(root / "val2017" / "b.jpg", WIDTH, HEIGHT)
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [1, 1, 3, 2],
         "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]]},
        {"id": 11, "image_id": 1, "category_id": 3, "iscrowd": 1, "bbox": [0, 0, 2, 5],
         "segmentation": {"size": [HEIGHT, WIDTH], "counts": [0, 7, 43]}},
        {"id": 12, "image_id": 2, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 10, 5],
         "segmentation": {"size": [HEIGHT, WIDTH], "counts": COMPRESSED}},
    ]  # fmt: skip
    data = {
        "images": [
            {"id": 2, "file_name": "b.jpg", "width": WIDTH, "height": HEIGHT},
            {"id": 1, "file_name": "a.jpg", "width": WIDTH, "height": HEIGHT},
        ],
        "annotations": annotations,
        "categories": [{"id": 3, "name": "dog"}, {"id": 1, "name": "cat"}],
    }
    write_text(root / "annotations" / "instances_val2017.json", json.dumps(data))
    return root


def test_compressed_rle_string_decodes_to_hand_computed_runs() -> None:
    assert rle_counts_from_string(COMPRESSED) == [3, 5, 35, 4, 3]
    assert encode_rle_string([3, 5, 35, 4, 3]) == COMPRESSED


def test_rle_round_trips_a_random_mask_column_major() -> None:
    mask = np.random.default_rng(0).random((7, 13)) > 0.6
    runs = column_major_runs(mask)

    np.testing.assert_array_equal(
        decode_rle(rle_counts_from_string(encode_rle_string(runs)), 7, 13), mask
    )


def test_rle_whose_runs_do_not_cover_the_image_is_rejected() -> None:
    with pytest.raises(ValueError, match="sum to 4"):
        decode_rle([1, 3], 2, 3)


def test_coco_polygon_plain_and_compressed_rle_decode_exactly(coco_root: Path) -> None:
    dataset = open_dataset(coco_root, "coco")
    first, second = dataset[0], dataset[1]

    assert dataset.classes == ["cat", "dog"] and dataset.name == "coco:val2017"
    assert first.image_path == coco_root / "val2017" / "a.jpg" and first.size == (WIDTH, HEIGHT)
    np.testing.assert_array_equal(first.masks["cat"], SQUARE_MASK)
    np.testing.assert_array_equal(first.masks["dog"], PLAIN_MASK)  # crowd is included
    assert first.boxes == {"cat": [(1.0, 1.0, 4.0, 3.0)], "dog": [(0.0, 0.0, 2.0, 5.0)]}
    assert second.classes == ["cat"] and second.valid is None
    np.testing.assert_array_equal(second.masks["cat"], COMPRESSED_MASK)


def test_coco_instances_of_a_class_are_unioned(coco_root: Path) -> None:
    json_path = coco_root / "annotations" / "instances_val2017.json"
    data = json.loads(json_path.read_text())
    data["annotations"][1]["category_id"] = 1
    json_path.write_text(json.dumps(data))

    sample = open_dataset(coco_root, "coco")[0]

    np.testing.assert_array_equal(sample.masks["cat"], SQUARE_MASK | PLAIN_MASK)
    assert sample.boxes["cat"] == [(1.0, 1.0, 4.0, 3.0), (0.0, 0.0, 2.0, 5.0)]


def test_coco_annotation_without_bbox_gets_box_of_its_mask(coco_root: Path) -> None:
    json_path = coco_root / "annotations" / "instances_val2017.json"
    data = json.loads(json_path.read_text())
    del data["annotations"][0]["bbox"]
    json_path.write_text(json.dumps(data))

    assert open_dataset(coco_root, "coco")[0].boxes["cat"] == [(1.0, 1.0, 5.0, 4.0)]


def test_coco_malformed_annotation_fails_that_image_naming_the_json(coco_root: Path) -> None:
    json_path = coco_root / "annotations" / "instances_val2017.json"
    data = json.loads(json_path.read_text())
    data["annotations"][2]["segmentation"]["counts"] = [1, 2]
    json_path.write_text(json.dumps(data))
    dataset = open_dataset(coco_root, "coco")

    with pytest.raises(ClipvizError, match="annotation 12 of b.jpg") as err:
        dataset[1]
    assert str(json_path) in str(err.value) and err.value.exit_code == 1
    assert dataset[0].classes == ["cat", "dog"]


def test_coco_json_file_as_root_finds_images_under_images_folder(coco_root: Path) -> None:
    (coco_root / "val2017").rename(coco_root / "images")
    json_path = coco_root / "annotations" / "instances_val2017.json"

    sample = open_dataset(json_path, "coco", limit=1)[0]

    assert sample.image_path == coco_root / "images" / "a.jpg"


def test_coco_missing_split_lists_available_ones(coco_root: Path) -> None:
    with pytest.raises(
        ClipvizError, match=r"instances_train2017\.json.*available splits: val2017"
    ) as e:
        open_dataset(coco_root, "coco", split="train2017")
    assert str(coco_root) in str(e.value)


def test_coco_unreadable_json_names_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "instances_val2017.json"
    broken.write_text("{not json")

    with pytest.raises(ClipvizError, match="cannot read .* as JSON") as err:
        open_dataset(broken, "coco")
    assert str(broken) in str(err.value)


# --- CUB ------------------------------------------------------------------------------


@pytest.fixture
def cub_root(tmp_path: Path) -> Path:
    root = tmp_path / "CUB_200_2011"
    paths = [
        "001.Black_footed_Albatross/a.jpg",
        "002.Laysan_Albatross/b.jpg",
        "001.Black_footed_Albatross/c.jpg",
    ]
    write_text(root / "images.txt", "".join(f"{i + 1} {p}\n" for i, p in enumerate(paths)))
    write_text(root / "bounding_boxes.txt", "1 1.0 2.0 3.0 4.0\n2 0.5 0.5 2.0 2.0\n3 0 0 8 6\n")
    write_text(root / "image_class_labels.txt", "1 1\n2 2\n3 1\n")
    write_text(root / "classes.txt", "1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    write_text(root / "train_test_split.txt", "1 1\n2 0\n3 0\n")
    for path in paths:
        write_image(root / "images" / path, 8, 6)
    return root


def test_cub_display_name_drops_number_and_underscores() -> None:
    assert cub_display_name("001.Black_footed_Albatross") == "Black footed Albatross"
    assert cub_display_name("plain_name") == "plain name"


def test_cub_boxes_are_x_y_w_h_converted_to_corners(cub_root: Path) -> None:
    dataset = open_dataset(cub_root, "cub")
    sample = dataset[0]

    assert dataset.classes == ["Black footed Albatross", "Laysan Albatross"] and len(dataset) == 3
    assert sample.image_path == cub_root / "images" / "001.Black_footed_Albatross" / "a.jpg"
    assert sample.size == (8, 6) and sample.masks == {} and sample.valid is None
    assert sample.boxes == {"Black footed Albatross": [(1.0, 2.0, 4.0, 6.0)]}
    assert dataset[1].boxes == {"Laysan Albatross": [(0.5, 0.5, 2.5, 2.5)]}


def test_cub_split_follows_is_training_flag(cub_root: Path) -> None:
    test = open_dataset(cub_root, "cub", split="test")
    train = open_dataset(cub_root, "cub", split="train")

    assert [s.image_path.name for s in test] == ["b.jpg", "c.jpg"]
    assert [s.image_path.name for s in train] == ["a.jpg"]
    assert len(open_dataset(cub_root, "cub", split="all", limit=2)) == 2


def test_cub_unknown_split_and_missing_file_are_reported(cub_root: Path) -> None:
    with pytest.raises(ClipvizError, match="use train, test or all"):
        open_dataset(cub_root, "cub", split="val")
    (cub_root / "bounding_boxes.txt").unlink()
    with pytest.raises(ClipvizError, match="has no bounding_boxes.txt") as err:
        open_dataset(cub_root, "cub")
    assert str(cub_root) in str(err.value)


# --- generic --------------------------------------------------------------------------


@pytest.fixture
def generic_root(tmp_path: Path) -> Path:
    root = tmp_path / "shapes"
    write_image(root / "images" / "a.png", 8, 6)
    write_image(root / "images" / "b.jpg", 8, 6)
    write_image(root / "images" / "c.png", 8, 6)
    write_text(root / "images" / "notes.txt", "not an image")
    circle = np.zeros((6, 8), dtype=np.uint8)
    circle[1:3, 2:5] = 200
    (root / "masks" / "a").mkdir(parents=True)
    Image.fromarray(circle).save(root / "masks" / "a" / "red_circle.png")
    square = np.zeros((6, 8, 4), dtype=np.uint8)
    square[4:6, 6:8] = (0, 0, 255, 255)
    square[0, 0] = (255, 255, 255, 0)  # coloured but transparent: background
    Image.fromarray(square).save(root / "masks" / "a" / "blue_square.png")
    boxes = {"a.png": {"red_circle": [[0, 0, 2, 2]]}, "c": {"tree": [[1, 1, 3, 3], [4, 4, 5, 5]]}}
    write_text(root / "boxes.json", json.dumps(boxes))
    return root


def test_generic_reads_masks_listed_boxes_and_derives_missing_boxes(generic_root: Path) -> None:
    dataset = open_dataset(generic_root, "generic")
    a, b, c = dataset

    assert dataset.classes == ["blue_square", "red_circle", "tree"]
    assert [s.image_path.name for s in dataset] == ["a.png", "b.jpg", "c.png"]
    assert a.classes == ["blue_square", "red_circle"] and a.size == (8, 6)
    assert np.argwhere(a.masks["red_circle"]).tolist() == [
        [1, 2],
        [1, 3],
        [1, 4],
        [2, 2],
        [2, 3],
        [2, 4],
    ]
    assert np.argwhere(a.masks["blue_square"]).tolist() == [[4, 6], [4, 7], [5, 6], [5, 7]]
    assert a.boxes == {"red_circle": [(0.0, 0.0, 2.0, 2.0)], "blue_square": [(6.0, 4.0, 8.0, 6.0)]}
    assert b.classes == [] and b.masks == {} and b.boxes == {}
    assert c.classes == ["tree"] and c.boxes["tree"] == [(1.0, 1.0, 3.0, 3.0), (4.0, 4.0, 5.0, 5.0)]


def test_limit_keeps_first_samples_in_sorted_order(generic_root: Path) -> None:
    dataset = open_dataset(generic_root, "generic", limit=2)

    assert [s.image_path.name for s in dataset] == ["a.png", "b.jpg"]
    assert len(open_dataset(generic_root, "generic", limit=0)) == 0


def test_generic_mask_of_wrong_size_names_both_files(generic_root: Path) -> None:
    Image.new("L", (3, 3), 255).save(generic_root / "masks" / "a" / "red_circle.png")

    with pytest.raises(ClipvizError, match="is 3x3 but image .* is 8x6") as err:
        open_dataset(generic_root, "generic")[0]
    assert str(generic_root / "masks" / "a" / "red_circle.png") in str(err.value)


def test_generic_malformed_boxes_json_is_reported(generic_root: Path) -> None:
    write_text(generic_root / "boxes.json", json.dumps({"a.png": {"red_circle": [[0, 0, 2]]}}))

    with pytest.raises(ClipvizError, match="boxes.json is malformed"):
        open_dataset(generic_root, "generic")


# --- open_dataset ---------------------------------------------------------------------


def test_missing_root_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ClipvizError, match="does not exist") as err:
        open_dataset(tmp_path / "nowhere", "voc")
    assert str(tmp_path / "nowhere") in str(err.value) and err.value.exit_code == 2


def test_root_that_is_a_file_is_rejected_for_folder_layouts(tmp_path: Path) -> None:
    file = tmp_path / "file.txt"
    file.write_text("x")

    with pytest.raises(ClipvizError, match="is not a folder"):
        open_dataset(file, "cub")


def test_unknown_format_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ClipvizError, match="use one of voc, coco, cub, generic"):
        open_dataset(tmp_path, "imagenet")  # type: ignore[arg-type]
