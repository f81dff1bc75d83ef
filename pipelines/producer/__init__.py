"""The producer: image datasets in, token shards out (sources, decoding, the Ray tokenization run)."""
