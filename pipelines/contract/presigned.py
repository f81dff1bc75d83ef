"""Whole-object S3 GETs at about half the client CPU of s3fs's: botocore signs, aiohttp fetches.

Why: a folder dataset costs one GET per image. At the job's target (1,200 images/s per GPU, 8 GPUs
a node) that is about 10,000 GETs/s per node, and a GET through s3fs and botocore's request
pipeline (parameter checks, event hooks, response parsing) costs about 2 ms of client CPU: some 20
cores of a node spent on bookkeeping. Here botocore only presigns the request (the credentials,
their refresh, the bucket's region and the addressing style all stay botocore's) and aiohttp sends
it on fsspec's event loop: about 0.9 ms per GET (``python -m bench.s3_get`` measures both side by
side).

It is used only where it sends the same request as s3fs would: a filesystem with no per-request
extras (requester pays, SSE-C keys, version ids), no proxy and no client certificate, and
``VFMTOK_S3_PRESIGNED_GET`` not ``0``. Certificates are checked as botocore checks them
(``verify``, else ``AWS_CA_BUNDLE`` or the profile's ``ca_bundle``, else botocore's bundle).
Anything else goes through s3fs. An answer it does not handle (a redirect, a refused signature, a
TLS failure, any other 4xx) sends that object through s3fs, so errors read exactly as they always
did; when s3fs then succeeds where the presigned GET did not, this process stops presigning for
that filesystem.

A presigned URL holds the access key id (and a session token, if any) in its query, so no URL is
ever put into an exception or a log line here.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import re
import ssl
import threading
import weakref

from pipelines.contract.retry import TransientError, transient_kind

log = logging.getLogger(__name__)

SWITCH = "VFMTOK_S3_PRESIGNED_GET"
EXPIRES_S = 900  # a URL is used the moment it is made; this only bounds a leaked one's life
# Credentials given to the client sign the URL as they would sign the request.
_CLIENT_OPTIONS = {"endpoint_url", "region_name", "verify", "aws_access_key_id", "aws_secret_access_key",
                   "aws_session_token"}
_CONFIG_OPTIONS = {"retries", "max_pool_connections", "connect_timeout", "read_timeout", "s3", "signature_version",
                   "region_name", "user_agent_extra"}
# Proxies botocore takes from the environment (aiohttp would too, but with .netrc credentials on top).
_ENVIRONMENT = {"http_proxy", "https_proxy", "all_proxy"}
_QUERY = re.compile(r"\?\S*")


class _Unhandled(Exception):
    """An answer that only s3fs knows how to read; carries no URL."""


class _Weather(TransientError):
    """A transient failure of a presigned GET (throttled, a server error, a broken connection)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def is_invalid_range(exc: BaseException) -> bool:
    """Whether an s3fs error is S3's answer to a range request on an empty object (416)."""
    response = getattr(exc.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") == "InvalidRange"


def eligible(fs) -> bool:
    """Whether a presigned GET on ``fs`` is the same request s3fs would send (see the module docstring)."""
    if os.environ.get(SWITCH, "1") == "0" or _ENVIRONMENT & {k.lower() for k in os.environ}:
        return False
    return (not getattr(fs, "version_aware", True) and not fs.req_kw and not fs.s3_additional_kwargs
            and set(fs.client_kwargs) <= _CLIENT_OPTIONS and set(fs.config_kwargs) <= _CONFIG_OPTIONS)


class PresignedGet:
    """Presigned GETs for one s3fs filesystem; its coroutines run on the filesystem's event loop."""

    def __init__(self, fs):
        self.fs = fs
        self.presigning = True
        self._session = None  # made on the loop, at first use

    async def fetch(self, path: str, n: int) -> bytes:
        """At most the first ``n`` bytes of the object (b"" for an empty one), one request."""
        if not self.presigning:
            return await self._through_s3fs(path, n)
        try:
            return await self._get(path, n)
        except _Unhandled as why:
            data = await self._through_s3fs(path, n)  # raises what s3fs raises, e.g. FileNotFoundError
            if self.presigning:
                self.presigning = False
                log.info("presigned GETs stop in this process: s3fs read s3://%s where one failed (%s)", path, why)
            return data

    async def _through_s3fs(self, path: str, n: int) -> bytes:
        try:
            return await self.fs._cat_file(path, start=0, end=n)
        except OSError as e:
            if is_invalid_range(e):
                return b""
            raise

    async def _get(self, path: str, n: int) -> bytes:
        bucket, key, _ = self.fs.split_path(path)
        await self.fs.set_session()
        client = await self.fs.get_s3(bucket)
        url = await client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                  ExpiresIn=EXPIRES_S)
        try:
            async with self._client_session().get(url, headers={"Range": f"bytes=0-{n - 1}"},
                                                  allow_redirects=False) as r:
                if r.status in (200, 206):
                    return await _body(r, n)
                if r.status == 416:
                    return b""
                if r.status >= 500:
                    kind = "throttled" if r.status == 503 else "server_error"
                    raise _Weather(kind, f"GET s3://{path}: HTTP {r.status}")
                raise _Unhandled(f"HTTP {r.status}")
        except (_Unhandled, _Weather):
            raise
        except Exception as e:  # noqa: BLE001 - sorted into the store's weather or "ask s3fs"
            failure = _sorted(e, path)
        raise failure  # outside the handler, so that the error naming the URL is not its context

    def _client_session(self):
        import aiohttp
        from botocore.httpsession import get_cert_path

        if self._session is None:
            config = self.fs.config_kwargs
            verify = self.fs.client_kwargs.get("verify")
            if verify is None:
                verify = self.fs.session.get_config_variable("ca_bundle") or True
            tls = False if verify is False else ssl.create_default_context(cafile=get_cert_path(verify))
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.get("connect_timeout", 60),
                                            sock_read=config.get("read_timeout", 60))
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls), timeout=timeout,
                                                  auto_decompress=False)
            atexit.register(_close, self.fs.loop, self._session, os.getpid())
        return self._session


def _sorted(error: Exception, path: str) -> Exception:
    """The store's weather (retried) or "ask s3fs" for an aiohttp failure, its text without the URL's query."""
    import aiohttp

    message = _QUERY.sub("?...", f"{type(error).__name__}: {error}")
    if isinstance(error, (ssl.SSLError, aiohttp.ClientSSLError)):
        return _Unhandled(message)
    kind = transient_kind(error)
    return _Unhandled(message) if kind is None else _Weather(kind, f"GET s3://{path}: {message}")


async def _body(response, n: int) -> bytes:
    """The body, at most ``n`` bytes: a store that ignores the Range header is not read on. (A body
    cut short of its Content-Length raises aiohttp's ClientPayloadError, a transient failure.)"""
    chunks, got = [], 0
    async for chunk in response.content.iter_chunked(1 << 20):
        chunks.append(chunk)
        got += len(chunk)
        if got >= n:
            break
    return b"".join(chunks)[:n]


def _close(loop, session, pid: int) -> None:
    """At exit, in the process that made it: close the session on its loop (quietly: the loop may be gone)."""
    if os.getpid() != pid or session.closed or not loop.is_running():
        return
    try:
        asyncio.run_coroutine_threadsafe(session.close(), loop).result(timeout=5)
    except Exception:  # noqa: BLE001 - best effort at interpreter exit
        pass


_readers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def reader_for(fs) -> PresignedGet | None:
    """This process's presigned reader for ``fs``, or None where :func:`eligible` says no."""
    if not eligible(fs):
        return None
    with _lock:
        mine = _readers.get(fs)
        if mine is None or mine[0] != os.getpid():  # a forked child makes its own session
            mine = _readers[fs] = (os.getpid(), PresignedGet(fs))
        return mine[1]
