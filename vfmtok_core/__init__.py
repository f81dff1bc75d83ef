"""VFMTok models in pure PyTorch: the tokenizer (DINOv2 + region-adaptive quantiser + decoders)."""

from vfmtok_core.config import CONFIGS, TokenizerConfig, get_config
from vfmtok_core.tokenizer import VFMTokenizer

__all__ = ["CONFIGS", "TokenizerConfig", "VFMTokenizer", "get_config"]
