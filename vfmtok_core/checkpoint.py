"""Reading released checkpoints safely from any fsspec URL and loading them with clear errors.

Checkpoints are unpickled with ``torch.load(weights_only=True)``: only tensors, containers and
an explicit allow-list of plain classes are reconstructed (``argparse.Namespace``, which the
official trainer stores under ``args``). A file that tries to run code is refused, never executed.
"""

from __future__ import annotations

import argparse
import io
import logging
import pickle
from collections.abc import Iterable, Mapping

import fsspec
import torch
from torch import nn

log = logging.getLogger(__name__)

# Classes a released checkpoint may contain besides tensors and builtin containers.
SAFE_GLOBALS = [argparse.Namespace]
STRIP_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 12


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the model; the message says why."""


def read_bytes(url: str, storage_options: Mapping | None = None) -> bytes:
    """Read a whole file from a local path or any fsspec URL (s3://, https://, hf://, ...)."""
    try:
        with fsspec.open(url, "rb", **dict(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoint not found: {url}") from e
    except IsADirectoryError as e:
        raise CheckpointError(
            f"{url} is a folder, not a checkpoint file (a GPT training run's folder? "
            "`python -m jobs.export_gpt` writes its checkpoint as one file)"
        ) from e
    except ImportError as e:  # e.g. hf:// without huggingface_hub installed
        raise CheckpointError(f"cannot open {url}: {e}") from e


def load_checkpoint(url: str, storage_options: Mapping | None = None) -> object:
    """Unpickle a checkpoint with the weights-only loader; tensors land on the CPU."""
    data = read_bytes(url, storage_options)
    if not data:
        raise CheckpointError(f"{url} is empty")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {url}: it contains objects outside the weights-only allow-list "
            f"({', '.join(c.__qualname__ for c in SAFE_GLOBALS)}); it may carry code. "
            f"Details: {str(e).splitlines()[0]}"
        ) from e
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise CheckpointError(f"{url} is not a readable PyTorch checkpoint (truncated or wrong file?): {e}") from e


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def select_state_dict(obj: object, preferred: Iterable[str], url: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Pick the weights out of a checkpoint: the first ``preferred`` key holding a state dict,
    else the object itself if it is one. ``module.`` / ``_orig_mod.`` prefixes are stripped."""
    preferred = list(preferred)
    chosen = None
    if isinstance(obj, Mapping):
        for key in preferred:
            if key in obj and _is_state_dict(obj[key]):
                log.debug("using %r weights of %s", key, url)
                chosen = obj[key]
                break
        if chosen is None and _is_state_dict(obj):
            chosen = obj
    if chosen is None:
        found = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"no state dict in {url}: looked for {preferred} or a flat tensor dict, found {found}")
    return {strip_prefixes(k): v for k, v in chosen.items()}


def strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in STRIP_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


def check_state_dict(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str, optional: Iterable[str] = ()
) -> None:
    """Require an exact key and shape match between ``state`` and ``expected``.

    Unlike ``load_state_dict(strict=True)`` the error lists missing, unexpected and mis-shaped
    keys together. ``optional`` names expected keys a file may omit.
    """
    missing = set(expected) - set(state) - set(optional)
    unexpected = set(state) - set(expected)
    misshaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if misshaped:
        problems.append("mis-shaped keys: " + "; ".join(misshaped[:_MAX_LISTED]))
    if problems:
        raise CheckpointError(f"{what} does not fit the model -- " + " | ".join(problems))


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str, optional: Iterable[str] = ()) -> None:
    """Check ``state`` against ``module`` (see :func:`check_state_dict`), then load it."""
    check_state_dict(module.state_dict(), state, what, optional)
    module.load_state_dict(state, strict=False)
