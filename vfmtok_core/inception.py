"""Inception-v3 as FID and the ADM (guided-diffusion) evaluator see it, in plain PyTorch.

Both metrics are defined by one TensorFlow graph, ``classify_image_graph_def.pb`` of the
inception-2015-12-05 release. ADM's ``evaluations/evaluator.py`` runs that graph itself, which needs
TensorFlow and a graph file at a hard-coded path. torch-fidelity's ``inception-v3-compat`` port is
the accepted PyTorch equivalent: the same layers with the graph's quirks (padding-free average
pools, a max pool in the last block, TF 1.x resize), matching TF to small numerical differences
(float summation order, not modelling). This module re-implements that network and loads the
weights file torch-fidelity converted from the graph (``weights-inception-2015-12-05-6726825d.pth``,
a flat state dict), so parameter names follow torch-fidelity's and the file loads with strict key
checking. Nothing downloads: the caller names the file.

What the outputs are, in the graph's terms (ADM's names):

- ``pool``: ``pool_3:0``, the 2048 global-average-pooled features of FID, precision and recall;
- ``spatial``: ``mixed_6/conv:0``, the 1x1 branch of Mixed_6d (after its batch norm and ReLU,
  192 channels at 17x17), of which ADM keeps channels ``[..., :7]`` in NHWC and flattens in NHWC
  order (17 * 17 * 7 = 2023 features) for sFID;
- ``logits``: ``pool_3`` times the weights of ``softmax/logits/MatMul``, without the bias: ADM's
  Inception Score takes the softmax of exactly this (torch-fidelity's ``logits_unbiased``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vfmtok_core.checkpoint import load_checkpoint, load_strict, select_state_dict

INPUT_SIZE = 299
POOL_FEATURES = 2048
# The 2015 graph's classifier has 1008 outputs: the 1000 ImageNet classes and 8 unused ones.
NUM_LOGITS = 1008
# ADM's sFID keeps the first 7 channels of the 17x17 ``mixed_6/conv`` map.
SPATIAL_CHANNELS = 7
SPATIAL_FEATURES = 17 * 17 * SPATIAL_CHANNELS
# TF's BatchNormWithGlobalNormalization in the graph uses this variance epsilon.
_BN_EPS = 1e-3


def tf1_resize_bilinear(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) float images as TensorFlow 1.x's ``ResizeBilinear`` does it
    with ``align_corners=False`` and no half-pixel centres (the graph's own resize op).

    Output pixel ``i`` samples the input at ``i * in / out`` (no half-pixel offset, so the image
    shifts towards the top-left compared with ``F.interpolate``), between rows ``floor`` and
    ``floor + 1`` clamped to the last row. The scale is a float32 division and the blend
    ``a + (b - a) * t`` is done in TF's order, horizontally first, so the result is TF's to float32
    rounding.
    """
    h, w = size
    rows_lo, rows_hi, dy = _tf1_source_grid(images.shape[-2], h, images.device)
    cols_lo, cols_hi, dx = _tf1_source_grid(images.shape[-1], w, images.device)
    top, bottom = images.index_select(-2, rows_lo), images.index_select(-2, rows_hi)

    def across(x: torch.Tensor) -> torch.Tensor:
        left, right = x.index_select(-1, cols_lo), x.index_select(-1, cols_hi)
        return left + (right - left) * dx

    top, bottom = across(top), across(bottom)
    return top + (bottom - top) * dy.unsqueeze(-1)


def _tf1_source_grid(
    in_size: int, out_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each output index: the lower and upper source index and the weight of the upper one."""
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lo = src.floor()
    hi = (lo + 1).clamp(max=in_size - 1)
    return lo.long().to(device), hi.long().to(device), (src - lo).to(device)


def from_uint8_nhwc(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) images, the layout of ADM's sample and reference ``.npz`` batches, as the
    float32 (N, 3, H, W) tensor in [0, 255] that :meth:`InceptionV3.forward` takes."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float()


@contextlib.contextmanager
def _ieee_float32() -> Iterator[None]:
    """IEEE float32 CUDA convolutions and matmuls for the duration, whatever the process set.

    torch lets cuDNN convolutions use TF32 by default, which shifts the features by about 1e-3
    relative and so moves FID; the metrics are defined in float32. Previous settings are restored.
    """
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision, conv.fp32_precision = "ieee", "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """TF's SAME-padded 3x3 average pool: border windows average only the pixels inside the image."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _reduce_pool(x: torch.Tensor) -> torch.Tensor:
    """The unpadded stride-2 3x3 max pool of the stem and of the grid-reduction blocks."""
    return F.max_pool2d(x, kernel_size=3, stride=2)


class BasicConv(nn.Module):
    """Convolution without bias, batch norm, ReLU: every convolution of the graph."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b..5d): 1x1, 5x5, double 3x3 and average-pool branches."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1)
        self.branch_pool = BasicConv(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_3x3(x)),
        ]
        return torch.cat(branches, dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 grid reduction (Mixed_6a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            _reduce_pool(x),
        ]
        return torch.cat(branches, dim=1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b..6e) with factorised 7x7 convolutions.

    The 1x1 branch comes first in the output, as in the graph's concat: channels ``[:192]`` of
    Mixed_6d's output are ``mixed_6/conv``.
    """

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = conv(dbl)
        branches = [
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool_3x3(x)),
        ]
        return torch.cat(branches, dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 grid reduction (Mixed_7a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tower = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            tower = conv(tower)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), tower, _reduce_pool(x)], dim=1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, Mixed_7c) whose 3x3 branches split into parallel 1x3 and 3x1 convolutions.

    ``pool`` is the pool before the pool branch: the graph has an average pool in Mixed_7b but a
    max pool in Mixed_7c (unlike the paper), and FID is defined by the graph.
    """

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = _avg_pool_3x3 if pool == "avg" else _max_pool_3x3
        self.branch1x1 = BasicConv(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tower = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branches = [
            self.branch1x1(x),
            self.branch3x3_2a(tower),
            self.branch3x3_2b(tower),
            self.branch3x3dbl_3a(dbl),
            self.branch3x3dbl_3b(dbl),
            self.branch_pool(self.pool(x)),
        ]
        return torch.cat(branches, dim=1)


class InceptionV3(nn.Module):
    """The frozen FID Inception-v3, returning ``pool``, ``spatial`` and ``logits`` (see the module doc).

    Always in eval mode with frozen weights: batch statistics would change the features.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        # The file carries fc.bias; the logits ADM uses leave it out, so it is loaded but never read.
        self.fc = nn.Linear(POOL_FEATURES, NUM_LOGITS)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> InceptionV3:
        """Stay in eval mode whatever a parent asks."""
        return super().train(False)

    @classmethod
    def from_file(cls, url: str, storage_options: Mapping | None = None) -> InceptionV3:
        """Load torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (or a file with the
        same keys) from a local path or fsspec URL, checking every key and shape.

        BatchNorm's ``num_batches_tracked`` may be absent (the converted file has none); it is a
        training counter that eval never reads.
        """
        model = cls()
        state = select_state_dict(load_checkpoint(url, storage_options), (), url)
        counters = [k for k in model.state_dict() if k.endswith(".num_batches_tracked")]
        load_strict(model, state, f"Inception-v3 weights {url}", optional=counters)
        return model

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """299x299x3 -> 35x35x192: five convolutions and two stride-2 max pools."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_reduce_pool(x)))
        return _reduce_pool(x)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of images given as float (N, 3, H, W) with values in [0, 255], any H and W.

        uint8 (N, H, W, 3) arrays go through :func:`from_uint8_nhwc` first. Images are resized to
        299x299 as the graph does, scaled to [-1, 1], and run in IEEE float32 without gradients,
        also inside an autocast region.

        Returns:
            ``{"pool": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)}``, all float32.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W) in [0, 255], got {tuple(images.shape)}")
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False), _ieee_float32():
            x = tf1_resize_bilinear(images.float(), (INPUT_SIZE, INPUT_SIZE))
            x = (x - 128) / 128
            x = self.stem(x)
            x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
            x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))
            spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
            x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
            pool = x.mean(dim=(2, 3))
            logits = pool @ self.fc.weight.T
        return {"pool": pool, "spatial": spatial, "logits": logits}
