"""The pictures: one probe curve per model and the grouped FHS profile of all models.

matplotlib is an optional extra (``pip install "pytest-mllmprobe[report]"``) and is imported
only inside these functions. No pyplot: figures are drawn on ``Figure`` + the Agg canvas, so
nothing touches the user's interactive backend or global state, and it runs headless.
"""

from __future__ import annotations

import io
import math
from typing import Any

from ..health import STAGE_ORDER
from .layout import STAGE_TITLES, Curve, Point, curve_of, diagnosis, failing_stages, number, thin_ticks

DPI = 100
MODEL_FIGSIZE = (11.0, 5.6)          # inches; PNG is 1100 x 560 pixels
PROFILE_HEIGHT = 4.6
AXES_RECT = (0.058, 0.25, 0.93, 0.57)  # left, bottom, width, height in figure fractions
TICK_FONTSIZE = 8

COLORS = {
    "image": "#1f5fa8",       # vision -> connector -> LLM image-token mean
    "last": "#e07b00",        # LLM last token
    "lens": "#2a9d8f",        # the logit lens: the model's own words at each decoder layer
    "answer": "#111111",
    "chance": "#7f7f7f",
    "floor": "#c0392b",
    "fail": "#d0021b",
    "consumed": "#7b3fa0",
}
BANDS = {"vision": "#e9f0fa", "connector": "#fdf0dc", "llm": "#e8f5e6", "answer": "#f0eaf7"}
FAIL_BAND = "#fbe0df"
SHORT_TITLES = {"vision": "vision", "connector": "conn.", "llm": "LLM", "answer": "ans."}
SCORE_KEYS = ("FHS_V", "FHS_C", "FHS_L", "P_final")
SCORE_STAGE = dict(zip(SCORE_KEYS, STAGE_ORDER))


def _matplotlib() -> tuple[Any, Any]:
    """``(Figure, FigureCanvasAgg)``; raises ImportError when matplotlib is not installed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def available() -> bool:
    try:
        _matplotlib()
    except ImportError:
        return False
    return True


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def profile_figsize(n_models: int) -> tuple[float, float]:
    """Wide enough for every bar: 9 inches up to 4 models, then wider."""
    return (max(9.0, 5.0 + 1.0 * n_models), PROFILE_HEIGHT)


# -- the probe curve -------------------------------------------------------------------------


def model_figure(model: dict[str, Any], reference: dict[str, Any] | None = None) -> Any:
    """The probe-accuracy curve of one model (``results["models"][label]``) as a Figure.

    ``reference`` is another model dict (same label, e.g. a baseline run), drawn dashed.
    """
    Figure, Canvas = _matplotlib()
    curve = curve_of(model)
    fig = Figure(figsize=MODEL_FIGSIZE, dpi=DPI)
    Canvas(fig)
    ax = fig.add_axes(AXES_RECT)
    n = curve.n_positions
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(-0.04, 1.06)
    ax.set_ylabel(f"probe {curve.metric.replace('_', ' ')} (held-out images)")
    ax.set_xlabel("layer, in pipeline order (conn = connector output, ans = the model's own answer)",
                  fontsize=9)
    ax.grid(axis="y", color="#d8d8d8", linewidth=0.6, zorder=0.5)
    ax.set_axisbelow(True)
    _bands(ax, curve)
    references = _reference_lines(ax, curve, reference)
    levels = _level_line(ax, curve, "chance", COLORS["chance"], (0, (5, 3)), "chance")
    levels += _level_line(ax, curve, "threshold", COLORS["floor"], (0, (1, 1.5)),
                          "per-locus pass line (threshold)")
    consumed = _consumed(ax, curve)
    controls = _interval_bands(ax, curve) + _control_lines(ax, curve)
    # Legend order: what was measured, the lines to read it against, what failed, the reference.
    handles = _probe_lines(ax, curve) + controls + levels + consumed + _failures(ax, curve) + references
    _ticks(fig, ax, curve)
    _titles(fig, model, curve)
    _legend(fig, handles, ax)
    _stage_labels(fig, ax, curve)
    return fig


def _legend(fig: Any, handles: list[Any], ax: Any = None) -> None:
    """Below the axes, in as many columns as fit the figure's width; a legend taller than the room
    under the axis labels makes the figure taller (the axes keep their size)."""
    renderer = fig.canvas.get_renderer()
    for ncol in (4, 3, 2, 1):
        legend = fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=ncol,
                            fontsize=8.5, frameon=False, handlelength=2.6, columnspacing=1.4)
        if legend.get_window_extent(renderer).width <= fig.bbox.width - 10 or ncol == 1:
            break
        legend.remove()
    if ax is None:
        return
    room = ax.get_tightbbox(renderer).y0 - 6  # pixels between the figure's bottom and the x label
    extra = legend.get_window_extent(renderer).height - room
    if extra <= 0:
        return
    old = fig.get_figheight() * fig.dpi
    new = old + extra
    fig.set_figheight(new / fig.dpi)
    left, bottom, width, height = ax.get_position().bounds
    ax.set_position([left, (bottom * old + extra) / new, width, height * old / new])
    for text in fig.texts:  # titles and stage names keep their distance from the top
        x, y = text.get_position()
        text.set_position((x, 1 - (1 - y) * old / new))


def _xy(points: list[Point]) -> tuple[list[int], list[float]]:
    return [p.x for p in points], [math.nan if p.value is None else p.value for p in points]


def _bands(ax: Any, curve: Curve) -> None:
    for stage, (lo, hi) in curve.spans.items():
        color = FAIL_BAND if stage == curve.first_failing_stage else BANDS.get(stage, "#f2f2f2")
        ax.axvspan(lo - 0.5, hi + 0.5, color=color, zorder=0, linewidth=0)
        if lo > 0:
            ax.axvline(lo - 0.5, color="#b9b9b9", linewidth=0.8, zorder=0.6)


def _stage_labels(fig: Any, ax: Any, curve: Curve) -> None:
    """Stage names above the axes; short names, then staggered rows, if they would collide."""
    from matplotlib.transforms import blended_transform_factory

    transform = blended_transform_factory(ax.transData, ax.transAxes)
    renderer = fig.canvas.get_renderer()
    for names, stagger in ((STAGE_TITLES, False), (SHORT_TITLES, False), (SHORT_TITLES, True)):
        texts = []
        for i, (stage, (lo, hi)) in enumerate(curve.spans.items()):
            failing = stage in curve.failing_stages
            same = stage in curve.unchanged  # the fine-tune left these weights as they were
            texts.append(ax.text(
                (lo + hi) / 2, 1.012 + (0.05 if stagger and i % 2 else 0.0),
                names.get(stage, stage) + (" (unchanged)" if same else ""), transform=transform, ha="center",
                va="bottom", fontsize=9.5, fontweight="bold" if failing else "normal",
                fontstyle="italic" if same else "normal",
                color=COLORS["fail"] if failing else ("#777777" if same else "#333333"), clip_on=False,
            ))
        for t in texts:  # keep the end bands' labels inside the figure
            box = t.get_window_extent(renderer)
            if box.x1 > fig.bbox.x1 - 4:
                t.set_horizontalalignment("right")
                t.set_x(curve.n_positions - 0.4)
            elif box.x0 < fig.bbox.x0 + 4:
                t.set_horizontalalignment("left")
                t.set_x(-0.6)
        boxes = sorted((t.get_window_extent(renderer) for t in texts), key=lambda b: b.x0)
        if not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:])):
            return
        for t in texts:
            t.remove()


def _level_line(ax: Any, curve: Curve, attr: str, color: str, style: Any, label: str) -> list[Any]:
    """Chance or pass line: one value per x (the highest where two readouts share an x)."""
    level: dict[int, float] = {}
    for p in curve.points:
        value = getattr(p, attr)
        if value is not None:
            level[p.x] = max(level.get(p.x, value), value)
    if not level:
        return []
    xs = sorted(level)
    edges, values = [], []
    for x in xs:  # a step line that spans each position from x - 0.5 to x + 0.5
        edges += [x - 0.5, x + 0.5]
        values += [level[x], level[x]]
    (line,) = ax.plot(edges, values, color=color, linestyle=style, linewidth=1.3, zorder=2, label=label)
    return [line]


def _consumed(ax: Any, curve: Curve) -> list[Any]:
    read = ", ".join(f"vision.{curve.ticks[x]}" for x in curve.consumed_x)
    what = "vision layers the connector reads" if len(curve.consumed_x) > 1 else "vision layer the connector reads"
    lines = [ax.axvline(x, color=COLORS["consumed"], linestyle=(0, (4, 2, 1, 2)), linewidth=1.4, zorder=1.5,
                        label=f"{what} ({read})") for x in curve.consumed_x]
    return lines[:1]


def _probe_lines(ax: Any, curve: Curve) -> list[Any]:
    handles = []
    main = curve.series("image")
    # Vision layers after the deepest one the connector reads are not on the model's path:
    # drawn as a faded branch, and the main line goes from the read layer to the connector.
    cut = max(curve.consumed_x, default=None)
    unused = [p for p in main if p.stage == "vision" and cut is not None and p.x > cut]
    path = [p for p in main if p not in unused]
    if path:
        (line,) = ax.plot(*_xy(path), color=COLORS["image"], marker="o", markersize=4, linewidth=2,
                          zorder=4, label="probe: vision, connector" + (
                              ", LLM image tokens" if any(p.stage == "llm" for p in path) else ""))
        handles.append(line)
    if unused:
        branch = [p for p in path if p.x == cut][:1] + unused
        (line,) = ax.plot(*_xy(branch), color="#8aa6c8", marker="o", markersize=4, linewidth=1.2,
                          markerfacecolor="white", linestyle=(0, (2, 1.5)), zorder=3.8,
                          label="vision layers after the one the connector reads")
        handles.append(line)
    last = curve.series("last")
    if last:
        (line,) = ax.plot(*_xy(last), color=COLORS["last"], marker="s", markersize=3.5, linewidth=2,
                          zorder=4, label="probe: LLM last token")
        handles.append(line)
    lens = curve.series("lens")
    if lens:
        (line,) = ax.plot(*_xy(lens), color=COLORS["lens"], marker="^", markersize=4, linewidth=1.6,
                          linestyle=(0, (4, 1.5)), zorder=4.2, label="logit lens: the model's own words at the layer")
        handles.append(line)
    for i, readout in enumerate(curve.extra_readouts):
        (line,) = ax.plot(*_xy(curve.series(readout)), color=f"C{i + 2}", marker=".", linewidth=1.2,
                          zorder=3.5, label=f"probe: LLM {readout}")
        handles.append(line)
    answer = curve.answer
    if answer is not None and answer.value is not None:
        if last and last[-1].value is not None:
            ax.plot([last[-1].x, answer.x], [last[-1].value, answer.value], color=COLORS["answer"],
                    linestyle=":", linewidth=1.2, zorder=3)
        (mark,) = ax.plot([answer.x], [answer.value], linestyle="none", marker="D", markersize=8,
                          color=COLORS["answer"], zorder=5, label="model's own answer (P_final)")
        handles.append(mark)
    return handles


def _interval_bands(ax: Any, curve: Curve) -> list[Any]:
    """The 95% bootstrap interval of each probe line, as a shaded band behind it."""
    handles = []
    for readout, color in (("image", COLORS["image"]), ("last", COLORS["last"])):
        points = [p for p in curve.series(readout) if p.low is not None and p.high is not None]
        if len(points) < 1:
            continue
        band = ax.fill_between([p.x for p in points], [p.low for p in points], [p.high for p in points],
                               color=color, alpha=0.16, linewidth=0, zorder=1.5,
                               label="95% interval (bootstrap over test images)" if not handles else None)
        if not handles:
            handles.append(band)
    return handles


def _control_lines(ax: Any, curve: Curve) -> list[Any]:
    """The control task (probes on permuted labels) and the random-initialisation twin."""
    handles = []
    main = [p for p in curve.series("image") if p.control is not None]
    if main:
        (line,) = ax.plot(*_control_xy(main, "control"), color="#7f7f7f", linestyle=(0, (1, 2)), linewidth=1.3,
                          marker="v", markersize=3, zorder=2.5, label="control: probe on permuted labels")
        handles.append(line)
    twin = [p for p in curve.series("image") if p.random_init is not None]
    if twin:
        (line,) = ax.plot(*_control_xy(twin, "random_init"), color="#9467bd", linestyle=(0, (4, 2)),
                          linewidth=1.4, marker="^", markersize=3.5, zorder=2.6,
                          label="random-init twin (same architecture)")
        handles.append(line)
    return handles


def _control_xy(points: list[Point], attr: str) -> tuple[list[int], list[float]]:
    return [p.x for p in points], [getattr(p, attr) for p in points]


def _failures(ax: Any, curve: Curve) -> list[Any]:
    handles = []
    failed = [p for p in curve.points if p.passed is False and p.value is not None]
    if failed:
        (mark,) = ax.plot(*_xy(failed), linestyle="none", marker="X", markersize=10,
                          color=COLORS["fail"], markeredgecolor="white", markeredgewidth=0.6,
                          zorder=6, label="failing locus test")
        handles.append(mark)
    by_x = {}
    for p in curve.points:
        if p.value is not None:
            by_x.setdefault(p.x, p.value)
    rules = [(x, by_x[x]) for _, x in curve.failing_stage_rules if x in by_x]
    if rules:
        (ring,) = ax.plot([x for x, _ in rules], [y for _, y in rules], linestyle="none", marker="o",
                          markersize=15, markerfacecolor="none", markeredgecolor=COLORS["fail"],
                          markeredgewidth=2, zorder=6, label="failing stage rule")
        handles.append(ring)
    if curve.first_failing_stage is not None:
        from matplotlib.patches import Patch

        handles.append(Patch(color=FAIL_BAND, label=f"first failing stage: {curve.first_failing_stage}"))
    return handles


def _reference_lines(ax: Any, curve: Curve, reference: dict[str, Any] | None) -> list[Any]:
    if not reference:
        return []
    ref = curve_of(reference)
    x_of = {p.locus: p.x for p in curve.points}
    handles = []
    cut = max(ref.consumed_x, default=None)  # the reference's path, as for the model itself
    for readout, color in (("image", COLORS["image"]), ("last", COLORS["last"])):
        pts = [p for p in ref.series(readout) if p.locus in x_of
               and not (p.stage == "vision" and cut is not None and p.x > cut)]
        if not pts:
            continue
        xs = [x_of[p.locus] for p in pts]
        ys = [math.nan if p.value is None else p.value for p in pts]
        (line,) = ax.plot(xs, ys, color=color, linestyle=(0, (6, 3)), linewidth=1.5, alpha=0.65,
                          zorder=3, label=f"reference: {'image-token mean' if readout == 'image' else 'last token'}")
        handles.append(line)
    answer = ref.answer
    if answer is not None and answer.value is not None and answer.locus in x_of:
        (mark,) = ax.plot([x_of[answer.locus]], [answer.value], linestyle="none", marker="D",
                          markersize=8, markerfacecolor="none", markeredgecolor=COLORS["answer"],
                          alpha=0.7, zorder=5, label="reference: answer")
        handles.append(mark)
    return handles


def _ticks(fig: Any, ax: Any, curve: Curve) -> None:
    """A minor tick on every layer; labels only where they fit (checked on the real renderer)."""
    n = curve.n_positions
    ax.set_xticks(range(n), minor=True)
    ax.tick_params(axis="x", which="minor", length=2.5)
    ax.tick_params(axis="x", which="major", labelsize=TICK_FONTSIZE, length=5)
    width_px = fig.get_figwidth() * DPI * AXES_RECT[2]
    per_position = width_px / max(n, 1)
    widest = max((len(t) for t in curve.ticks), default=1) * TICK_FONTSIZE * 0.62 * DPI / 72 + 6
    gap = max(1, math.ceil(widest / per_position))
    while True:
        chosen = thin_ticks(curve.tick_stages, gap, keep=curve.consumed_x)
        ax.set_xticks(chosen)
        ax.set_xticklabels([curve.ticks[x] for x in chosen])
        if not tick_label_overlaps(fig, ax) or gap >= n:
            return
        gap += 1


def tick_label_overlaps(fig: Any, ax: Any | None = None) -> list[tuple[str, str]]:
    """Pairs of visible x tick labels whose drawn boxes overlap (empty when readable)."""
    ax = ax if ax is not None else fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
    boxes = sorted(((t.get_window_extent(renderer), t.get_text()) for t in labels), key=lambda b: b[0].x0)
    return [(a[1], b[1]) for a, b in zip(boxes, boxes[1:]) if a[0].x1 > b[0].x0]


def _titles(fig: Any, model: dict[str, Any], curve: Curve) -> None:
    text = f"{curve.label}: {diagnosis(model)}"
    failing = curve.first_failing_stage is not None
    fit_text(fig, 0.5, 0.955, text, 12, fontweight="bold", color=COLORS["fail"] if failing else "#1b5e20")
    fit_text(fig, 0.5, 0.912, model.get("profile") or "", 10, color="#333333")


def fit_text(fig: Any, x: float, y: float, text: str, size: float, min_size: float = 7.0, **kw: Any) -> Any:
    """A centred line of figure text that never runs past the figure's edges: the font shrinks
    down to ``min_size``, then the text is wrapped onto as many lines as it needs."""
    import textwrap

    artist = fig.text(x, y, text, ha="center", va="center", fontsize=size, **kw)
    renderer = fig.canvas.get_renderer()
    room = fig.bbox.width * 0.97
    width = artist.get_window_extent(renderer).width
    while width > room and size > min_size:
        size = max(min_size, size - 0.5)
        artist.set_fontsize(size)
        width = artist.get_window_extent(renderer).width
    if width > room:
        chars = max(20, int(len(text) * room / width))
        artist.set_text("\n".join(textwrap.wrap(text, chars)))
    return artist


# -- the profile bars ------------------------------------------------------------------------


def profile_figure(results: dict[str, Any]) -> Any:
    """Grouped bars: FHS_V, FHS_C, FHS_L, P_final for every model; failing stages hatched."""
    Figure, Canvas = _matplotlib()
    models = list(results.get("models", {}).values())
    fig = Figure(figsize=profile_figsize(len(models)), dpi=DPI)
    Canvas(fig)
    ax = fig.add_axes((0.075, 0.2, 0.9, 0.64))
    n = max(len(models), 1)
    width = 0.8 / n
    top = 1.0
    for i, model in enumerate(models):
        failing = set(failing_stages(model))
        color = f"C{i % 10}"
        for g, key in enumerate(SCORE_KEYS):
            value = number((model.get("scores") or {}).get(key))
            x = g - 0.4 + width * (i + 0.5)
            bad = SCORE_STAGE[key] in failing
            if value is None:
                ax.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=8, rotation=90)
                continue
            top = max(top, value)
            ax.bar(x, value, width * 0.92, color=color, edgecolor=COLORS["fail"] if bad else "white",
                   linewidth=1.5 if bad else 0.5, hatch="///" if bad else None,
                   zorder=3)
            low, high = ((model.get("intervals") or {}).get(key) or [None, None])
            if number(low) is not None and number(high) is not None:  # the 95% bootstrap interval
                ax.errorbar([x], [value], yerr=[[value - low], [high - value]], fmt="none",
                            ecolor="#333333", elinewidth=1.0, capsize=3, zorder=4.5)
                top = max(top, high)
            ax.text(x, value + 0.01, f"{value:.2f}", ha="center", va="bottom",
                    fontsize=8 if n <= 4 else 7, rotation=0 if n <= 4 else 90, zorder=4)
    ax.axhline(1.0, color="#9e9e9e", linewidth=0.8, linestyle="--", zorder=2)
    ax.set_ylim(0, top * 1.15)
    ax.set_xticks(range(len(SCORE_KEYS)))
    ax.set_xticklabels([f"{k}\n({'model answer' if k == 'P_final' else 'FHS, ' + STAGE_TITLES[SCORE_STAGE[k]]})"
                        for k in SCORE_KEYS], fontsize=9)
    ax.set_ylabel("score (FHS can exceed 1)")
    ax.grid(axis="y", color="#dddddd", linewidth=0.6, zorder=0)
    ax.set_axisbelow(True)
    fig.text(0.5, 0.95, "Feature health profile: FHS_V -> FHS_C -> FHS_L -> P_final",
             ha="center", va="center", fontsize=12, fontweight="bold")
    from matplotlib.patches import Patch

    handles = [Patch(color=f"C{i % 10}", label=str(m.get("label"))) for i, m in enumerate(models)]
    handles.append(Patch(facecolor="white", edgecolor=COLORS["fail"], hatch="///",
                         label="hatched: the stage fails a rule"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8.5, frameon=False)
    return fig


def render_model(model: dict[str, Any], reference: dict[str, Any] | None = None) -> bytes:
    return png_bytes(model_figure(model, reference))


def render_profile(results: dict[str, Any]) -> bytes:
    return png_bytes(profile_figure(results))
