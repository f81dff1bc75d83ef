"""The DINO discriminator: state-dict layout, BatchNormLocal, readouts, input handling, gradients, loading."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from vfmtok_core.checkpoint import CheckpointError
from vfmtok_core.discriminator import (
    BatchNormLocal,
    DinoDiscriminator,
    get_discriminator_config,
)

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


def tiny(seed: int = 0) -> DinoDiscriminator:
    torch.manual_seed(seed)
    return DinoDiscriminator("tiny")


def images(b: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def normalise(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2 - MEAN) / STD


# ------------------------------------------------------------------------------ 1. official layout
def test_default_layout_parameter_count_and_output_shape():
    torch.manual_seed(0)
    disc = DinoDiscriminator("dino-s16")
    state = disc.state_dict()
    head0 = {k: tuple(v.shape) for k, v in state.items() if k.startswith("heads.0.")}
    expected = {
        "heads.0.0.0.weight_orig": (384, 384, 1),
        "heads.0.0.0.bias": (384,),
        "heads.0.0.0.weight_u": (384,),
        "heads.0.0.0.weight_v": (384,),
        "heads.0.0.1.weight": (384,),
        "heads.0.0.1.bias": (384,),
        "heads.0.1.fn.0.weight_orig": (384, 384, 9),
        "heads.0.1.fn.0.bias": (384,),
        "heads.0.1.fn.0.weight_u": (384,),
        "heads.0.1.fn.0.weight_v": (3456,),
        "heads.0.1.fn.1.weight": (384,),
        "heads.0.1.fn.1.bias": (384,),
        "heads.0.2.weight_orig": (1, 384, 1),
        "heads.0.2.bias": (1,),
        "heads.0.2.weight_u": (1,),
        "heads.0.2.weight_v": (384,),
    }
    assert sorted(head0) == sorted(expected)
    assert head0 == expected
    assert len(state) == 5 * len(expected)
    assert all(k.startswith("heads.") for k in state), "only the heads belong in the state dict"
    assert not any("backbone" in k for k in state)

    trainable = sum(p.numel() for p in disc.parameters() if p.requires_grad)
    assert trainable == 5 * 1_477_249 == 7_386_245
    assert not any(p.requires_grad for p in disc.backbone.parameters())

    disc.eval()
    with torch.no_grad():
        logits = disc(images(2, 336))
    assert logits.shape == (2, 980)
    assert torch.isfinite(logits).all()


def test_config_lookup_and_validation():
    cfg = get_discriminator_config("tiny")
    assert get_discriminator_config(cfg) is cfg
    assert (cfg.num_tokens, cfg.num_logits) == (16, 80)
    assert get_discriminator_config("dino-s16").num_logits == 980
    with pytest.raises(KeyError, match="unknown discriminator config"):
        get_discriminator_config("nope")
    with pytest.raises(ValueError, match="readout_blocks"):
        type(cfg)(depth=4, readout_blocks=(0, 4))


# ---------------------------------------------------------------------------- 2. BatchNormLocal
def test_batchnormlocal_matches_per_group_formula():
    g = torch.Generator().manual_seed(0)
    b, c, length, eps = 16, 5, 7, 1e-6
    x = torch.randn(b, c, length, generator=g, dtype=torch.float64).float() * 3 + 1
    bn = BatchNormLocal(c, virtual_bs=8, eps=eps)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g))

    expected = torch.empty(b, c, length, dtype=torch.float64)
    xd = x.double()
    for group in range(2):  # ceil(16 / 8) groups of 8 consecutive samples
        rows = slice(group * 8, (group + 1) * 8)
        for ch in range(c):
            vals = xd[rows, ch, :]
            n = vals.numel()
            mean = vals.sum() / n
            var = ((vals - mean) ** 2).sum() / n  # biased
            expected[rows, ch, :] = (vals - mean) / math.sqrt(var + eps) * bn.weight[ch].item() + bn.bias[ch].item()

    for mode in (True, False):  # no running statistics: identical in train and eval
        bn.train(mode)
        torch.testing.assert_close(bn(x).double(), expected, rtol=1e-5, atol=1e-5)

    # Group 1's samples never reach group 0's output.
    changed = x.clone()
    changed[8:] = torch.randn(8, c, length, generator=g) * 10 - 4
    assert torch.equal(bn(changed)[:8], bn(x)[:8])
    assert not torch.allclose(bn(changed)[8:], bn(x)[8:])


def test_batchnormlocal_rejects_uneven_groups():
    bn = BatchNormLocal(4, virtual_bs=8)
    assert bn(torch.randn(12, 4, 3)).shape == (12, 4, 3)  # two groups of 6
    with pytest.raises(ValueError, match="batch 9 cannot be split into 2 equal groups"):
        bn(torch.randn(9, 4, 3))


def test_head_matches_formula():
    """conv1x1 -> BN -> LeakyReLU -> (circular conv9 -> BN -> LeakyReLU + x) / sqrt 2 -> conv1x1,
    every conv weight divided by its spectral-norm estimate u . W v (eval: no power iteration)."""
    disc = tiny(0).eval()
    head = disc.heads[0]
    state = head.state_dict()
    x = torch.randn(16, 64, 16)

    def sn_weight(prefix: str) -> torch.Tensor:
        w = state[f"{prefix}.weight_orig"]
        sigma = state[f"{prefix}.weight_u"] @ (w.reshape(w.shape[0], -1) @ state[f"{prefix}.weight_v"])
        return w / sigma

    def bn(h: torch.Tensor, prefix: str) -> torch.Tensor:
        g = h.reshape(2, 8, *h.shape[1:])  # two virtual batches of 8
        mean = g.mean(dim=(1, 3), keepdim=True)
        var = ((g - mean) ** 2).mean(dim=(1, 3), keepdim=True)
        g = (g - mean) / torch.sqrt(var + 1e-6)
        return g.reshape(h.shape) * state[f"{prefix}.weight"][:, None] + state[f"{prefix}.bias"][:, None]

    with torch.no_grad():
        h = F.leaky_relu(bn(F.conv1d(x, sn_weight("0.0"), state["0.0.bias"]), "0.1"), 0.2)
        r = F.conv1d(F.pad(h, (4, 4), mode="circular"), sn_weight("1.fn.0"), state["1.fn.0.bias"])
        h = (F.leaky_relu(bn(r, "1.fn.1"), 0.2) + h) / math.sqrt(2)
        expected = F.conv1d(h, sn_weight("2"), state["2.bias"])
        torch.testing.assert_close(head(x), expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------- 3. readouts
def test_readout_activations_from_backbone_pieces():
    disc = tiny(0).eval()
    bb = disc.backbone
    x = images(2, 64)  # the tiny backbone's own size: the area resize is the identity
    with torch.no_grad():
        acts = disc.features(x)
        xn = normalise(x)
        patches = F.conv2d(xn, bb.patch_embed.proj.weight, bb.patch_embed.proj.bias, stride=16)
        patches = patches.flatten(2).transpose(1, 2)
        tokens = torch.cat([bb.cls_token.expand(2, -1, -1), patches], dim=1) + bb.pos_embed
        after0 = bb.blocks[0](tokens)

    assert len(acts) == 5
    assert all(a.shape == (2, 64, 16) for a in acts)
    expected0 = (tokens[:, 1:] + tokens[:, 0:1]).transpose(1, 2)
    torch.testing.assert_close(acts[0], expected0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acts[1], (after0[:, 1:] + after0[:, :1]).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_block_is_prenorm_with_tanh_gelu():
    disc = tiny(0)
    blk = disc.backbone.blocks[0]
    x = torch.randn(2, 17, 64)
    heads, hd = 2, 32
    with torch.no_grad():
        h = F.layer_norm(x, (64,), blk.norm1.weight, blk.norm1.bias, eps=1e-6)
        q, k, v = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).split(64, dim=-1)
        q, k, v = (t.view(2, 17, heads, hd).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        x1 = x + att.transpose(1, 2).reshape(2, 17, 64) @ blk.attn.proj.weight.T + blk.attn.proj.bias
        h = F.layer_norm(x1, (64,), blk.norm2.weight, blk.norm2.bias, eps=1e-6)
        hid = h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
        gelu_tanh = 0.5 * hid * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hid + 0.044715 * hid**3)))
        expected = x1 + gelu_tanh @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
        torch.testing.assert_close(blk(x), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- 4. input handling
def test_same_seed_same_logits():
    disc = tiny(0).eval()
    x = images(2, 96)
    with torch.no_grad():
        torch.manual_seed(123)
        a = disc(x)
        torch.manual_seed(123)
        b = disc(x)
    assert torch.equal(a, b)


def test_large_inputs_are_cropped_or_resized_at_random():
    disc = tiny(0).eval()
    x = images(2, 72)  # 9 x 9 possible 64 x 64 windows
    resized = normalise(F.interpolate(x, size=(64, 64), mode="area"))
    xn = normalise(x)
    windows = {(t, l): xn[..., t : t + 64, l : l + 64] for t in range(9) for l in range(9)}
    crop_seeds: dict[int, tuple[int, int]] = {}
    resize_seeds: list[int] = []
    for seed in range(60):
        torch.manual_seed(seed)
        out = disc.preprocess(x)
        assert out.shape == (2, 3, 64, 64)
        if torch.allclose(out, resized, atol=1e-5):
            resize_seeds.append(seed)
            continue
        # Otherwise one window, at the same offset for every image of the batch.
        hits = [tl for tl, w in windows.items() if torch.allclose(out, w, atol=1e-5)]
        assert hits, f"seed {seed}: neither the resize nor a 64x64 window"
        crop_seeds[seed] = hits[0]
    assert len(crop_seeds) >= 15 and len(resize_seeds) >= 15, (len(crop_seeds), len(resize_seeds))
    assert len(set(crop_seeds.values())) > 5, "crop offsets should vary between calls"

    # The logits follow: a resize-branch call equals the logits of the resized image, a crop-branch
    # call those of its window (images of at most 64 px are only ever resized, here by the identity).
    seed, (t, l) = next(iter(crop_seeds.items()))
    with torch.no_grad():
        torch.manual_seed(resize_seeds[0])
        torch.testing.assert_close(disc(x), disc(F.interpolate(x, size=(64, 64), mode="area")), rtol=1e-4, atol=1e-4)
        torch.manual_seed(seed)
        cropped = disc(x)
        torch.testing.assert_close(cropped, disc(x[..., t : t + 64, l : l + 64]), rtol=1e-4, atol=1e-4)
        torch.manual_seed(resize_seeds[0])
        assert not torch.allclose(cropped, disc(x), atol=1e-3)


def test_small_inputs_are_always_resized():
    disc = tiny(0).eval()
    for size in (64, 48):
        x = images(2, size)
        with torch.no_grad():
            torch.manual_seed(1)
            a = disc(x)
            torch.manual_seed(2)
            b = disc(x)
        assert torch.equal(a, b)
        expected = normalise(F.interpolate(x, size=(64, 64), mode="area"))
        torch.testing.assert_close(disc.preprocess(x), expected)


# ------------------------------------------------------------------------------- 5. gradients
def test_gradients_reach_the_input_not_the_backbone():
    disc = tiny(0).train()
    x = images(2, 96).requires_grad_(True)
    F.softplus(-disc(x)).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for p in disc.backbone.parameters():
        assert not p.requires_grad and p.grad is None
    for name, p in disc.named_parameters():
        assert p.requires_grad and p.grad is not None, name
    assert all(p.grad.abs().sum() > 0 for p in disc.heads.parameters())

    assert disc.training and not disc.backbone.training
    disc.train(True)
    assert not any(m.training for m in disc.backbone.modules())
    disc.requires_grad_(True)  # backbone is outside the module tree: still frozen
    assert not any(p.requires_grad for p in disc.backbone.parameters())


def test_backbone_follows_dtype_moves():
    disc = tiny(0).double()
    assert all(p.dtype == torch.float64 for p in disc.backbone.parameters())
    assert disc.mean.dtype == torch.float64
    with torch.no_grad():
        assert disc.eval()(images(2, 64).double()).dtype == torch.float64


# ---------------------------------------------------------------------------------- 6. loading
def _dino_file_state(seed: int) -> dict[str, torch.Tensor]:
    """A flat DINO-layout state dict with random, non-zero qkv biases."""
    src = tiny(seed)
    state = {k: v.clone() for k, v in src.backbone.state_dict().items()}
    for k in state:
        if k.endswith("attn.qkv.bias"):
            state[k].normal_()
    return state


def test_from_files_round_trip_and_key_bias(tmp_path):
    state = _dino_file_state(5)
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(state, path)

    disc = DinoDiscriminator.from_files(str(path), config="tiny")
    loaded = disc.backbone.state_dict()
    assert sorted(loaded) == sorted(state)
    for k, v in state.items():
        if k.endswith("attn.qkv.bias"):
            assert torch.equal(loaded[k][:64], v[:64]) and torch.equal(loaded[k][128:], v[128:])
            assert torch.equal(loaded[k][64:128], torch.zeros(64)), "k-bias must be zeroed"
        else:
            assert torch.equal(loaded[k], v), k
    assert state["blocks.0.attn.qkv.bias"][64:128].abs().sum() > 0, "the caller's tensors are untouched"
    assert not any(p.requires_grad for p in disc.backbone.parameters())

    # DINO's full checkpoints: teacher weights under ``backbone.`` next to the projection head.
    wrapped = {f"backbone.{k}": v for k, v in state.items()} | {"head.last_layer.weight_g": torch.ones(8, 1)}
    full = tmp_path / "dino_deitsmall16_full_checkpoint.pth"
    torch.save({"teacher": wrapped, "student": {f"module.{k}": v for k, v in wrapped.items()}, "epoch": 100}, full)
    from_full = DinoDiscriminator.from_files(str(full), config="tiny")
    for k, v in from_full.backbone.state_dict().items():
        assert torch.equal(v, loaded[k]), k

    broken = dict(state)
    del broken["blocks.1.mlp.fc2.bias"]
    bad = tmp_path / "missing_key.pth"
    torch.save(broken, bad)
    with pytest.raises(CheckpointError, match=re.escape(str(bad)) + ".*blocks.1.mlp.fc2.bias"):
        DinoDiscriminator.from_files(str(bad), config="tiny")


def test_heads_only_state_dict_round_trip(tmp_path):
    torch.save(_dino_file_state(5), tmp_path / "dino.pth")
    src = DinoDiscriminator.from_files(str(tmp_path / "dino.pth"), config="tiny")
    x = images(2, 96)
    src.train()
    src(x)  # a training step's power iteration moves the spectral-norm vectors away from init
    saved = tmp_path / "disc.pt"
    torch.save(src.state_dict(), saved)

    torch.manual_seed(99)  # different head initialisation
    dst = DinoDiscriminator.from_files(str(tmp_path / "dino.pth"), config="tiny")
    dst.load_state_dict(torch.load(saved, weights_only=True))  # strict: heads only on both sides
    src.eval()
    dst.eval()
    with torch.no_grad():
        torch.manual_seed(7)
        a = src(x)
        torch.manual_seed(7)
        b = dst(x)
    assert torch.equal(a, b)
