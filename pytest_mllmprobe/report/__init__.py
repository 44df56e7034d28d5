"""Reports people would rather look at: results.json, one probe curve per model, the FHS profile,
and a self-contained index.html.

Plain Python (no pytest). matplotlib is an optional extra, imported only when plots are drawn::

    from pytest_mllmprobe import run
    from pytest_mllmprobe.report import write_report

    outcome = write_report(run("demo").to_dict(), "mllm-report")
    print(outcome.written, outcome.warnings)

Re-render a saved run: ``python -m pytest_mllmprobe.report results.json OUT_DIR [--reference old.json]``.
"""

from __future__ import annotations

from .writer import MATPLOTLIB_HINT, ReportOutcome, load_results, write_report

__all__ = ["MATPLOTLIB_HINT", "ReportOutcome", "load_results", "write_report"]
