"""The S3 fault proxy (infra/s3_fault_proxy.py): byte-exact pass-through, each injected fault as a
real client sees it, seeded reproducibility, the path/method filters, and loopback-only binding."""

from __future__ import annotations

import gzip
import http.server
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config

from infra.s3_fault_proxy import FaultProxy, FaultRates

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infra" / "s3_fault_proxy.py"


@pytest.fixture()
def proxy(s3_endpoint):
    with FaultProxy(s3_endpoint) as p:
        yield p


def _client(endpoint: str):
    # One attempt: the test must see each injected fault, not botocore's retry of it.
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(retries={"total_max_attempts": 1})
    )


def _status(exc: botocore.exceptions.ClientError) -> int:
    return exc.response["ResponseMetadata"]["HTTPStatusCode"]


def test_passes_requests_through_unchanged(proxy, s3_bucket, s3_endpoint):
    bucket, _ = s3_bucket
    data = os.urandom(200_000)
    s3 = _client(proxy.endpoint)
    put = s3.put_object(Bucket=bucket, Key="dir/a b+c.bin", Body=data)
    got = s3.get_object(Bucket=bucket, Key="dir/a b+c.bin")
    assert got["Body"].read() == data
    assert got["ContentLength"] == len(data) and got["ETag"] == put["ETag"]
    assert s3.head_object(Bucket=bucket, Key="dir/a b+c.bin")["ContentLength"] == len(data)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="dir/")["Contents"]
    assert [(o["Key"], o["Size"]) for o in listed] == [("dir/a b+c.bin", len(data))]
    # The object really is upstream, under the same key (the raw path was not re-encoded).
    assert _client(s3_endpoint).get_object(Bucket=bucket, Key="dir/a b+c.bin")["Body"].read() == data
    faults = {"slowdown": 0, "error500": 0, "error502": 0, "reset": 0, "truncate": 0, "slow": 0, "corrupt": 0}
    counts = proxy.counts
    assert len(data) < counts.pop("bytes_out") < len(data) + 4000  # the object, and a listing's XML
    assert counts == {"requests": 4, "max_in_flight": 1, **faults}


class _Recorder(http.server.BaseHTTPRequestHandler):
    """An upstream that records what it receives and answers with a gzip-encoded body."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, list[tuple[str, str]], bytes]] = []
    payload = gzip.compress(b"stored gzip-encoded" * 50)

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append((self.command, self.path, self.headers.items(), body))
        self.send_response(200)
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args) -> None:
        pass


def test_forwards_raw_path_host_and_bytes():
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    request = (
        b"PUT /bkt/a%2Fb%20c+d?x=1&y=%2F HTTP/1.1\r\nHost: signed.example:1234\r\nAuthorization: AWS4 sig\r\n"
        b"Connection: close, X-Hop\r\nX-Hop: 1\r\nProxy-Authorization: p\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    try:
        with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as p:
            with socket.create_connection(p.address) as conn:
                conn.sendall(request)
                answer = b""
                while chunk := conn.recv(65536):
                    answer += chunk
    finally:
        upstream.shutdown()
        upstream.server_close()
    method, path, headers, body = _Recorder.seen[-1]
    assert (method, path, body) == ("PUT", "/bkt/a%2Fb%20c+d?x=1&y=%2F", b"hello")
    assert headers == [("Host", "signed.example:1234"), ("Authorization", "AWS4 sig"), ("Content-Length", "5")]
    head, _, got = answer.partition(b"\r\n\r\n")
    assert got == _Recorder.payload  # not decompressed on the way through
    assert b"\r\nContent-Encoding: gzip\r\n" in head and f"\r\nContent-Length: {len(got)}\r\n".encode() in head


def test_error_answers_are_s3_shaped_and_not_forwarded(proxy, s3_bucket, s3_endpoint):
    bucket, _ = s3_bucket
    s3, upstream = _client(proxy.endpoint), _client(s3_endpoint)
    upstream.put_object(Bucket=bucket, Key="k", Body=b"x")

    proxy.set_rates(FaultRates(slowdown=1.0))
    with pytest.raises(botocore.exceptions.ClientError) as err:
        s3.get_object(Bucket=bucket, Key="k")
    assert err.value.response["Error"]["Code"] == "SlowDown" and _status(err.value) == 503
    with pytest.raises(botocore.exceptions.ClientError) as err:
        s3.put_object(Bucket=bucket, Key="throttled", Body=b"y")
    assert _status(err.value) == 503
    assert "Contents" not in upstream.list_objects_v2(Bucket=bucket, Prefix="throttled")

    proxy.set_rates(FaultRates(error500=1.0))
    with pytest.raises(botocore.exceptions.ClientError) as err:
        s3.get_object(Bucket=bucket, Key="k")
    assert err.value.response["Error"]["Code"] == "InternalError" and _status(err.value) == 500

    proxy.set_rates(FaultRates(error502=1.0))
    with pytest.raises(botocore.exceptions.ClientError) as err:
        s3.get_object(Bucket=bucket, Key="k")
    assert _status(err.value) == 502

    proxy.set_rates(FaultRates())
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"x"
    counts = proxy.counts
    assert (counts["slowdown"], counts["error500"], counts["error502"], counts["requests"]) == (2, 1, 1, 5)


def test_reset_drops_the_answer_after_the_put_landed(proxy, s3_bucket, s3_endpoint):
    bucket, _ = s3_bucket
    data = os.urandom(50_000)
    s3 = _client(proxy.endpoint)
    proxy.set_rates(FaultRates(reset=1.0, methods=("PUT",)))
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        s3.put_object(Bucket=bucket, Key="landed", Body=data)
    assert _client(s3_endpoint).get_object(Bucket=bucket, Key="landed")["Body"].read() == data
    # GET is outside the methods filter.
    assert s3.get_object(Bucket=bucket, Key="landed")["Body"].read() == data
    assert proxy.counts["reset"] == 1


def test_truncate_never_returns_short_data(proxy, s3_bucket, s3_endpoint):
    bucket, _ = s3_bucket
    data = os.urandom(100_000)
    _client(s3_endpoint).put_object(Bucket=bucket, Key="big", Body=data)
    s3 = _client(proxy.endpoint)
    proxy.set_rates(FaultRates(truncate=1.0, methods=("GET",)))
    got = s3.get_object(Bucket=bucket, Key="big")
    assert got["ContentLength"] == len(data)  # the headers promise the whole object
    with pytest.raises(botocore.exceptions.ResponseStreamingError, match=r"IncompleteRead\(50000 bytes read"):
        got["Body"].read()
    assert s3.head_object(Bucket=bucket, Key="big")["ContentLength"] == len(data)  # HEAD is not filtered in
    assert proxy.counts["truncate"] == 1


def test_corrupt_flips_one_byte_of_the_stored_body(proxy, s3_bucket, s3_endpoint):
    bucket, _ = s3_bucket
    data = os.urandom(10_000)
    proxy.set_rates(FaultRates(corrupt=1.0, methods=("PUT",)))
    # botocore's default CRC32 lets moto (and the client) notice the damage; without it the store
    # keeps the damaged bytes, which is what this fault is for.
    unchecked = boto3.client("s3", endpoint_url=proxy.endpoint, region_name="us-east-1", config=Config(
        retries={"total_max_attempts": 1}, request_checksum_calculation="when_required",
        response_checksum_validation="when_required"))
    unchecked.put_object(Bucket=bucket, Key="damaged", Body=data)
    stored = _client(s3_endpoint).get_object(Bucket=bucket, Key="damaged")["Body"].read()
    assert len(stored) == len(data)
    assert [i for i in range(len(data)) if stored[i] != data[i]] == [len(data) // 2]
    assert proxy.counts["corrupt"] == 1


def test_slow_delays_the_body_and_delivers_it(proxy, s3_bucket):
    bucket, _ = s3_bucket
    s3 = _client(proxy.endpoint)
    s3.put_object(Bucket=bucket, Key="k", Body=b"payload")
    proxy.set_rates(FaultRates(slow=1.0, slow_seconds=0.3, methods=("GET",)))
    start = time.monotonic()
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"payload"
    assert time.monotonic() - start >= 0.3
    assert proxy.counts["slow"] == 1


def _failures(endpoint: str, bucket: str, requests: int) -> list[bool]:
    s3 = _client(endpoint)
    out = []
    for i in range(requests):
        try:
            if i % 2:
                s3.get_object(Bucket=bucket, Key="k")["Body"].read()
            else:
                s3.head_object(Bucket=bucket, Key="k")
            out.append(False)
        except botocore.exceptions.ClientError as exc:
            assert _status(exc) == 503
            out.append(True)
    return out


def test_same_seed_same_faults(s3_endpoint, s3_bucket):
    bucket, _ = s3_bucket
    _client(s3_endpoint).put_object(Bucket=bucket, Key="k", Body=b"x")
    runs = []
    for seed in (7, 7, 8):
        with FaultProxy(s3_endpoint, FaultRates(slowdown=0.3), seed=seed) as p:
            runs.append(_failures(p.endpoint, bucket, 40))
            assert p.counts["slowdown"] == sum(runs[-1])
    assert runs[0] == runs[1] != runs[2]
    assert 4 <= sum(runs[0]) <= 24
    # One uniform draw per request from random.Random(seed), compared against the rate.
    rng = random.Random(7)
    assert runs[0] == [rng.random() < 0.3 for _ in range(40)]


def test_path_and_query_filter(proxy, s3_bucket, s3_endpoint):
    bucket, _ = s3_bucket
    for key in ("flaky-1", "steady-1"):
        _client(s3_endpoint).put_object(Bucket=bucket, Key=key, Body=key.encode())
    s3 = _client(proxy.endpoint)
    proxy.set_rates(FaultRates(slowdown=0.5, path_regex=r"/flaky-"))
    flaky = []
    for _ in range(20):
        assert s3.get_object(Bucket=bucket, Key="steady-1")["Body"].read() == b"steady-1"
        try:
            s3.get_object(Bucket=bucket, Key="flaky-1")["Body"].read()
            flaky.append(False)
        except botocore.exceptions.ClientError:
            flaky.append(True)
    # Unfiltered requests consume no draw: the flaky ones see the seed's sequence unshifted.
    rng = random.Random(0)
    assert flaky == [rng.random() < 0.5 for _ in range(20)]
    assert proxy.counts["requests"] == 40 and proxy.counts["slowdown"] == sum(flaky)

    proxy.set_rates(FaultRates(slowdown=1.0, path_regex=r"[?&]list-type=2"))  # the query counts too
    with pytest.raises(botocore.exceptions.ClientError):
        s3.list_objects_v2(Bucket=bucket)
    assert s3.get_object(Bucket=bucket, Key="flaky-1")["Body"].read() == b"flaky-1"


def test_rates_are_validated():
    with pytest.raises(ValueError, match="sum"):
        FaultRates(slowdown=0.6, reset=0.5)
    with pytest.raises(ValueError, match="outside"):
        FaultRates(slow=-0.1)
    with pytest.raises(ValueError, match="regex"):
        FaultRates(path_regex="(")


def _listening(port: int) -> set[str]:
    """Local addresses (kernel hex notation) of listening TCP sockets on ``port``."""
    found = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if table.exists():
            for line in table.read_text().splitlines()[1:]:
                fields = line.split()
                addr, hex_port = fields[1].split(":")
                if fields[3] == "0A" and int(hex_port, 16) == port:
                    found.add(addr)
    return found


def test_binds_loopback_only(s3_endpoint):
    with FaultProxy(s3_endpoint) as p:
        host, port = p.address
        assert host == "127.0.0.1" and p.endpoint == f"http://127.0.0.1:{port}"
        if Path("/proc/net/tcp").exists():
            assert _listening(port) == {"0100007F"}  # 127.0.0.1, and no other address
    with pytest.raises(RuntimeError):
        p.endpoint  # noqa: B018 -- stopped, so there is no endpoint

    refused = subprocess.run(
        [sys.executable, str(SCRIPT), "--upstream", s3_endpoint, "--host", "0.0.0.0", "--port", "0"],
        capture_output=True, text=True, timeout=30,
    )
    assert refused.returncode == 2
    assert len(refused.stderr.splitlines()) == 1 and "0.0.0.0" in refused.stderr and "--allow-remote" in refused.stderr


def test_cli_serves_until_sigterm(s3_endpoint, s3_bucket):
    bucket, _ = s3_bucket
    with subprocess.Popen(
        [sys.executable, str(SCRIPT), "--upstream", s3_endpoint, "--port", "0", "--error500", "1", "--methods", "GET"],
        stderr=subprocess.PIPE, text=True,
    ) as cli:
        try:
            endpoint = re.search(r"proxying (http://127\.0\.0\.1:\d+) ", cli.stderr.readline()).group(1)
            s3 = _client(endpoint)
            s3.put_object(Bucket=bucket, Key="k", Body=b"x")
            with pytest.raises(botocore.exceptions.ClientError, match="InternalError"):
                s3.get_object(Bucket=bucket, Key="k")
            cli.send_signal(signal.SIGTERM)
            assert cli.wait(timeout=10) == 0
            assert "final counts {'requests': 2, 'max_in_flight': 1, 'bytes_out': 0, 'slowdown': 0, 'error500': 1" in cli.stderr.read()
        finally:
            cli.kill()
