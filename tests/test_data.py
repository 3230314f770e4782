"""Robust image input: every mode becomes upright 8-bit RGB, bad files become reasons."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clipviz.data.images import ImageError, load_image
from clipviz.data.inputs import collect_inputs


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (20, 40)
    arr = np.asarray(out)
    assert arr[2, 10, 0] > 200 and arr[-3, 10, 0] < 60  # the band is now on top


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    data = np.array([[0, 257 * 100], [65535, 257 * 200]], dtype=np.uint16)
    Image.fromarray(data).save(tmp_path / "deep.png")
    out = np.asarray(load_image(tmp_path / "deep.png"))
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[..., 0], [[0, 100], [255, 200]])


def test_transparency_is_composited_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2] = (0, 0, 255, 255)  # opaque blue top half, transparent bottom half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png"))
    np.testing.assert_array_equal(out[0, 0], [0, 0, 255])
    np.testing.assert_array_equal(out[3, 3], [255, 255, 255])


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "LA"])
def test_other_modes_become_rgb(tmp_path, mode):
    img = Image.new("RGB", (8, 6), (200, 10, 10)).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (8, 6)


def test_truncated_file_is_refused_with_a_reason(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, "JPEG"
    )
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(tmp_path / "cut.jpg")


def test_text_file_is_not_an_image(tmp_path):
    (tmp_path / "notes.jpg").write_text("hello")
    with pytest.raises(ImageError, match="not an image"):
        load_image(tmp_path / "notes.jpg")


def test_images_above_the_pixel_limit_are_refused_before_decoding(tmp_path):
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"300x200.*`max_pixels`"):
        load_image(tmp_path / "big.png", max_pixels=50_000)
    assert load_image(tmp_path / "big.png", max_pixels=60_000).size == (300, 200)


def test_folders_globs_and_lists_map_to_mirrored_output_folders(tmp_path, monkeypatch):
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    for name in ("a.jpg", "b.PNG", "sub/c.jpg", "sub/c.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / "photos" / name)
    (tmp_path / "photos" / "readme.txt").write_text("not an image")
    (tmp_path / "photos" / ".hidden.jpg").write_text("skip me")

    items, ignored = collect_inputs([str(tmp_path / "photos")])
    assert [str(i.rel) for i in items] == ["a.jpg", "b.PNG"] and ignored == 1

    items, _ = collect_inputs([str(tmp_path / "photos")], recursive=True)
    assert sorted(str(i.rel) for i in items) == ["a.jpg", "b.PNG", "sub/c.jpg", "sub/c.png"]

    items, _ = collect_inputs([str(tmp_path / "photos" / "**" / "*.jpg")])
    assert sorted(str(i.rel) for i in items) == ["a.jpg", "sub/c.jpg"]

    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path}/photos/a.jpg\n# a comment\n\n{tmp_path}/photos/sub/c.png\n")
    items, _ = collect_inputs([], inputs_file=str(listing))
    assert [str(i.rel) for i in items] == ["a.jpg", "sub/c.png"]


def test_missing_input_is_a_usage_error(tmp_path):
    from clipviz import ClipvizError

    with pytest.raises(ClipvizError, match="does not exist") as e:
        collect_inputs([str(tmp_path / "nope.jpg")])
    assert e.value.exit_code == 2
