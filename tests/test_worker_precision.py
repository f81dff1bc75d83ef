"""The tokenizer actor's precision: ``auto`` resolved where the device is known, TF32 set only
around the forward, and CPU tokens bitwise equal to fp32 ``VFMTokenizer.encode``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.producer.images import decode_image, make_variants, source_crops
from pipelines.producer.precision import fp32_math, resolve_precision
from pipelines.producer.worker import TokenizerSpec, TokenizerWorker
from tests.pipeline_data import jpeg_bytes
from vfmtok_core import VFMTokenizer
from vfmtok_core.preprocess import to_tensor


@pytest.mark.parametrize(
    "asked, device, resolved",
    [
        ("auto", "cpu", "fp32"),
        ("auto", "cuda", "bf16"),
        ("auto", "cuda:1", "bf16"),
        ("tf32", "cpu", "fp32"),
        ("tf32", "cuda", "tf32"),
        ("fp32", "cuda", "fp32"),
        ("bf16", "cpu", "bf16"),
    ],
)
def test_resolve_precision(asked, device, resolved):
    assert resolve_precision(asked, device) == resolved


def test_unknown_precision_fails_on_the_driver():
    with pytest.raises(ValueError, match="precision must be one of"):
        TokenizerSpec(precision="fp16")


def test_tf32_only_inside_the_scope():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    with fp32_math("tf32"):
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    assert (matmul.fp32_precision, conv.fp32_precision) == before
    with pytest.raises(RuntimeError), fp32_math("fp32"):
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        raise RuntimeError("forward failed")
    assert (matmul.fp32_precision, conv.fp32_precision) == before


@pytest.mark.parametrize("precision", ["auto", "tf32"])
def test_cpu_worker_tokens_equal_fp32_encode(precision):
    worker = TokenizerWorker(TokenizerSpec("tiny", precision=precision), batch_size=6, threads=0)
    assert worker.info()["precision"] == "fp32" and worker.info()["device"] == "cpu"
    variants = ("center", "flip")
    images = [decode_image(jpeg_bytes(i, size=(150 + 10 * i, 120))) for i in range(5)]  # 3 per forward: 3 + 2
    crops = [source_crops(img, 112, variants) for img in images]
    tokens = worker.encode({k: np.stack([c[k] for c in crops]) for k in crops[0]}, variants)

    tok = VFMTokenizer.from_config("tiny", seed=0)
    expected = np.stack([tok.encode(to_tensor(make_variants(img, 112, variants))).numpy() for img in images])
    assert tokens.dtype == np.uint16 and tokens.shape == (5, 2, 256)
    np.testing.assert_array_equal(tokens, expected)
