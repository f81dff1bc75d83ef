"""Training utilities for the GPT: the upstream optimiser recipe and an EMA of the weights."""

from __future__ import annotations

import torch
from torch import nn


def adamw(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (tensors of 2+ dims), as upstream."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


class EMA:
    """Exponential moving average of a model's parameters (buffers untouched), kept in fp32.

    Built from the parameters as they are after wrapping: under FSDP they are sharded DTensors and
    the average stays sharded the same way, so it costs no communication per step. Its state dict
    holds full tensors under the model's own parameter names (``GPT.from_pretrained`` loads it).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            self.params[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full CPU tensors (a collective call under FSDP: every rank must make it)."""
        return {k: (v.full_tensor() if _is_dtensor(v) else v).cpu() for k, v in self.params.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, t in self.params.items():
            full = state[name].to(torch.float32)
            if _is_dtensor(t):
                from torch.distributed.tensor import distribute_tensor

                t.copy_(distribute_tensor(full.to(t.device_mesh.device_type), t.device_mesh, t.placements))
            else:
                t.copy_(full)
