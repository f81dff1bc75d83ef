"""Data: image sources, preprocessing, token shards and streaming (built on :mod:`vfmtok_core`)."""
