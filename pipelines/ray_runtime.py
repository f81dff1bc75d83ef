"""Connecting to Ray: the cluster in ``RAY_ADDRESS`` (e.g. under ``ray job submit``), an already
initialised one, or an embedded local instance started quietly and stopped afterwards.

The embedded instance keeps Ray's token authentication on. Ray's processes listen on every
network interface (there is no setting that binds them all to loopback), and without a token any
host that can reach this machine could join the cluster and run code in it. Its dashboard is off;
when asked for, it listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import logging
import os

# Ray reads these when it is imported, so they are set when this module is imported (every job
# imports it before Ray) and again before each session: no usage stats, no per-operator progress
# bars, and token authentication for an embedded instance (see the module docstring). The C++
# log level is left alone: setting it prints a line of its own on every start.
_QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}


def _prepare_environment() -> None:
    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")


_prepare_environment()


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None, dashboard: bool = False):
    """Yield with Ray initialised; only an instance started here is shut down on exit."""
    _prepare_environment()
    import ray

    if ray.is_initialized():
        yield ray
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=False,
                 logging_level=logging.ERROR)
    logging.getLogger("ray").setLevel(logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()
