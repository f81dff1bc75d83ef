"""The tokenizer's training objective, as the official ``VQLoss`` computes it (spec section 6.1).

Generator side, one scalar per step::

    total = rec_w * (rec(x, x') + mse(x, x'))          # 2 x MSE by default ("l2"), L1 + MSE with "l1"
          + perc_w * mean(LPIPS(x, x'))
          + adv_w(step) * mean(softplus(-D(x')))     # non-saturating; adv_w = disc_w once step >= disc_start
          + codebook + commit                        # added unweighted (upstream ignores --codebook-weight)
          + mean(1 - cos(semantic, DINOv2 last))     # weight 1, hard-coded upstream

Discriminator side: ``adv_w(step) * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x')))`` on detached
images. Neither image is detached on the generator side, so the adversarial gradient reaches the
decoder through the discriminator; the semantic target is DINOv2's output and carries no gradient.
The adaptive GAN weight of VQGAN is off upstream, and so it is here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vfmtok_core.tokenizer import TokenizerOutput

RECONSTRUCTION = ("l2", "l1")


@dataclass(frozen=True)
class LossConfig:
    reconstruction: str = "l2"
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0
    disc_weight: float = 0.5
    disc_start: int = 20000

    def __post_init__(self) -> None:
        if self.reconstruction not in RECONSTRUCTION:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTION}, got {self.reconstruction!r}")

    def adversarial_weight(self, step: int) -> float:
        """The GAN terms' weight at ``step`` (0-based optimiser steps): 0 before ``disc_start``."""
        return self.disc_weight if step >= self.disc_start else 0.0


def reconstruction_loss(images: torch.Tensor, recon: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """``rec(x, x') + MSE(x, x')``: upstream always adds an MSE to the chosen loss, so "l2" is 2 x MSE."""
    first = F.mse_loss(recon, images) if kind == "l2" else F.l1_loss(recon, images)
    return first + F.mse_loss(recon, images)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_fake).mean()


def semantic_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` per token over channels (eps 1e-6), averaged over tokens and the batch."""
    return (1.0 - F.cosine_similarity(predicted.float(), target.detach().float(), dim=-1, eps=1e-6)).mean()


class TokenizerLoss(nn.Module):
    """The generator and discriminator losses, holding the frozen LPIPS network and the
    discriminator (whose heads are trained by the caller's second optimiser)."""

    def __init__(self, cfg: LossConfig, perceptual: nn.Module, discriminator: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.perceptual = perceptual
        self.discriminator = discriminator

    def generator(self, images: torch.Tensor, out: TokenizerOutput, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, every term unweighted and detached) for the tokenizer's optimiser step.

        Before ``disc_start`` the adversarial term is exactly zero and the discriminator's pass over
        the reconstruction is skipped (upstream runs it and multiplies by 0: same gradients, one
        discriminator forward and backward per step wasted)."""
        cfg = self.cfg
        recon = out.reconstruction
        rec = reconstruction_loss(images, recon, cfg.reconstruction)
        perceptual = self.perceptual(images, recon).mean()
        vq = out.codebook_loss + out.commit_loss
        semantic = semantic_loss(out.semantic, out.semantic_target)
        adv_w = cfg.adversarial_weight(step)
        g_adv = non_saturating_g_loss(self.discriminator(recon)) if adv_w else recon.new_zeros(())
        total = cfg.reconstruction_weight * rec + cfg.perceptual_weight * perceptual + adv_w * g_adv + vq + semantic
        terms = {
            "loss": total, "reconstruction": rec, "perceptual": perceptual, "generator_adv": g_adv,
            "codebook": out.codebook_loss, "commit": out.commit_loss, "semantic": semantic,
            "adversarial_weight": torch.tensor(adv_w),
        }
        return total, {k: v.detach().float() for k, v in terms.items()}

    def discriminator_step(self, images: torch.Tensor, recon: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted hinge loss, its terms and the mean logits) on detached images. It runs from the
        first step, as upstream does (weight 0 before ``disc_start``), so the logits are logged
        throughout and the spectral norms' power iterations advance as upstream's do."""
        logits_real = self.discriminator(images.detach())
        logits_fake = self.discriminator(recon.detach())
        d_loss = hinge_d_loss(logits_real, logits_fake)
        weighted = self.cfg.adversarial_weight(step) * d_loss
        terms = {"disc": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return weighted, {k: v.detach().float() for k, v in terms.items()}
