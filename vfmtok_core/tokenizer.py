"""The VFMTok image tokenizer: images -> 256 discrete tokens -> images.

Module attribute names equal the official ``VQModel``'s, so the released ``vfmtok-tokenizer.pt``
loads key for key; the frozen DINOv2 lives under ``dinov2`` and loads from its own flat ``.pth``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from vfmtok_core import checkpoint as ckpt
from vfmtok_core.config import TokenizerConfig, get_config
from vfmtok_core.decoder import DecoderTransformer
from vfmtok_core.dinov2 import DinoV2
from vfmtok_core.encoder import RegionAdaptiveEncoder
from vfmtok_core.pixel_decoder import PixelDecoder
from vfmtok_core.preprocess import resize_for_encoder, resize_output
from vfmtok_core.quantizer import VectorQuantizer

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
# Prefix of the backbone in the official full-model state dict.
FULL_MODEL_BACKBONE = "encode_transformer.backbone.pretrained_encoder."
# Training statistic with no effect on outputs; optional in files and excluded from fingerprints.
USAGE_BUFFER = "slot_quantize.codebook_used"


@dataclass
class TokenizerOutput:
    """Everything a tokenizer training step needs."""

    reconstruction: torch.Tensor  # (B, 3, S, S)
    codes: torch.Tensor  # (B, N)
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor
    semantic: torch.Tensor  # (B, G*G, C) predicted DINOv2 features
    semantic_target: torch.Tensor  # (B, G*G, C) DINOv2's last level


class VFMTokenizer(nn.Module):
    def __init__(
        self,
        config: str | TokenizerConfig = "vfmtok-l14-336",
        precision: str = "fp32",
        backend: str = "auto",
        decoder_only: bool = False,
    ):
        """``decoder_only`` leaves out DINOv2 (1.2 GB for ViT-L): enough to decode codes, e.g. for sampling.
        ``backend`` selects the kernels (see :mod:`kernels.dispatch`)."""
        super().__init__()
        cfg = get_config(config)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.config = cfg
        self.precision = precision
        n_levels = len(cfg.dinov2.levels)
        self.decoder_only = decoder_only
        self.dinov2 = None if decoder_only else DinoV2(cfg.dinov2).requires_grad_(False)
        self.encode_transformer = RegionAdaptiveEncoder(cfg.encoder, cfg.dinov2.embed_dim, n_levels, backend)
        self.pre_slots_quant = nn.Linear(cfg.encoder.dim, cfg.quantizer.code_dim)
        self.slot_quantize = VectorQuantizer(cfg.quantizer, backend)
        self.post_slots_quant = nn.Linear(cfg.quantizer.code_dim, cfg.decoder.dim)
        self.decode_transformer = DecoderTransformer(
            cfg.decoder,
            num_slots=cfg.encoder.num_queries,
            feature_grid=cfg.feature_grid,
            grid=cfg.decoder_grid,
            feature_dim=cfg.dinov2.embed_dim,
        )
        self.decoder = PixelDecoder(cfg.pixel_decoder, z_channels=cfg.decoder.dim)
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)
        self._fingerprint: str | None = None
        self.eval()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls, config: str | TokenizerConfig = "tiny", seed: int = 0, device="cpu", precision: str = "fp32", backend: str = "auto"
    ):
        """Randomly initialised tokenizer (deterministic for a seed), for demos and tests."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config, precision=precision, backend=backend)
        return model.to(device)

    @classmethod
    def from_pretrained(
        cls,
        tokenizer: str,
        dinov2: str | None = None,
        config: str | TokenizerConfig = "vfmtok-l14-336",
        device="cpu",
        precision: str = "fp32",
        storage_options: Mapping | None = None,
        decoder_only: bool = False,
        backend: str = "auto",
    ) -> "VFMTokenizer":
        """Load the released weights from local paths or fsspec URLs.

        Args:
            tokenizer: ``vfmtok-tokenizer.pt`` (``ema`` preferred, then ``model``, ``state_dict``, raw).
            dinov2: the flat ``dinov2_vit*14_reg4_pretrain.pth``; may be omitted when the tokenizer
                file is a full-model dict that also holds the backbone, and is ignored with
                ``decoder_only``.
        """
        model = cls(config, precision=precision, decoder_only=decoder_only, backend=backend)
        state = ckpt.select_state_dict(
            ckpt.load_checkpoint(tokenizer, storage_options), ("ema", "model", "state_dict"), tokenizer
        )
        backbone = {k[len(FULL_MODEL_BACKBONE) :]: state.pop(k) for k in list(state) if k.startswith(FULL_MODEL_BACKBONE)}
        if not decoder_only:
            if dinov2 is not None:
                model.load_dinov2(dinov2, storage_options)
            elif not backbone:
                raise ckpt.CheckpointError(
                    f"{tokenizer} holds no DINOv2 backbone weights; pass dinov2=<.pth path or URL>"
                )
            else:
                ckpt.load_strict(model.dinov2, backbone, f"DINOv2 weights ({tokenizer})")
        trainable = {k: v for k, v in model.state_dict().items() if not k.startswith("dinov2.")}
        ckpt.check_state_dict(trainable, state, f"tokenizer weights ({tokenizer})", optional=[USAGE_BUFFER])
        model.load_state_dict(state, strict=False)
        log.info("loaded tokenizer %s (fingerprint %s)", tokenizer, model.fingerprint)
        return model.to(device)

    def load_dinov2(self, url: str, storage_options: Mapping | None = None) -> None:
        """Load the frozen backbone from a flat ``dinov2_vit*14_reg4_pretrain.pth`` (path or URL)."""
        state = ckpt.select_state_dict(ckpt.load_checkpoint(url, storage_options), ("model", "state_dict"), url)
        ckpt.load_strict(self.dinov2, state, f"DINOv2 weights ({url})")
        self._fingerprint = None

    def train(self, mode: bool = True) -> "VFMTokenizer":
        super().train(mode)
        if self.dinov2 is not None:
            self.dinov2.eval()  # frozen: never in training mode
        return self

    # ------------------------------------------------------------------ identity
    @property
    def fingerprint(self) -> str:
        """Stable hash of the weights and the preprocessing config (computed once, on first use).

        Two tokenizers with equal fingerprints emit equal tokens for equal inputs; token datasets
        record it so that shards from different tokenizers are never mixed.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps({**self.config.to_dict(), "decoder_only": self.decoder_only}, sort_keys=True).encode())
            for name, t in sorted(self.state_dict().items()):
                if name == USAGE_BUFFER:
                    continue
                t = t.detach().cpu().contiguous()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes())
            self._fingerprint = f"{self.config.name}-{h.hexdigest()[:16]}"
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return self.pre_slots_quant.weight.device

    # ------------------------------------------------------------------ encode
    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be float (B, 3, H, W) in [-1, 1], got {images.dtype} {tuple(images.shape)}")
        return images.to(self.device, torch.float32)

    def dinov2_features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """DINOv2 levels (list of (B, G*G, C)) and cls token for images in [-1, 1]."""
        if self.dinov2 is None:
            raise RuntimeError("this tokenizer was loaded decoder_only: it can decode codes but not encode images")
        x = resize_for_encoder(self._check_images(images), self.config.image_size)
        x = (x.clamp(-1, 1) + 1) / 2
        x = (x - self.mean) / self.std
        with torch.no_grad(), self._autocast():
            levels, cls = self.dinov2.forward_levels(x)
        return [f.float() for f in levels], cls.float()

    def encode_prequant(self, images: torch.Tensor) -> torch.Tensor:
        """Query vectors before quantisation, (B, N, code_dim) float32 (not normalised)."""
        levels, _ = self.dinov2_features(images)
        with self._autocast():
            slots = self.encode_transformer(levels)
        return self.pre_slots_quant(slots.float())

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images float (B, 3, H, W) in [-1, 1] -> codes LongTensor (B, N)."""
        return self.slot_quantize.lookup(self.encode_prequant(images))

    # ------------------------------------------------------------------ decode
    def decode_quant(self, quant: torch.Tensor) -> torch.Tensor:
        """Unit code vectors (B, N, code_dim) -> images (B, 3, S, S) at the config's size."""
        with self._autocast():
            slots = self.post_slots_quant(quant)
            z = self.decode_transformer(slots)
            return self.decoder(z).float()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Codes (B, N) -> float images (B, 3, size, size), roughly in [-1, 1] and not clamped."""
        if codes.ndim != 2 or codes.shape[1] != self.config.tokens_per_image:
            raise ValueError(f"codes must be (B, {self.config.tokens_per_image}), got {tuple(codes.shape)}")
        images = self.decode_quant(self.slot_quantize.embed(codes.to(self.device).long()))
        return resize_output(images, size or self.config.image_size)

    # ------------------------------------------------------------------ training
    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        """Full training pass: reconstruction, VQ losses and the semantic (DINOv2) branch."""
        levels, _ = self.dinov2_features(images)
        with self._autocast():
            slots = self.encode_transformer(levels)
        q = self.slot_quantize(self.pre_slots_quant(slots.float()))
        with self._autocast():
            dec_slots = self.post_slots_quant(q.quant)
            recon = self.decoder(self.decode_transformer(dec_slots)).float()
            semantic = self.decode_transformer.semantic(dec_slots).float()
        return TokenizerOutput(recon, q.codes, q.codebook_loss, q.commit_loss, semantic, levels[-1])

