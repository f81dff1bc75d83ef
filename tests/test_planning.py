"""Planning without Ray: the fanned-out listing, the Parquet plan, growth (--extend) and the refusal
of inputs that changed after planning."""

from __future__ import annotations

import fsspec
import pytest

from pipelines.producer.planning import Plan, extend, list_files, plan
from pipelines.producer.sources import read_item
from tests.pipeline_data import png_bytes, write_folder, write_tar

# Names whose per-folder order differs from a naive sort of folder names: "a-b/" sorts before "a/",
# and "a.png" (a file) sorts between "a-b/" and "a/".
TRICKY = ["a/z.png", "a/b/c.png", "a-b/x.png", "a.png", "a0/y.png", "b.png", "Z/q.png", "a/b.png"]


def _write(root, names):
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(i, size=(10 + i, 10)))


def test_fanned_out_listing_is_the_sorted_recursive_listing(tmp_path):
    _write(tmp_path, TRICKY)
    fs = fsspec.filesystem("file")
    listed = list_files(fs, str(tmp_path), lambda p: True)
    expected = sorted(fs.find(str(tmp_path)))
    assert listed.column("path").to_pylist() == expected
    assert listed.column("size").to_pylist() == [fs.size(p) for p in expected]


def test_fanned_out_listing_on_s3(s3_bucket):
    bucket, so = s3_bucket
    fs = fsspec.filesystem("s3", **so)
    for i, name in enumerate(TRICKY):
        fs.pipe(f"{bucket}/in/{name}", png_bytes(i))
    listed = list_files(fsspec.filesystem("s3", use_listings_cache=False, **so), f"{bucket}/in", lambda p: p.endswith(".png"))
    assert listed.column("path").to_pylist() == sorted(f"{bucket}/in/{n}" for n in TRICKY)


def test_plan_round_trips_through_parquet_and_items_are_built_on_demand(tmp_path):
    write_folder(tmp_path, classes=3, per_class=3)
    p = plan(str(tmp_path), "folder", rows_per_shard=4)
    back, identity = Plan.from_parquet(p.to_parquet({"fingerprint": "x"}))
    assert identity == {"fingerprint": "x"} and back.classes == ["class0", "class1", "class2"]
    assert list(back) == list(p)
    assert [(i.shard, i.start, i.stop, i.unit, i.labels) for i in back] == [
        ("shard-000000", 0, 4, f"{tmp_path}#0", (0, 1, 2, 0)),  # classes interleaved
        ("shard-000001", 4, 8, f"{tmp_path}#4", (1, 2, 0, 1)),
        ("shard-000002", 8, 9, f"{tmp_path}#8", (2,)),
    ]
    assert back[1].files == ("class1/img1.png", "class2/img1.png", "class0/img2.png", "class1/img2.png")
    assert back[2].sizes == ((tmp_path / "class2" / "img2.png").stat().st_size,)
    assert back.select([2, 0]).shards == ["shard-000002", "shard-000000"]


def test_extend_appends_new_files_and_reports_vanished_and_changed(tmp_path):
    write_folder(tmp_path, classes=2, per_class=3)
    stored = plan(str(tmp_path), "folder", rows_per_shard=4)
    (tmp_path / "class0" / "img1.png").unlink()
    (tmp_path / "class1" / "img0.png").write_bytes(png_bytes(999, size=(80, 80)))  # a different size
    (tmp_path / "class0" / "img9.png").write_bytes(png_bytes(9))
    (tmp_path / "class9").mkdir()
    for i in range(4):
        (tmp_path / "class9" / f"n{i}.png").write_bytes(png_bytes(50 + i))
    growth = extend(stored, str(tmp_path), "folder", rows_per_shard=4)
    assert growth.vanished == ["class0/img1.png"] and growth.changed == ["class1/img0.png"]
    assert growth.new_inputs == 5 and growth.new_items == 2 and growth.new_classes == ["class9"]
    grown = growth.plan
    assert grown.classes == ["class0", "class1", "class9"]
    assert list(grown)[: len(stored)] == list(stored)  # planned items are untouched
    new = list(grown)[len(stored) :]
    assert [i.shard for i in new] == ["shard-000002", "shard-000003"]
    # The new files interleaved by class among themselves, as a new plan's are.
    assert [f for i in new for f in i.files] == ["class9/n0.png", "class9/n1.png", "class0/img9.png", "class9/n2.png",
                                                 "class9/n3.png"]
    assert [lab for i in new for lab in i.labels] == [2, 2, 0, 2, 2]
    assert [(i.start, i.stop, i.unit) for i in new] == [(6, 10, f"{tmp_path}#6"), (10, 11, f"{tmp_path}#10")]
    # Nothing new: the same plan, nothing to add.
    again = extend(grown, str(tmp_path), "folder", rows_per_shard=4)
    assert again.new_items == 0 and list(again.plan) == list(grown)


def test_extend_webdataset(tmp_path):
    write_tar(tmp_path / "in" / "a.tar", [("k0", {"png": png_bytes(0)})])
    stored = plan(str(tmp_path / "in"), "webdataset", 10)
    write_tar(tmp_path / "in" / "b.tar", [("k1", {"png": png_bytes(1)})])
    growth = extend(stored, str(tmp_path / "in"), "webdataset", 10)
    assert [(i.shard, i.unit) for i in growth.plan] == [("shard-000000", "a"), ("shard-000001", "b")]


def test_a_file_that_changed_after_planning_is_refused_not_mixed_in(tmp_path):
    write_folder(tmp_path / "f", classes=1, per_class=2)
    [item] = plan(str(tmp_path / "f"), "folder", 10)
    (tmp_path / "f" / "class0" / "img1.png").write_bytes(png_bytes(7, size=(90, 90)))
    got = [(s.key, s.error[0] if s.error else None) for s in read_item(item)]
    assert got == [("class0/img0", None), ("class0/img1", "changed")]

    write_tar(tmp_path / "t.tar", [("k0", {"png": png_bytes(0)})])
    [item] = plan(str(tmp_path / "t.tar"), "webdataset", 10)
    write_tar(tmp_path / "t.tar", [("k0", {"png": png_bytes(0)}), ("k1", {"png": png_bytes(1)})])
    assert [(s.key, s.error[0]) for s in read_item(item)] == [("t/<file>", "changed")]


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown input format"):
        plan(str(tmp_path), "zip", 10)


def test_class_folders_are_interleaved_so_every_shard_samples_all_classes(tmp_path):
    for c, n in enumerate((40, 10, 30)):  # unequal classes
        (tmp_path / f"c{c}").mkdir()
        for i in range(n):
            (tmp_path / f"c{c}" / f"{i:03d}.png").write_bytes(b"x")
    p = plan(str(tmp_path), "folder", rows_per_shard=20)
    items = list(p)
    for item in items:  # each class in proportion to its size: 10, 2.5 and 7.5 of every 20
        counts = [item.labels.count(c) for c in range(3)]
        assert all(abs(k - 20 * n / 80) <= 1 for k, n in zip(counts, (40, 10, 30))), counts
    files = [f for item in items for f in item.files]
    assert sorted(files) == sorted(str(q.relative_to(tmp_path)) for q in tmp_path.rglob("*.png"))
    for c in range(3):  # a class keeps its listing order
        mine = [f for f in files if f.startswith(f"c{c}/")]
        assert mine == sorted(mine)

