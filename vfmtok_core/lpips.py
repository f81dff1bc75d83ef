"""LPIPS v0.1 perceptual distance with a VGG16 trunk, the perceptual term of the tokenizer loss.

Computes what taming-transformers' ``LPIPS`` (and the ``lpips`` package with ``net='vgg'``) does
on images in [-1, 1]. Those build their trunk through torchvision, which downloads ImageNet VGG16
weights at construction, and taming loads its heads from a path on the authors' machine. Here
construction touches no network: weights come from files the caller names (a local path or any
fsspec URL) and are checked key by key, so a wrong or missing file fails loudly instead of leaving
a randomly initialised loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from vfmtok_core.checkpoint import check_state_dict, load_checkpoint, load_strict, select_state_dict

VGG16_WIDTHS = (64, 128, 256, 512, 512)
# The real network, and a narrow one with the same layers that tests and CPU demos can afford.
LPIPS_WIDTHS = {"full": VGG16_WIDTHS, "tiny": (8, 16, 32, 64, 64)}
# Convolutions per VGG16 stage; each stage ends in the ReLU whose output LPIPS compares.
_STAGE_CONVS = (2, 2, 3, 3, 3)
# The normalisation is ImageNet's mean/std re-expressed for inputs in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10


class VGG16Features(nn.Module):
    """The convolutional part of VGG16, returning relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3.

    ``features`` has torchvision's index layout so its ``vgg16-397923af.pth`` loads unchanged.
    ``widths`` narrows every stage for small test configurations.
    """

    def __init__(self, widths: Sequence[int] = VGG16_WIDTHS) -> None:
        super().__init__()
        if len(widths) != len(_STAGE_CONVS):
            raise ValueError(f"VGG16 has {len(_STAGE_CONVS)} stages, got widths {tuple(widths)}")
        layers: list[nn.Module] = []
        taps: list[int] = []
        channels = 3
        for width, convs in zip(widths, _STAGE_CONVS):
            for _ in range(convs):
                layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU()]
                channels = width
            taps.append(len(layers) - 1)
            # The last pool is never run; it keeps torchvision's layout of ``features``.
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)
        self.taps = tuple(taps)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for i, layer in enumerate(self.features[: self.taps[-1] + 1]):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


class LinearHead(nn.Module):
    """Per-layer 1x1 projection to one channel.

    The dropout never acts (LPIPS is always in eval mode); it sits at index 0 so the released
    keys ``lin{i}.model.1.weight`` load without renaming.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit(f: torch.Tensor) -> torch.Tensor:
    """Scale each feature vector to unit length over channels; eps keeps dead (all-zero) ones at 0."""
    return f / (f.square().sum(dim=1, keepdim=True).sqrt() + _EPS)


class LPIPS(nn.Module):
    """Frozen LPIPS distance between two image batches; gradients flow to the images only."""

    def __init__(self, widths: Sequence[int] = VGG16_WIDTHS) -> None:
        super().__init__()
        # Constants, not weights: released files do not carry them.
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features(widths)
        for i, width in enumerate(widths):
            self.add_module(f"lin{i}", LinearHead(width))
        # A distance is non-negative: trained heads are (LPIPS clamps them at zero while fitting
        # them), and random ones are made so, else a random-weight loss rewards moving away.
        with torch.no_grad():
            for head in self.heads:
                head.model[1].weight.abs_()
        self.requires_grad_(False)
        self.eval()

    @property
    def heads(self) -> list[LinearHead]:
        return [getattr(self, f"lin{i}") for i in range(len(self.net.taps))]

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode whatever a parent asks: active head dropout would make the loss noisy."""
        return super().train(False)

    @classmethod
    def from_files(
        cls,
        vgg16: str,
        heads: str,
        storage_options: Mapping | None = None,
        widths: Sequence[int] = VGG16_WIDTHS,
    ) -> LPIPS:
        """Build the model from torchvision's VGG16 file and the LPIPS v0.1 VGG heads file."""
        model = cls(widths)
        model.load_vgg16(vgg16, storage_options)
        model.load_heads(heads, storage_options)
        return model

    def load_vgg16(self, url: str, storage_options: Mapping | None = None) -> None:
        """Load torchvision-layout VGG16 weights; the file's ``classifier.*`` keys are not used."""
        state = select_state_dict(load_checkpoint(url, storage_options), (), url)
        features = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        load_strict(self.net, features, f"VGG16 weights {url}")

    def load_heads(self, url: str, storage_options: Mapping | None = None) -> None:
        """Load the linear heads (``lin{i}.model.1.weight``), e.g. the ``lpips`` package's ``vgg.pth``."""
        state = select_state_dict(load_checkpoint(url, storage_options), (), url)
        expected = {k: v for k, v in self.state_dict().items() if k.startswith("lin")}
        check_state_dict(expected, state, f"LPIPS heads {url}")
        self.load_state_dict(state, strict=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance between images ``x`` and ``y`` (B, 3, H, W) in [-1, 1], shape (B,).

        Always computed in float32, even inside a bf16 autocast region: the loss is built from
        small differences of unit-normalised features, which bf16's 8-bit mantissa rounds away.
        """
        with torch.autocast(x.device.type, enabled=False):
            images = (torch.cat([x, y]).float() - self.shift) / self.scale
            layers = [f.chunk(2) for f in self.net(images)]
            dist = sum(
                head((_unit(fx) - _unit(fy)).square()).mean(dim=(2, 3))
                for head, (fx, fy) in zip(self.heads, layers)
            )
        return dist.squeeze(1)
