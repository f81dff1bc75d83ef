"""Our Inception-v3 against torch-fidelity's ``inception-v3-compat`` given the same random weights file.

torch-fidelity's package ``__init__`` imports torchvision, which cannot be installed here (the
index's build needs CUDA libraries); tools/bootstrap.sh installs torch-fidelity with ``--no-deps``
and the tests import it against a stand-in torchvision that has only the names its modules look up
at import time. ``sys.modules`` is as before once the reference module is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from vfmtok_core.checkpoint import CheckpointError
from vfmtok_core.inception import InceptionV3, from_uint8_nhwc, tf1_resize_bilinear


def torchvision_stand_in() -> dict[str, types.ModuleType]:
    """The torchvision names torch-fidelity's modules touch while importing; none is ever called."""
    datasets = types.ModuleType("torchvision.datasets")
    for name in ("CIFAR10", "STL10", "CIFAR100"):
        setattr(datasets, name, type(name, (), {}))
    functional = types.ModuleType("torchvision.transforms.functional")
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    torchvision = types.ModuleType("torchvision")
    torchvision.datasets = datasets
    torchvision.transforms = transforms
    return {
        "torchvision": torchvision,
        "torchvision.datasets": datasets,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
    }


MISSING_REFERENCE = (
    "torch-fidelity 0.4.0 (the reference for vfmtok_core.inception) is missing: "
    "tools/bootstrap.sh installs it with --no-deps"
)


def test_reference_is_installed():
    """Fails, rather than skips, where the reference is absent (the comparisons then error)."""
    assert importlib.util.find_spec("torch_fidelity") is not None, MISSING_REFERENCE


@pytest.fixture(scope="module")
def fidelity() -> types.ModuleType:
    """torch-fidelity's ``feature_extractor_inceptionv3`` module."""
    assert importlib.util.find_spec("torch_fidelity") is not None, MISSING_REFERENCE
    with pytest.MonkeyPatch.context() as mp:
        for name, module in torchvision_stand_in().items():
            mp.setitem(sys.modules, name, module)
        before = set(sys.modules)
        try:
            return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        finally:
            # Drop the torch_fidelity modules bound to the stand-in so no later import sees them.
            for name in set(sys.modules) - before:
                if name == "torch_fidelity" or name.startswith("torch_fidelity."):
                    del sys.modules[name]


def test_reference_import_leaves_no_trace(fidelity):
    stand_ins = torchvision_stand_in().keys()
    assert not [n for n in stand_ins if n in sys.modules and not getattr(sys.modules[n], "__file__", None)]
    assert not [n for n in sys.modules if n == "torch_fidelity" or n.startswith("torch_fidelity.")]


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every weight of the network, random: He-initialised convolutions keep activations at a
    steady scale through the ~90 layers; batch-norm statistics and affines are random too, and
    ``fc.bias`` is large so that logits with the bias differ clearly from logits without it."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in InceptionV3().state_dict().items():
        shape = value.shape
        if key.endswith(".num_batches_tracked"):
            continue  # like the converted TF weights file, which has none
        if key.endswith(".conv.weight"):
            state[key] = torch.randn(shape, generator=g) * math.sqrt(2 / value[0].numel())
        elif key.endswith(".running_mean"):
            state[key] = torch.randn(shape, generator=g) * 0.1
        elif key.endswith((".running_var", ".bn.weight")):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(".bn.bias"):
            state[key] = torch.randn(shape, generator=g) * 0.2
        elif key == "fc.weight":
            state[key] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        elif key == "fc.bias":
            state[key] = torch.randn(shape, generator=g)
        else:
            raise KeyError(f"no random init for {key}")
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(random_state(), path)
    return path


@pytest.fixture(scope="module")
def ours(weights_file) -> InceptionV3:
    return InceptionV3.from_file(str(weights_file))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Two different uint8 NHWC images, non-square: fine noise, and coarse 8x8 blocks of noise."""
    g = torch.Generator().manual_seed(1)
    fine = torch.randint(0, 256, (48, 64, 3), generator=g, dtype=torch.uint8)
    coarse = torch.randint(0, 256, (6, 8, 3), generator=g, dtype=torch.uint8)
    coarse = coarse.repeat_interleave(8, dim=0).repeat_interleave(8, dim=1)
    return torch.stack([fine, coarse])


@pytest.fixture(scope="module")
def our_features(ours, images) -> dict[str, torch.Tensor]:
    return ours(from_uint8_nhwc(images.numpy()))


@pytest.fixture(scope="module")
def reference_features(fidelity, weights_file, images) -> dict[str, torch.Tensor]:
    """torch-fidelity's features of the same uint8 images (it takes NCHW), and ADM's ``spatial``
    made from its Mixed_6d 1x1 branch the way ADM makes it: NHWC, channels [:7], flattened."""
    ref = fidelity.FeatureExtractorInceptionV3(
        name="inception-v3-compat",
        features_list=["2048", "logits_unbiased"],
        feature_extractor_weights_path=str(weights_file),
    )
    caught = {}
    hook = ref.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: caught.update(branch=out.clone()))
    try:
        with torch.no_grad():
            pool, logits = ref(images.permute(0, 3, 1, 2).contiguous())
    finally:
        hook.remove()
    spatial = caught["branch"].permute(0, 2, 3, 1)[..., :7].flatten(1)
    return {"pool": pool, "logits": logits, "spatial": spatial}


@pytest.mark.parametrize("name", ["pool", "spatial", "logits"])
def test_matches_torch_fidelity(our_features, reference_features, name):
    torch.testing.assert_close(our_features[name], reference_features[name], rtol=1e-5, atol=1e-6)


def test_shapes_dtypes_and_distinct_images(our_features):
    for name, dim in {"pool": 2048, "spatial": 17 * 17 * 7, "logits": 1008}.items():
        features = our_features[name]
        assert features.shape == (2, dim) and features.dtype == torch.float32, name
        assert torch.isfinite(features).all(), name
        # Far above the comparison tolerance: equal features would make the comparison vacuous.
        assert (features[0] - features[1]).abs().mean() > 1e-2 * features.abs().mean(), name
    assert (our_features["spatial"] > 0).any()


def test_float32_without_grad_under_autocast(ours, images, our_features):
    """bf16 autocast and a grad-requiring input change nothing, and CUDA float32 math is set to
    IEEE during the forward only (checked here through the settings; they apply on CUDA)."""
    backends = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = tuple(b.fp32_precision for b in backends)
    seen = []
    hook = ours.Mixed_6d.register_forward_pre_hook(lambda m, a: seen.append(tuple(b.fp32_precision for b in backends)))
    x = from_uint8_nhwc(images).requires_grad_()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ours(x)
    finally:
        hook.remove()
    assert seen == [("ieee", "ieee")]
    assert tuple(b.fp32_precision for b in backends) == before
    for name, features in out.items():
        assert features.dtype == torch.float32 and not features.requires_grad, name
        torch.testing.assert_close(features, our_features[name], rtol=0, atol=0)


def test_stays_frozen(ours):
    ours.train()
    assert not any(m.training for m in ours.modules())
    assert not any(p.requires_grad for p in ours.parameters())


def test_from_file_round_trip(ours, tmp_path):
    """A file written from a model's own state dict (with the batch-norm counters) loads back exactly."""
    path = tmp_path / "inception.pth"
    torch.save(ours.state_dict(), path)
    loaded = InceptionV3.from_file(str(path)).state_dict()
    original = ours.state_dict()
    assert loaded.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(loaded[key], value), key


def test_missing_key_names_file_and_key(tmp_path):
    state = random_state()
    del state["Mixed_7b.branch_pool.bn.running_var"]
    path = tmp_path / "truncated-inception.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="missing keys: Mixed_7b.branch_pool.bn.running_var") as err:
        InceptionV3.from_file(str(path))
    assert str(path) in str(err.value)


def test_input_conventions(ours, images):
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        ours(images.float())  # NHWC passed as is
    with pytest.raises(ValueError, match="uint8"):
        from_uint8_nhwc(images.float())
    assert torch.equal(from_uint8_nhwc(images), images.permute(0, 3, 1, 2).float())


@pytest.mark.parametrize("in_size", [(48, 64), (512, 384), (299, 299)])
def test_resize_matches_torch_fidelity(fidelity, in_size):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, *in_size, generator=g) * 255
    expected = fidelity.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    torch.testing.assert_close(tf1_resize_bilinear(x, (299, 299)), expected, rtol=1e-6, atol=1e-4)


def test_resize_is_tf1_legacy_sampling():
    """TF 1.x samples output pixel i at i * in / out (no half-pixel centres) and clamps at the edge:
    [0, 8] -> [0, 4, 8, 8], where half-pixel resizing (``F.interpolate``) gives [0, 2, 6, 8]."""
    x = torch.tensor([[[[0.0, 8.0]]]])
    assert tf1_resize_bilinear(x, (1, 4)).flatten().tolist() == [0.0, 4.0, 8.0, 8.0]
