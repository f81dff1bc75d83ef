"""Shared fixtures: the official-config tokenizer loaded with the golden recipe weights."""

from __future__ import annotations

import os

# Triton kernels run on the CPU in Triton's interpreter; it must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import pipelines.ray_runtime  # noqa: E402,F401 - sets Ray's environment before any test imports Ray

from tests.golden import load_npz, recipe_state_dict  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _threads():
    # The golden outputs were produced with 2 threads; thread count changes CNN rounding slightly.
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def golden_files(tmp_path_factory):
    """The recipe weights written as the released files would be: a flat DINOv2 .pth and a
    tokenizer checkpoint with ``ema`` / ``model`` / ``args`` like the official trainer writes."""
    import argparse

    root = tmp_path_factory.mktemp("golden_ckpt")
    dinov2 = recipe_state_dict("dinov2")
    tok = recipe_state_dict("tokenizer")
    torch.save(dinov2, root / "dinov2_vitl14_reg4_pretrain.pth")
    args = argparse.Namespace(codebook_size=16384, codebook_slots_embed_dim=12, z_channels=512, image_size=336)
    torch.save({"model": tok, "ema": tok, "steps": 0, "args": args}, root / "vfmtok-tokenizer.pt")
    return root


@pytest.fixture(scope="session")
def golden_tokenizer(golden_files):
    from vfmtok_core import VFMTokenizer

    return VFMTokenizer.from_pretrained(
        tokenizer=str(golden_files / "vfmtok-tokenizer.pt"),
        dinov2=str(golden_files / "dinov2_vitl14_reg4_pretrain.pth"),
        config="vfmtok-l14-336",
    )


@pytest.fixture(scope="session")
def golden_inputs():
    from vfmtok_core.preprocess import to_tensor

    inputs = load_npz("inputs")
    return to_tensor(inputs["images_uint8"]), inputs


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1; yields its endpoint URL."""
    import logging
    import os
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint):
    """A fresh bucket; yields (bucket name, fsspec storage options)."""
    import uuid

    import boto3

    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}
    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name, opts


@pytest.fixture()
def proxy(s3_endpoint):
    """The fault-injecting S3 proxy (infra/s3_fault_proxy.py) in front of the server, no faults
    until a test sets them; its ``counts`` also tell requests and bytes served."""
    from infra.s3_fault_proxy import FaultProxy

    with FaultProxy(s3_endpoint, seed=5) as p:
        yield p
