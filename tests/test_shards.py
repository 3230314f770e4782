"""WebDataset shards: brace patterns, streamed samples that survive damage, atomic writes."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, features

from clipviz.data.images import ImageError, load_image, load_image_bytes
from clipviz.data.shards import (
    ShardSample,
    ShardWriter,
    expand_braces,
    is_shard_spec,
    read_parquet_metadata,
    read_shard,
    shard_paths,
    write_parquet_atomic,
)
from clipviz.errors import ClipvizError


def _image(fmt="PNG", color=(200, 30, 10), size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def _noise(seed: int) -> bytes:
    """A PNG of a few kilobytes, so that a cut can fall inside its data."""
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _tar(path, members):
    """Write `members` ((name, bytes) pairs) as a plain tar at `path`."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _offsets(path):
    """(header offset, data offset, size) of each member of a tar."""
    with tarfile.open(path) as tar:
        return [(m.offset, m.offset_data, m.size) for m in tar.getmembers()]


# -- brace patterns ----------------------------------------------------------------------------


def test_brace_range_keeps_the_zero_padding_of_its_first_bound():
    assert expand_braces("d/{00008..00011}.tar") == [
        "d/00008.tar",
        "d/00009.tar",
        "d/00010.tar",
        "d/00011.tar",
    ]
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"]
    assert expand_braces("{08..10}") == ["08", "09", "10"]
    assert expand_braces("{10..12}") == ["10", "11", "12"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]


def test_brace_lists_and_several_groups_expand_to_their_product_in_order():
    assert expand_braces("s{a,b}-{0..1}.tar") == ["sa-0.tar", "sa-1.tar", "sb-0.tar", "sb-1.tar"]
    assert expand_braces("{x,,y}") == ["x", "", "y"]
    assert expand_braces("plain/000.tar") == ["plain/000.tar"]
    assert expand_braces("odd{name}.tar") == ["odd{name}.tar"]


@pytest.mark.parametrize(
    "pattern", ["{5..}.tar", "{a..3}.tar", "{1..2..3}", "{..}", "{0..9999999}"]
)
def test_malformed_or_huge_brace_ranges_are_refused(pattern):
    with pytest.raises(ClipvizError, match="brace range"):
        expand_braces(pattern)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("data/{00000..00002}.tar", True),
        ("data/*.tar", True),
        ("SHARD.TAR", True),
        ("shard.tar.gz", True),
        ("data/{5..}.tar", True),  # meant as shards: shard_paths explains the mistake
        ("photos/*.jpg", False),
        ("a{.tar,.jpg}", False),
        ("photos", False),
        ("", False),
    ],
)
def test_shard_specs_are_names_that_end_in_tar(text, expected):
    assert is_shard_spec(text) is expected


# -- shard paths -------------------------------------------------------------------------------


def _touch_shards(folder, names):
    for name in names:
        (folder / name).write_bytes(b"")


def test_shard_paths_follow_the_expansion_order_once_each(tmp_path):
    _touch_shards(tmp_path, ["00000.tar", "00001.tar", "00002.tar"])
    got = shard_paths(f"{tmp_path}/{{00002,00000,00002,00001}}.tar")
    assert got == [tmp_path / "00002.tar", tmp_path / "00000.tar", tmp_path / "00001.tar"]


def test_shard_paths_match_globs_sorted_and_drop_repeats(tmp_path):
    _touch_shards(tmp_path, ["b.tar", "a.tar", "c.tar"])
    (tmp_path / "d.tar").mkdir()  # a folder is not a shard
    got = shard_paths(f"{tmp_path}/{{c.tar,*.tar}}")
    assert got == [tmp_path / "c.tar", tmp_path / "a.tar", tmp_path / "b.tar"]


def test_missing_shards_are_counted_and_the_first_named(tmp_path):
    _touch_shards(tmp_path, ["00000.tar", "00001.tar", "00002.tar"])
    with pytest.raises(ClipvizError) as caught:
        shard_paths(f"{tmp_path}/{{00000..00009}}.tar")
    assert str(caught.value) == (
        f"7 of 10 shards do not exist, first: {tmp_path}/00003.tar; check the pattern"
    )


def test_a_glob_that_matches_nothing_is_refused(tmp_path):
    with pytest.raises(ClipvizError, match="no shard files match"):
        shard_paths(f"{tmp_path}/*.tar")


# -- reading samples ---------------------------------------------------------------------------


def test_members_sharing_a_key_form_one_sample_in_tar_order(tmp_path):
    jpg, png = _image("JPEG"), _image("PNG", (0, 0, 255))
    meta = {"url": "http://example.com/0.jpg", "width": 6}
    members = [
        ("00000000.jpg", jpg),
        ("00000000.txt", b"  a red box \n"),
        ("00000000.json", json.dumps(meta).encode()),
        ("00000001.png", png),
        ("00000001.txt", b"caf\xc3\xa9 \xff"),
    ]
    if features.check("webp"):
        members.append(("00000002.webp", _image("WEBP")))
    samples = list(read_shard(_tar(tmp_path / "s.tar", members)))
    assert [s.key for s in samples] == ["00000000", "00000001", "00000002"][: len(samples)]
    first, second = samples[0], samples[1]
    assert first == ShardSample("00000000", jpg, "jpg", "a red box", meta, None)
    assert (second.ext, second.image, second.caption, second.meta) == ("png", png, "café �", None)
    assert second.error is None
    np.testing.assert_array_equal(np.asarray(load_image_bytes(second.image))[0, 0], [0, 0, 255])
    if features.check("webp"):
        assert (samples[2].ext, samples[2].caption, samples[2].error) == ("webp", None, None)


def test_keys_keep_their_folders_and_extensions_are_lower_case(tmp_path):
    jpg = _image("JPEG")
    members = [
        ("a/b/00000042.jpg", jpg),
        ("a/b/00000042.txt", b"in b"),
        ("a/c/00000042.JPG", jpg),
        ("./x/7.jpeg", jpg),
        ("x/8.seg.png", _image()),  # the extension is all after the first dot
    ]
    samples = list(read_shard(_tar(tmp_path / "s.tar", members)))
    assert [(s.key, s.ext, s.caption) for s in samples] == [
        ("a/b/00000042", "jpg", "in b"),
        ("a/c/00000042", "jpg", None),
        ("x/7", "jpeg", None),
        ("x/8", None, None),
    ]
    assert samples[3].error == "no image in this sample (members: seg.png)"


def test_folders_and_hidden_members_are_ignored_and_links_or_devices_fail_their_sample(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        folder = tarfile.TarInfo("d")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        link = tarfile.TarInfo("1.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        for name, data in [("1.txt", b"one"), ("__key__", b"1"), ("d/.1.png", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        fifo = tarfile.TarInfo("2.png")
        fifo.type = tarfile.FIFOTYPE
        tar.addfile(fifo)
        for i in range(12):  # a sample of many links names the first few
            many = tarfile.TarInfo(f"3.{i}.png")
            many.type, many.linkname = tarfile.LNKTYPE, "1.txt"
            tar.addfile(many)
    samples = list(read_shard(path))
    assert samples[:2] == [
        ShardSample("1", caption="one", error="member 1.png is a link; not read"),
        ShardSample("2", error="member 2.png is not a regular file; not read"),
    ]
    assert samples[2].error == "; ".join(
        [f"member 3.{i}.png is a link; not read" for i in range(8)] + ["and 4 more"]
    )


def test_a_sample_without_an_image_says_what_it_has(tmp_path):
    members = [("5.txt", b"words"), ("5.json", b'{"k": 1}')]
    (sample,) = read_shard(_tar(tmp_path / "s.tar", members))
    assert sample.error == "no image in this sample (members: txt, json)"
    assert (sample.image, sample.caption, sample.meta) == (None, "words", {"k": 1})


def test_two_images_in_one_sample_are_an_error_not_a_choice(tmp_path):
    members = [("6.jpg", _image("JPEG")), ("6.png", _image()), ("6.txt", b"t")]
    (sample,) = read_shard(_tar(tmp_path / "s.tar", members))
    assert sample.error == "two images in one sample: jpg, png"
    assert (sample.image, sample.ext, sample.caption) == (None, None, "t")


def test_invalid_json_only_loses_the_metadata_when_an_image_exists(tmp_path):
    png = _image()
    members = [("7.png", png), ("7.json", b"{oops"), ("8.json", b"{oops"), ("9.json", b"[1]")]
    with_image, without, not_object = read_shard(_tar(tmp_path / "s.tar", members))
    assert (with_image.image, with_image.meta, with_image.error) == (png, None, None)
    assert without.meta is None and without.error is not None
    assert without.error.startswith("no image in this sample (members: json); its json is not")
    assert "not valid JSON" in without.error
    assert not_object.error == (
        "no image in this sample (members: json); its json is not a JSON object"
    )


def test_a_cut_inside_the_third_member_keeps_the_first_two_samples(tmp_path):
    path = _tar(tmp_path / "cut.tar", [(f"{i}.png", _noise(i)) for i in range(4)])
    _, data_at, size = _offsets(path)[2]
    path.write_bytes(path.read_bytes()[: data_at + size // 2])
    samples = list(read_shard(path))
    assert [s.key for s in samples] == ["0", "1", "cut.tar#damaged"]
    assert samples[0].image == _noise(0) and samples[1].image == _noise(1)
    assert samples[2].error is not None
    assert samples[2].error.startswith("shard is truncated or corrupt after 2 samples: ")
    assert samples[2].image is None


def test_the_sample_being_read_when_damage_shows_is_dropped(tmp_path):
    members = [("0.png", _noise(0)), ("0.txt", b"zero"), ("1.png", _noise(1)), ("1.txt", b"one")]
    path = _tar(tmp_path / "cut.tar", members)
    _, data_at, size = _offsets(path)[3]
    path.write_bytes(path.read_bytes()[: data_at + size // 2])  # inside sample 1's caption
    samples = list(read_shard(path))
    assert [(s.key, s.caption) for s in samples] == [("0", "zero"), ("cut.tar#damaged", None)]


def test_a_shard_without_its_end_marker_or_with_a_garbled_header_is_damaged(tmp_path):
    members = [(f"{i}.png", _noise(i)) for i in range(3)]
    path = _tar(tmp_path / "short.tar", members)
    header_at = _offsets(path)[2][0]
    whole = path.read_bytes()
    path.write_bytes(whole[:header_at])  # ends right after member 1, with no zero blocks
    samples = list(read_shard(path))
    assert [s.key for s in samples] == ["0", "short.tar#damaged"]
    assert samples[1].error == (
        "shard is truncated or corrupt after 1 samples: "
        "the file ends without the tar end-of-archive marker"
    )
    garbled = whole[:header_at] + b"\x7f" * 512 + whole[header_at + 512 :]
    path.write_bytes(garbled)
    samples = list(read_shard(path))
    assert [s.key for s in samples] == ["0", "short.tar#damaged"]
    assert samples[1].error is not None and "bad member header" in samples[1].error


def test_gzipped_shards_stream_and_their_damage_is_reported(tmp_path):
    plain = _tar(tmp_path / "s.tar", [(f"{i}.png", _noise(i)) for i in range(3)])
    packed = gzip.compress(plain.read_bytes(), mtime=0)
    (tmp_path / "s.tar.gz").write_bytes(packed)
    assert [s.key for s in read_shard(tmp_path / "s.tar.gz")] == ["0", "1", "2"]
    (tmp_path / "cut.tar.gz").write_bytes(packed[: len(packed) // 2])
    samples = list(read_shard(tmp_path / "cut.tar.gz"))
    assert samples[-1].key == "cut.tar.gz#damaged"
    assert all(s.error is None for s in samples[:-1]) and len(samples) < 4


def test_a_shard_that_cannot_be_opened_becomes_one_error_sample(tmp_path):
    (tmp_path / "notes.tar").write_text("not a tar at all, just a few words of text\n" * 20)
    (tmp_path / "folder.tar").mkdir()
    (missing,) = read_shard(tmp_path / "nope.tar")
    (text,) = read_shard(tmp_path / "notes.tar")
    (folder,) = read_shard(tmp_path / "folder.tar")
    assert missing == ShardSample(
        "nope.tar#unreadable", error="shard cannot be read: No such file or directory"
    )
    assert text.key == "notes.tar#unreadable" and text.error is not None
    assert folder.key == "folder.tar#unreadable" and folder.error is not None


# -- images from bytes -------------------------------------------------------------------------


def test_image_bytes_decode_exactly_like_the_file(tmp_path):
    img = Image.new("RGBA", (10, 6), (0, 0, 255, 255))
    img.paste((255, 0, 0, 0), (0, 0, 5, 6))  # transparent left half
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "a.png", exif=exif)
    from_file = np.asarray(load_image(tmp_path / "a.png"))
    from_bytes = np.asarray(load_image_bytes((tmp_path / "a.png").read_bytes()))
    assert from_bytes.shape == (10, 6, 3)
    np.testing.assert_array_equal(from_bytes, from_file)


def test_image_bytes_obey_the_pixel_limit_and_report_bad_data():
    big = _image(size=(300, 200))
    with pytest.raises(ImageError, match=r"300x200.*`max_pixels`"):
        load_image_bytes(big, max_pixels=50_000)
    assert load_image_bytes(big, max_pixels=60_000).size == (300, 200)
    with pytest.raises(ImageError, match="truncated"):
        load_image_bytes(_noise(3)[:300])
    with pytest.raises(ImageError, match="not an image"):
        load_image_bytes(b"hello")


# -- writing shards ----------------------------------------------------------------------------


def _write(path, members):
    with ShardWriter(path) as writer:
        for name, data in members:
            writer.add(name, data)


def test_written_shards_hold_the_members_in_order_and_read_back_as_samples(tmp_path):
    png = _image()
    members = [("00000000.png", png), ("00000000.txt", b"red"), ("sub/00000001.json", b"{}")]
    _write(tmp_path / "out.tar", members)
    with tarfile.open(tmp_path / "out.tar") as tar:
        infos = tar.getmembers()
        got = [(m.name, tar.extractfile(m).read()) for m in infos]  # type: ignore[union-attr]
    assert got == members
    assert {(m.mode, m.mtime, m.uid, m.gid, m.uname, m.gname) for m in infos} == {
        (0o644, 0, 0, 0, "", "")
    }
    samples = list(read_shard(tmp_path / "out.tar"))
    assert [(s.key, s.ext, s.caption) for s in samples] == [
        ("00000000", "png", "red"),
        ("sub/00000001", None, None),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tar"]


def test_equal_adds_give_byte_identical_shards(tmp_path):
    members = [("0.png", _noise(0)), ("0.txt", "ünïcode".encode()), ("dir/1.png", _noise(1))]
    _write(tmp_path / "a.tar", members)
    _write(tmp_path / "b.tar", members)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_a_failing_block_leaves_no_shard_and_no_temporary(tmp_path):
    with pytest.raises(RuntimeError, match="stop"), ShardWriter(tmp_path / "out.tar") as w:
        w.add("0.png", _image())
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old.tar").write_bytes(b"previous")
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "old.tar") as w:
        raise RuntimeError("stop")
    assert (tmp_path / "old.tar").read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["old.tar"]


@pytest.mark.parametrize("name", ["", "/etc/passwd", "../up.png", "a/../../b.png", "a\x00.png"])
def test_member_names_that_could_escape_are_refused(tmp_path, name):
    with ShardWriter(tmp_path / "out.tar") as writer, pytest.raises(ClipvizError):
        writer.add(name, b"x")


def test_adding_outside_the_with_block_is_refused(tmp_path):
    with pytest.raises(ClipvizError, match="with ShardWriter"):
        ShardWriter(tmp_path / "out.tar").add("0.png", b"x")


# -- parquet -----------------------------------------------------------------------------------


def test_parquet_round_trip_keeps_columns_and_metadata(tmp_path):
    columns = {"key": ["a", "b", "c"], "score": [0.5, 1.5, -2.0], "n": [1, 2, 3]}
    metadata = {"clipviz": json.dumps({"schema_version": 1}), "ünïcode": "välue"}
    path = tmp_path / "scores.parquet"
    write_parquet_atomic(path, columns, metadata)
    assert pq.read_table(path).to_pydict() == columns
    assert read_parquet_metadata(path) == metadata
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.parquet"]
    write_parquet_atomic(tmp_path / "bare.parquet", {"x": [1]})
    assert read_parquet_metadata(tmp_path / "bare.parquet") == {}


def test_parquet_metadata_of_missing_or_broken_files_is_none(tmp_path):
    assert read_parquet_metadata(tmp_path / "missing.parquet") is None
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet at all")
    assert read_parquet_metadata(tmp_path / "junk.parquet") is None
    write_parquet_atomic(tmp_path / "ok.parquet", {"x": list(range(100))}, {"k": "v"})
    cut = (tmp_path / "ok.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(cut[: len(cut) // 2])
    assert read_parquet_metadata(tmp_path / "cut.parquet") is None
