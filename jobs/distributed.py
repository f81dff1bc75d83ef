"""What the trainers share about running distributed: process-group setup, small collectives, Ray
Train, and the CLI entry point that picks one process, torchrun or Ray Train."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from jobs.cli import fail, parse_config, setup_logging


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device): joins the process group torchrun or Ray Train describe in the
    environment (NCCL on GPUs, gloo on CPUs); a lone process needs none."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def mean_across(value: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of ``value`` over all ranks (every rank gets it), detached."""
    value = value.detach().clone()
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return value


def run_on_ray_train(loop: Callable[[], object], workers: int) -> None:
    """Run ``loop`` on ``workers`` Ray Train workers, which set up the process group that
    :func:`setup_distributed` joins (on GPUs when the cluster has one per worker); raises if a
    worker failed. Ray Train keeps metrics only with its own checkpoints; ours are in ``--out``."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.ray_runtime import ray_session

    with ray_session() as ray:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
        TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu)).fit()


def trainer_main(config_cls: type, train: Callable, run_on_ray: Callable, user_errors: tuple[type[Exception], ...],
                 argv=None, description: str | None = None) -> None:
    """A trainer's CLI: parse its config, run ``train`` here (one process or a torchrun rank) or
    ``run_on_ray`` with ``--ray-workers``, print the last metrics once; a user mistake is one line
    on stderr and exit code 2."""
    setup_logging()
    cfg = parse_config(config_cls, argv, description=description)
    try:
        last = run_on_ray(cfg) if cfg.ray_workers else train(cfg)
    except user_errors as e:
        fail(e)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(last))
    if dist.is_initialized():
        dist.destroy_process_group()
