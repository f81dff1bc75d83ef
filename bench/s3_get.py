"""Client CPU per S3 GET: presigned GETs on aiohttp against s3fs's botocore calls, side by side.

A local S3 server (moto, its own process on 127.0.0.1) holds photo-sized objects; the folder reader's
own path (``storage.read_many``, 16 requests in flight) reads all of them with presigned GETs and
with them switched off (``VFMTOK_S3_PRESIGNED_GET=0``, every GET through s3fs), in interleaved
rounds. Printed: this process's CPU milliseconds per GET for each (all its threads, the event loop
included), the server's, their ratio, and whether both read the same bytes.

Why it matters: a node feeding 8 GPUs at 1,200 images/s each makes about 10,000 GETs/s; every
millisecond of client CPU per GET is 10 cores.

Run: ``python -m bench.s3_get`` (about 30 seconds).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import time
import zlib
from dataclasses import dataclass, field

from bench.local_s3 import cpu_seconds, moto_server
from jobs.cli import parse_config, setup_logging
from pipelines.contract import presigned
from pipelines.contract.storage import filesystem, read_many

log = logging.getLogger("bench.s3_get")


@dataclass
class BenchConfig:
    """Client CPU per GET, presigned versus through s3fs."""

    objects: int = field(default=1000, metadata={"help": "objects read per round"})
    object_kib: int = field(default=110, metadata={"help": "size of each object (an ImageNet JPEG is ~110 KiB)"})
    rounds: int = field(default=3, metadata={"help": "interleaved rounds of each; medians are printed"})
    in_flight: int = field(default=16, metadata={"help": "requests open at once"})


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _round(fs, paths: list[str], in_flight: int, server_pid: int) -> tuple[float, float, float, int]:
    """(client CPU ms per GET, server CPU ms per GET, seconds, a CRC of what was read, in order)."""
    cpu, server, start = _own_cpu(), cpu_seconds(server_pid), time.perf_counter()
    crc = 0
    for future in read_many(fs, paths, 1 << 30, in_flight):
        crc = zlib.crc32(future.result(), crc)
    n = len(paths)
    return (1000 * (_own_cpu() - cpu) / n, 1000 * (cpu_seconds(server_pid) - server) / n,
            time.perf_counter() - start, crc)


def main(argv=None) -> dict:
    setup_logging()
    cfg = parse_config(BenchConfig, argv, description=__doc__)
    with moto_server() as (endpoint, server):
        opts = {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        fs, _ = filesystem("s3://bench", opts)
        body = os.urandom(cfg.object_kib << 10)
        paths = [f"bench/o/{i:06d}.jpg" for i in range(cfg.objects)]
        fs.pipe({p: body[i % 97 :] for i, p in enumerate(paths)})
        results: dict[str, list] = {"presigned": [], "s3fs": []}
        for _ in range(cfg.rounds + 1):  # the first round of each warms connections; not counted
            for mode in results:
                os.environ[presigned.SWITCH] = "1" if mode == "presigned" else "0"
                results[mode].append(_round(fs, paths, cfg.in_flight, server.pid))
        os.environ.pop(presigned.SWITCH)
    med = {m: [statistics.median(r[k] for r in rs[1:]) for k in range(3)] for m, rs in results.items()}
    result = {
        "objects": cfg.objects, "object_kib": cfg.object_kib,
        "client_cpu_ms_per_get": {m: round(v[0], 3) for m, v in med.items()},
        "server_cpu_ms_per_get": {m: round(v[1], 3) for m, v in med.items()},
        "gets_per_s": {m: round(cfg.objects / v[2], 1) for m, v in med.items()},
        "client_cpu_ratio_s3fs_over_presigned": round(med["s3fs"][0] / med["presigned"][0], 2),
        "same_bytes": len({r[3] for rs in results.values() for r in rs}) == 1,
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
