"""Preprocessing matches the official pipeline: ADM centre crop, kornia resize, uint8 conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.golden import load_npz
from vfmtok_core.preprocess import center_crop, resize_for_encoder, resize_output, to_tensor, to_uint8


def test_center_crop_reproduces_golden_inputs():
    from skimage import data

    expected = load_npz("inputs")["images_uint8"]
    for i, loader in enumerate([data.astronaut, data.coffee]):
        crop = center_crop(Image.fromarray(loader()).convert("RGB"), 336)
        assert crop.size == (336, 336)
        np.testing.assert_array_equal(np.asarray(crop), expected[i])


@pytest.mark.parametrize("size", [(700, 1400), (1500, 900), (336, 400), (100, 50)])
def test_center_crop_any_size(size):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    assert center_crop(img, 336).size == (336, 336)


def test_to_tensor_matches_torchvision_normalisation():
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    x = to_tensor(u8)
    ref = ((torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255) - 0.5) / 0.5
    assert torch.equal(x, ref)
    with pytest.raises(ValueError, match="uint8 RGB"):
        to_tensor(u8.astype(np.float32))


def test_to_uint8_truncates_like_upstream():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 255]


@pytest.mark.parametrize("shape", [(336, 336), (400, 512), (200, 300), (672, 672)])
def test_resize_matches_kornia(shape):
    kornia = pytest.importorskip("kornia")
    x = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = resize_for_encoder(x, 336)
    ref = kornia.geometry.transform.resize(x, (336, 336), interpolation="bicubic", align_corners=True, antialias=True)
    assert ours.shape == (2, 3, 336, 336)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_resize_is_identity_at_size():
    x = torch.rand(1, 3, 336, 336)
    assert resize_for_encoder(x, 336) is x
    assert resize_output(x, 336) is x
    assert resize_output(x, 256).shape == (1, 3, 256, 256)
