"""Inputs and preprocessing of the tokenization job (no Ray): layouts, decoding, variants, rejects."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.producer.images import Rejected, decode_image, expand_variants, make_variants
from pipelines.producer.planning import plan
from pipelines.producer.sources import detect_format, read_item
from tests.pipeline_data import (
    Exploit, bomb_bytes, jpeg_bytes, lmdb_record, png_bytes, write_folder, write_lmdb, write_tar,
)
from vfmtok_core.preprocess import center_crop


def _samples(url, fmt, rows_per_shard=100):
    return [s for item in plan(url, fmt, rows_per_shard) for s in read_item(item)]


def test_folder_labels_from_class_dirs(tmp_path):
    keys = write_folder(tmp_path, classes=2, per_class=3)
    assert detect_format(str(tmp_path)) == "folder"
    items = plan(str(tmp_path), "folder", rows_per_shard=4)
    assert [i.shard for i in items] == ["shard-000000", "shard-000001"]
    samples = _samples(str(tmp_path), "folder")
    # Plan order interleaves the classes; each class keeps its own order.
    assert [s.key for s in samples] == [keys[i] for i in (0, 3, 1, 4, 2, 5)]
    assert [s.label for s in samples] == [0, 1, 0, 1, 0, 1]


def test_flat_folder_has_no_labels(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(1))
    (tmp_path / "b.jpg").write_bytes(jpeg_bytes(2))
    assert [(s.key, s.label) for s in _samples(str(tmp_path), "folder")] == [("a", None), ("b", None)]


def test_webdataset_grouping_labels_and_rejects(tmp_path):
    write_tar(tmp_path / "part" / "s0.tar", [
        ("x/0001", {"jpg": jpeg_bytes(1), "cls": b"7"}),
        ("x/0002", {"png": png_bytes(2)}),
        ("x/0003", {"txt": b"caption only"}),
        ("x/0001", {"jpg": jpeg_bytes(3), "cls": b"8"}),  # duplicate key
        ("x/0004", {"jpg": jpeg_bytes(4), "cls": b"seven"}),
    ])
    assert detect_format(str(tmp_path)) == "webdataset"
    got = [(s.key, s.label, s.error[0] if s.error else None) for s in _samples(str(tmp_path), "webdataset")]
    assert got == [
        ("part/s0/x/0001", 7, None),
        ("part/s0/x/0002", None, None),
        ("part/s0/x/0003", None, "no_image"),
        ("part/s0/x/0001", None, "duplicate_key"),
        ("part/s0/x/0004", None, "bad_label"),
    ]


def test_truncated_tar_keeps_earlier_samples(tmp_path):
    write_tar(tmp_path / "t.tar", [(f"k{i}", {"jpg": jpeg_bytes(i)}) for i in range(4)])
    data = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(data[: len(data) // 2 + 100])
    samples = _samples(str(tmp_path), "webdataset")
    assert samples[-1].error[0] == "corrupt_tar"
    assert all(s.error is None for s in samples[:-1]) and len(samples) >= 2


def test_parquet_bytes_and_hf_struct_columns(tmp_path):
    imgs = [png_bytes(i) for i in range(5)]
    pq.write_table(pa.table({"image": imgs, "label": [1, 2, 3, 4, 5]}), tmp_path / "a.parquet", row_group_size=2)
    hf = pa.array([{"bytes": b, "path": f"p{i}.png"} for i, b in enumerate(imgs[:2])])
    pq.write_table(pa.table({"image": hf, "key": ["u", "v"]}), tmp_path / "b.parquet")
    assert detect_format(str(tmp_path)) == "parquet"
    items = plan(str(tmp_path), "parquet", rows_per_shard=100)
    assert len(items) == 4  # 3 row groups + 1
    got = [(s.key, s.label, s.data == (imgs + imgs[:2])[i]) for i, s in enumerate(_samples(str(tmp_path), "parquet"))]
    assert got == [("a/0", 1, True), ("a/1", 2, True), ("a/2", 3, True), ("a/3", 4, True), ("a/4", 5, True),
                   ("b/u", None, True), ("b/v", None, True)]


def test_lmdb_layout_and_restricted_unpickler(tmp_path):
    marker = tmp_path / "pwned"
    write_lmdb(tmp_path / "db", [
        lmdb_record(png_bytes(1), 3),
        pickle.dumps({"image": png_bytes(2), "label": Exploit(str(marker))}),
        b"not a pickle",
        lmdb_record(jpeg_bytes(3), 9),
    ])
    assert detect_format(str(tmp_path / "db")) == "lmdb"
    got = [(s.key, s.label, s.error[0] if s.error else None) for s in _samples(str(tmp_path / "db"), "lmdb")]
    assert got == [("0", 3, None), ("1", None, "bad_record"), ("2", None, "bad_record"), ("3", 9, None)]
    assert not marker.exists()


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "CMYK", "LA", "1", "I;16"])
def test_any_mode_decodes_to_rgb(mode):
    buf = io.BytesIO()
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    if mode == "I;16":
        arr = (np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
        base = Image.fromarray(arr).convert("I;16")
    else:
        base = base.convert(mode)
    base.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    img = decode_image(buf.getvalue())
    assert img.mode == "RGB" and img.size == (40, 30)
    if mode == "I;16":  # 16-bit greys are rescaled, not clipped to white
        assert 0 < np.asarray(img).mean() < 250


def test_transparent_pixels_become_white():
    buf = io.BytesIO()
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(buf, format="PNG")
    assert np.asarray(decode_image(buf.getvalue()))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (20, 40)


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"hello, not an image at all", "not_an_image"),
        (png_bytes(1)[:200], "corrupt"),
        (jpeg_bytes(1)[:300], "corrupt"),
        (bomb_bytes(), "too_large"),
        (png_bytes(1, size=(4, 4)), "too_small"),
    ],
)
def test_bad_inputs_are_rejected_with_reason(data, reason):
    with pytest.raises(Rejected) as e:
        decode_image(data)
    assert e.value.reason == reason


def test_variants():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    names = expand_variants(["center", "flip", "tencrop"])
    assert len(names) == 12 and names[2] == "tencrop0"
    crops = make_variants(img, 32, names)
    assert crops.shape == (12, 32, 32, 3) and crops.dtype == np.uint8
    np.testing.assert_array_equal(crops[0], np.asarray(center_crop(img, 32)))
    np.testing.assert_array_equal(crops[1], crops[0][:, ::-1])
    big = np.asarray(center_crop(img, 35))
    np.testing.assert_array_equal(crops[2], big[:32, :32])  # top-left
    np.testing.assert_array_equal(crops[7], big[:, ::-1][:32, :32])  # top-left of the mirrored image
    corners = [(0, 0), (0, 3), (3, 0), (3, 3), (2, 2)]  # torchvision's five_crop of 32 in 35 (centre rounds up)
    for i, (top, left) in enumerate(corners):
        np.testing.assert_array_equal(crops[2 + i], big[top : top + 32, left : left + 32])
        np.testing.assert_array_equal(crops[7 + i], big[:, ::-1][top : top + 32, left : left + 32])
    np.testing.assert_array_equal(make_variants(img, 32, ("flip", "center"))[1], crops[0])
    with pytest.raises(ValueError, match="unknown variant"):
        expand_variants(["sideways"])
