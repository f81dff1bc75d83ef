"""Triton kernels versus their PyTorch references at VFMTok's shapes (batch 64), in one run.

- Multi-scale deformable attention: value (64, 2304, 8, 64), 256 queries, 4 levels of 24x24,
  4 points; forward, and forward + backward. Target on a GPU: Triton >= 2x the grid_sample reference.
- Codebook lookup: 64 x 256 vectors against 16384 x 12 codes. Target on a GPU: >= 3x cdist/argmin.

- On the CPU, the reference lookup's chunk size: 64 MiB chunks (the previous default, still the
  accelerators') against 4 MiB ones (the CPU default), for the lookup above and for a ``tiny``
  tokenizer's whole encode of 64 images, with a check that the codes are equal.

Without a GPU the Triton side cannot be timed (the CPU only runs it in Triton's interpreter, a
correctness tool); the reference timings are printed and the ratios marked as not measured.

Run: ``python -m bench.kernels``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import torch

from jobs.cli import parse_config, setup_logging
from kernels import codebook_lookup, ms_deform_attn

log = logging.getLogger("bench.kernels")


@dataclass
class BenchConfig:
    """Benchmark the Triton kernels against their references."""

    batch: int = field(default=64, metadata={"help": "images per call"})
    repeats: int = field(default=10, metadata={"help": "timed repeats (median)"})
    dtype: str = field(default="float32", metadata={"help": "input dtype", "choices": ["float32", "bfloat16"]})


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def run(cfg: BenchConfig) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, cfg.dtype)
    g = torch.Generator().manual_seed(0)
    n, m, d, lq, levels, points, side = cfg.batch, 8, 64, 256, 4, 4, 24
    shapes = torch.tensor([[side, side]] * levels, device=device)
    starts = torch.arange(levels, device=device) * side * side
    value = torch.randn(n, levels * side * side, m, d, generator=g).to(device, dtype)
    loc = torch.rand(n, lq, m, levels, points, 2, generator=g).to(device, dtype)
    attn = torch.rand(n, lq, m, levels * points, generator=g).softmax(-1).view(n, lq, m, levels, points).to(device, dtype)
    z = torch.randn(n * 256, 12, generator=g).to(device)
    codebook = torch.randn(16384, 12, generator=g).to(device)

    def msda(backend, backward):
        def fn():
            args = [t.detach().requires_grad_(backward) for t in (value, loc, attn)]
            out = ms_deform_attn(args[0], shapes, starts, args[1], args[2], backend=backend)
            if backward:
                out.float().sum().backward()
        return fn

    backends = ["torch", "triton"] if device == "cuda" else ["torch"]
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (no GPU)", "dtype": cfg.dtype}
    for name, fns in {
        "ms_deform_attn_forward": {b: msda(b, False) for b in backends},
        "ms_deform_attn_forward_backward": {b: msda(b, True) for b in backends},
        "codebook_lookup": {b: (lambda b=b: codebook_lookup(z, codebook, backend=b)) for b in backends},
    }.items():
        times = {b: _median_time(fn, cfg.repeats) for b, fn in fns.items()}
        entry = {f"{b}_ms": 1000 * t for b, t in times.items()}
        entry["speedup"] = times["torch"] / times["triton"] if "triton" in times else None
        result[name] = entry
        if entry["speedup"] is None:
            log.info("%s: reference %.1f ms; Triton not timed (no GPU)", name, entry["torch_ms"])
        else:
            log.info("%s: reference %.2f ms, Triton %.2f ms -> %.1fx", name, entry["torch_ms"], entry["triton_ms"], entry["speedup"])
    if device == "cpu":
        result["cpu_chunk_size"] = _cpu_chunks(z, codebook, cfg.repeats)
    print(json.dumps(result, indent=1))
    return result


def _cpu_chunks(z: torch.Tensor, codebook: torch.Tensor, repeats: int) -> dict:
    """The CPU reference lookup and a ``tiny`` encode with 64 MiB against 4 MiB distance chunks."""
    import kernels.codebook_ref as ref
    from vfmtok_core import VFMTokenizer

    tok = VFMTokenizer.from_config("tiny", seed=0)
    images = torch.rand(64, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1
    small = ref._CHUNK_ELEMENTS
    out, codes = {}, {}
    for name, elements in (("chunk_64MiB", 1 << 24), ("chunk_4MiB", small)):
        ref._CHUNK_ELEMENTS = elements
        try:
            out[f"lookup_{name}_ms"] = 1000 * _median_time(lambda: codebook_lookup(z, codebook, backend="torch"), repeats)
            out[f"tiny_encode_{name}_ms"] = 1000 * _median_time(lambda: tok.encode(images), repeats)
            codes[name] = (codebook_lookup(z, codebook, backend="torch"), tok.encode(images))
        finally:
            ref._CHUNK_ELEMENTS = small
    out["lookup_speedup"] = out["lookup_chunk_64MiB_ms"] / out["lookup_chunk_4MiB_ms"]
    out["tiny_encode_speedup"] = out["tiny_encode_chunk_64MiB_ms"] / out["tiny_encode_chunk_4MiB_ms"]
    out["codes_equal"] = all(torch.equal(a, b) for a, b in zip(codes["chunk_64MiB"], codes["chunk_4MiB"]))
    log.info("CPU reference lookup, 64 MiB vs 4 MiB chunks: %.1f vs %.1f ms (%.2fx); tiny encode of 64 images: "
             "%.0f vs %.0f ms (%.2fx); codes equal: %s", out["lookup_chunk_64MiB_ms"], out["lookup_chunk_4MiB_ms"],
             out["lookup_speedup"], out["tiny_encode_chunk_64MiB_ms"], out["tiny_encode_chunk_4MiB_ms"],
             out["tiny_encode_speedup"], out["codes_equal"])
    return out


def main(argv=None) -> None:
    setup_logging()
    run(parse_config(BenchConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
