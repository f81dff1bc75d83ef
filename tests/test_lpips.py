"""LPIPS against the ``lpips`` package (v0.1, net='vgg') given the same random trunk and its real heads.

``lpips`` imports torchvision, which is not installable here (the index only has a CUDA build), and
only needs ``torchvision.models.vgg16(...).features``. The tests hand it a stand-in whose VGG16 is
built from the published layer configuration, independently of ``vfmtok_core.lpips``.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from vfmtok_core.checkpoint import CheckpointError
from vfmtok_core.lpips import LPIPS

# VGG16 ("configuration D") as published: conv widths, 'M' for a 2x2 max-pool.
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# Where lpips splits torchvision's ``features`` into its five slices.
LPIPS_SLICES = [range(0, 4), range(4, 9), range(9, 16), range(16, 23), range(23, 30)]
TINY_WIDTHS = (8, 16, 32, 64, 64)


def reference_vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = v
    return nn.Sequential(*layers)


def random_vgg16_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """He-initialised weights, so activations keep their scale through all 13 convolutions and
    the unit normalisation never meets near-zero features by accident."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, layer in enumerate(reference_vgg16_features()):
        if isinstance(layer, nn.Conv2d):
            fan_in = layer.in_channels * 9
            state[f"features.{i}.weight"] = torch.randn(layer.weight.shape, generator=g) * math.sqrt(2 / fan_in)
            state[f"features.{i}.bias"] = torch.randn(layer.bias.shape, generator=g) * 0.05
    return state


def load_into_reference(ref: nn.Module, state: dict[str, torch.Tensor]) -> None:
    renamed = {}
    for s, indices in enumerate(LPIPS_SLICES, start=1):
        for i in indices:
            for p in ("weight", "bias"):
                if f"features.{i}.{p}" in state:
                    renamed[f"net.slice{s}.{i}.{p}"] = state[f"features.{i}.{p}"]
    missing, unexpected = ref.load_state_dict(renamed, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("net.")]


@pytest.fixture(scope="module")
def heads_file() -> Path:
    spec = importlib.util.find_spec("lpips")
    assert spec is not None, "the lpips package (the reference) is missing: tools/bootstrap.sh installs it"
    return Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"


@pytest.fixture(scope="module")
def reference(heads_file) -> nn.Module:
    """``lpips.LPIPS(net='vgg')`` with its bundled heads, imported against the torchvision stand-in;
    ``sys.modules`` is as before once the model is built."""
    models = types.ModuleType("torchvision.models")
    models.vgg16 = lambda pretrained=False, **kw: types.SimpleNamespace(features=reference_vgg16_features())
    torchvision = types.ModuleType("torchvision")
    torchvision.models = models
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "torchvision", torchvision)
        mp.setitem(sys.modules, "torchvision.models", models)
        before = set(sys.modules)
        try:
            lpips = importlib.import_module("lpips")
            ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        finally:
            # Drop the lpips modules bound to the stand-in so no later import sees them.
            for name in set(sys.modules) - before:
                if name == "lpips" or name.startswith("lpips."):
                    del sys.modules[name]
    load_into_reference(ref, random_vgg16_state())
    return ref


@pytest.fixture(scope="module")
def ours(heads_file) -> LPIPS:
    model = LPIPS()
    model.net.load_state_dict(random_vgg16_state())
    model.load_heads(str(heads_file))
    return model


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    # Different noise levels, so the two distances differ clearly.
    noise = torch.tensor([0.1, 0.4]).view(2, 1, 1, 1)
    y = (x + noise * torch.randn(2, 3, 64, 64, generator=g)).clamp(-1, 1)
    return x, y


def test_matches_lpips_package(ours, reference, images):
    x, y = images
    with torch.no_grad():
        d = ours(x, y)
        expected = reference(x, y, normalize=False).flatten()
        self_dist = ours(x, x)
    assert d.shape == (2,) and d.dtype == torch.float32
    torch.testing.assert_close(d, expected, rtol=1e-5, atol=1e-6)
    assert (d > 0).all() and d[1] > 2 * d[0]
    torch.testing.assert_close(self_dist, torch.zeros(2), rtol=0, atol=1e-7)


def test_matches_lpips_package_with_a_dead_layer(ours, reference, images):
    """A layer whose ReLU outputs are all zero must add 0, not NaN (the normalisation's eps)."""
    state = random_vgg16_state()
    state["features.28.bias"] = torch.full_like(state["features.28.bias"], -1e4)
    ours, reference = copy.deepcopy(ours), copy.deepcopy(reference)
    ours.net.load_state_dict(state)
    load_into_reference(reference, state)
    x, y = images
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), reference(x, y).flatten(), rtol=1e-5, atol=1e-6)


def test_frozen_eval_and_differentiable(ours, images):
    x, y = images
    x = x.clone().requires_grad_(True)
    before = ours(x, y)
    before.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in ours.parameters())
    parent = nn.ModuleDict({"lpips": ours})
    parent.train()
    assert not any(m.training for m in ours.modules())
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), before.detach(), rtol=0, atol=0)


def test_float32_under_bf16_autocast(ours, images):
    x, y = images
    with torch.no_grad():
        expected = ours(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            d = ours(x.bfloat16(), y.bfloat16())
    assert d.dtype == torch.float32
    # Only the inputs' bf16 rounding differs.
    torch.testing.assert_close(d, expected, rtol=2e-2, atol=0)


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    vgg = {**random_vgg16_state(3), "classifier.0.weight": torch.randn(4, 8, generator=g)}
    widths = (64, 128, 256, 512, 512)
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(widths)}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(heads, tmp_path / "heads.pth")
    return tmp_path / "vgg16.pth", tmp_path / "heads.pth", vgg, heads


def test_from_files_round_trip(files, images):
    vgg_path, heads_path, vgg, heads = files
    loaded = LPIPS.from_files(str(vgg_path), str(heads_path))
    in_memory = LPIPS()
    in_memory.net.load_state_dict({k: v for k, v in vgg.items() if k.startswith("features.")})
    in_memory.load_state_dict(heads, strict=False)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x, y = images
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, y), in_memory(x, y), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("which", "key", "replacement"),
    [
        ("heads", "lin3.model.1.weight", None),
        ("vgg", "features.26.bias", None),
        ("vgg", "features.0.weight", torch.zeros(32, 3, 3, 3)),
    ],
    ids=["heads-missing-key", "vgg-missing-key", "vgg-wrong-shape"],
)
def test_from_files_rejects_bad_files(files, which, key, replacement):
    vgg_path, heads_path, vgg, heads = files
    path, state = (vgg_path, dict(vgg)) if which == "vgg" else (heads_path, dict(heads))
    if replacement is None:
        del state[key]
    else:
        state[key] = replacement
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as e:
        LPIPS.from_files(str(vgg_path), str(heads_path))
    assert key in str(e.value)


def test_tiny_widths():
    torch.manual_seed(0)
    model = LPIPS(widths=TINY_WIDTHS)
    for head in model.heads:
        nn.init.uniform_(head.model[1].weight)  # the released heads are non-negative
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(2, 2, 3, 32, 32, generator=g) * 2 - 1
    d = model(x, y)
    assert d.shape == (2,) and torch.isfinite(d).all() and (d > 0).all()
