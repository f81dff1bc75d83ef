"""CNN pixel decoder (VQGAN / LlamaGen layout): a patch-grid feature map -> an RGB image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vfmtok_core.config import PixelDecoderConfig


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)

        def seq(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, HW, C)

        out = F.scaled_dot_product_attention(seq(self.q(n)), seq(self.k(n)), seq(self.v(n)))
        return x + self.proj_out(out.squeeze(1).transpose(1, 2).reshape(b, c, h, w))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Nearest-neighbour upsampling has no bf16 CPU kernel on older torch; do it in fp32.
        up = F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype)
        return self.conv(up)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_res: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(num_res))
        self.upsample = Upsample(cout) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class PixelDecoder(nn.Module):
    """(B, z_channels, g, g) -> (B, out_channels, g * 2^(levels-1), ...), not clamped."""

    def __init__(self, cfg: PixelDecoderConfig, z_channels: int) -> None:
        super().__init__()
        mult = cfg.ch_mult
        cin = cfg.ch * mult[-1]
        g = cfg.groups
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(cin, cin, g), AttnBlock(cin, g), ResnetBlock(cin, cin, g)])
        blocks = []
        for i, m in enumerate(reversed(mult)):
            cout = cfg.ch * m
            blocks.append(UpBlock(cin, cout, cfg.num_res_blocks + 1, g, upsample=i != len(mult) - 1))
            cin = cout
        self.conv_blocks = nn.ModuleList(blocks)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for layer in self.mid:
            h = layer(h)
        for block in self.conv_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))
