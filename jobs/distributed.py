"""What the trainers share about running distributed: process-group setup, small collectives, Ray
Train, and the CLI entry point that picks one process, torchrun or Ray Train."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

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


def from_rank0(value, world: int):
    """Rank 0's ``value`` on every rank (any picklable object; other ranks pass None)."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def merged_on_rank0(part: dict, world: int) -> dict | None:
    """The union of every rank's ``part`` on rank 0; None elsewhere."""
    if world == 1:
        return part
    parts = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(part, parts, dst=0)
    return {k: v for p in parts for k, v in p.items()} if parts else None


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


def map_on_actors(actor_cls: type, init: tuple, workers: int, tasks: Iterable[tuple[object, tuple]],
                  on_result: Callable[[object, object], None], method: str = "chunk", in_flight: int = 2) -> None:
    """Run ``actor.<method>(*args)`` for each ``(key, args)`` of ``tasks`` on ``workers`` Ray actors of
    ``actor_cls(*init)`` (a GPU each when the cluster has one per actor, else a CPU each), at most
    ``in_flight`` calls queued per actor, and hand each result to ``on_result(key, result)`` as it
    arrives (in completion order). Tasks are drawn lazily, so a long input is never listed whole.
    Raises the first failure."""
    from pipelines.ray_runtime import ray_session

    with ray_session() as ray:
        gpus = ray.cluster_resources().get("GPU", 0) >= workers
        remote_cls = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)(actor_cls)
        free = [a for a in (remote_cls.remote(*init) for _ in range(workers)) for _ in range(in_flight)]
        pending: dict = {}
        todo = iter(tasks)
        task = next(todo, None)
        while task is not None or pending:
            while task is not None and free:
                actor = free.pop()
                pending[getattr(actor, method).remote(*task[1])] = (actor, task[0])
                task = next(todo, None)
            done, _ = ray.wait(list(pending), num_returns=1)
            actor, key = pending.pop(done[0])
            on_result(key, ray.get(done[0]))
            free.append(actor)
