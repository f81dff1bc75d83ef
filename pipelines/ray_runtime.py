"""Connecting to Ray: the cluster in ``RAY_ADDRESS`` (e.g. under ``ray job submit``), an already
initialised one, or an embedded local instance started quietly and stopped afterwards."""

from __future__ import annotations

import contextlib
import logging
import os

# Set before Ray is imported so the embedded instance starts without token-auth files, usage
# stats or per-operator progress bars.
_QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_BACKEND_LOG_LEVEL": "fatal",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None):
    """Yield with Ray initialised; only an instance started here is shut down on exit."""
    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if ray.is_initialized():
        yield ray
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    logging.getLogger("ray").setLevel(logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()
