"""The tokenizer actor: builds one tokenizer on its device and turns source crops into tokens."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

from pipelines.producer.images import cut_variants
from pipelines.producer.precision import PRECISIONS, fp32_math, model_precision, resolve_precision

log = logging.getLogger(__name__)


@dataclass
class TokenizerSpec:
    """How each actor builds its tokenizer (checkpoints or a seeded random config).

    ``precision`` is one of :data:`~pipelines.producer.precision.PRECISIONS`; ``auto`` is resolved
    by the actor, which knows its device. It is checked here so that a bad name fails on the driver."""

    config: str = "tiny"
    tokenizer: str | None = None
    dinov2: str | None = None
    seed: int = 0
    precision: str = "auto"
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def build(self, device: str, precision: str):
        """The tokenizer on ``device`` for a resolved ``precision`` (see :func:`resolve_precision`)."""
        from vfmtok_core import VFMTokenizer

        built = model_precision(precision)
        if self.tokenizer:
            return VFMTokenizer.from_pretrained(
                tokenizer=self.tokenizer, dinov2=self.dinov2, config=self.config, device=device,
                precision=built, storage_options=self.storage_options,
            )
        return VFMTokenizer.from_config(self.config, seed=self.seed, device=device, precision=built)


class TokenizerWorker:
    """Holds one tokenizer; turns source crops into tokens (N, V, T) uint16, cutting the variants
    and normalising on its device, a batch at a time (on CUDA with the transfers overlapped, see
    :mod:`pipelines.producer.device_feed`)."""

    def __init__(self, spec: TokenizerSpec, batch_size: int, threads: int):
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.precision = resolve_precision(spec.precision, self.device)
        self.tok = spec.build(self.device, self.precision)
        self.batch_size = batch_size
        log.info("tokenizer %s on %s in %s (asked: %s)", spec.config, self.device, self.precision, spec.precision)

    def info(self) -> dict:
        cfg = self.tok.config
        return {
            "fingerprint": self.tok.fingerprint,
            "config": cfg.to_dict(),
            "image_size": cfg.image_size,
            "tokens_per_image": cfg.tokens_per_image,
            "codebook_size": cfg.quantizer.codebook_size,
            "device": self.device,
            "precision": self.precision,
            "pid": os.getpid(),
        }

    def encode(self, sources: dict[str, np.ndarray], variants: tuple[str, ...]) -> np.ndarray:
        import torch

        from pipelines.producer.device_feed import map_batches
        from vfmtok_core.preprocess import normalize

        size, t = self.tok.config.image_size, self.tok.config.tokens_per_image
        n = len(next(iter(sources.values()))) if sources else 0
        out = np.empty((n, len(variants), t), np.uint16)

        def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            crops = torch.stack(cut_variants(batch, size, variants, lambda x: x.flip(2)), dim=1)  # (b, V, S, S, 3)
            with fp32_math(self.precision):
                codes = self.tok.encode(normalize(crops.flatten(0, 1)))
            return codes.view(-1, len(variants), t)

        step = max(1, self.batch_size // len(variants))  # images per forward: about batch_size crops
        map_batches(forward, sources, out, step, self.device)
        return out
