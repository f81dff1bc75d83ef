"""The tokenizer trainer's image stream: every input layout, an order fixed by (seed, epoch) whatever
the world size and workers, per-sample augmentation, and bad samples recorded and replaced."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.producer.training_images import ImageIndex, TrainingImages, build_index, image_loader
from tests.pipeline_data import lmdb_record, png_bytes, write_folder, write_lmdb, write_tar

SIZE = 32


def _epoch(index: ImageIndex, batch: int = 2, rank: int = 0, world: int = 1, workers: int = 0, epoch: int = 0,
           consumed: int = 0, seed: int = 0, order: str = "auto") -> list[dict]:
    ds = TrainingImages(index, SIZE, batch, seed=seed, rank=rank, world=world, order=order, window_items=2)
    ds.epoch, ds.consumed = epoch, consumed
    return list(image_loader(ds, workers))


def _keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    keys = write_folder(root, classes=3, per_class=4)
    return build_index(str(root)), keys


def test_an_epoch_is_a_permutation_fixed_by_seed_and_epoch(folder):
    index, keys = folder
    first = _epoch(index)
    assert sorted(_keys(first)) == sorted(keys)  # 12 samples, 6 batches of 2: each exactly once
    again = _epoch(index)
    assert _keys(again) == _keys(first)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert _keys(_epoch(index, epoch=1)) != _keys(first)
    assert _keys(_epoch(index, seed=1)) != _keys(first)
    # Class-sorted folders are mixed: the first batches do not all hold one class.
    assert len({k.split("/")[0] for k in _keys(first)[:4]}) > 1
    labels = [int(v) for b in first for v in b["label"]]
    assert [int(k[len("class")]) for k in _keys(first)] == labels


def test_world_size_and_workers_do_not_change_the_global_batches(folder):
    index, _ = folder
    single = _keys(_epoch(index, batch=4))
    ranks = [_keys(_epoch(index, batch=2, rank=r, world=2)) for r in range(2)]
    # Step s of the two ranks together covers the same positions as step s of one process.
    for step in range(3):
        assert sorted(ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2]) == sorted(single[4 * step : 4 * step + 4])
    assert _keys(_epoch(index, batch=2, rank=1, world=2, workers=2)) == ranks[1]


def test_resume_from_a_position_continues_the_same_sequence(folder):
    index, _ = folder
    whole = _epoch(index, batch=2)
    rest = _epoch(index, batch=2, consumed=6)
    assert _keys(rest) == _keys(whole)[6:]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, whole[3:]))


def test_augmentation_is_a_random_crop_and_flip_per_position(tmp_path):
    # One picture, many copies: the crops differ between positions and stay in range.
    for i in range(8):
        (tmp_path / f"p{i}.png").write_bytes(png_bytes(7, size=(80, 50)))
    batches = _epoch(build_index(str(tmp_path)), batch=8)
    imgs = batches[0]["image"]
    assert imgs.shape == (8, 3, SIZE, SIZE) and imgs.dtype == torch.float32
    assert imgs.min() >= -1 and imgs.max() <= 1
    assert len({tuple(np.round(im.numpy().ravel()[:50], 4)) for im in imgs}) > 4


def test_bad_samples_are_recorded_and_replaced(tmp_path):
    write_folder(tmp_path, classes=1, per_class=5)
    (tmp_path / "class0" / "broken.png").write_bytes(b"\x89PNG not really")
    batches = _epoch(build_index(str(tmp_path)), batch=3)
    assert [len(b["key"]) for b in batches] == [3, 3]  # the epoch keeps its size
    rejected = [r for b in batches for r in b["rejected"]]
    assert [(r[0], r[1]) for r in rejected] == [("class0/broken", "not_an_image")]
    assert "class0/broken" not in _keys(batches)


def _samples(n: int = 10) -> list[tuple[str, bytes, int]]:
    return [(f"s{i:02d}", png_bytes(i), i % 3) for i in range(n)]


def test_every_input_layout_gives_every_sample_once(tmp_path):
    samples = _samples()
    write_tar(tmp_path / "wds" / "a.tar", [(k, {"png": d, "cls": str(c).encode()}) for k, d, c in samples[:6]])
    write_tar(tmp_path / "wds" / "b.tar", [(k, {"png": d, "cls": str(c).encode()}) for k, d, c in samples[6:]])
    (tmp_path / "pq").mkdir()
    table = pa.table({"key": [k for k, _, _ in samples], "image": [d for _, d, _ in samples], "label": [c for _, _, c in samples]})
    pq.write_table(table, tmp_path / "pq" / "part.parquet", row_group_size=4)
    write_lmdb(tmp_path / "lmdb", [lmdb_record(d, c) for _, d, c in samples])
    expected_labels = {k: c for k, _, c in samples}
    for name, fmt, items in (("wds", "webdataset", [6, 4]), ("pq", "parquet", [4, 4, 2]), ("lmdb", "lmdb", [10])):
        index = build_index(str(tmp_path / name))
        assert index.fmt == fmt and index.counts.tolist() == items
        batches = _epoch(index)
        keys = _keys(batches)
        assert len(keys) == 10 and len(set(keys)) == 10, (fmt, keys)
        if fmt != "lmdb":  # LMDB keys are record numbers
            short = [k.rsplit("/", 1)[-1] for k in keys]
            assert sorted(short) == sorted(expected_labels)
            assert [int(v) for b in batches for v in b["label"]] == [expected_labels[k] for k in short]
        assert _keys(_epoch(index)) == keys
    # Tars and Parquet row groups are read whole, so they shuffle in windows of items.
    assert TrainingImages(build_index(str(tmp_path / "wds")), SIZE, 2).mode == "window"


def test_index_round_trips_through_bytes(folder):
    index, _ = folder
    back = ImageIndex.from_bytes(index.to_bytes())
    assert back.counts.tolist() == index.counts.tolist() and back.fmt == index.fmt and back.url == index.url
    assert _keys(_epoch(back)) == _keys(_epoch(index))


def test_s3_input_streams_the_same_samples(tmp_path, s3_bucket):
    import fsspec

    bucket, opts = s3_bucket
    write_folder(tmp_path, classes=2, per_class=3)
    fs = fsspec.filesystem("s3", **opts)
    fs.put(str(tmp_path) + "/", f"{bucket}/imgs/", recursive=True)
    local = build_index(str(tmp_path))
    remote = build_index(f"s3://{bucket}/imgs", opts)
    ds = TrainingImages(remote, SIZE, 2, storage_options=opts)
    batches = list(image_loader(ds))
    assert _keys(batches) == _keys(_epoch(local))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, _epoch(local)))
