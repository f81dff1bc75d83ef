"""The tokenizer objective, term by term, against independent computations on fixed inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vfmtok_core.config import QuantizerConfig
from vfmtok_core.discriminator import DinoDiscriminator
from vfmtok_core.lpips import LPIPS, LPIPS_WIDTHS
from vfmtok_core.quantizer import VectorQuantizer
from vfmtok_core.tokenizer import VFMTokenizer
from vfmtok_core.tokenizer_loss import (
    LossConfig, TokenizerLoss, hinge_d_loss, non_saturating_g_loss, reconstruction_loss, semantic_loss,
)


def test_gan_losses_by_formula():
    real = torch.tensor([[2.0, 0.5, -0.3], [1.0, -2.0, 0.0]])
    fake = torch.tensor([[-2.0, 0.25, 1.5], [-0.5, 3.0, -1.0]])
    r, f = real.numpy().ravel(), fake.numpy().ravel()
    hinge = 0.5 * (np.mean(np.maximum(0, 1 - r)) + np.mean(np.maximum(0, 1 + f)))
    assert hinge_d_loss(real, fake).item() == pytest.approx(hinge, rel=1e-6)
    assert non_saturating_g_loss(fake).item() == pytest.approx(np.mean(np.log1p(np.exp(-f))), rel=1e-6)


def test_reconstruction_is_two_mse_or_l1_plus_mse():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    mse = ((x - y) ** 2).mean().item()
    l1 = (x - y).abs().mean().item()
    assert reconstruction_loss(x, y, "l2").item() == pytest.approx(2 * mse, rel=1e-6)
    assert reconstruction_loss(x, y, "l1").item() == pytest.approx(l1 + mse, rel=1e-6)


def test_semantic_loss_is_one_minus_token_cosine_and_target_gets_no_gradient():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    target = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    p, t = pred.detach().numpy(), target.detach().numpy()
    cos = (p * t).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1))
    loss = semantic_loss(pred, target)
    assert loss.item() == pytest.approx(np.mean(1 - cos), rel=1e-5)
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None


def test_vq_terms_and_where_their_gradients_go():
    torch.manual_seed(0)
    vq = VectorQuantizer(QuantizerConfig(codebook_size=64, code_dim=4, usage_window=16))
    with torch.no_grad():
        vq.embedding.weight.normal_()  # spread codes, stored unnormalised on purpose
    z = torch.randn(3, 5, 4, requires_grad=True)
    out = vq(z)
    zn = F.normalize(z.detach(), dim=-1).numpy().reshape(-1, 4)
    book = vq.embedding.weight.detach().numpy()
    book = book / np.linalg.norm(book, axis=1, keepdims=True)
    codes = np.argmax(zn @ book.T, axis=1)
    err = np.mean((book[codes] - zn) ** 2)
    assert out.codes.flatten().tolist() == codes.tolist()
    assert out.codebook_loss.item() == pytest.approx(err, rel=1e-5)
    assert out.commit_loss.item() == pytest.approx(0.25 * err, rel=1e-5)
    # The codebook loss moves only the codebook, the commitment only the encoder's vectors.
    out.codebook_loss.backward(retain_graph=True)
    assert z.grad is None and vq.embedding.weight.grad.abs().sum() > 0
    vq.embedding.weight.grad = None
    out.commit_loss.backward()
    assert z.grad.abs().sum() > 0 and vq.embedding.weight.grad is None
    # Straight-through: the forward value is the code vector.
    assert np.allclose(out.quant.detach().numpy().reshape(-1, 4), book[codes], atol=1e-6)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tok = VFMTokenizer.from_config("tiny", seed=0).train()
    crit = TokenizerLoss(LossConfig(disc_start=5), LPIPS(widths=LPIPS_WIDTHS["tiny"]), DinoDiscriminator("tiny"))
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(3)) * 2 - 1
    return tok, crit, x


def test_total_is_the_weighted_sum_and_gan_terms_start_at_disc_start(setup):
    tok, crit, x = setup
    out = tok(x)
    before, t0 = crit.generator(x, out, step=4)
    expected = (t0["reconstruction"] + t0["perceptual"] + t0["codebook"] + t0["commit"] + t0["semantic"])
    assert before.item() == pytest.approx(expected.item(), rel=1e-5)
    assert t0["generator_adv"].item() == 0.0 and t0["adversarial_weight"].item() == 0.0
    after, t1 = crit.generator(x, out, step=5)
    assert t1["generator_adv"].item() > 0 and t1["adversarial_weight"].item() == 0.5
    assert after.item() == pytest.approx(expected.item() + 0.5 * t1["generator_adv"].item(), rel=1e-5)
    assert t1["perceptual"].item() > 0 and t1["semantic"].item() > 0

    weighted, d0 = crit.discriminator_step(x, out.reconstruction, step=4)
    assert weighted.item() == 0.0 and d0["disc"].item() > 0  # computed, logged, not applied
    weighted, d1 = crit.discriminator_step(x, out.reconstruction, step=5)
    assert weighted.item() == pytest.approx(0.5 * d1["disc"].item(), rel=1e-6)


def test_dinov2_gets_no_gradient_and_every_trained_part_does(setup):
    tok, crit, x = setup
    tok.zero_grad(set_to_none=True)
    loss, _ = crit.generator(x, tok(x), step=10)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in tok.dinov2.parameters())
    for part in (tok.encode_transformer, tok.pre_slots_quant, tok.post_slots_quant, tok.decode_transformer, tok.decoder):
        assert sum(float(p.grad.abs().sum()) for p in part.parameters() if p.grad is not None) > 0, part
    assert not any(p.requires_grad for p in crit.perceptual.parameters())
    # The generator's adversarial term reaches the decoder through the discriminator.
    assert any(p.grad is not None for p in crit.discriminator.parameters() if p.requires_grad)
