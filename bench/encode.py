"""Encode throughput of the official config on this machine, and our DINOv2 versus transformers'.

Prints, from one run with the same threads and inputs:
- images/s of ``VFMTokenizer.encode`` for ``vfmtok-l14-336`` (random weights: speed does not
  depend on their values), fp32 and, optionally, bf16;
- our DINOv2 ViT-L/14-reg4 forward time against Hugging Face transformers'
  ``Dinov2WithRegistersModel`` of the same size loaded with the *same* weights (the max output
  difference is printed too, so both sides provably compute the same function), and their ratio.
  The target is ours <= 1.05x theirs.

Run: ``python -m bench.encode`` (``make bench`` installs transformers first).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field

import torch

from jobs.cli import parse_config, setup_logging
from vfmtok_core import VFMTokenizer

log = logging.getLogger("bench.encode")


@dataclass
class BenchConfig:
    """Benchmark VFMTok encode throughput and our DINOv2 against transformers'."""

    batch_size: int = field(default=4, metadata={"help": "images per forward"})
    repeats: int = field(default=5, metadata={"help": "timed repeats per side (median reported)"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: leave torch's default)"})
    bf16: bool = field(default=False, metadata={"help": "also time encode under bf16 autocast"})


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hf_state_dict(ours: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Our flat DINOv2 keys -> transformers' (>= 5) Dinov2WithRegisters keys (qkv split into q, k, v)."""
    out = {
        "embeddings.cls_token": ours["cls_token"],
        "embeddings.mask_token": ours["mask_token"],
        "embeddings.register_tokens": ours["register_tokens"],
        "embeddings.position_embeddings": ours["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": ours["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": ours["patch_embed.proj.bias"],
        "layernorm.weight": ours["norm.weight"],
        "layernorm.bias": ours["norm.bias"],
    }
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = ours[f"{src}attn.qkv.{kind}"].chunk(3)
            out[f"{dst}attention.q_proj.{kind}"] = q
            out[f"{dst}attention.k_proj.{kind}"] = k
            out[f"{dst}attention.v_proj.{kind}"] = v
            out[f"{dst}attention.o_proj.{kind}"] = ours[f"{src}attn.proj.{kind}"]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{dst}{name}.{kind}"] = ours[f"{src}{name}.{kind}"]
        out[f"{dst}layer_scale1.lambda1"] = ours[f"{src}ls1.gamma"]
        out[f"{dst}layer_scale2.lambda1"] = ours[f"{src}ls2.gamma"]
    return out


def run(cfg: BenchConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    tok = VFMTokenizer.from_config("vfmtok-l14-336", seed=0)
    dcfg = tok.config.dinov2
    theirs = Dinov2WithRegistersModel(
        Dinov2WithRegistersConfig(
            hidden_size=dcfg.embed_dim,
            num_hidden_layers=dcfg.depth,
            num_attention_heads=dcfg.num_heads,
            intermediate_size=int(dcfg.embed_dim * dcfg.mlp_ratio),
            patch_size=dcfg.patch_size,
            image_size=dcfg.pos_grid * dcfg.patch_size,
            num_register_tokens=dcfg.num_register_tokens,
            layerscale_value=1.0,
            layer_norm_eps=dcfg.eps,
        )
    ).eval()
    theirs.load_state_dict(hf_state_dict(tok.dinov2.state_dict(), dcfg.depth), strict=True)

    size = tok.config.image_size
    x = torch.rand(cfg.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours_out = tok.dinov2.forward_levels(x)[0][-1]
        theirs_out = theirs(pixel_values=x).last_hidden_state[:, 1 + dcfg.num_register_tokens :]
        max_diff = (ours_out - theirs_out).abs().max().item()

        def ours_fn():
            tok.dinov2.forward_levels(x)

        def theirs_fn():
            theirs(pixel_values=x)

        # Interleave the two sides so drift in machine load hits both equally.
        t_ours, t_theirs = [], []
        for _ in range(cfg.repeats):
            t_ours.append(_time(ours_fn, 1))
            t_theirs.append(_time(theirs_fn, 1))
        ours_s, theirs_s = statistics.median(t_ours), statistics.median(t_theirs)
        images = x * 2 - 1
        enc_s = _time(lambda: tok.encode(images), cfg.repeats)
        result = {
            "threads": torch.get_num_threads(),
            "batch": cfg.batch_size,
            "dinov2_ours_s": ours_s,
            "dinov2_transformers_s": theirs_s,
            "dinov2_ratio": ours_s / theirs_s,
            "dinov2_max_abs_diff": max_diff,
            "encode_images_per_s_fp32": cfg.batch_size / enc_s,
        }
        if cfg.bf16:
            tok.precision = "bf16"
            result["encode_images_per_s_bf16"] = cfg.batch_size / _time(lambda: tok.encode(images), cfg.repeats)
    log.info(
        "DINOv2 ViT-L/14-reg4 @%d, batch %d, %d threads: ours %.3fs, transformers %.3fs, ratio %.3f "
        "(target <= 1.05); max |diff| %.2e",
        size, cfg.batch_size, result["threads"], ours_s, theirs_s, result["dinov2_ratio"], max_diff,
    )
    log.info("encode (%s fp32): %.2f images/s", tok.config.name, result["encode_images_per_s_fp32"])
    if cfg.bf16:
        log.info("encode (%s bf16): %.2f images/s", tok.config.name, result["encode_images_per_s_bf16"])
    return result


def main(argv=None) -> None:
    setup_logging()
    run(parse_config(BenchConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
