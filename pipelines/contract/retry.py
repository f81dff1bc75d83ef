"""Retrying object-store requests: bounded attempts, exponential backoff with full jitter, and a
count of every retry so that a run can say how rough the weather was.

Why our own layer rather than s3fs's and botocore's: theirs retry silently (nothing to count or
report), cover different error sets, and stack (5 x 5 attempts). :func:`pipelines.contract.storage.filesystem`
turns theirs off for object stores, so each request is attempted here, once per attempt.

Only errors that can pass are retried: throttling (503 SlowDown), server errors (500, 502, 504),
dropped connections, truncated bodies, and an upload whose stored size or checksum does not match
what was sent. A missing key, a refused credential or a malformed request fails at once: retrying
them would only repeat the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# S3 error codes (and HTTP statuses) that mean "try again later".
_TRANSIENT_CODES = {
    "SlowDown": "throttled", "Throttling": "throttled", "ThrottlingException": "throttled",
    "RequestLimitExceeded": "throttled", "TooManyRequests": "throttled", "503": "throttled",
    "ServiceUnavailable": "server_error", "InternalError": "server_error", "500": "server_error",
    "502": "server_error", "504": "server_error", "BadGateway": "server_error", "RequestTimeout": "timeout",
    # The store received a body that does not match the checksum we sent: it was damaged on the way.
    "BadDigest": "verify", "InvalidDigest": "verify", "XAmzContentSHA256Mismatch": "verify",
}
# Exception class names (from aiohttp, botocore, urllib3, http.client, asyncio) that mean the
# connection broke or the body was cut short. Matched by name so this module imports none of them.
_TRANSIENT_NAMES = {
    "ConnectionResetError": "connection", "BrokenPipeError": "connection", "ConnectionAbortedError": "connection",
    "ConnectionRefusedError": "connection", "ServerDisconnectedError": "connection",
    "ClientConnectionError": "connection", "ClientOSError": "connection", "ClientConnectorError": "connection",
    "ConnectionClosedError": "connection", "EndpointConnectionError": "connection",
    "HTTPClientError": "connection", "ProtocolError": "connection", "RemoteDisconnected": "connection",
    "ClientPayloadError": "truncated", "IncompleteRead": "truncated", "IncompleteReadError": "truncated",
    "ResponseStreamingError": "truncated", "ContentLengthError": "truncated", "TransferEncodingError": "truncated",
    "ReadTimeoutError": "timeout", "ConnectTimeoutError": "timeout", "TimeoutError": "timeout",
    "FSTimeoutError": "timeout", "ServerTimeoutError": "timeout",
    "FlexibleChecksumError": "verify",  # botocore: the body's CRC did not match what was sent
}


class TransientError(OSError):
    """A failure worth retrying that is ours to detect (an upload that did not land intact)."""

    kind = "verify"


class StorageUnavailable(OSError):
    """Transient errors outlasted every attempt. Ray retries the whole task on this one (and on no
    other exception): the store may be back by then, and the work item is deterministic."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 10
    base_seconds: float = 0.1
    max_seconds: float = 20.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2^attempt)], so that many clients throttled
        at once spread out instead of retrying in lockstep."""
        return rng.uniform(0.0, min(self.max_seconds, self.base_seconds * (2.0**attempt)))

    @staticmethod
    def from_env() -> "RetryPolicy":
        env = os.environ.get
        return RetryPolicy(
            attempts=int(env("VFMTOK_IO_ATTEMPTS", RetryPolicy.attempts)),
            base_seconds=float(env("VFMTOK_IO_BACKOFF_S", RetryPolicy.base_seconds)),
            max_seconds=float(env("VFMTOK_IO_BACKOFF_MAX_S", RetryPolicy.max_seconds)),
        )


def transient_kind(exc: BaseException) -> str | None:
    """The kind of a transient failure (``throttled``, ``server_error``, ``connection``,
    ``truncated``, ``timeout``, ``verify``), or None for an error that would only repeat."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StorageUnavailable):  # already retried in full: no second round on top
            return None
        if isinstance(e, TransientError):
            return e.kind
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return None
        response = getattr(e, "response", None)
        if isinstance(response, dict):  # botocore ClientError
            err = response.get("Error", {})
            status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            kind = _TRANSIENT_CODES.get(str(err.get("Code", ""))) or _TRANSIENT_CODES.get(status)
            if kind is None and status.startswith("5"):
                kind = "server_error"
            return kind
        for cls in type(e).__mro__:
            if cls.__name__ in _TRANSIENT_NAMES:
                return _TRANSIENT_NAMES[cls.__name__]
        e = e.__cause__ or e.__context__
    return None


def is_storage_fault(exc: BaseException) -> bool:
    """True for the store's weather (transient, or retried to exhaustion): an error that must
    propagate so that the work is retried, never be recorded as a property of the input."""
    return isinstance(exc, StorageUnavailable) or transient_kind(exc) is not None


class _Stats:
    """Process-wide counters: ``requests``, ``retries`` and ``retries.<kind>``."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: Counter = Counter()

    def add(self, **counts: int) -> None:
        with self._lock:
            self._counts.update({k.replace("__", "."): v for k, v in counts.items()})

    def snapshot(self) -> Counter:
        with self._lock:
            return Counter(self._counts)


STATS = _Stats()


@contextlib.contextmanager
def counting() -> Iterator[Counter]:
    """Yields a Counter that, on exit, holds the requests and retries made inside the block (by
    this process: a Ray task runs alone in its worker, so the difference is the task's own)."""
    before = STATS.snapshot()
    out: Counter = Counter()
    try:
        yield out
    finally:
        out.update(STATS.snapshot() - before)


def summarize(counts: Counter) -> dict:
    """``{"requests": n, "retries": n, "retries_by_kind": {...}}`` for a run summary."""
    return {
        "requests": counts.get("requests", 0),
        "retries": counts.get("retries", 0),
        "retries_by_kind": {k.split(".", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("retries.")},
    }


SLOTS = threading.BoundedSemaphore(int(os.environ.get("VFMTOK_IO_MAX_IN_FLIGHT", "16")))
_rng = random.Random()


def retrying(fn: Callable[..., T], *args, what: str, remote: bool = True, policy: RetryPolicy | None = None, **kwargs) -> T:
    """``fn(*args, **kwargs)``, retried on transient errors; ``what`` names it in logs and errors.

    A remote call also takes one of the process's request slots (``VFMTOK_IO_MAX_IN_FLIGHT``, 16 by
    default), which bounds the requests a process has open against the store at once, read-ahead
    threads included. Local calls are neither slotted nor counted as requests.
    """
    policy = policy or RetryPolicy.from_env()
    attempt = 0
    while True:
        try:
            if not remote:
                return fn(*args, **kwargs)
            STATS.add(requests=1)
            with SLOTS:
                return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - classified below; anything permanent is re-raised as is
            attempt += 1
            pause = _pause_before_retry(e, attempt, policy, what)
            if pause is None:
                raise
            time.sleep(pause)


async def retrying_async(fn: Callable[..., Awaitable[T]], *args, what: str, policy: RetryPolicy | None = None,
                         **kwargs) -> T:
    """:func:`retrying` for a coroutine function of a remote request, on an event loop. It takes no
    request slot: the caller holds one for the whole call (a thread's semaphore cannot be awaited)."""
    policy = policy or RetryPolicy.from_env()
    attempt = 0
    while True:
        try:
            STATS.add(requests=1)
            return await fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - classified below; anything permanent is re-raised as is
            attempt += 1
            pause = _pause_before_retry(e, attempt, policy, what)
            if pause is None:
                raise
            await asyncio.sleep(pause)


def _pause_before_retry(e: Exception, attempt: int, policy: RetryPolicy, what: str) -> float | None:
    """Seconds to wait before retrying after failed attempt number ``attempt``; None when ``e`` would
    only repeat. Raises :class:`StorageUnavailable` once the attempts are spent. Counts the retry."""
    kind = transient_kind(e)
    if kind is None:
        return None
    if attempt >= policy.attempts:
        raise StorageUnavailable(f"{what}: still failing after {attempt} attempts ({kind}): {e}") from e
    STATS.add(retries=1, **{f"retries__{kind}": 1})
    pause = policy.delay(attempt - 1, _rng)
    log.debug("%s: %s (%s); retry %d in %.2fs", what, kind, e, attempt, pause)
    return pause
