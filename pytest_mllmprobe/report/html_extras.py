"""pytest-html integration: the model's plot and per-locus table as report extras.

Importable without pytest-html (and without matplotlib): then it returns fewer extras or none.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from .page import CSS, locus_table, rule_table


def pytest_html_extras(model: Mapping[str, Any]) -> list[Any]:
    """Extras for one model (``Results.to_dict()["models"][label]``): the plot (when matplotlib is
    installed) and the per-locus and stage-rule tables. ``[]`` when pytest-html is not installed.

    Attach them to one report per model, e.g. in ``pytest_runtest_makereport``::

        report.extras = [*getattr(report, "extras", []), *pytest_html_extras(model_dict)]
    """
    try:
        from pytest_html import extras
    except ImportError:
        return []
    from . import plots

    label = str(model.get("label", "model"))
    out: list[Any] = []
    if plots.available():
        png = plots.render_model(dict(model))
        out.append(extras.png(base64.b64encode(png).decode("ascii"), name=f"{label}: probe accuracy"))
    # pytest-html puts html extras into its page as they are: keep the CSS scoped to table.mllm.
    css = "\n".join(line for line in CSS.splitlines() if line.startswith("table.mllm"))
    out.append(extras.html(f"<style>{css}</style><div class=\"mllm-extra\">"
                           f"{locus_table(model)}{rule_table(model)}</div>"))
    return out


__all__ = ["pytest_html_extras"]
