"""``python -m pytest_mllmprobe.report results.json OUT_DIR [--reference other.json]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .writer import load_results, write_report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_mllmprobe.report",
        description="Re-render the report (plots, index.html) from a saved results.json.",
    )
    parser.add_argument("results", help="a results.json written by --mllm-report or write_report()")
    parser.add_argument("out_dir", help="folder to write into (created if needed)")
    parser.add_argument("--reference", metavar="JSON",
                        help="another results.json (e.g. a baseline run) drawn dashed for the same labels")
    args = parser.parse_args(argv)
    try:
        results = load_results(args.results)
        reference = load_results(args.reference) if args.reference else None
        outcome = write_report(results, args.out_dir, reference=reference)
    except (OSError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    for warning in outcome.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for path in outcome.written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
