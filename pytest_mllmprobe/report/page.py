"""``index.html``: one self-contained page (inline CSS, images as data URIs, no network).

Every piece of text from the results dict goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from typing import Any

from .layout import curve_of, diagnosis, number

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1180px;
color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 6px;border-bottom:2px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
.meta{color:#555;font-size:13px}.profile{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px}
.ok{color:#1b5e20;font-weight:600}.bad{color:#c62828;font-weight:600}
.hint{background:#fff8e1;border:1px solid #f0c36d;padding:8px 12px;border-radius:4px}
img{max-width:100%;height:auto;border:1px solid #e3e3e3}
table.mllm{border-collapse:collapse;font-size:12.5px;margin:6px 0 12px}
table.mllm th,table.mllm td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
table.mllm th{background:#f3f3f3}table.mllm td.num{text-align:right;font-variant-numeric:tabular-nums}
table.mllm tr.fail td{background:#fdecea}table.mllm .why{color:#666;font-size:11.5px;max-width:420px}
table.mllm tr.stage-vision td:first-child{border-left:4px solid #9db9e0}
table.mllm tr.stage-connector td:first-child{border-left:4px solid #f0c27a}
table.mllm tr.stage-llm td:first-child{border-left:4px solid #98cf90}
table.mllm tr.stage-answer td:first-child{border-left:4px solid #bfa5dd}
"""

LOCUS_COLUMNS = ("locus", "stage", "readout", "accuracy", "balanced accuracy", "chance", "threshold",
                 "result", "failure mode")
RULE_COLUMNS = ("test", "stage", "rule", "metric", "value", "threshold", "delta", "result", "explanation",
                "source")


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    value = number(value)
    return "n/a" if value is None else f"{value:.{digits}f}"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def locus_table(model: Mapping[str, Any]) -> str:
    """The per-locus table, pipeline order; one ``<tr data-locus=...>`` per locus."""
    curve = curve_of(dict(model))
    rows = []
    for p in curve.points:
        result = "n/a" if p.passed is None else ("pass" if p.passed else "FAIL")
        readout = p.readout or ""
        if not p.finite:
            readout = f"{readout} (non-finite)".strip()
        mode = esc(p.failure_mode or "")
        if p.why:
            mode += f'<div class="why">{esc(p.why)}</div>'
        rows.append(
            f'<tr class="stage-{esc(p.stage)}{" fail" if p.passed is False else ""}" data-locus="{esc(p.locus)}">'
            f"<td>{esc(p.locus)}</td><td>{esc(p.stage)}</td><td>{esc(readout)}</td>"
            f'<td class="num">{fmt(p.accuracy)}</td><td class="num">{fmt(p.balanced)}</td>'
            f'<td class="num">{fmt(p.chance)}</td><td class="num">{fmt(p.threshold)}</td>'
            f"<td>{result}</td><td>{mode}</td></tr>"
        )
    head = "".join(f"<th>{esc(c)}</th>" for c in LOCUS_COLUMNS)
    caption = esc(f"per-locus probe tests; accuracy columns on the test split, "
                  f"threshold and chance in {curve.metric}")
    return (f'<table class="mllm loci"><caption class="meta">{caption}</caption><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def rule_table(model: Mapping[str, Any]) -> str:
    """The stage rules (``stage.*`` verdicts), one row per check."""
    rows = []
    for name, verdict in (model.get("verdicts") or {}).items():
        if not name.startswith("stage."):
            continue
        for check in verdict.get("checks", ()):
            passed = check.get("passed")
            rows.append(
                f'<tr class="stage-{esc(verdict.get("stage"))}{"" if passed else " fail"}" '
                f'data-test="{esc(name)}">'
                f"<td>{esc(name)}</td><td>{esc(verdict.get('stage'))}</td><td>{esc(check.get('rule'))}</td>"
                f"<td>{esc(check.get('metric'))}</td><td class=\"num\">{fmt(check.get('value'))}</td>"
                f"<td class=\"num\">{fmt(check.get('threshold'))}</td>"
                f"<td class=\"num\">{fmt(check.get('delta'))}</td><td>{'pass' if passed else 'FAIL'}</td>"
                f"<td class=\"why\">{esc(check.get('explanation'))}</td><td class=\"why\">{esc(check.get('source'))}</td></tr>"
            )
    if not rows:
        return '<p class="meta">no stage rules recorded</p>'
    head = "".join(f"<th>{esc(c)}</th>" for c in RULE_COLUMNS)
    return f'<table class="mllm rules"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def model_section(label: str, model: Mapping[str, Any], png: bytes | None, anchor: str) -> str:
    healthy = model.get("first_failing_stage") is None
    stage_map = model.get("stage_map") or {}
    consumed = ", ".join(f"vision.{i}" for i in stage_map.get("consumed_vision_layers") or ()) or "n/a"
    facts = (
        f"source {model.get('source')}; family {stage_map.get('family', '?')}; "
        f"{model.get('n_train', '?')} train / {model.get('n_test', '?')} test images; "
        f"classes {', '.join(map(str, model.get('class_names') or ()))}; metric {model.get('metric')}; "
        f"connector reads {consumed} (vision_feature_layer={stage_map.get('vision_feature_layer')!r})"
    )
    image = (f'<img alt="{esc(f"probe accuracy along the pipeline of {label}")}" src="{data_uri(png)}">'
             if png else "")
    return (
        f'<section class="model" id="{esc(anchor)}"><h2>{esc(label)}</h2>'
        f'<p class="profile">{esc(model.get("profile"))}</p>'
        f'<p class="{"ok" if healthy else "bad"}">{esc(diagnosis(dict(model)))}</p>'
        f'<p class="meta">{esc(facts)}</p>{changes_paragraph(model)}{image}'
        f"<h3>Per-locus tests</h3>{locus_table(model)}"
        f"<h3>Stage rules</h3>{rule_table(model)}</section>"
    )


def render_page(results: Mapping[str, Any], model_pngs: Mapping[str, bytes | None], anchors: Mapping[str, str],
                profile_png: bytes | None, warnings: list[str]) -> str:
    """The whole ``index.html``."""
    models = results.get("models") or {}
    data = results.get("data") or {}
    settings = results.get("settings") or {}
    summary_rows = "".join(
        f'<tr><td><a href="#{esc(anchors[label])}">{esc(label)}</a></td>'
        f'<td class="profile">{esc(m.get("profile"))}</td>'
        f'<td class="{"ok" if m.get("first_failing_stage") is None else "bad"}">{esc(diagnosis(m))}</td></tr>'
        for label, m in models.items()
    )
    counts = ", ".join(f"{c} {n}" for c, n in zip(data.get("class_names") or (), data.get("class_counts") or ()))
    run_facts = (f"data {data.get('root', '?')} ({data.get('n_images', '?')} images: {counts}); "
                 f"probe {settings.get('probe', '?')}; test_size {settings.get('test_size', '?')}; "
                 f"seed {settings.get('seed', '?')}; schema_version {results.get('schema_version', '?')}")
    notes = "".join(f'<p class="hint">{esc(w)}</p>' for w in warnings)
    profile = (f'<img alt="feature health profile of all models" src="{data_uri(profile_png)}">'
               if profile_png else "")
    sections = "".join(model_section(label, m, model_pngs.get(label), anchors[label]) for label, m in models.items())
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>mllmprobe report: {esc(', '.join(models))}</title><style>{CSS}</style></head><body>"
        f"<h1>Where is the class signal lost?</h1><p class=\"meta\">{esc(run_facts)}</p>{notes}"
        f'<table class="mllm summary"><thead><tr><th>model</th><th>profile</th><th>diagnosis</th></tr></thead>'
        f"<tbody>{summary_rows}</tbody></table>{profile}{sections}</body></html>\n"
    )


__all__ = ["CSS", "LOCUS_COLUMNS", "data_uri", "locus_table", "model_section", "render_page", "rule_table"]


def changes_paragraph(model: Mapping[str, Any]) -> str:
    """What a fine-tune changed, per stage (``changed_stages``), or nothing when the run does not know."""
    changes = model.get("changed_stages") or {}
    if not changes.get("text"):
        return ""
    return f'<p class="meta">weights: {esc(changes["text"])} (vs {esc(changes.get("against", "?"))})</p>'
