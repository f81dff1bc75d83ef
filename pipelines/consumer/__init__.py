"""The consumer: token shards streamed into training, and the trainer's checkpoints."""
