"""Read one model of a ``results.json`` dict into plot-ready positions. Plain Python.

The pipeline is laid out left to right: every vision layer, the connector, every LLM layer
(both readouts share one x), the answer. Everything here works on the JSON dict, so a saved
``results.json`` can be re-rendered without the engine, torch or the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..health import STAGE_ORDER
from ..results import diagnosis_text

STAGE_TITLES = {
    "vision": "vision encoder",
    "connector": "connector",
    "llm": "language model",
    "answer": "answer",
}

# Readouts drawn as the main line (vision -> connector -> LLM image-token mean) and as the second one.
MAIN_READOUT = "image"
LAST_READOUT = "last"
# The logit lens (``lens.<i>``): the model's own words at each decoder layer, drawn beside the last-token probe.
LENS_READOUT = "lens"

# Rules whose threshold is an absolute per-locus pass line (see verdicts.py).
FLOOR_RULES = ("min_above_chance", "floor")


@dataclass(frozen=True)
class Point:
    """One locus placed on the pipeline axis."""

    locus: str
    stage: str
    layer: int | None
    readout: str | None
    x: int
    value: float | None          # the model's metric (``model["metric"]``): what is plotted and judged
    accuracy: float | None
    balanced: float | None
    chance: float | None
    threshold: float | None
    passed: bool | None
    finite: bool
    failure_mode: str | None
    why: str = ""
    low: float | None = None            # the 95% bootstrap interval of ``value``
    high: float | None = None
    control: float | None = None        # the control task's ``value`` (permuted labels)
    random_init: float | None = None    # the random-initialisation twin's ``value``


@dataclass(frozen=True)
class Curve:
    """One model's loci in pipeline order, plus what the plot marks around them."""

    label: str
    metric: str
    ticks: tuple[str, ...]                       # one tick label per x position
    tick_stages: tuple[str, ...]                 # the stage of each x position
    points: tuple[Point, ...]
    spans: dict[str, tuple[int, int]]            # stage -> first and last x
    consumed_x: tuple[int, ...]                  # x of the vision layers the connector reads
    failing_stage_rules: tuple[tuple[str, int], ...] = ()   # (stage, x of the rule's locus)
    first_failing_stage: str | None = None
    failing_stages: tuple[str, ...] = field(default=())
    #: stages whose weights the fine-tune did not change (``changed_stages.unchanged``)
    unchanged: tuple[str, ...] = field(default=())

    def series(self, readout: str | None) -> list[Point]:
        """The points of one line: ``image`` is vision + connector + LLM image-token mean."""
        if readout == MAIN_READOUT:
            return [p for p in self.points if p.stage in ("vision", "connector")
                    or (p.stage == "llm" and p.readout == MAIN_READOUT)]
        return [p for p in self.points if p.stage == "llm" and p.readout == readout]

    @property
    def extra_readouts(self) -> list[str]:
        """LLM readouts other than ``image`` and ``last`` (drawn as extra lines if present)."""
        seen: list[str] = []
        for p in self.points:
            if p.stage == "llm" and p.readout not in (MAIN_READOUT, LAST_READOUT, LENS_READOUT, None) \
                    and p.readout not in seen:
                seen.append(p.readout)
        return seen

    @property
    def answer(self) -> Point | None:
        return next((p for p in self.points if p.stage == "answer"), None)

    @property
    def n_positions(self) -> int:
        return len(self.ticks)


def number(value: Any) -> float | None:
    """A finite float, or None for null/NaN/inf/non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def stage_rank(stage: str) -> int:
    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


def _layer_key(layer: Any) -> tuple[int, int]:
    return (0, -1) if layer is None else (1, int(layer))


def parse_locus(name: str) -> dict[str, Any]:
    """``llm.3.last`` -> name, stage llm, layer 3, readout last (for dicts that omit them,
    e.g. a baseline file's loci)."""
    parts = name.split(".")
    layer = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    return {"name": name, "stage": parts[0], "layer": layer, "readout": parts[2] if len(parts) > 2 else None}


def ordered_loci(model: dict[str, Any]) -> list[dict[str, Any]]:
    """The locus dicts in pipeline order: stage, layer, then readout (image before last)."""
    readout_rank = {None: 0, MAIN_READOUT: 1, LAST_READOUT: 2}
    loci = [{**parse_locus(name), **loc} for name, loc in (model.get("loci") or {}).items()]
    first_seen = {loc["name"]: i for i, loc in enumerate(loci)}
    return sorted(loci, key=lambda loc: (
        stage_rank(loc.get("stage", "")), _layer_key(loc.get("layer")),
        readout_rank.get(loc.get("readout"), 3), first_seen[loc["name"]],
    ))


def locus_threshold(verdict: dict[str, Any] | None) -> float | None:
    """The per-locus pass line: the highest absolute threshold among the floor-type checks."""
    if not verdict:
        return None
    values = [number(c.get("threshold")) for c in verdict.get("checks", ()) if c.get("rule") in FLOOR_RULES]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def failing_why(verdict: dict[str, Any] | None) -> str:
    """The explanations of a verdict's failing checks, joined."""
    if not verdict:
        return ""
    return "; ".join(f"{c.get('rule')}: {c.get('explanation', '')}"
                     for c in verdict.get("checks", ()) if not c.get("passed", True))


def failing_stages(model: dict[str, Any]) -> list[str]:
    """Stages with any failing test (locus or stage rule), in pipeline order."""
    failed = {v.get("stage") for v in model.get("verdicts", {}).values() if v.get("passed") is False}
    return sorted((s for s in failed if s), key=stage_rank)


def diagnosis(model: dict[str, Any]) -> str:
    """The one-line verdict: the dict's ``diagnosis`` if it has one, else rebuilt from the dict
    by the same function as ``ModelResult.diagnosis``."""
    if isinstance(model.get("diagnosis"), str):
        return model["diagnosis"]
    if not model.get("verdicts"):
        return "no verdicts recorded"
    comparison = model.get("comparison")
    return diagnosis_text(failing_stages(model), comparison if isinstance(comparison, dict) else None)


def _tick(stage: str, layer: Any, name: str) -> str:
    if stage == "connector":
        return "conn" if layer is None else f"c{layer}"
    if stage == "answer":
        return "ans"
    return str(layer) if layer is not None else name


def curve_of(model: dict[str, Any]) -> Curve:
    """Lay one model dict (``results["models"][label]``) out along the pipeline."""
    metric = model.get("metric") or "accuracy"
    verdicts = model.get("verdicts", {})
    positions: dict[tuple[str, tuple[int, int]], int] = {}
    ticks: list[str] = []
    tick_stages: list[str] = []
    points: list[Point] = []
    for loc in ordered_loci(model):
        stage = loc.get("stage", "?")
        key = (stage, _layer_key(loc.get("layer")))  # the readouts of one layer share an x
        if key not in positions:
            positions[key] = len(ticks)
            ticks.append(_tick(stage, loc.get("layer"), loc["name"]))
            tick_stages.append(stage)
        verdict = verdicts.get(loc["name"])
        chance = loc.get("chance") or {}
        points.append(Point(
            locus=loc["name"], stage=stage, layer=loc.get("layer"), readout=loc.get("readout"),
            x=positions[key], value=number(loc.get(metric)), accuracy=number(loc.get("accuracy")),
            balanced=number(loc.get("balanced_accuracy")), chance=number(chance.get(metric)),
            threshold=locus_threshold(verdict),
            passed=None if verdict is None else bool(verdict.get("passed")),
            finite=bool(loc.get("finite", True)),
            failure_mode=None if verdict is None else verdict.get("failure_mode"),
            why=failing_why(verdict),
            low=number(((loc.get("intervals") or {}).get(metric) or [None, None])[0]),
            high=number(((loc.get("intervals") or {}).get(metric) or [None, None])[1]),
            control=number(((loc.get("control") or {}).get(metric) or {}).get("control")),
            random_init=number((loc.get("random_init") or {}).get(metric)),
        ))
    spans: dict[str, tuple[int, int]] = {}
    for x, stage in enumerate(tick_stages):
        lo, hi = spans.get(stage, (x, x))
        spans[stage] = (min(lo, x), max(hi, x))
    by_name = {p.locus: p for p in points}
    consumed = (model.get("stage_map") or {}).get("consumed_vision_layers") or ()
    consumed_x = tuple(by_name[f"vision.{i}"].x for i in consumed if f"vision.{i}" in by_name)
    rules = []
    for name, verdict in verdicts.items():
        if name.startswith("stage.") and verdict.get("passed") is False:
            point = by_name.get(verdict.get("locus", ""))
            if point is not None:
                rules.append((verdict.get("stage", ""), point.x))
    return Curve(
        label=str(model.get("label", "?")), metric=metric, ticks=tuple(ticks),
        tick_stages=tuple(tick_stages), points=tuple(points), spans=spans, consumed_x=consumed_x,
        failing_stage_rules=tuple(rules), first_failing_stage=model.get("first_failing_stage"),
        failing_stages=tuple(failing_stages(model)),
        unchanged=tuple((model.get("changed_stages") or {}).get("unchanged") or ()),
    )


def thin_ticks(stages: Sequence[str], gap: int, keep: Sequence[int] = ()) -> list[int]:
    """Which x positions get a tick label so that labelled positions are >= ``gap`` apart.

    Priority: the single-position stages (connector, answer), ``keep`` (e.g. the consumed
    vision layer), the first and last layer of each stage, then every ``step``-th layer of each
    stage, where ``step`` is the smallest of 1, 2, 4, 5, 10, 20, 40, 50, ... that is >= ``gap``.
    """
    n = len(stages)
    gap = max(1, int(gap))
    step = _nice_step(gap)
    spans: dict[str, list[int]] = {}
    for x, stage in enumerate(stages):
        spans.setdefault(stage, []).append(x)
    candidates = [xs[0] for xs in spans.values() if len(xs) == 1]
    candidates += list(keep)
    for xs in spans.values():
        if len(xs) > 1:
            candidates += [xs[0], xs[-1]]
    for xs in spans.values():
        if len(xs) > 1:
            candidates += [x for i, x in enumerate(xs) if i % step == 0]
    chosen: list[int] = []
    for x in candidates:
        if 0 <= x < n and x not in chosen and all(abs(x - c) >= gap for c in chosen):
            chosen.append(x)
    return sorted(chosen)


def _nice_step(gap: int) -> int:
    """The smallest of 1, 2, 4, 5, 10, 20, 40, 50, 100, ... that is >= ``gap``."""
    scale = 1
    while True:
        for base in (1, 2, 4, 5):
            if base * scale >= gap:
                return base * scale
        scale *= 10
