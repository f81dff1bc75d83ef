"""Export a training checkpoint as one file in the released layout (``{"model", "ema"}`` state
dicts), which ``GPT.from_pretrained``, ``jobs.sample`` and ``jobs.train_gpt --init`` load.

Reads a sharded checkpoint (any world size, FSDP or not) or a full one from a training ``--out``
folder, local or S3; the newest unless ``--step`` names another. Runs in one process, no GPU.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field

import torch

from jobs.cli import UsageError, fail, parse_config, setup_logging, storage_options
from pipelines.consumer.checkpoints import latest_step, load_latest
from pipelines.consumer.sharded_checkpoints import load_for_export, read_train_state, step_name
from pipelines.contract.redact import redact_url
from pipelines.contract.storage import atomic_write, exists, filesystem, join
from vfmtok_core.gpt import GPT

log = logging.getLogger("jobs.export_gpt")


@dataclass
class ExportConfig:
    """Export a GPT training checkpoint to the released single-file layout."""

    checkpoint: str = field(default="", metadata={"help": "the training run's --out folder (local or fsspec URL; required)"})
    out: str = field(default="", metadata={"help": "the file to write, e.g. GPT-B-ours.pt (local or fsspec URL; required)"})
    step: int = field(default=0, metadata={"help": "the step to export (0: the newest)"})
    storage_options: str = field(default="{}", metadata={"help": "fsspec options: JSON, or @FILE holding JSON"})


def export(cfg: ExportConfig) -> dict:
    """Write the export; returns what was written (step, size, file, bytes)."""
    if not cfg.checkpoint or not cfg.out:
        raise UsageError("--checkpoint and --out are required")
    so = storage_options(cfg.storage_options)
    latest = latest_step(cfg.checkpoint, so)
    if latest is None:
        raise UsageError(f"{redact_url(cfg.checkpoint)} holds no checkpoint (no latest.json)")
    fs, root = filesystem(cfg.checkpoint, so)
    if latest["format"] == "full":
        if cfg.step and cfg.step != latest["step"]:
            raise UsageError("--step is only for sharded checkpoints; a full one exports its newest step")
        state = load_latest(cfg.checkpoint, so)
        step, size, model_sd, ema_sd = state["step"], state["size"], state["model"], state["ema"]
    else:
        path = step_name(cfg.step) if cfg.step else latest["path"]
        if not exists(fs, join(root, path, ".metadata")):
            raise UsageError(f"{redact_url(cfg.checkpoint)} has no complete checkpoint {path}")
        meta = read_train_state(cfg.checkpoint, path, so)
        step, size = meta["step"], meta["size"]
        model = GPT.from_config(size, vocab_size=meta["vocab_size"], block_size=meta["block_size"])
        model_sd = model.state_dict()
        ema_sd = {name: torch.empty_like(p) for name, p in model.named_parameters()}
        load_for_export(cfg.checkpoint, path, {"model": model_sd, "ema": ema_sd}, so)
    buf = io.BytesIO()
    torch.save({"model": model_sd, "ema": ema_sd, "steps": step}, buf)
    out_fs, out_path = filesystem(cfg.out, so)
    atomic_write(out_fs, out_path, buf.getvalue())
    result = {"step": step, "size": size, "out": redact_url(cfg.out), "bytes": buf.getbuffer().nbytes}
    log.info("exported step %d of %s (%s) to %s", step, redact_url(cfg.checkpoint), size, redact_url(cfg.out))
    return result


def main(argv=None) -> None:
    setup_logging()
    cfg = parse_config(ExportConfig, argv, description=__doc__)
    try:
        print(json.dumps(export(cfg)))
    except (UsageError, FileNotFoundError, ValueError) as e:
        fail(e)


if __name__ == "__main__":
    main()
