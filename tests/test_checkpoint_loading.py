"""Checkpoint loading: the layouts users have, from local disk and S3, and clear refusals."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from vfmtok_core import VFMTokenizer
from vfmtok_core.checkpoint import CheckpointError, load_checkpoint, select_state_dict


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A tiny tokenizer saved the way the released files are laid out."""
    root = tmp_path_factory.mktemp("tiny_ckpt")
    src = VFMTokenizer.from_config("tiny", seed=3)
    sd = src.state_dict()
    dinov2 = {k[len("dinov2.") :]: v for k, v in sd.items() if k.startswith("dinov2.")}
    tok = {k: v for k, v in sd.items() if not k.startswith("dinov2.")}
    torch.save(dinov2, root / "dinov2.pth")
    torch.save({"ema": tok, "model": tok, "steps": 7}, root / "tok.pt")
    return root, src, tok, dinov2


def _load(root, tok_name="tok.pt", dinov2="dinov2.pth", **kw):
    return VFMTokenizer.from_pretrained(
        tokenizer=str(root / tok_name), dinov2=str(root / dinov2) if dinov2 else None, config="tiny", **kw
    )


def _codes(tok):
    x = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return tok.encode(x)


def test_roundtrip_reproduces_source(tiny_files):
    root, src, _, _ = tiny_files
    loaded = _load(root)
    assert loaded.fingerprint == src.fingerprint
    assert torch.equal(_codes(loaded), _codes(src))


@pytest.mark.parametrize("layout", ["ema_over_model", "model", "state_dict", "raw", "prefixed", "full_model"])
def test_accepted_layouts(tiny_files, tmp_path, layout):
    root, src, tok, dinov2 = tiny_files
    noise = {k: v + 1 for k, v in tok.items()}
    dinov2_arg = "dinov2.pth"
    if layout == "ema_over_model":
        obj = {"model": noise, "ema": tok}
    elif layout == "model":
        obj = {"model": tok, "optimizer": {"state": {}}}
    elif layout == "state_dict":
        obj = {"state_dict": tok}
    elif layout == "raw":
        obj = tok
    elif layout == "prefixed":
        obj = {"model": {f"module._orig_mod.{k}": v for k, v in tok.items()}}
    else:  # one dict holding the backbone under its official full-model prefix
        obj = {"ema": {**tok, **{f"encode_transformer.backbone.pretrained_encoder.{k}": v for k, v in dinov2.items()}}}
        dinov2_arg = None
    torch.save(obj, tmp_path / "t.pt")
    os.link(root / "dinov2.pth", tmp_path / "dinov2.pth")
    loaded = _load(tmp_path, "t.pt", dinov2_arg)
    assert loaded.fingerprint == src.fingerprint


def test_usage_buffer_optional_and_args_namespace_allowed(tiny_files, tmp_path):
    import argparse

    root, src, tok, _ = tiny_files
    trimmed = {k: v for k, v in tok.items() if k != "slot_quantize.codebook_used"}
    torch.save({"ema": trimmed, "args": argparse.Namespace(lr=1e-4, image_size=336, name="x")}, tmp_path / "t.pt")
    os.link(root / "dinov2.pth", tmp_path / "dinov2.pth")
    assert _load(tmp_path, "t.pt").fingerprint == src.fingerprint


def test_missing_unexpected_and_misshaped_keys_are_named(tiny_files, tmp_path):
    root, _, tok, _ = tiny_files
    bad = dict(tok)
    del bad["pre_slots_quant.weight"]
    bad["extra.thing"] = torch.zeros(1)
    bad["post_slots_quant.bias"] = torch.zeros(7)
    torch.save({"ema": bad}, tmp_path / "t.pt")
    os.link(root / "dinov2.pth", tmp_path / "dinov2.pth")
    with pytest.raises(CheckpointError) as e:
        _load(tmp_path, "t.pt")
    msg = str(e.value)
    assert "missing keys: pre_slots_quant.weight" in msg
    assert "unexpected keys: extra.thing" in msg
    assert "post_slots_quant.bias: file (7,) vs model (64,)" in msg


def test_wrong_config_for_file_is_refused(tiny_files):
    root = tiny_files[0]
    with pytest.raises(CheckpointError, match="does not fit the model"):
        VFMTokenizer.from_pretrained(tokenizer=str(root / "tok.pt"), dinov2=str(root / "dinov2.pth"))


def test_dinov2_file_swapped_with_tokenizer_file(tiny_files):
    root = tiny_files[0]
    with pytest.raises(CheckpointError, match="DINOv2 weights"):
        _load(root, "tok.pt", "tok.pt")


def test_missing_dinov2_is_explained(tiny_files):
    with pytest.raises(CheckpointError, match="pass dinov2="):
        _load(tiny_files[0], dinov2=None)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint", b"PK\x03\x04garbage"])
def test_wrong_file(tmp_path, content):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(CheckpointError):
        load_checkpoint(str(tmp_path / "x.pt"))


def test_truncated_file(tiny_files, tmp_path):
    data = (tiny_files[0] / "tok.pt").read_bytes()
    (tmp_path / "x.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or wrong file"):
        load_checkpoint(str(tmp_path / "x.pt"))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("via", ["torch_save", "raw_pickle"])
def test_pickle_carrying_code_is_refused_not_run(tmp_path, via):
    marker = tmp_path / "pwned"
    obj = {"ema": {"w": torch.zeros(1)}, "evil": _Payload(marker)}
    path = tmp_path / "evil.pt"
    if via == "torch_save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(str(path))
    assert not marker.exists()


def test_no_state_dict_inside(tmp_path):
    torch.save({"steps": 3, "args": None}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="no state dict"):
        select_state_dict(load_checkpoint(str(tmp_path / "x.pt")), ("ema", "model"))


def test_load_from_s3(tiny_files, s3_bucket):
    import s3fs

    root, src, _, _ = tiny_files
    bucket, opts = s3_bucket
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    fs.put(str(root / "tok.pt"), f"{bucket}/weights/tok.pt")
    fs.put(str(root / "dinov2.pth"), f"{bucket}/weights/dinov2.pth")
    loaded = VFMTokenizer.from_pretrained(
        tokenizer=f"s3://{bucket}/weights/tok.pt",
        dinov2=f"s3://{bucket}/weights/dinov2.pth",
        config="tiny",
        storage_options=opts,
    )
    assert loaded.fingerprint == src.fingerprint
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(f"s3://{bucket}/weights/missing.pt", opts)


def test_load_over_http(tiny_files):
    """http(s):// goes through fsspec's HTTP filesystem; served here from 127.0.0.1."""
    import functools
    import http.server
    import threading

    root, src, _, _ = tiny_files
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        loaded = VFMTokenizer.from_pretrained(tokenizer=f"{base}/tok.pt", dinov2=f"{base}/dinov2.pth", config="tiny")
        assert loaded.fingerprint == src.fingerprint
        with pytest.raises(FileNotFoundError, match="checkpoint not found"):
            load_checkpoint(f"{base}/missing.pt")
    finally:
        server.shutdown()
        server.server_close()


def test_decoder_only_loads_without_dinov2(tiny_files):
    root, src, _, _ = tiny_files
    dec = VFMTokenizer.from_pretrained(tokenizer=str(root / "tok.pt"), config="tiny", decoder_only=True)
    assert dec.dinov2 is None and dec.fingerprint != src.fingerprint
    codes = _codes(src)
    assert torch.equal(dec.decode(codes), src.decode(codes))
    with pytest.raises(RuntimeError, match="decoder_only"):
        dec.encode(torch.zeros(1, 3, 112, 112))
