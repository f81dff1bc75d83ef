"""l2-normalised vector quantiser (VFMTok's ``slot_quantize``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from vfmtok_core.config import QuantizerConfig


@dataclass
class QuantizerOutput:
    quant: torch.Tensor  # (..., d) straight-through quantised vectors (unit norm)
    codes: torch.Tensor  # (...) int64
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation on the unit sphere.

    The stored codebook is not guaranteed to be unit-norm after training, so it is renormalised at
    every use, on both the encode and the decode side.
    """

    def __init__(self, cfg: QuantizerConfig, backend: str = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        self.backend = backend
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.code_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # A rolling window of recently used indices (training statistic only). It is part of the
        # released checkpoints, so it stays a persistent buffer.
        self.register_buffer("codebook_used", torch.zeros(cfg.usage_window))

    def normalized_codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight.float(), dim=-1)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Codes (...) for vectors z (..., d)."""
        return kernels.codebook_lookup(z, self.embedding.weight, backend=self.backend)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Unit-norm code vectors (..., d) for codes (...)."""
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cfg.codebook_size):
            raise ValueError(f"codes must be in [0, {self.cfg.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
        return F.embedding(codes, self.normalized_codebook())

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise with the straight-through estimator and the VQ/commitment losses."""
        z = F.normalize(z.float(), dim=-1)
        codes = self.lookup(z)
        zq = F.embedding(codes, self.normalized_codebook())
        codebook_loss = F.mse_loss(zq, z.detach())
        commit_loss = self.cfg.commit_beta * F.mse_loss(zq.detach(), z)
        if self.training:
            flat = codes.flatten()[-self.cfg.usage_window :].to(self.codebook_used.dtype)
            self.codebook_used.copy_(torch.cat([self.codebook_used[flat.numel() :], flat]))
        return QuantizerOutput(z + (zq - z).detach(), codes, codebook_loss, commit_loss)
