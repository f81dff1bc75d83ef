"""The tokenization job on S3 in fair and foul weather, measured side by side in one run.

A local S3 server (moto, 127.0.0.1) holds a folder of photo-sized JPEGs, and a local folder the
same files. The same job (``tiny`` config) runs four times: local disk to local disk; S3 to S3
straight to the server; through the fault-injecting proxy (``infra/s3_fault_proxy.py``) at the
rates given; and through the proxy adding ``--latency-ms`` to every request (the round trip of a
real object store). The server and the latency proxy run in processes of their own (as a store and a
network would) and their CPU seconds per run are printed, since on this machine they take them from
the same cores as the job. Printed: images/s of each and their ratios, requests per image, the retries the
job counted by kind against the faults the proxy injected, and whether all outputs are identical
shard for shard (they must be).

Run: ``python -m bench.s3_faults`` (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.local_s3 import cpu_seconds, free_port, moto_server, wait_for
from bench.pipeline import write_jpegs
from jobs.cli import parse_config, setup_logging
from jobs.tokenize import TokenizeConfig, run
from pipelines.ray_runtime import ray_session

log = logging.getLogger("bench.s3_faults")


@dataclass
class BenchConfig:
    """Throughput and retries of an S3-to-S3 tokenization job, clean versus through injected faults."""

    images: int = field(default=1200, metadata={"help": "JPEGs in the input folder"})
    rows_per_shard: int = field(default=32, metadata={"help": "images per work item"})
    slowdown: float = field(default=0.05, metadata={"help": "rate of 503 SlowDown"})
    reset: float = field(default=0.02, metadata={"help": "rate of connections dropped after forwarding"})
    truncate: float = field(default=0.01, metadata={"help": "rate of bodies cut in half"})
    seed: int = field(default=0, metadata={"help": "the proxy's fault seed"})
    latency_ms: float = field(default=20.0, metadata={"help": "delay added to every request in the latency run"})


def _runs(cfg: BenchConfig, endpoint: str, server, slow, latency_port: int):
    """The four runs; returns their summaries, the server's and latency proxy's CPU seconds per run,
    the faults injected, each output's manifest shards and the seconds of the uncounted first S3 run."""
    import s3fs

    from infra.s3_fault_proxy import FaultProxy, FaultRates

    direct = {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp) / "in", cfg.images)
        s3fs.S3FileSystem(skip_instance_cache=True, **direct).put(f"{tmp}/in", "bench/in", recursive=True)
        faults = FaultRates(slowdown=cfg.slowdown, reset=cfg.reset, truncate=cfg.truncate)
        with FaultProxy(endpoint, faults, seed=cfg.seed) as flaky, ray_session():
            def via(proxy_endpoint):
                return {**direct, "client_kwargs": {**direct["client_kwargs"], "endpoint_url": proxy_endpoint}}

            runs = {"local": (f"{tmp}/in", f"{tmp}/out", {}), "clean": ("s3://bench/in", "s3://bench/out-clean", direct),
                    "faults": ("s3://bench/in", "s3://bench/out-faults", via(flaky.endpoint)),
                    "latency": ("s3://bench/in", "s3://bench/out-latency", via(f"http://127.0.0.1:{latency_port}"))}
            # First runs start Ray's worker processes and load the S3 client into them (botocore's
            # import and service model, a TLS context): one-off costs of each process, which a long
            # job pays once. They are not counted; the S3 one's time is printed.
            run(TokenizeConfig(input=f"{tmp}/in", output=f"{tmp}/warm-up", rows_per_shard=cfg.rows_per_shard))
            cold = run(TokenizeConfig(input="s3://bench/in", output="s3://bench/warm-up", rows_per_shard=cfg.rows_per_shard,
                                      storage_options=json.dumps(direct)))["this_run"]["seconds"]
            summaries, server_cpu = {}, {}
            for name, (src, dst, opts) in runs.items():
                before = cpu_seconds(server.pid) + cpu_seconds(slow.pid)
                summaries[name] = run(TokenizeConfig(input=src, output=dst, rows_per_shard=cfg.rows_per_shard,
                                                     storage_options=json.dumps(opts)))
                server_cpu[name] = round(cpu_seconds(server.pid) + cpu_seconds(slow.pid) - before, 2)
            injected = flaky.counts
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **direct)
        shards = {n: json.loads(fs.cat_file(f"bench/out-{n}/manifest.json"))["shards"] for n in ("clean", "faults", "latency")}
        shards["local"] = json.loads((Path(tmp) / "out" / "manifest.json").read_text())["shards"]
    return summaries, server_cpu, injected, shards, cold


def main(argv=None) -> dict:
    setup_logging()
    cfg = parse_config(BenchConfig, argv, description=__doc__)
    latency_port = free_port()
    # The server and the latency proxy run as processes of their own, as a real store and network
    # are: in this process they would share the driver's interpreter lock. Their CPU time is taken
    # from the same 2 cores, so it is measured and reported per run.
    with moto_server() as (endpoint, server):
        slow = subprocess.Popen([sys.executable, "-m", "infra.s3_fault_proxy", "--upstream", endpoint, "--port",
                                 str(latency_port), "--slow", "1", "--slow-seconds", str(cfg.latency_ms / 1000)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(latency_port)
            summaries, server_cpu, injected, shards, cold = _runs(cfg, endpoint, server, slow, latency_port)
        finally:
            slow.terminate()
            slow.wait(timeout=30)
    speed = {n: summaries[n]["this_run"]["images_per_s"] for n in summaries}
    storage = summaries["faults"]["this_run"]["storage"]
    result = {
        "images": cfg.images,
        "images_per_s": speed,
        "ratio_faults_vs_clean": round(speed["faults"] / speed["clean"], 3),
        f"ratio_s3_with_{cfg.latency_ms:g}ms_latency_vs_local_disk": round(speed["latency"] / speed["local"], 3),
        "ratio_s3_with_latency_vs_clean_s3": round(speed["latency"] / speed["clean"], 3),
        "server_and_latency_proxy_cpu_seconds": server_cpu,
        "job_seconds": {n: summaries[n]["this_run"]["seconds"] for n in summaries},
        "first_s3_run_seconds_not_counted": cold,
        "requests_per_image": round(storage["requests"] / cfg.images, 2),
        "retries_counted": storage["retries_by_kind"],
        "faults_injected": {k: v for k, v in injected.items() if v and k not in ("max_in_flight", "bytes_out")},
        "identical_outputs": all(shards[n] == shards["local"] for n in shards),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
