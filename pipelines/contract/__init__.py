"""The dataset contract: shard formats, manifest and commits, and the storage layer beneath them."""
