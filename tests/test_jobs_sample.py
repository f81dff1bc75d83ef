"""jobs.sample end to end on tiny checkpoints: the labelled grid and the ADM .npz."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from jobs.sample import SampleConfig, run
from vfmtok_core import VFMTokenizer
from vfmtok_core.gpt import GPT


def _checkpoints(tmp_path):
    tok = VFMTokenizer.from_config("tiny", seed=1)
    torch.save({"ema": {k: v for k, v in tok.state_dict().items() if not k.startswith("dinov2.")}}, tmp_path / "tok.pt")
    gpt = GPT.from_config("GPT-tiny", seed=2, vocab_size=1024)
    with torch.no_grad():
        gpt.output.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    torch.save({"ema": gpt.state_dict()}, tmp_path / "gpt.pt")
    return dict(gpt=str(tmp_path / "gpt.pt"), tokenizer=str(tmp_path / "tok.pt"), size="GPT-tiny", config="tiny")


def test_grid(tmp_path):
    paths = _checkpoints(tmp_path)
    out = run(SampleConfig(out=str(tmp_path / "g.png"), classes="1,2", per_class=3, image_size=64, **paths))
    img = Image.open(out)
    assert img.size == (3 * 68 + 4, 2 * (68 + 14) + 4)


def test_npz_is_adm_format_and_seeded(tmp_path):
    paths = _checkpoints(tmp_path)
    cfg = dict(num=5, batch_size=2, cfg_scale=2.0, top_k=100, seed=7, **paths)
    a = np.load(run(SampleConfig(out=str(tmp_path / "a.npz"), **cfg)))
    b = np.load(run(SampleConfig(out=str(tmp_path / "b.npz"), **cfg)))
    assert a["arr_0"].shape == (5, 256, 256, 3) and a["arr_0"].dtype == np.uint8
    assert a["arr_1"].shape == (5,) and a["arr_1"].max() < 1000
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
