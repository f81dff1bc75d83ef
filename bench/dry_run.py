"""Planning at scale: ``jobs.tokenize --dry-run`` over a generated folder of empty image files.

Makes ``--files`` empty ``.jpg`` files in ``--classes`` class folders (ImageNet's layout), runs the
dry run as its own process (as a user would), and prints its wall time, the driver's peak resident
memory, and the plan it reports. Nothing is tokenized and nothing is written to the output.

Run: ``python -m bench.dry_run`` (1M files: about a minute to create, then the measured run).
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from jobs.cli import parse_config, setup_logging

log = logging.getLogger("bench.dry_run")


@dataclass
class BenchConfig:
    """Time and peak memory of planning a large folder with --dry-run."""

    files: int = field(default=1_000_000, metadata={"help": "empty image files to plan"})
    classes: int = field(default=1000, metadata={"help": "class folders they are spread over"})
    rows_per_shard: int = field(default=1024, metadata={"help": "images per work item"})


def make_folder(root: Path, files: int, classes: int) -> None:
    per_class = -(-files // classes)
    with tqdm(total=files, desc="creating", unit="file", mininterval=2) as bar:
        for c in range(classes):
            folder = root / f"n{c:08d}"
            folder.mkdir(parents=True)
            count = min(per_class, files - bar.n)
            for i in range(count):
                (folder / f"n{c:08d}_{i}.JPEG").touch()
            bar.update(count)


def main(argv=None) -> dict:
    setup_logging()
    cfg = parse_config(BenchConfig, argv, description=__doc__)
    tmp = Path(tempfile.mkdtemp(prefix="vfmtok-dry-run-"))
    try:
        make_folder(tmp / "in", cfg.files, cfg.classes)
        cmd = [sys.executable, "-m", "jobs.tokenize", "--input", str(tmp / "in"), "--output", str(tmp / "out"),
               "--rows-per-shard", str(cfg.rows_per_shard), "--dry-run"]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        report = json.loads(done.stdout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"files": cfg.files, "seconds": round(seconds, 1), "driver_peak_rss_mb": round(peak_mb),
              "work_items": report["work_items"], "inputs": report["inputs"], "classes": report["classes"]}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
