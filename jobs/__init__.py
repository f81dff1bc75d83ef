"""Entry points run by ``python -m jobs.<name>``, ``ray job submit`` and ``torchrun``."""
