"""The DINO discriminator VFMTok trains its tokenizer against (StyleGAN-T's, ``--disc-type dinogan``).

A frozen DINO (v1) ViT-S/16 reads the image; five "readout" activations (the embedding and the
outputs of blocks 2, 5, 8, 11, each with the cls token added to every patch token) feed five small
trainable convolutional heads whose per-token logits are concatenated to (B, 5 * 196).

Upstream downloads ``dino_deitsmall16_pretrain.pth`` through torch.hub while constructing the
module. Here construction never touches the network: :meth:`DinoDiscriminator.from_files` takes a
local path or fsspec URL and reads it with the weights-only loader of :mod:`vfmtok_core.checkpoint`,
and the plain constructor gives a randomly initialised (still frozen) backbone for tests and demos.

Parameter names of the backbone follow the flat layout of the released DINO file
(``blocks.N.attn.qkv.weight`` ...), so it loads with strict key matching and no renaming; the heads'
names follow upstream, so the ``discriminator`` entry of a VFMTok training checkpoint loads as is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vfmtok_core import checkpoint as ckpt
from vfmtok_core.dinov2 import Attention, Mlp, PatchEmbed

# Prefix of the backbone's keys in DINO's own full checkpoints (``teacher`` / ``student`` entries).
_WRAPPED_BACKBONE = "backbone."


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Backbone size, input size and head settings; the defaults are the official DINO ViT-S/16."""

    dim: int = 384
    depth: int = 12
    num_heads: int = 6
    patch_size: int = 16
    image_size: int = 224  # the backbone's input side; its pos_embed covers exactly this grid
    mlp_ratio: float = 4.0
    readout_blocks: tuple[int, ...] = (2, 5, 8, 11)  # 0-based; the embedding is always read out too
    virtual_batch: int = 8
    kernel_size: int = 9  # of the residual conv in each head (circular padding kernel_size // 2)
    ln_eps: float = 1e-6  # backbone LayerNorms
    bn_eps: float = 1e-6  # heads' BatchNormLocal
    crop_prob: float = 0.5  # chance of a random crop (instead of a resize) for inputs larger than image_size

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        blocks = self.readout_blocks
        if not blocks or any(a >= b for a, b in zip(blocks, blocks[1:])) or blocks[0] < 0 or blocks[-1] >= self.depth:
            raise ValueError(f"readout_blocks {blocks} must be strictly increasing and within depth {self.depth}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep the token count, got {self.kernel_size}")
        if self.virtual_batch < 1:
            raise ValueError(f"virtual_batch must be positive, got {self.virtual_batch}")
        if not 0.0 <= self.crop_prob <= 1.0:
            raise ValueError(f"crop_prob must be in [0, 1], got {self.crop_prob}")

    @property
    def num_tokens(self) -> int:
        """Patch tokens per activation (196 at 224 px with 16 px patches)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_activations(self) -> int:
        return 1 + len(self.readout_blocks)

    @property
    def num_logits(self) -> int:
        """Logits per image: one per token of every activation (980 for the official model)."""
        return self.num_activations * self.num_tokens


DISCRIMINATOR_CONFIGS: dict[str, DiscriminatorConfig] = {
    "dino-s16": DiscriminatorConfig(),
    # Every code path of the official model at small width, for tests and demos: 16 tokens, 80 logits.
    "tiny": DiscriminatorConfig(dim=64, depth=4, num_heads=2, image_size=64, readout_blocks=(0, 1, 2, 3)),
}


def get_discriminator_config(name_or_config: str | DiscriminatorConfig) -> DiscriminatorConfig:
    """Look up a named config (or pass a config through unchanged)."""
    if isinstance(name_or_config, DiscriminatorConfig):
        return name_or_config
    if name_or_config not in DISCRIMINATOR_CONFIGS:
        raise KeyError(f"unknown discriminator config {name_or_config!r}; known: {', '.join(DISCRIMINATOR_CONFIGS)}")
    return DISCRIMINATOR_CONFIGS[name_or_config]


# ---------------------------------------------------------------------------------------- backbone
class Block(nn.Module):
    """Pre-norm ViT block without LayerScale (DINO v1)."""

    def __init__(self, cfg: DiscriminatorConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg.dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio), approximate="tanh")  # as upstream runs DINO

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def readout(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 1 + N, C) tokens with cls first -> (B, C, N): every patch token plus the cls token."""
    return (tokens[:, 1:] + tokens[:, :1]).transpose(1, 2)


class DinoViT(nn.Module):
    """DINO (v1) ViT returning the readout activations the discriminator's heads consume.

    Inputs must already be normalised and exactly ``image_size`` square (the discriminator's
    :meth:`~DinoDiscriminator.preprocess` sees to that), so the position embedding is never resized.
    """

    def __init__(self, cfg: DiscriminatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens + 1, cfg.dim))
        # DINO's own initialisation; it also keeps a random backbone's cls readout non-trivial.
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        # Never used by the readouts (they are raw block outputs); kept so the released file loads strictly.
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> [cls, patches] with the position embedding added."""
        patches = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), patches], dim=1)
        return tokens + self.pos_embed

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The embedding's and each readout block's activation, each (B, dim, num_tokens).
        Blocks past the last readout block are skipped."""
        read = self.cfg.readout_blocks
        x = self.embed(x)
        out = [readout(x)]
        for i, block in enumerate(self.blocks[: read[-1] + 1]):
            x = block(x)
            if i in read:
                out.append(readout(x))
        return out

    @torch.no_grad()
    def zero_key_bias(self) -> None:
        """Zero the k third of every qkv bias, as upstream does after loading the DINO weights.

        Softmax attention is invariant to it (q . b_k is the same for every key of a query, so it
        cancels in the softmax); it is done so the held weights match upstream's exactly.
        """
        dim = self.cfg.dim
        for block in self.blocks:
            block.attn.qkv.bias[dim : 2 * dim].zero_()


# ------------------------------------------------------------------------------------------- heads
class BatchNormLocal(nn.Module):
    """Batch norm over "virtual batches": the batch is cut into ceil(B / virtual_bs) equal groups and
    each group is normalised with its own mean and biased variance over samples and length.

    It keeps no running statistics, so training and evaluation behave the same, and it is not a
    ``_BatchNorm``, so ``SyncBatchNorm.convert_sync_batchnorm`` leaves it alone (as upstream).
    Statistics are computed in float32 so reduced-precision activations do not lose the variance.
    """

    def __init__(self, num_features: int, virtual_bs: int = 8, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.virtual_bs = virtual_bs
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, L) -> (B, C, L)."""
        b = x.shape[0]
        groups = math.ceil(b / self.virtual_bs)
        if b % groups:
            raise ValueError(
                f"BatchNormLocal: batch {b} cannot be split into {groups} equal groups "
                f"(ceil({b} / virtual batch {self.virtual_bs})); use a batch divisible by {groups}"
            )
        g = x.float().reshape(groups, b // groups, *x.shape[1:])
        mean = g.mean(dim=(1, 3), keepdim=True)
        var = g.var(dim=(1, 3), correction=0, keepdim=True)
        out = ((g - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if self.affine:
            out = out * self.weight[:, None] + self.bias[:, None]
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"virtual_bs={self.virtual_bs}, eps={self.eps}, affine={self.affine}"


class ResidualBlock(nn.Module):
    """(fn(x) + x) / sqrt(2): the sum of two unit-variance signals scaled back to unit variance."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) / math.sqrt(2)


def spectral_conv1d(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv1d:
    """Conv1d under spectral norm (state ``weight_orig`` / ``weight_u`` / ``weight_v``), circularly padded."""
    conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return nn.utils.spectral_norm(conv)


def conv_block(channels: int, kernel_size: int, cfg: DiscriminatorConfig) -> nn.Sequential:
    return nn.Sequential(
        spectral_conv1d(channels, channels, kernel_size),
        BatchNormLocal(channels, virtual_bs=cfg.virtual_batch, eps=cfg.bn_eps),
        nn.LeakyReLU(0.2),
    )


def make_head(cfg: DiscriminatorConfig) -> nn.Sequential:
    """One activation's head: (B, dim, N) -> (B, 1, N) logits."""
    return nn.Sequential(
        conv_block(cfg.dim, 1, cfg),
        ResidualBlock(conv_block(cfg.dim, cfg.kernel_size, cfg)),
        spectral_conv1d(cfg.dim, 1, 1),
    )


# ----------------------------------------------------------------------------------- discriminator
class DinoDiscriminator(nn.Module):
    """Frozen DINO ViT plus one trainable head per readout activation; images in [-1, 1] -> (B, num_logits).

    The backbone is held in a tuple, outside the module tree, as upstream does: its weights are not
    in ``state_dict()`` (so a saved discriminator, like the ``discriminator`` entry of VFMTok's
    checkpoints, holds the heads only and loads with plain strict ``load_state_dict``) and not in
    ``parameters()`` (so an optimiser over the discriminator never sees them). Unlike upstream,
    ``_apply`` is extended so ``.to(device)``, ``.cuda()``, ``.half()`` ... move it with the heads.
    It never trains: its parameters do not require grad and it stays in eval mode whatever
    ``train()`` is told, but it is differentiable, so gradients reach the input image (the generator's
    adversarial loss flows through it into the reconstruction).
    """

    def __init__(self, config: str | DiscriminatorConfig = "dino-s16") -> None:
        super().__init__()
        cfg = get_discriminator_config(config)
        self.config = cfg
        backbone = DinoViT(cfg).eval().requires_grad_(False)
        self._frozen: tuple[DinoViT] = (backbone,)
        self.heads = nn.ModuleList(make_head(cfg) for _ in range(cfg.num_activations))
        # ImageNet normalisation of [0, 1] images; not persistent, so the state dict stays heads-only.
        self.register_buffer("mean", torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_files(
        cls, dino: str, config: str | DiscriminatorConfig = "dino-s16", storage_options: Mapping | None = None
    ) -> DinoDiscriminator:
        """A discriminator with the DINO backbone read from ``dino`` (local path or fsspec URL) and fresh heads.

        ``dino`` is the flat ``dino_deitsmall16_pretrain.pth``, or one of DINO's full training
        checkpoints, whose ``teacher`` entry holds the backbone under ``backbone.`` next to the DINO
        projection head (which is dropped). Keys and shapes must match the backbone exactly. The k
        third of every qkv bias is zeroed after loading, as upstream does.
        """
        model = cls(config)
        state = ckpt.select_state_dict(ckpt.load_checkpoint(dino, storage_options), ("teacher", "model", "state_dict"), dino)
        if any(k.startswith(_WRAPPED_BACKBONE) for k in state):
            state = {k[len(_WRAPPED_BACKBONE) :]: v for k, v in state.items() if k.startswith(_WRAPPED_BACKBONE)}
        ckpt.load_strict(model.backbone, state, f"DINO weights ({dino})")
        model.backbone.zero_key_bias()
        return model

    @property
    def backbone(self) -> DinoViT:
        return self._frozen[0]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> DinoDiscriminator:
        super()._apply(fn, recurse)
        if recurse:
            self.backbone._apply(fn)
        return self

    def train(self, mode: bool = True) -> DinoDiscriminator:
        super().train(mode)
        self.backbone.eval()  # frozen: never in training mode
        return self

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> ImageNet-normalised (B, 3, S, S), S = ``image_size``.

        If H and W both exceed S, with probability ``crop_prob`` one random S x S window (the same
        for the whole batch) is taken; otherwise the image is area-resized to S. The choice and the
        offset are drawn on every call from torch's global CPU generator (only for inputs larger than
        S), so ``torch.manual_seed`` or ``torch.random.fork_rng`` make a call reproducible.
        """
        size = self.config.image_size
        h, w = x.shape[-2:]
        x = (x + 1) / 2
        if h > size and w > size and bool(torch.rand((), device="cpu") < self.config.crop_prob):
            top = int(torch.randint(0, h - size + 1, (), device="cpu"))
            left = int(torch.randint(0, w - size + 1, (), device="cpu"))
            x = x[..., top : top + size, left : left + size]
        else:
            x = F.interpolate(x, size=(size, size), mode="area")
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] -> the readout activations, each (B, dim, num_tokens)."""
        return self.backbone(self.preprocess(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> logits (B, num_logits), head by head.

        B must split into equal virtual batches (see :class:`BatchNormLocal`)."""
        b = x.shape[0]
        return torch.cat([head(act).view(b, -1) for head, act in zip(self.heads, self.features(x))], dim=1)

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"backbone=DINO ViT (dim={cfg.dim}, depth={cfg.depth}, patch={cfg.patch_size}, "
            f"image_size={cfg.image_size}; frozen, not in state_dict)"
        )
