"""Regenerate the golden fixtures' deterministic weights (see fixtures/golden/README.md, section 1).

Each tensor is drawn from its official key name alone, so our loader sees exactly the state dicts
the official code was run with.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from pathlib import Path

import numpy as np
import torch

GOLDEN = Path(__file__).parent / "fixtures" / "golden"


def recipe_tensor(key: str, shape: list[int], salt: str = "") -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32((salt + key).encode()))
    t = torch.randn(shape, generator=g, dtype=torch.float32)
    if len(shape) == 1 and key.endswith(".weight"):
        return 1 + np.float32(0.1) * t
    if len(shape) == 1 or shape[0] == 1:
        return np.float32(0.02) * t
    return t / np.float32(math.sqrt(math.prod(shape[1:])))


def recipe_state_dict(table: str) -> dict[str, torch.Tensor]:
    """State dict for ``keys_<table>.json``; non-parameter buffers are zeros."""
    entries = json.loads((GOLDEN / f"keys_{table}.json").read_text())
    state = {}
    for key, shape, dtype in entries:
        if key.endswith("codebook_used"):
            state[key] = torch.zeros(shape, dtype=getattr(torch, dtype))
        else:
            state[key] = recipe_tensor(key, shape)
    return state


def checksum_mismatches(state: dict[str, torch.Tensor], model: str) -> list[str]:
    expected = json.loads((GOLDEN / "weights_checksums.json").read_text())[model]
    bad = []
    for key, ref in expected.items():
        digest = hashlib.sha256(state[key].contiguous().numpy().astype("<f4", copy=False).tobytes()).hexdigest()
        if digest != ref["sha256"]:
            bad.append(key)
    return bad


def load_npz(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"{name}.npz") as f:
        return {k: f[k] for k in f.files}
