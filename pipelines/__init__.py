"""Data, in three parts with one direction of use (built on :mod:`vfmtok_core`):

- :mod:`pipelines.producer`: input sources, decoding and crops, the Ray tokenization run;
- :mod:`pipelines.contract`: what producer and consumer agree on: shard formats, the manifest and
  commit protocol, and the storage layer (retries, atomic writes, redaction) both go through;
- :mod:`pipelines.consumer`: streaming token shards into training, and training checkpoints.

Producer and consumer import the contract, never each other. :mod:`pipelines.ray_runtime` starts
or joins the Ray cluster for either.
"""
