"""Sampling from the class-conditional GPT with a static KV cache and classifier-free guidance."""

from __future__ import annotations

import torch

from vfmtok_core.gpt import GPT


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and outside the smallest nucleus of mass top_p.

    The nucleus always keeps the most likely token and the first one that crosses ``top_p``.
    """
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum > top_p
        drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of logits (B, V)."""
    logits = filter_logits(logits / max(temperature, 1e-5), top_k, top_p)
    if greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT,
    labels: torch.Tensor,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    decode_fn=None,
) -> torch.Tensor:
    """Generate a full token grid per label -> LongTensor (B, block_size).

    With ``cfg_scale > 1`` the conditional and unconditional (null class) rows run as one batch of
    2B and the logits are ``u + cfg_scale * (c - u)``; otherwise only the conditional rows run.
    The same ``generator`` seed gives the same tokens. ``decode_fn`` replaces ``model.decode``
    (e.g. a ``torch.compile``-d version of it, see :func:`compiled_decode`).
    """
    decode = decode_fn or model.decode
    cfg = model.config
    labels = labels.to(model.tok_embeddings.weight.device).long()
    b = labels.shape[0]
    guided = cfg_scale > 1.0
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, cfg.null_class)])

    def guide(logits: torch.Tensor) -> torch.Tensor:
        if not guided:
            return logits
        cond, uncond = logits[:b], logits[b:]
        return uncond + (cond - uncond) * cfg_scale

    def pick(logits: torch.Tensor) -> torch.Tensor:
        return sample_token(guide(logits), temperature, top_k, top_p, greedy, generator)

    out = torch.empty(b, cfg.block_size, dtype=torch.long, device=labels.device)
    was_training = model.training
    model.eval()
    model.setup_cache(labels.shape[0])
    try:
        out[:, 0] = pick(model.prefill(labels))
        for pos in range(1, cfg.block_size):
            tok = out[:, pos - 1]
            position = torch.full((1,), pos, dtype=torch.long, device=labels.device)
            out[:, pos] = pick(decode(torch.cat([tok, tok]) if guided else tok, position))
    finally:
        model.clear_cache()
        model.train(was_training)
    return out


def compiled_decode(model: GPT):
    """``model.decode`` compiled for repeated static-shape decode steps (worth it on a GPU).

    Every step has the same shapes (a fixed-size cache read under a mask), so one graph serves
    all 255 steps; "reduce-overhead" mode replays it as a CUDA graph.
    """
    mode = "reduce-overhead" if model.tok_embeddings.weight.is_cuda else "default"
    return torch.compile(model.decode, mode=mode, dynamic=False)
