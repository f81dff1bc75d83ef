"""VFMTok models in pure PyTorch: the tokenizer (DINOv2 + region-adaptive quantiser + decoders) and the GPT.

Names are imported lazily so that torch-free helpers (``vfmtok_core.crop``) load without torch:
data-loading worker processes then start in milliseconds instead of seconds.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CONFIGS": "vfmtok_core.config",
    "TokenizerConfig": "vfmtok_core.config",
    "get_config": "vfmtok_core.config",
    "VFMTokenizer": "vfmtok_core.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vfmtok_core' has no attribute {name!r}")
