"""The Quickstart's main job end to end on the tiny config and bundled photos."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.reconstruct import ReconstructConfig, run
from pipelines.producer.samples import bundled_photos
from vfmtok_core import VFMTokenizer
from vfmtok_core.preprocess import center_crop, to_tensor


def test_reconstruct_writes_grid_and_tokens(tmp_path):
    photo = tmp_path / "cat.png"
    bundled_photos(("chelsea",))[0][1].save(photo)
    cfg = ReconstructConfig(out=str(tmp_path / "out"), images=[str(photo), str(photo)], batch_size=1)
    summary = run(cfg)

    grid = Image.open(tmp_path / "out" / "reconstruction.png")
    assert grid.size == (2 * 112 + 12, 2 * 116 + 4)
    tokens = np.load(tmp_path / "out" / "tokens.npy")
    assert tokens.shape == (2, 256) and tokens.dtype == np.uint16
    on_disk = json.loads((tmp_path / "out" / "tokens.json").read_text())
    assert on_disk["tokenizer"] == summary["tokenizer"]

    tok = VFMTokenizer.from_config("tiny", seed=0)
    expected = tok.encode(to_tensor(center_crop(Image.open(photo).convert("RGB"), 112)))
    assert torch.equal(torch.from_numpy(tokens[:1].astype(np.int64)), expected)
    assert [e["name"] for e in on_disk["tokens"]] == ["cat", "cat"]
    assert on_disk["tokens"][1]["tokens"] == expected[0].tolist()


@pytest.mark.parametrize("name, content, message", [
    ("missing.png", None, "No such file or directory"),
    ("notes.png", b"not an image", "is not an image PIL can read"),
])
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys, name, content, message):
    from jobs.reconstruct import main

    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit) as stopped:
        main(["--images", str(tmp_path / name), "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(tmp_path / name) in err[0]
    assert not (tmp_path / "out").exists()
