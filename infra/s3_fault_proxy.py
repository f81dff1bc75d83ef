"""A fault-injecting reverse proxy for S3, for testing how clients survive a flaky object store.

It sits on 127.0.0.1 in front of an S3-compatible server (moto's server mode, MinIO, ...) and
forwards requests byte for byte -- raw path, Host header and body unchanged, so SigV4
signatures made for the proxy's address stay valid upstream -- while injecting, with seeded
per-request probabilities, the failures real S3 traffic shows:

* ``slowdown``  503 SlowDown (S3's throttling answer); the request is not forwarded.
* ``error500``  500 InternalError; not forwarded.
* ``error502``  502 Bad Gateway from "a load balancer"; not forwarded.
* ``reset``     forwarded, then the connection is dropped without an answer: a PUT may have
                landed although the client saw a failure, the case idempotent retries exist for.
* ``truncate``  forwarded; the status and headers (with the full Content-Length) and about half
                of the body are sent, then the connection is dropped.
* ``slow``      forwarded; the headers go out at once and the body ``slow_seconds`` later (an
                answer without a body, e.g. to HEAD, is delayed as a whole).
* ``corrupt``   a request body is forwarded with one byte flipped (damage in transit). Real S3
                refuses such a PUT when it carries Content-MD5; moto stores it, so a client
                must notice from the stored ETag.

Use it from Python (``FaultProxy``, started in a background thread) or from the command line::

    python infra/s3_fault_proxy.py --upstream http://127.0.0.1:9000 --port 9100 --slowdown 0.05
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import ipaddress
import logging
import random
import re
import signal
import sys
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Literal, get_args
from xml.sax.saxutils import escape as xml_escape

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

logger = logging.getLogger("s3_fault_proxy")

FaultKind = Literal["slowdown", "error500", "error502", "reset", "truncate", "slow", "corrupt"]
# The order in which one uniform draw walks the cumulative rates; changing it changes which
# requests a given seed fails, so it is part of the reproducibility contract.
FAULT_KINDS: tuple[FaultKind, ...] = get_args(FaultKind)

# Headers that describe one connection rather than the message (RFC 9110 section 7.6.1), plus
# Expect: the proxy answers 100-continue itself and forwards a body it already holds.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
)
# aiohttp's client would otherwise add these; a header the caller did not send must not appear
# upstream (Content-Type and Accept-Encoding change what S3 stores and returns).
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")


@dataclass(frozen=True)
class FaultRates:
    """Per-request fault probabilities, and which requests they apply to.

    At most one fault is injected per request, so the rates must sum to at most 1. Requests
    outside the ``path_regex`` / ``methods`` filter are forwarded untouched and do not consume a
    random draw, so the faults a seed produces on the filtered requests do not depend on how
    much other traffic passes through.
    """

    slowdown: float = 0.0
    error500: float = 0.0
    error502: float = 0.0
    reset: float = 0.0
    truncate: float = 0.0
    slow: float = 0.0
    corrupt: float = 0.0
    slow_seconds: float = 0.5
    path_regex: str | None = None  # re.search against the raw path including the query string
    methods: tuple[str, ...] | None = None  # HTTP methods, case-insensitive

    def __post_init__(self) -> None:
        rates = [getattr(self, kind) for kind in FAULT_KINDS]
        for kind, rate in zip(FAULT_KINDS, rates):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fault rate {kind}={rate} is outside [0, 1]")
        if sum(rates) > 1.0 + 1e-9:
            raise ValueError(f"fault rates sum to {sum(rates)}, more than 1")
        if self.slow_seconds < 0:
            raise ValueError(f"slow_seconds={self.slow_seconds} is negative")
        if self.path_regex is not None:
            try:
                re.compile(self.path_regex)
            except re.error as exc:
                raise ValueError(f"path_regex {self.path_regex!r} is not a valid regex: {exc}") from exc

    def applies_to(self, method: str, path: str) -> bool:
        """Whether a request with this method and raw path (with query) is subject to faults."""
        if self.methods is not None and method.upper() not in {m.upper() for m in self.methods}:
            return False
        return self.path_regex is None or re.search(self.path_regex, path) is not None


def _s3_error(status: int, code: str, message: str, resource: str) -> web.Response:
    """An error answer shaped like S3's, so clients parse the code as they would from AWS."""
    request_id = uuid.uuid4().hex[:16].upper()
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{xml_escape(resource)}</Resource><RequestId>{request_id}</RequestId></Error>"
    )
    headers = {"x-amz-request-id": request_id}
    return web.Response(status=status, body=body.encode(), content_type="application/xml", headers=headers)


def _end_to_end(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The headers minus hop-by-hop ones, including any the Connection header names."""
    named = {token.strip().lower() for value in headers.getall("Connection", []) for token in value.split(",")}
    return CIMultiDict(
        (name, value)
        for name, value in headers.items()
        if name.lower() not in _HOP_BY_HOP and name.lower() not in named and not name.lower().startswith("proxy-")
    )


class FaultProxy:
    """The proxy, served by aiohttp on its own event loop in a background daemon thread.

    The thread lets synchronous tests and tools (boto3, s3fs's sync API) talk to it from the
    main thread. ``counts`` and ``set_rates`` are safe to use from any thread while it runs.
    """

    def __init__(
        self,
        upstream: str,
        rates: FaultRates = FaultRates(),
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        url = URL(upstream)
        if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/") or url.query_string:
            raise ValueError(f"upstream must be scheme://host[:port], got {upstream!r}")
        self._upstream = str(url.origin())
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._in_flight = 0
        self._rng = random.Random(seed)
        self._rates = rates
        self._counts = self._zero_counts()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.ServerRunner | None = None
        self._address: tuple[str, int] | None = None

    # -- control, from any thread -------------------------------------------------------------

    def start(self) -> None:
        """Start serving; returns once the socket listens, raising if it could not bind."""
        if self._thread is not None:
            raise RuntimeError("the proxy is already running")
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="s3-fault-proxy", daemon=True)
        self._thread.start()
        try:
            ready.result()
        except BaseException:
            self._thread.join()
            self._thread = None
            raise
        logger.info("proxying %s -> %s", self.endpoint, self._upstream)

    def stop(self) -> None:
        """Stop serving, close the upstream connections and join the thread; a no-op if stopped."""
        if self._thread is None:
            return
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """The URL clients use, with the port actually bound (``port=0`` picks a free one)."""
        if self._address is None:
            raise RuntimeError("the proxy is not running")
        host, port = self._address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the listening socket is bound to."""
        if self._address is None:
            raise RuntimeError("the proxy is not running")
        return self._address

    @property
    def counts(self) -> dict[str, int]:
        """A snapshot: injected faults per kind, ``requests`` (every request received),
        ``max_in_flight`` (the most requests open at once) and ``bytes_out`` (response bodies sent
        whole to clients)."""
        with self._lock:
            return dict(self._counts)

    def reset_counts(self) -> None:
        """Zero the counts, e.g. between phases of a test; the RNG sequence is not restarted."""
        with self._lock:
            self._counts = self._zero_counts()

    def set_rates(self, rates: FaultRates) -> None:
        """Switch the fault rates for the requests that arrive from now on (the RNG continues)."""
        with self._lock:
            self._rates = rates

    # -- the server thread --------------------------------------------------------------------

    @staticmethod
    def _zero_counts() -> dict[str, int]:
        return {"requests": 0, "max_in_flight": 0, "bytes_out": 0, **{kind: 0 for kind in FAULT_KINDS}}

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # reported to start(), which re-raises it
                ready.set_exception(exc)
                loop.run_until_complete(self._close())
                return
            ready.set_result(None)
            loop.run_forever()
            loop.run_until_complete(self._close())
        finally:
            self._address = None
            loop.close()

    async def _open(self) -> None:
        # auto_decompress=False: bodies pass through byte for byte even when S3 stored them with a
        # Content-Encoding. The cookie jar is a dummy so one client's cookies never reach another.
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        # The low-level server, not an Application: no router to normalise or reject odd S3 keys,
        # and no request-size cap. access_log=None keeps dropped connections out of the logs.
        server = web.Server(self._handle, access_log=None)
        self._runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        host, port = self._runner.addresses[0][:2]  # the socket's own address: port=0 is resolved
        self._address = (host, port)

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _choose_fault(self, method: str, path: str) -> tuple[FaultKind | None, float]:
        """Count the request and pick its fault with one draw; returns it and ``slow_seconds``."""
        with self._lock:
            self._counts["requests"] += 1
            rates = self._rates
            if not rates.applies_to(method, path):
                return None, rates.slow_seconds
            u = self._rng.random()
            cumulative = 0.0
            for kind in FAULT_KINDS:
                cumulative += getattr(rates, kind)
                if u < cumulative:
                    self._counts[kind] += 1
                    return kind, rates.slow_seconds
            return None, rates.slow_seconds

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Track how many requests are open at once (``max_in_flight``: what a client's
        concurrency bound is checked against), then serve the request."""
        with self._lock:
            self._in_flight += 1
            self._counts["max_in_flight"] = max(self._counts["max_in_flight"], self._in_flight)
        try:
            return await self._serve(request)
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _serve(self, request: web.BaseRequest) -> web.StreamResponse:
        # The low-level server has no router to answer Expect: 100-continue, so do it here;
        # botocore sends it with PUTs and would otherwise wait a second before sending the body.
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await request.content.read()
        fault, slow_seconds = self._choose_fault(request.method, request.raw_path)
        if fault == "corrupt" and body:
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
        if fault == "slowdown":
            return _s3_error(503, "SlowDown", "Please reduce your request rate.", request.path)
        if fault == "error500":
            return _s3_error(500, "InternalError", "We encountered an internal error. Please try again.", request.path)
        if fault == "error502":
            return web.Response(
                status=502, text="<html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html"
            )

        try:
            status, reason, headers, payload = await self._forward(request, body)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            logger.warning("upstream failed for %s %s: %r", request.method, request.raw_path, exc)
            return web.Response(status=502, text=f"upstream failed: {exc!r}")

        if fault == "reset" or (fault == "truncate" and not payload):
            return self._drop(request)
        if fault == "slow" and not payload:
            await asyncio.sleep(slow_seconds)  # no body to hold back (HEAD, empty object): delay it all
        response = web.StreamResponse(status=status, reason=reason, headers=headers)
        await response.prepare(request)  # sends the status line and headers right away
        if fault == "truncate":
            await self._write_all(request, response, payload[: len(payload) // 2])
            return self._drop(request, response)
        if fault == "slow" and payload:
            await asyncio.sleep(slow_seconds)
        if payload:
            await response.write(payload)
            with self._lock:
                self._counts["bytes_out"] += len(payload)
        await response.write_eof()
        return response

    async def _forward(
        self, request: web.BaseRequest, body: bytes
    ) -> tuple[int, str | None, CIMultiDict[str], bytes]:
        """Send the request upstream as received; return its status, reason, headers, body."""
        assert self._session is not None
        headers = _end_to_end(request.headers)
        # Host stays as the client sent it (in the signature); the body is sent with its length.
        headers.popall("Content-Length", None)
        if request.body_exists or "Content-Length" in request.headers:
            headers["Content-Length"] = str(len(body))
        url = URL(self._upstream + request.raw_path, encoded=True)  # encoded: never re-quote the path
        async with self._session.request(
            request.method,
            url,
            headers=headers,
            data=body if "Content-Length" in headers else None,
            skip_auto_headers=_NO_AUTO_HEADERS,
            allow_redirects=False,
        ) as upstream:
            payload = await upstream.read()
            out = _end_to_end(upstream.headers)
        # The body is relayed exactly as read, so its length is the Content-Length; a HEAD answer
        # keeps upstream's, which describes the object it did not send.
        if request.method != "HEAD":
            out.popall("Content-Length", None)
            out["Content-Length"] = str(len(payload))
        return upstream.status, upstream.reason, out, payload

    @staticmethod
    async def _write_all(request: web.BaseRequest, response: web.StreamResponse, data: bytes) -> None:
        """Write ``data`` and wait until the transport has handed all of it to the kernel, so that
        the abort which follows cannot discard it (abort drops asyncio's write buffer)."""
        assert request.transport is not None
        request.transport.set_write_buffer_limits(high=0)
        await response.write(data)
        await request.writer.drain()

    @staticmethod
    def _drop(request: web.BaseRequest, response: web.StreamResponse | None = None) -> web.StreamResponse:
        """Close the client connection abruptly, without (the rest of) an answer.

        aiohttp still wants a response object; it fails to send it on the closed transport and
        treats that as a client disconnect, which it does not log.
        """
        if request.transport is not None:
            request.transport.abort()
        return response if response is not None else web.Response(status=502)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="s3_fault_proxy",
        description="A fault-injecting reverse proxy for S3: forwards to --upstream and injects "
        "throttling, errors, dropped connections, truncated and slow bodies at the given rates.",
    )
    p.add_argument("--upstream", required=True, help="the S3 endpoint to forward to, e.g. http://127.0.0.1:9000")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9100, help="port to listen on (default 9100; 0 picks a free one)")
    p.add_argument("--allow-remote", action="store_true", help="allow a --host that is not a loopback address")
    for kind, what in [
        ("slowdown", "503 SlowDown, not forwarded"),
        ("error500", "500 InternalError, not forwarded"),
        ("error502", "502 Bad Gateway, not forwarded"),
        ("reset", "forwarded, then the connection is dropped without an answer"),
        ("truncate", "forwarded; headers and half the body, then the connection is dropped"),
        ("slow", "forwarded; the body is delayed by --slow-seconds"),
        ("corrupt", "a request body is forwarded with one byte flipped"),
    ]:
        p.add_argument(f"--{kind}", type=float, default=0.0, metavar="P", help=f"probability of {what} (default 0)")
    p.add_argument("--slow-seconds", type=float, default=0.5, help="delay of a slow body (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-request fault draw (default 0)")
    p.add_argument("--path-regex", help="inject faults only where this regex matches the path with query")
    p.add_argument("--methods", help="inject faults only on these comma-separated HTTP methods, e.g. GET,PUT")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the proxy until SIGINT or SIGTERM, logging the fault counts every 10 s and at exit."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.allow_remote and not _is_loopback(args.host):
        # A fault proxy forwards unauthenticated traffic to the store behind it; exposing it
        # beyond this machine has to be a deliberate choice.
        logger.error("refusing to listen on non-loopback --host %s without --allow-remote", args.host)
        return 2
    try:
        rates = FaultRates(
            **{kind: getattr(args, kind) for kind in FAULT_KINDS},
            slow_seconds=args.slow_seconds,
            path_regex=args.path_regex,
            methods=tuple(m.strip() for m in args.methods.split(",")) if args.methods else None,
        )
    except ValueError as exc:
        logger.error("%s", exc)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    proxy = FaultProxy(args.upstream, rates, seed=args.seed, host=args.host, port=args.port)
    proxy.start()
    try:
        while not stop.wait(10.0):
            logger.info("counts %s", proxy.counts)
    finally:
        proxy.stop()
        logger.info("final counts %s", proxy.counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
