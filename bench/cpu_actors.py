"""How the job's CPU tokenizer actors wait and split the cores, measured side by side in one run.

On a machine without GPUs the tokenizer actors run torch on the same cores as the decode tasks
(actors hold no Ray CPU slot, see ``start_workers``), so the cores are oversubscribed by design.
Three settings of the same job (``tiny``, centre crop, same images), in interleaved rounds:

- ``passive``: the job's default, one actor with a torch thread per core whose OpenMP threads
  sleep when they wait (``OMP_WAIT_POLICY=PASSIVE``, which ``start_workers`` gives the actors);
- ``spinning``: the same with libgomp's own default (spin a while, then sleep), the job's
  behaviour before. Set here with an empty ``OMP_WAIT_POLICY``, which libgomp ignores (it
  writes a warning to the actor's log);
- ``actor_per_core``: one single-threaded actor per core (``--workers <cores> --threads 1``),
  for a small model the fastest split, at the memory of a model per core.

Printed: images/s of each (medians), and passive over spinning. The job's figures exclude starting
Ray, its workers and the tokenizers; a warm-up round is not counted.

Run: ``python -m bench.cpu_actors`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.pipeline import write_jpegs
from jobs.cli import parse_config, setup_logging
from pipelines.producer.tokenize import TokenizeOptions, TokenizerSpec, run_tokenize
from pipelines.ray_runtime import ray_session

log = logging.getLogger("bench.cpu_actors")


@dataclass
class BenchConfig:
    """The CPU tokenizer actors' wait policy and core split, side by side."""

    images: int = field(default=1536, metadata={"help": "JPEGs in the input folder"})
    rows_per_shard: int = field(default=256, metadata={"help": "images per work item"})
    rounds: int = field(default=3, metadata={"help": "counted rounds of each setting (medians are printed)"})


def run(cfg: BenchConfig) -> dict:
    speeds: dict[str, list[float]] = {"passive": [], "spinning": [], "actor_per_core": []}
    saved = os.environ.get("OMP_WAIT_POLICY")
    with tempfile.TemporaryDirectory() as tmp, ray_session() as ray:
        tmp = Path(tmp)
        write_jpegs(tmp / "in", cfg.images)
        cores = int(ray.cluster_resources()["CPU"])
        settings = {"passive": ("PASSIVE", 1, cores), "spinning": ("", 1, cores), "actor_per_core": ("PASSIVE", cores, 1)}
        try:
            for r in range(cfg.rounds + 1):  # the first round starts Ray's workers: not counted
                for name, (policy, workers, threads) in settings.items():
                    os.environ["OMP_WAIT_POLICY"] = policy  # passed on to the actors by start_workers
                    summary = run_tokenize(TokenizeOptions(
                        input=str(tmp / "in"), output=str(tmp / f"{name}-{r}"), spec=TokenizerSpec("tiny"),
                        workers=workers, threads=threads, rows_per_shard=cfg.rows_per_shard))
                    if r:
                        speeds[name].append(summary["this_run"]["images_per_s"])
        finally:
            if saved is None:
                os.environ.pop("OMP_WAIT_POLICY", None)
            else:
                os.environ["OMP_WAIT_POLICY"] = saved
    med = {k: statistics.median(v) for k, v in speeds.items()}
    out = {
        "cores": cores, "images": cfg.images,
        "images_per_s": {k: round(v, 1) for k, v in med.items()},
        "by_round": speeds,
        "passive_over_spinning": round(med["passive"] / med["spinning"], 3),
        "actor_per_core_over_passive": round(med["actor_per_core"] / med["passive"], 3),
    }
    log.info("1 actor x %d threads: passive wait %.1f img/s vs spinning %.1f (%.2fx); %d actors x 1 thread %.1f img/s",
             cores, med["passive"], med["spinning"], out["passive_over_spinning"], cores, med["actor_per_core"])
    print(json.dumps(out, indent=1))
    return out


def main(argv=None) -> None:
    setup_logging()
    run(parse_config(BenchConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
