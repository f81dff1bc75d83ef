"""Typed configurations for the VFMTok tokenizer.

``vfmtok-l14-336`` is the released model (DINOv2 ViT-L/14-reg4 at 336 px, 256 tokens, 16384x12
codebook). ``tiny`` runs every code path of the official model with small widths so that tests and
demos finish in seconds on a CPU; it still emits 256 tokens per image so that everything
downstream (shards, GPT, sampling) sees the official sequence length.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DinoV2Config:
    """A DINOv2 ViT with register tokens (the ``dinov2_vit*14_reg`` hub models)."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    patch_size: int = 14
    pos_grid: int = 37  # the stored pos_embed covers a 37x37 grid (518 px)
    num_register_tokens: int = 4
    mlp_ratio: float = 4.0
    ffn: str = "mlp"  # "mlp" (GELU) or "swiglu" (ViT-g)
    eps: float = 1e-6
    # 0-based blocks whose outputs feed the tokenizer; the last one is taken after the final norm.
    levels: tuple[int, ...] = (5, 11, 17, 23)


@dataclass(frozen=True)
class EncoderConfig:
    """The region-adaptive encoder: projectors plus deformable-attention query layers."""

    dim: int = 512
    depth: int = 6
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 1024  # upstream uses min(4 * dim, 1024)
    num_queries: int = 256  # laid out on a sqrt(num_queries)^2 reference grid


@dataclass(frozen=True)
class QuantizerConfig:
    codebook_size: int = 16384
    code_dim: int = 12
    commit_beta: float = 0.25
    usage_window: int = 65536  # length of the ``codebook_used`` buffer kept in checkpoints


@dataclass(frozen=True)
class DecoderConfig:
    """The decoder transformer that turns slots into a patch grid (and DINOv2 features in training)."""

    dim: int = 512
    depth: int = 6
    num_heads: int = 8
    mlp_dim: int = 2048
    patch_size: int = 16
    num_register_tokens: int = 4
    attn_dropout: float = 0.1


@dataclass(frozen=True)
class PixelDecoderConfig:
    """The VQGAN/LlamaGen-style CNN decoder."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 1
    out_channels: int = 3
    groups: int = 32


@dataclass(frozen=True)
class TokenizerConfig:
    name: str = "vfmtok-l14-336"
    image_size: int = 336
    dinov2: DinoV2Config = field(default_factory=DinoV2Config)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    # DINOv2 input normalisation applied inside the tokenizer to images in [-1, 1].
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        grid = int(round(self.encoder.num_queries**0.5))
        if grid * grid != self.encoder.num_queries:
            raise ValueError(f"num_queries must be a square, got {self.encoder.num_queries}")
        if self.image_size % self.dinov2.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the DINOv2 patch size")
        if self.image_size % self.decoder.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the decoder patch size")
        upsample = 2 ** (len(self.pixel_decoder.ch_mult) - 1)
        if self.image_size // self.decoder.patch_size * upsample != self.image_size:
            raise ValueError("decoder grid times the pixel decoder's upsampling must equal image_size")
        if any(not 0 <= lvl < self.dinov2.depth for lvl in self.dinov2.levels):
            raise ValueError(f"DINOv2 levels {self.dinov2.levels} outside depth {self.dinov2.depth}")

    @property
    def tokens_per_image(self) -> int:
        return self.encoder.num_queries

    @property
    def feature_grid(self) -> int:
        """DINOv2 patch grid side at the tokenizer's input size (24 for 336 px)."""
        return self.image_size // self.dinov2.patch_size

    @property
    def decoder_grid(self) -> int:
        """Side of the decoder transformer's patch grid (21 for 336 px)."""
        return self.image_size // self.decoder.patch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _dinov2(name: str) -> DinoV2Config:
    """DINOv2 sizes as published (all with 4 registers); levels are the quarter-depth blocks."""
    sizes = {
        "vits14": dict(embed_dim=384, depth=12, num_heads=6),
        "vitb14": dict(embed_dim=768, depth=12, num_heads=12),
        "vitl14": dict(embed_dim=1024, depth=24, num_heads=16),
        "vitg14": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
    }
    if name not in sizes:
        raise KeyError(f"unknown DINOv2 size {name!r}; known: {', '.join(sizes)}")
    kw = sizes[name]
    depth = kw["depth"]
    levels = tuple(depth * q // 4 - 1 for q in (1, 2, 3, 4))
    return DinoV2Config(levels=levels, **kw)


DINOV2_SIZES = ("vits14", "vitb14", "vitl14", "vitg14")


def dinov2_config(name: str) -> DinoV2Config:
    return _dinov2(name)


def _tiny() -> TokenizerConfig:
    return TokenizerConfig(
        name="tiny",
        image_size=112,
        dinov2=DinoV2Config(embed_dim=64, depth=4, num_heads=2, pos_grid=16, levels=(0, 1, 2, 3)),
        encoder=EncoderConfig(dim=32, depth=1, num_heads=2, num_points=4, ffn_dim=64, num_queries=256),
        quantizer=QuantizerConfig(codebook_size=1024, code_dim=12),
        decoder=DecoderConfig(dim=64, depth=2, num_heads=4, mlp_dim=128, patch_size=16),
        pixel_decoder=PixelDecoderConfig(ch=32, ch_mult=(1, 1, 1, 1, 2)),
    )


CONFIGS = {
    "vfmtok-l14-336": TokenizerConfig,
    "tiny": _tiny,
}


def get_config(name: str | TokenizerConfig) -> TokenizerConfig:
    """Look up a named config (or pass a config through unchanged)."""
    if isinstance(name, TokenizerConfig):
        return name
    if name not in CONFIGS:
        raise KeyError(f"unknown tokenizer config {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name]()
