"""GPT generation speed: static KV cache versus recomputing the whole prefix at every step.

Both sides generate the same 256-token greedy sequences from the same GPT-B (random weights: speed
does not depend on their values), in one run, and must produce identical tokens. The target is a
cache speed-up of at least 5x. Where a GPU is present it also reports images/s (tokens only) for
GPT-B at batch 64 in bf16, with and without ``torch.compile`` of the decode step.

Run: ``python -m bench.sample``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from jobs.cli import parse_config, setup_logging
from vfmtok_core.generate import compiled_decode, generate, sample_token
from vfmtok_core.gpt import GPT, GPT_CONFIGS

log = logging.getLogger("bench.sample")


@dataclass
class BenchConfig:
    """Benchmark KV-cache generation against full recomputation."""

    size: str = field(default="GPT-B", metadata={"help": "GPT size", "choices": sorted(GPT_CONFIGS)})
    batch_size: int = field(default=2, metadata={"help": "sequences per run"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})
    gpu_batch: int = field(default=64, metadata={"help": "batch for the GPU images/s figure"})


@torch.no_grad()
def generate_without_cache(model: GPT, labels: torch.Tensor) -> torch.Tensor:
    """Greedy generation that reruns the full prefix each step (what a cache-less loop does)."""
    b, n = labels.shape[0], model.config.block_size
    codes = torch.zeros(b, n, dtype=torch.long, device=labels.device)
    for t in range(n):
        # The token at index t is a placeholder: logits[:, t] only see codes[:, :t].
        logits = model(labels, codes[:, : t + 1])[:, t]
        codes[:, t] = sample_token(logits, greedy=True)
    return codes


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run(cfg: BenchConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = GPT.from_config(cfg.size, seed=0)
    with torch.no_grad():  # non-zero head so greedy decoding is not a constant
        model.output.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(cfg.batch_size) % model.config.num_classes
    tokens = cfg.batch_size * model.config.block_size
    generate(model, labels[:1], greedy=True)  # warm-up
    cached, t_cache = _timed(lambda: generate(model, labels, greedy=True))
    full, t_full = _timed(lambda: generate_without_cache(model, labels))
    if not torch.equal(cached, full):
        raise AssertionError("KV-cache and full-recompute generations differ")
    result = {
        "size": cfg.size,
        "batch": cfg.batch_size,
        "threads": torch.get_num_threads(),
        "cache_tokens_per_s": tokens / t_cache,
        "no_cache_tokens_per_s": tokens / t_full,
        "speedup": t_full / t_cache,
    }
    log.info(
        "%s, batch %d, %d threads, 256 tokens: KV cache %.1f tokens/s, full recompute %.1f tokens/s -> %.1fx "
        "(target >= 5x); identical tokens",
        cfg.size, cfg.batch_size, result["threads"], result["cache_tokens_per_s"], result["no_cache_tokens_per_s"],
        result["speedup"],
    )
    if torch.cuda.is_available():
        gpu = model.to("cuda", torch.bfloat16)
        gl = torch.arange(cfg.gpu_batch, device="cuda") % 1000
        generate(gpu, gl, cfg_scale=1.5)
        _, t = _timed(lambda: generate(gpu, gl, cfg_scale=1.5))
        result["gpu_images_per_s_bf16"] = cfg.gpu_batch / t
        fast = compiled_decode(gpu)
        generate(gpu, gl, cfg_scale=1.5, decode_fn=fast)
        _, t = _timed(lambda: generate(gpu, gl, cfg_scale=1.5, decode_fn=fast))
        result["gpu_images_per_s_bf16_compiled"] = cfg.gpu_batch / t
        log.info(
            "%s on %s, batch %d, bf16, CFG 1.5: %.1f images/s eager, %.1f compiled",
            cfg.size, torch.cuda.get_device_name(), cfg.gpu_batch,
            result["gpu_images_per_s_bf16"], result["gpu_images_per_s_bf16_compiled"],
        )
    return result


def main(argv=None) -> None:
    setup_logging()
    run(parse_config(BenchConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
