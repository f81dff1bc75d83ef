"""jobs.inspect on a token dataset: per-class counts, code usage and entropy, rejects, the plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.inspect import main
from pipelines.contract.manifest import build_manifest, commit_shard, write_manifest
from pipelines.contract.shards import ShardRows
from pipelines.contract.storage import filesystem


def _dataset(root: Path, fmt: str) -> None:
    tokens = np.zeros((3, 1, 256), np.uint16)
    tokens[0, 0, :128] = 5
    tokens[1, 0, :] = 7
    tokens[2, 0, :] = np.arange(256)
    rows = ShardRows(["a", "b", "c"], [1, 1, None], ["src"] * 3, [bytes(32)] * 3, tokens)
    fs, path = filesystem(str(root))
    rejects = [{"key": "x", "source": "src", "reason": "corrupt", "error": "boom"}]
    commit = commit_shard(fs, path, "shard-000000", rows, fmt, ["center"], rejects)
    identity = {"fingerprint": "tiny-x", "variants": ["center"], "format": fmt, "tokens_per_image": 256}
    write_manifest(fs, path, build_manifest(identity, {}, 1024, {"shard-000000": commit}, 1))


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_summary(tmp_path, fmt, capsys):
    _dataset(tmp_path / "ds", fmt)
    summary = main([str(tmp_path / "ds"), "--plot", str(tmp_path / "usage.png")])
    assert summary["images"] == 3
    assert summary["classes"] == {1: 2, "none": 1}
    assert summary["codes_used"] == 256  # 0..255 from row c, 5 and 7 are among them
    assert summary["rejects_by_reason"] == {"corrupt": 1}
    assert 0 < summary["entropy_bits"] < 8 and summary["max_entropy_bits"] == 10
    assert Image.open(tmp_path / "usage.png").size == (1024, 320)
    printed = json.loads(capsys.readouterr().out)
    assert printed["images"] == 3


def test_not_a_dataset(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest.json" in err[0]
