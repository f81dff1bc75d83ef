"""LlamaGen's class-conditional GPT (as used by VFMTok), with a static KV cache for sampling.

One model definition serves every size (GPT-B ... GPT-3B, plus GPT-tiny for tests). Parameter
names equal the official ``autoregressive/models/gpt.py`` ones, so released ``GPT-*.pt`` files
load strictly. Quirks the released weights depend on are kept and marked where they occur.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from vfmtok_core import checkpoint as ckpt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTConfig:
    name: str = "GPT-B"
    n_layer: int = 12
    n_head: int = 12
    dim: int = 768
    vocab_size: int = 16384
    block_size: int = 256  # image tokens per sample: a 16 x 16 grid
    num_classes: int = 1000  # plus one null class (index num_classes) for classifier-free guidance
    class_dropout: float = 0.1
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    multiple_of: int = 256

    def __post_init__(self) -> None:
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if (self.dim // self.n_head) % 4:
            raise ValueError("head_dim must be a multiple of 4 for the 2D rotary embedding")
        side = int(round(self.block_size**0.5))
        if side * side != self.block_size:
            raise ValueError(f"block_size must be a square grid, got {self.block_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        return -(-hidden // self.multiple_of) * self.multiple_of

    @property
    def null_class(self) -> int:
        return self.num_classes


GPT_CONFIGS: dict[str, GPTConfig] = {
    c.name: c
    for c in (
        GPTConfig("GPT-tiny", n_layer=2, n_head=4, dim=64, multiple_of=32),
        GPTConfig("GPT-B", n_layer=12, n_head=12, dim=768),
        GPTConfig("GPT-L", n_layer=24, n_head=16, dim=1024),
        GPTConfig("GPT-XL", n_layer=36, n_head=20, dim=1280),
        GPTConfig("GPT-XXL", n_layer=48, n_head=24, dim=1536),
        GPTConfig("GPT-2B", n_layer=48, n_head=32, dim=1920),
        GPTConfig("GPT-3B", n_layer=24, n_head=32, dim=3200),
    )
}


def gpt_config(size: str | GPTConfig, **overrides) -> GPTConfig:
    if isinstance(size, GPTConfig):
        return dataclasses.replace(size, **overrides) if overrides else size
    if size not in GPT_CONFIGS:
        raise KeyError(f"unknown GPT size {size!r}; known: {', '.join(GPT_CONFIGS)}")
    return dataclasses.replace(GPT_CONFIGS[size], **overrides)


def rope_2d_table(grid: int, head_dim: int, base: float, prefix: int = 1) -> torch.Tensor:
    """(prefix + grid^2, head_dim/2, 2) cos/sin table of LlamaGen's 2D rotary embedding.

    The first quarter of the rotation pairs turns with the row index, the second with the column.
    The class-token rows are all zeros (cos = sin = 0, not an identity rotation), which zeroes the
    class token's q and k in every layer; the released weights were trained with this.
    """
    quarter = head_dim // 4
    freqs = 1.0 / base ** (torch.arange(0, head_dim // 2, 2)[:quarter].float() / (head_dim // 2))
    t = torch.arange(grid, dtype=torch.float32)
    ang = torch.outer(t, freqs)  # (grid, quarter)
    rows = ang[:, None, :].expand(grid, grid, quarter)
    cols = ang[None, :, :].expand(grid, grid, quarter)
    angles = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim // 2)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)
    return torch.cat([torch.zeros(prefix, head_dim // 2, 2), table])


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2j, 2j+1) of x (B, T, H, D) by the table rows (T, D/2, 2), in fp32."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    even, odd = xf[..., 0], xf[..., 1]
    out = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    return out.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache(nn.Module):
    """Static per-layer cache (B, H, max_len, D), written in place at the given positions.

    Attention always reads the whole cache under a position mask, so every decode step has the
    same shapes (what ``torch.compile`` and CUDA graphs need); unwritten slots are masked out.
    """

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        shape = (batch, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, positions, k.to(self.k.dtype))
        self.v.index_copy_(2, positions, v.to(self.v.dtype))
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, C). ``positions`` (T,) are the cache slots of x, or None to run without a cache."""
        b, t, c = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.n_head, self.head_dim).unbind(2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        if positions is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = self.kv_cache.update(positions, k, v)
            # Query at position p sees cache slots <= p.
            mask = torch.arange(k.shape[2], device=x.device)[None, :] <= positions[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, t, c)))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, positions)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class table with one extra null row; in training, labels drop to null with ``dropout`` probability."""

    def __init__(self, num_classes: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class GPT(nn.Module):
    """Class-conditional autoregressive transformer over image token grids."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        grid = int(round(cfg.block_size**0.5))
        self.register_buffer("rope", rope_2d_table(grid, cfg.head_dim, cfg.rope_base), persistent=False)
        self.activation_checkpointing = False  # recompute each block in backward (see forward)
        self._init_weights()

    def _apply(self, fn, recurse: bool = True):
        """Keep the rotary table in float32 when the model is cast (e.g. ``.to(torch.bfloat16)``),
        as upstream does by not registering it: bf16 angles would be off by up to a degree."""
        super()._apply(fn, recurse)
        if self.rope.dtype != torch.float32:
            grid = int(round(self.config.block_size**0.5))
            self.rope = rope_2d_table(grid, self.config.head_dim, self.config.rope_base).to(self.rope.device)
        return self

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.output.weight)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, size: str | GPTConfig = "GPT-tiny", seed: int = 0, **overrides) -> "GPT":
        """Randomly initialised model (deterministic for a seed); ``overrides`` edit the size's config."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(gpt_config(size, **overrides))
        return model.eval()

    @classmethod
    def from_pretrained(
        cls, path: str, size: str | GPTConfig = "GPT-B", storage_options: Mapping | None = None, **overrides
    ) -> "GPT":
        """Load a released or trained checkpoint (``ema``, ``model``, ``module``, ``state_dict`` or raw).

        The vocabulary and class count are read from the file's tables (a GPT trained on another
        tokenizer has another vocabulary); depth and width must match ``size``.
        """
        state = ckpt.select_state_dict(
            ckpt.load_checkpoint(path, storage_options), ("ema", "model", "module", "state_dict"), path
        )
        state = {k: v for k, v in state.items() if k != "freqs_cis" and ".kv_cache." not in k}
        if "tok_embeddings.weight" in state:
            overrides.setdefault("vocab_size", state["tok_embeddings.weight"].shape[0])
        if "cls_embedding.embedding_table.weight" in state:
            overrides.setdefault("num_classes", state["cls_embedding.embedding_table.weight"].shape[0] - 1)
        cfg = gpt_config(size, **overrides)
        model = cls(cfg)
        try:
            ckpt.check_state_dict(model.state_dict(), state, f"GPT weights ({path})")
        except ckpt.CheckpointError as e:
            guess = guess_size(state)
            hint = f"; the file looks like {guess}" if guess and guess != cfg.name else ""
            raise ckpt.CheckpointError(f"{e} [model size {cfg.name}{hint}]") from None
        model.load_state_dict(state, strict=False)
        return model.eval()

    # ------------------------------------------------------------------ forward
    def forward(self, labels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) float32; logits[:, i] predicts codes[:, i] from the class and codes[:, :i]."""
        b, t = codes.shape
        if t > self.config.block_size:
            raise ValueError(f"at most {self.config.block_size} codes per sample, got {t}")
        x = torch.cat([self.cls_embedding(labels)[:, None], self.tok_embeddings(codes[:, : t - 1])], dim=1)
        x = self.tok_dropout(x)
        rope = self.rope[:t]
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # Activations of a block are recomputed in the backward pass instead of kept: memory
                # per block drops to its input. The RNG state is restored for the recompute, so
                # dropout draws the same masks and the gradients are those of the plain pass.
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, None, use_reentrant=False)
            else:
                x = layer(x, rope, None)
        return self.output(self.norm(x)).float()

    # ------------------------------------------------------------------ cached decoding
    def setup_cache(self, batch: int, dtype: torch.dtype | None = None) -> None:
        """Allocate a static KV cache for ``batch`` sequences of 1 + block_size positions."""
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = self.tok_embeddings.weight.device
        for layer in self.layers:
            att = layer.attention
            att.kv_cache = KVCache(batch, att.n_head, self.config.block_size + 1, att.head_dim, dtype, device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    def step(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run embeddings x (B, T, C) at cache positions (T,); returns last-position logits (B, V) float32."""
        rope = self.rope[positions]
        for layer in self.layers:
            x = layer(x, rope, positions)
        return self.output(self.norm(x[:, -1])).float()

    def prefill(self, labels: torch.Tensor) -> torch.Tensor:
        """Feed the class tokens at position 0; logits (B, V) for the first image token."""
        positions = torch.zeros(1, dtype=torch.long, device=labels.device)
        return self.step(self.cls_embedding(labels)[:, None], positions)

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Feed tokens (B,) at sequence position ``pos`` (a 1-element LongTensor, 1 ... block_size-1)."""
        return self.step(self.tok_embeddings(tokens)[:, None], pos)


def guess_size(state: Mapping[str, torch.Tensor]) -> str | None:
    """Name the registered size whose layer count and width match a state dict, if any."""
    emb = state.get("tok_embeddings.weight")
    if emb is None:
        return None
    n_layer = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    for cfg in GPT_CONFIGS.values():
        if cfg.dim == emb.shape[1] and cfg.n_layer == n_layer:
            return cfg.name
    return None
