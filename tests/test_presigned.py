"""Presigned S3 GETs (pipelines/contract/presigned.py) through storage.read_many: the same bytes and
errors as s3fs, the store's weather retried, a refused presigned GET answered through s3fs, and no
credential in any error. Real parts: moto's server on 127.0.0.1 and the fault proxy in infra/."""

from __future__ import annotations

import itertools
import os

import pytest
import s3fs

from infra.s3_fault_proxy import FaultRates
from pipelines.contract import presigned, retry
from pipelines.contract.retry import STATS, StorageUnavailable, counting
from pipelines.contract.storage import TooLarge, filesystem, read_bytes, read_many

SECRET_TOKEN = "SessionTokenThatMustNotLeak"


def _via(opts: dict, endpoint: str) -> dict:
    return {**opts, "client_kwargs": {**opts["client_kwargs"], "endpoint_url": endpoint}}


def _objects(bucket: str, opts: dict) -> dict[str, bytes]:
    """Objects of distinct sizes (an empty one among them), written straight to the server."""
    objects = {f"{bucket}/o/{i:03d}": bytes([i % 251]) * (i * 997) for i in range(40)}
    s3fs.S3FileSystem(skip_instance_cache=True, **opts).pipe(objects)
    return objects


def _results(futures) -> list:
    out = []
    for f in futures:
        try:
            out.append(f.result())
        except Exception as e:  # noqa: BLE001 - the test compares what each path raised
            out.append(e)
    return out


def _chain(error: BaseException) -> str:
    """Every exception an error carries (causes and contexts), as a traceback would show them and more."""
    out = []
    while error is not None:
        out.append(f"{type(error).__name__}: {error!r} {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(out)


def test_presigned_reads_equal_s3fs_reads_in_order(s3_bucket):
    bucket, opts = s3_bucket
    objects = _objects(bucket, opts)
    fs, _ = filesystem(f"s3://{bucket}", opts)
    reader = presigned.reader_for(fs)
    assert reader is not None
    paths = list(objects) + [f"{bucket}/o/missing"]
    got = _results(read_many(fs, paths, limit=1 << 20, in_flight=8))
    assert got[:-1] == list(objects.values())  # a sequence: the order is promised
    assert isinstance(got[-1], FileNotFoundError)  # as s3fs says it
    with pytest.raises(FileNotFoundError):
        read_bytes(fs, paths[-1])
    assert reader.presigning  # a missing key is the input's fault, not the presigned GET's


def test_credentials_given_to_the_client_sign_presigned_reads(s3_bucket):
    bucket, opts = s3_bucket
    objects = _objects(bucket, opts)
    client = {**opts["client_kwargs"], "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    fs, _ = filesystem(f"s3://{bucket}", {"client_kwargs": client})
    assert presigned.reader_for(fs) is not None
    assert _results(read_many(fs, list(objects), limit=1 << 20, in_flight=4)) == list(objects.values())


def test_a_presigned_read_past_the_limit_is_too_large(s3_bucket):
    bucket, opts = s3_bucket
    objects = _objects(bucket, opts)
    fs, _ = filesystem(f"s3://{bucket}", opts)
    big = f"{bucket}/o/039"  # 38,883 bytes
    [future] = read_many(fs, [big], limit=len(objects[big]) - 1, in_flight=4)
    with pytest.raises(TooLarge):
        future.result()
    [future] = read_many(fs, [big], limit=len(objects[big]), in_flight=4)
    assert future.result() == objects[big]


def test_the_store_weather_is_retried_and_counted(s3_bucket, proxy):
    bucket, opts = s3_bucket
    objects = _objects(bucket, opts)
    fs, _ = filesystem(f"s3://{bucket}", _via(opts, proxy.endpoint))
    assert presigned.reader_for(fs) is not None
    proxy.set_rates(FaultRates(slowdown=0.2, reset=0.1, truncate=0.2, methods=("GET",)))
    with counting() as counts:
        got = _results(read_many(fs, list(objects), limit=1 << 20, in_flight=8))
    assert got == list(objects.values())
    kinds = {k.split(".", 1)[1] for k in counts if k.startswith("retries.")}
    assert {"throttled", "truncated"} <= kinds
    assert counts["retries"] >= proxy.counts["slowdown"] + proxy.counts["truncate"] - 1  # an empty body cannot be cut


def test_a_refused_presigned_get_is_answered_through_s3fs_and_presigning_stops(s3_bucket, monkeypatch):
    """A store that refuses query-string signatures (a bucket policy can) answers 403; here a URL
    naming another bucket draws a 4xx from moto in the same place."""
    bucket, opts = s3_bucket
    objects = _objects(bucket, opts)
    fs, _ = filesystem(f"s3://{bucket}", opts)
    reader = presigned.reader_for(fs)
    client = fs.s3
    sign = client.generate_presigned_url

    async def elsewhere(method, Params, **kw):  # noqa: N803 - botocore's spelling
        return await sign(method, Params={**Params, "Bucket": "no-such-bucket"}, **kw)

    monkeypatch.setattr(client, "generate_presigned_url", elsewhere)
    before = STATS.snapshot()["requests"]
    got = _results(read_many(fs, list(objects), limit=1 << 20, in_flight=4))
    assert got == list(objects.values())
    assert not reader.presigning
    # Once refused, each object costs one request again (the first few were in flight already).
    assert STATS.snapshot()["requests"] - before <= len(objects) + 4


def test_no_credential_reaches_an_error(s3_bucket, proxy, monkeypatch):
    bucket, opts = s3_bucket
    objects = _objects(bucket, opts)
    fs, _ = filesystem(f"s3://{bucket}", {**_via(opts, proxy.endpoint), "token": SECRET_TOKEN})
    monkeypatch.setenv("VFMTOK_IO_ATTEMPTS", "2")
    monkeypatch.setenv("VFMTOK_IO_BACKOFF_S", "0")
    proxy.set_rates(FaultRates(reset=1.0, methods=("GET",)))
    [future] = read_many(fs, list(objects)[5:6], limit=1 << 20, in_flight=4)
    with pytest.raises(StorageUnavailable) as caught:
        future.result()
    text = _chain(caught.value)
    assert "connection" in text
    for secret in (SECRET_TOKEN, "X-Amz-Signature", "X-Amz-Credential", "testing/"):
        assert secret not in text


def test_a_timeout_that_names_the_url_is_retried_without_it(s3_bucket, monkeypatch):
    """aiohttp names the whole URL in a connect timeout; a presigned URL's query holds credentials.
    A timeout to a live server cannot be caused here, so aiohttp's request raises it once."""
    import aiohttp

    bucket, opts = s3_bucket
    objects = _objects(bucket, opts)
    fs, _ = filesystem(f"s3://{bucket}", {**opts, "token": SECRET_TOKEN})
    real_get, seen = aiohttp.ClientSession.get, []

    def get(self, url, **kw):
        if not seen:
            seen.append(str(url))
            raise aiohttp.ConnectionTimeoutError(f"Connection timeout to host {url}")
        return real_get(self, url, **kw)

    monkeypatch.setattr(aiohttp.ClientSession, "get", get)
    logged = []
    monkeypatch.setattr(retry.log, "debug", lambda *a: logged.append(a[0] % a[1:]))
    path = list(objects)[7]
    monkeypatch.setenv("VFMTOK_IO_ATTEMPTS", "1")  # the error itself, whole chain
    with pytest.raises(StorageUnavailable) as caught:
        next(read_many(fs, [path], limit=1 << 20, in_flight=4)).result()
    assert SECRET_TOKEN in seen[0]  # the URL did carry it
    assert "Connection timeout" in _chain(caught.value) and SECRET_TOKEN not in _chain(caught.value)
    seen.clear()
    monkeypatch.setenv("VFMTOK_IO_ATTEMPTS", "3")  # retried, and its log line is clean too
    with counting() as counts:
        assert next(read_many(fs, [path], limit=1 << 20, in_flight=4)).result() == objects[path]
    assert counts["retries.timeout"] == 1
    assert len(logged) == 1 and "Connection timeout" in logged[0] and SECRET_TOKEN not in logged[0]


@pytest.mark.parametrize("change", ["requester_pays", "sse", "switch", "proxy_env", "client_certificate"])
def test_requests_with_extras_go_through_s3fs(s3_bucket, monkeypatch, change):
    bucket, opts = s3_bucket
    extra = {"requester_pays": {"requester_pays": True},
             "sse": {"s3_additional_kwargs": {"ServerSideEncryption": "AES256"}},
             "client_certificate": {"config_kwargs": {"client_cert": "/nonexistent.pem"}}}.get(change, {})
    if change == "switch":
        monkeypatch.setenv(presigned.SWITCH, "0")
    if change == "proxy_env":
        monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    fs, _ = filesystem(f"s3://{bucket}", {**opts, **extra})
    assert presigned.reader_for(fs) is None
    objects = _objects(bucket, opts)
    if change not in ("proxy_env", "client_certificate"):  # neither the proxy nor the certificate is there
        assert _results(read_many(fs, list(objects), limit=1 << 20, in_flight=4)) == list(objects.values())


def test_read_ahead_is_bounded_and_an_abandoned_read_frees_its_slots(s3_bucket, proxy):
    bucket, opts = s3_bucket
    objects = _objects(bucket, opts)
    fs, _ = filesystem(f"s3://{bucket}", _via(opts, proxy.endpoint))
    proxy.set_rates(FaultRates(slow=1.0, slow_seconds=0.2, methods=("GET",)))
    proxy.reset_counts()
    futures = read_many(fs, list(objects), limit=1 << 20, in_flight=6)
    first = list(itertools.islice(futures, 2))
    assert [f.result() for f in first] == list(objects.values())[:2]
    futures.close()
    # 7 started: 6 ahead, then one more as the second was taken; the rest were never sent.
    assert proxy.counts["requests"] == 7
    assert proxy.counts["max_in_flight"] >= 3  # many at a time (the proxy may see 7 overlap for an instant)
    free = retry.SLOTS._value  # noqa: SLF001 - the semaphore's count is the point
    assert free == int(os.environ.get("VFMTOK_IO_MAX_IN_FLIGHT", "16"))
