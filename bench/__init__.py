"""Benchmarks: each prints a ratio measured side by side in one run (``python -m bench.<name>``)."""
