"""Compute kernels used by the VFMTok models, each with a PyTorch reference behind a dispatcher.

The public entry points keep upstream's tensor layouts so that the models never depend on which
implementation runs:

- :func:`ms_deform_attn` -- multi-scale deformable attention (Deformable DETR's MSDA op).
- :func:`codebook_lookup` -- nearest l2-normalised codebook entry for each vector.
"""

from kernels.dispatch import BACKENDS, codebook_lookup, ms_deform_attn

__all__ = ["BACKENDS", "codebook_lookup", "ms_deform_attn"]
