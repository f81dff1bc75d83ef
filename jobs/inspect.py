"""Print a token dataset's summary: images, per-class counts, codebook usage and entropy, rejects.

``python -m jobs.inspect URL [--plot usage.png] [--storage-options JSON]``
"""

from __future__ import annotations

import argparse
import json
import logging

from jobs.cli import UsageError, fail, setup_logging, storage_options
from pipelines.contract.inspect import load_tokens, plot_usage, summarize, usage_histogram

log = logging.getLogger("jobs.inspect")


def main(argv=None) -> dict:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("url", help="token dataset (the folder holding manifest.json)")
    parser.add_argument("--plot", help="write a code-usage histogram PNG here")
    parser.add_argument("--storage-options", default="{}", help="fsspec options as JSON, or @FILE holding JSON")
    args = parser.parse_args(argv)
    try:
        manifest, rows, rejects = load_tokens(args.url, storage_options(args.storage_options))
    except (UsageError, FileNotFoundError) as e:
        fail(e)
    summary = summarize(manifest, rows, rejects)
    log.info(
        "%s: %d images x %d variants, %d shards, %.2f MB; %d/%d codes used (%.1f%%), entropy %.2f of %.2f bits; rejects %s",
        args.url, summary["images"], len(summary["variants"]), summary["shards"], summary["bytes"] / 1e6,
        summary["codes_used"], summary["codebook_size"], 100 * summary["usage"], summary["entropy_bits"],
        summary["max_entropy_bits"], summary["rejects_by_reason"] or "none",
    )
    print(json.dumps(summary, indent=1))
    if args.plot:
        plot_usage(usage_histogram(rows, manifest["codebook_size"]), args.plot)
        log.info("wrote %s", args.plot)
    return summary


if __name__ == "__main__":
    main()
