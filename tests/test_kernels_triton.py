"""Triton kernels against their PyTorch references, run on the CPU in Triton's interpreter
(``TRITON_INTERPRET=1``, set in conftest). Tolerances: fp32 outputs and value/weight gradients
within 1e-5, location gradients (scaled by the map size) within 1e-4 relative; bf16/fp16 within
half an output ulp of the fp32 reference computed on the same rounded inputs."""

from __future__ import annotations

import pytest
import torch

import kernels

SHAPES = torch.tensor([[5, 7], [3, 4], [2, 2]])
STARTS = torch.tensor([0, 35, 47])


def _inputs(n=2, m=2, d=8, lq=10, points=2, seed=0, dtype=torch.float32, shapes=SHAPES, starts=STARTS):
    g = torch.Generator().manual_seed(seed)
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    levels = shapes.shape[0]
    value = torch.randn(n, s, m, d, generator=g).to(dtype)
    # Locations from -0.3 to 1.3: many taps fall partly or wholly outside the maps.
    loc = (torch.rand(n, lq, m, levels, points, 2, generator=g) * 1.6 - 0.3).to(dtype)
    attn = torch.rand(n, lq, m, levels * points, generator=g).softmax(-1).view(n, lq, m, levels, points).to(dtype)
    return value, shapes, starts, loc, attn


def _both(value, shapes, starts, loc, attn, grad=True):
    outs = []
    for backend in ("torch", "triton"):
        args = [t.detach().clone().requires_grad_(grad) for t in (value, loc, attn)]
        out = kernels.ms_deform_attn(args[0], shapes, starts, args[1], args[2], backend=backend)
        grads = None
        if grad:
            go = torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype)
            grads = torch.autograd.grad(out, args, go)
        outs.append((out, grads))
    return outs


def test_forward_and_gradients_match_reference():
    (ref, gref), (tri, gtri) = _both(*_inputs())
    torch.testing.assert_close(tri, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gtri[0], gref[0], atol=1e-5, rtol=1e-5)  # value
    torch.testing.assert_close(gtri[1], gref[1], atol=1e-4, rtol=1e-4)  # locations (x W, x H)
    torch.testing.assert_close(gtri[2], gref[2], atol=1e-5, rtol=1e-5)  # attention weights


def test_vfmtok_layout_single_level_size():
    shapes = torch.tensor([[6, 6]] * 4)
    starts = torch.tensor([0, 36, 72, 108, 144])  # L+1 entries, as VFMTok passes
    (ref, gref), (tri, gtri) = _both(*_inputs(n=1, m=2, d=16, lq=9, points=4, shapes=shapes, starts=starts))
    torch.testing.assert_close(tri, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(gtri, gref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch", [1, 63, 65, 130])
def test_any_batch_size(batch):
    shapes, starts = torch.tensor([[3, 3]]), torch.tensor([0])
    (ref, _), (tri, _) = _both(*_inputs(n=batch, m=1, d=4, lq=3, points=1, shapes=shapes, starts=starts), grad=False)
    torch.testing.assert_close(tri, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_fp32(dtype):
    value, shapes, starts, loc, attn = _inputs(dtype=dtype)
    out = kernels.ms_deform_attn(value, shapes, starts, loc, attn, backend="triton")
    assert out.dtype == dtype
    ref = kernels.ms_deform_attn(value.float(), shapes, starts, loc.float(), attn.float(), backend="torch")
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert ((out.float() - ref).abs() <= ref.abs() * ulp + 1e-6).all()
    v, l, a = (t.clone().requires_grad_() for t in (value, loc, attn))
    kernels.ms_deform_attn(v, shapes, starts, l, a, backend="triton").float().sum().backward()
    assert v.grad.dtype == dtype and l.grad.dtype == dtype and torch.isfinite(l.grad.float()).all()


def test_codebook_lookup_matches_reference_with_ties_and_ragged_sizes():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 77, 12, generator=g)
    codebook = torch.randn(1500, 12, generator=g) * 3  # stored codes need not be unit-norm
    codebook[700] = codebook[3] * 2  # an exact tie after normalisation: the lower index wins
    z[0, 0] = codebook[3]
    ref = kernels.codebook_lookup(z, codebook, backend="torch")
    tri = kernels.codebook_lookup(z, codebook, backend="triton")
    assert tri.shape == (3, 77) and tri.dtype == torch.long
    assert torch.equal(tri, ref) and tri[0, 0] == 3


def test_tokenizer_codes_unchanged_with_triton_kernels():
    from vfmtok_core import VFMTokenizer

    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = VFMTokenizer.from_config("tiny", seed=0, backend="torch").encode(x)
    tri = VFMTokenizer.from_config("tiny", seed=0, backend="triton").encode(x)
    assert torch.equal(ref, tri)


@pytest.mark.slow
def test_golden_codes_with_triton_kernels(golden_files, golden_inputs):
    """The official config on the golden weights, every deformable layer and the quantiser in Triton."""
    from tests.golden import load_npz
    from vfmtok_core import VFMTokenizer

    tok = VFMTokenizer.from_pretrained(
        tokenizer=str(golden_files / "vfmtok-tokenizer.pt"),
        dinov2=str(golden_files / "dinov2_vitl14_reg4_pretrain.pth"),
        backend="triton",
    )
    assert torch.equal(tok.encode(golden_inputs[0]), torch.from_numpy(load_npz("expected_tokenizer")["codes"]))


def test_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    value, shapes, starts, loc, attn = _inputs()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.ms_deform_attn(value, shapes, starts, loc, attn, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.codebook_lookup(torch.zeros(2, 12), torch.ones(3, 12), backend="triton")
    # "auto" stays on the reference for CPU tensors.
    assert kernels.codebook_lookup(torch.ones(2, 12), torch.ones(3, 12), backend="auto").tolist() == [0, 0]
