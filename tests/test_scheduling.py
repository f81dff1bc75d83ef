"""The job's CPU stage is sized by the cluster's CPUs, not by its tokenizers: on a cluster that
declares 16 CPUs and 2 GPUs (logical resources on this 2-core machine; the GPU actors fall back to
the CPU), at least 12 decode tasks run at once in steady state."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.pipeline_data import write_tar

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import json, logging, sys, threading, time
from pipelines.ray_runtime import ray_session
import ray
from ray.util.state import list_tasks
from pipelines.producer.tokenize import TokenizeOptions, run_tokenize

# The state API is served by the dashboard (on 127.0.0.1).
ray.init(num_cpus=16, num_gpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
         logging_level=logging.ERROR)
samples, done = [], threading.Event()

def watch():
    while not done.is_set():
        try:
            running = list_tasks(filters=[("state", "=", "RUNNING"), ("name", "=", "prepare")], limit=1000)
        except Exception as e:
            print("WATCH", type(e).__name__, e, file=sys.stderr)
            time.sleep(1)
            continue
        samples.append(len(running))
        time.sleep(0.25)

threading.Thread(target=watch, daemon=True).start()
summary = run_tokenize(TokenizeOptions(input=sys.argv[1], output=sys.argv[2], workers=2, gpus_per_worker=1.0,
                                       threads=1))
done.set()
print("RESULT", json.dumps({"samples": samples, "complete": summary["complete"], "images": summary["images"]}))
"""


def _photo(seed: int) -> bytes:
    """A large, smooth JPEG: costly to decode and crop (as a photo is), cheap to store."""
    img = Image.linear_gradient("L").resize((1200, 900)).convert("RGB").rotate(seed % 360)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_decode_tasks_fill_the_cluster_cpus_not_the_tokenizer_count(tmp_path):
    # Decoding and cropping a 1200x900 photo costs several times what the tiny tokenizer needs to
    # encode it, so the CPU stage is the bottleneck, as it is on a GPU node.
    for t in range(64):
        write_tar(tmp_path / "in" / f"p{t:03d}.tar", [(f"k{i}", {"jpg": _photo(t * 20 + i)}) for i in range(12)])
    done = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "in"), str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert "RESULT" in done.stdout, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT", 1)[1].splitlines()[0])
    assert result["complete"] and result["images"] == 64 * 12
    busy = [n for n in result["samples"] if n]  # from the first decode task started to the last
    steady = sorted(busy[len(busy) // 4 : 3 * len(busy) // 4])  # the middle half: no ramp up or down
    assert steady and steady[len(steady) // 2] >= 12, " ".join(map(str, result["samples"]))
