"""The report: results.json, plots, index.html, the CLI and the pytest-html extras.

One real demo run and one planted fault (a corrupted middle LLM layer) feed every test.
"""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import math
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pytest_mllmprobe import run
from pytest_mllmprobe.baseline import entry_from_result, merge, write_json_atomic
from pytest_mllmprobe.results import Results
from pytest_mllmprobe.demo import DEMO_DATA
from pytest_mllmprobe.report import MATPLOTLIB_HINT, ReportOutcome, load_results, write_report
from pytest_mllmprobe.report.layout import curve_of, thin_ticks
from pytest_mllmprobe.report.writer import file_stems

from .conftest import subprocess_env
from .faults import build_faulty

FAULT = "corrupted-layer"


@pytest.fixture(scope="module")
def demo_results() -> Results:
    return run("demo")


@pytest.fixture(scope="module")
def demo(demo_results: Results) -> dict:
    return demo_results.to_dict()


@pytest.fixture(scope="module")
def fault(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = build_faulty(FAULT, tmp_path_factory.mktemp("faults"))
    return run(str(path), data=str(DEMO_DATA)).to_dict()


@pytest.fixture(scope="module")
def both(demo: dict, fault: dict) -> dict:
    merged = copy.deepcopy(demo)
    merged["models"].update(copy.deepcopy(fault["models"]))
    return merged


@pytest.fixture(scope="module")
def report(both: dict, tmp_path_factory: pytest.TempPathFactory) -> ReportOutcome:
    pytest.importorskip("matplotlib")
    return write_report(both, tmp_path_factory.mktemp("report"))


# -- helpers ---------------------------------------------------------------------------------


class _Page(HTMLParser):
    """Collects ``<tr data-locus>`` per model section and every ``<img src>``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self.images: list[str] = []
        self.tags: set[str] = set()
        self._section: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self._section = a.get("id")
        elif tag == "tr" and "data-locus" in a and self._section is not None:
            self.rows.setdefault(self._section, []).append(a["data-locus"] or "")
        elif tag == "img":
            self.images.append(a.get("src") or "")


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _image(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _pixel_std(image) -> float:
    import numpy as np

    return float(np.asarray(image.convert("L"), dtype=float).std())


def _red_pixels(image) -> int:
    """Pixels of the failure red (#d0021b), as drawn by the failing-test markers."""
    import numpy as np

    rgb = np.asarray(image.convert("RGB"), dtype=int)
    return int(((rgb[..., 0] > 180) & (rgb[..., 1] < 40) & (rgb[..., 2] < 60)).sum())


def _hide_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if matplotlib were not installed: ``import matplotlib(.anything)`` raises ImportError."""
    names = [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]
    for name in names or ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)


def _grown(model: dict, n_vision: int = 32, n_llm: int = 28) -> dict:
    """The demo model's dict with a 90-locus pipeline (32 vision, connector, 2 x 28 LLM, answer)."""
    grown = copy.deepcopy(model)
    template_locus, template_verdict = model["loci"]["vision.0"], model["verdicts"]["vision.0"]
    loci, verdicts = {}, {}

    def add(name: str, stage: str, layer: int | None, readout: str | None, value: float) -> None:
        loci[name] = dict(copy.deepcopy(template_locus), name=name, stage=stage, layer=layer,
                          readout=readout, accuracy=value, balanced_accuracy=value)
        verdict = copy.deepcopy(template_verdict)
        verdict.update(test=name, stage=stage, locus=name)
        verdict["checks"][0].update(value=value, passed=value >= verdict["checks"][0]["threshold"])
        verdict["passed"] = verdict["checks"][0]["passed"]
        verdicts[name] = verdict

    for i in range(n_vision):
        add(f"vision.{i}", "vision", i, None, 0.5 + 0.4 * i / n_vision)
    add("connector", "connector", None, None, 0.85)
    for i in range(n_llm):
        add(f"llm.{i}.image", "llm", i, "image", 0.85 - 0.3 * math.sin(i / 5) ** 2)
        add(f"llm.{i}.last", "llm", i, "last", 0.6 + 0.01 * i)
    add("answer", "answer", None, None, 0.7)
    verdicts.update({k: copy.deepcopy(v) for k, v in model["verdicts"].items() if k.startswith("stage.")})
    grown.update(loci=loci, verdicts=verdicts, label="grown")
    grown["stage_map"] = dict(model["stage_map"], consumed_vision_layers=[n_vision - 2])
    return grown


# -- results.json ----------------------------------------------------------------------------


def test_results_json_round_trips(demo: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_matplotlib(monkeypatch)  # the JSON does not need the plots
    outcome = write_report(demo, tmp_path / "new" / "dir")
    saved = json.loads((tmp_path / "new" / "dir" / "results.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(demo))
    assert saved["schema_version"] == 2
    assert load_results(outcome.out_dir / "results.json") == saved
    assert not [p for p in outcome.out_dir.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_results_json_is_strict(demo: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_matplotlib(monkeypatch)
    odd = copy.deepcopy(demo)
    odd["models"]["demo"]["scores"]["FHS_V"] = float("nan")
    write_report(odd, tmp_path)
    text = (tmp_path / "results.json").read_text(encoding="utf-8")
    assert "NaN" not in text
    assert json.loads(text)["models"]["demo"]["scores"]["FHS_V"] is None


def test_not_a_results_dict_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Results.to_dict"):
        write_report({"loci": {}}, tmp_path)


# -- pictures --------------------------------------------------------------------------------


def test_model_pngs_decode_are_not_blank_and_have_the_size(report: ReportOutcome, both: dict) -> None:
    from pytest_mllmprobe.report.plots import DPI, MODEL_FIGSIZE

    names = {p.name for p in report.written}
    assert {"results.json", "index.html", "profile.png", "demo.png", f"{FAULT}.png"} <= names
    for label in both["models"]:
        image = _image((report.out_dir / f"{label}.png").read_bytes())
        assert image.format == "PNG"
        assert image.size == (round(MODEL_FIGSIZE[0] * DPI), round(MODEL_FIGSIZE[1] * DPI))
        assert _pixel_std(image) > 20, f"{label}.png looks blank"
    # Failing tests are marked in red on the faulty model's curve only.
    assert _red_pixels(_image((report.out_dir / f"{FAULT}.png").read_bytes())) > 200
    assert _red_pixels(_image((report.out_dir / "demo.png").read_bytes())) < 50


def test_profile_png_has_the_size_for_all_models(report: ReportOutcome, both: dict) -> None:
    from pytest_mllmprobe.report.plots import DPI, profile_figsize

    image = _image((report.out_dir / "profile.png").read_bytes())
    width, height = profile_figsize(len(both["models"]))
    assert image.size == (round(width * DPI), round(height * DPI))
    assert _pixel_std(image) > 20


def test_curve_marks_what_the_plot_needs(demo: dict, fault: dict) -> None:
    healthy = curve_of(demo["models"]["demo"])
    assert healthy.ticks == ("0", "1", "2", "3", "conn", "0", "1", "2", "3", "ans")
    assert healthy.consumed_x == (2,)
    assert healthy.first_failing_stage is None and not healthy.failing_stage_rules
    assert [p.locus for p in healthy.series("last")] == [f"llm.{i}.last" for i in range(4)]
    assert all(p.threshold == pytest.approx(0.4) for p in healthy.points if p.readout != "lens")
    # the logit lens shares the x of its decoder layer and has no pass line: it is not a test
    lens = healthy.series("lens")
    assert [p.x for p in lens] == [p.x for p in healthy.series("last")]
    assert all(p.threshold is None and p.passed is None for p in lens)

    broken = curve_of(fault["models"][FAULT])
    assert broken.first_failing_stage == "llm"
    assert {"llm.2.image", "llm.3.last", "answer"} <= {p.locus for p in broken.points if p.passed is False}
    assert ("llm", broken.spans["llm"][1]) in broken.failing_stage_rules


def test_ninety_loci_tick_labels_do_not_overlap(demo: dict) -> None:
    pytest.importorskip("matplotlib")
    from pytest_mllmprobe.report.plots import model_figure, render_model, tick_label_overlaps

    grown = _grown(demo["models"]["demo"])
    assert len(grown["loci"]) == 90
    fig = model_figure(grown)
    assert tick_label_overlaps(fig) == []
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert "conn" in labels and "ans" in labels and 8 <= len(labels) < 62
    assert _pixel_std(_image(render_model(grown))) > 20


def test_thin_ticks_keeps_the_gap_and_the_single_stages() -> None:
    stages = ["vision"] * 32 + ["connector"] + ["llm"] * 28 + ["answer"]
    for gap in (1, 2, 3, 4, 7):
        chosen = thin_ticks(stages, gap, keep=[30])
        assert all(b - a >= gap for a, b in zip(chosen, chosen[1:]))
        assert {32, 61} <= set(chosen)
    assert thin_ticks(stages, 1) == list(range(62))


def test_reference_is_drawn_for_the_same_label(demo: dict, fault: dict, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    healthy_as_fault = {"schema_version": 1, "models": {FAULT: demo["models"]["demo"]}}
    plain = write_report(fault, tmp_path / "plain")
    overlaid = write_report(fault, tmp_path / "ref", reference=healthy_as_fault)
    assert (plain.out_dir / f"{FAULT}.png").read_bytes() != (overlaid.out_dir / f"{FAULT}.png").read_bytes()
    assert not overlaid.warnings
    other = write_report(fault, tmp_path / "other", reference=demo)
    assert any("'demo'" in w for w in other.warnings)


def test_reference_may_be_a_baseline_file(demo_results: Results, fault: dict, tmp_path: Path) -> None:
    """A baseline file's entries hold only metrics per locus name (no stage/layer/verdicts)."""
    pytest.importorskip("matplotlib")
    entry = entry_from_result(demo_results["demo"], demo_results.data, demo_results.settings)
    write_json_atomic(tmp_path / "baseline.json", merge(None, {FAULT: (entry, set())}))
    outcome = write_report(fault, tmp_path / "out", reference=load_results(tmp_path / "baseline.json"))
    assert not outcome.warnings and outcome.plotted
    assert [p.locus for p in curve_of(entry).series("image")][-1] == "llm.3.image"


@pytest.mark.parametrize("damage", ["drop-stage", "wrong-type", "other-version", "baseline-without-loci"])
def test_a_damaged_results_file_names_the_key(demo: dict, demo_results: Results, tmp_path: Path,
                                              damage: str) -> None:
    doc = copy.deepcopy(demo)
    if damage == "drop-stage":
        del doc["models"]["demo"]["loci"]["vision.0"]["stage"]
        expected = r"models\['demo'\]\.loci\['vision\.0'\]\.stage must be present"
    elif damage == "wrong-type":
        doc["models"]["demo"]["scores"]["FHS_V"] = "high"
        expected = r"models\['demo'\]\.scores\['FHS_V'\] must be a number or null, got 'high'"
    elif damage == "other-version":
        doc["schema_version"] = 99
        expected = "schema_version is 99"
    else:
        entry = entry_from_result(demo_results["demo"], demo_results.data, demo_results.settings)
        doc = merge(None, {"demo": (entry, set())})
        del doc["models"]["demo"]["loci"]
        expected = r"models\['demo'\]\.loci must be present"
    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ValueError, match=expected):
        load_results(path)


def test_long_titles_stay_inside_the_figure(demo: dict) -> None:
    pytest.importorskip("matplotlib")
    from pytest_mllmprobe.report.plots import model_figure

    model = copy.deepcopy(demo["models"]["demo"])
    model["label"] = "LLaVA-Med-BUSI-" * 8  # 120 characters
    fig = model_figure(model)
    renderer = fig.canvas.get_renderer()
    for text in fig.texts:
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width, (text.get_text(), box)


# -- index.html ------------------------------------------------------------------------------


def test_html_has_a_row_per_locus_and_its_images_resolve(report: ReportOutcome, both: dict) -> None:
    path = report.out_dir / "index.html"
    page = _parse(path)
    for label, model in both["models"].items():
        assert sorted(page.rows[label]) == sorted(model["loci"])
    assert len(page.images) == 1 + len(both["models"])
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert _image(base64.b64decode(src.split(",", 1)[1])).format == "PNG"
    text = path.read_text(encoding="utf-8")
    assert not {"script", "link"} & page.tags and "http://" not in text and "https://" not in text
    assert "first failing stage: llm (comprehension deficit in LLM reasoning)" in text
    assert both["models"]["demo"]["profile"].replace(">", "&gt;") in text


def test_html_escapes_every_text(demo: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_matplotlib(monkeypatch)
    evil = '<img src=x onerror="alert(1)">&'
    model = copy.deepcopy(demo["models"]["demo"])
    model["label"] = evil
    model["source"] = evil
    outcome = write_report({"schema_version": 1, "models": {evil: model}}, tmp_path)
    text = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert evil not in text and html.escape(evil) in text
    assert len(_parse(tmp_path / "index.html").images) == 0
    assert outcome.warnings == (MATPLOTLIB_HINT,)


def test_without_matplotlib_json_and_tables_still_written(demo: dict, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_matplotlib(monkeypatch)
    outcome = write_report(demo, tmp_path)
    assert sorted(p.name for p in outcome) == ["index.html", "results.json"]
    assert not outcome.plotted and MATPLOTLIB_HINT in outcome.warnings
    assert 'pip install "pytest-mllmprobe[report]"' in MATPLOTLIB_HINT
    page = _parse(tmp_path / "index.html")
    assert sorted(page.rows["demo"]) == sorted(demo["models"]["demo"]["loci"]) and not page.images
    assert html.escape(MATPLOTLIB_HINT) in (tmp_path / "index.html").read_text(encoding="utf-8")


def test_file_names_are_safe_and_unique() -> None:
    assert file_stems(["a/b", "a b", "profile", "index", ""]) == {
        "a/b": "a_b", "a b": "a_b-2", "profile": "profile-model", "index": "index-model", "": "model",
    }


# -- CLI and pytest-html ---------------------------------------------------------------------


def test_cli_rerenders_from_saved_json(report: ReportOutcome, tmp_path: Path) -> None:
    saved = report.out_dir / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_mllmprobe.report", str(saved), str(tmp_path / "again"),
         "--reference", str(saved)],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(p.name for p in report.written)
    assert json.loads((tmp_path / "again" / "results.json").read_text()) == json.loads(saved.read_text())


def test_importing_the_report_is_cheap() -> None:
    code = ("import sys, pytest_mllmprobe.report, pytest_mllmprobe.report.html_extras; "
            "print(sorted(m for m in ('matplotlib', 'torch', 'pytest') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=subprocess_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_cli_names_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_mllmprobe.report.__main__ import main

    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "results"}')
    with pytest.raises(SystemExit) as exc:
        main([str(bad), str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "bad.json" in capsys.readouterr().err


def test_pytest_html_extras(demo: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_mllmprobe.report.html_extras import pytest_html_extras

    model = demo["models"]["demo"]
    try:
        import pytest_html  # noqa: F401
    except ImportError:
        assert pytest_html_extras(model) == []
    else:
        extras = pytest_html_extras(model)
        kinds = [e["format_type"] for e in extras]
        assert kinds[-1] == "html" and 'data-locus="answer"' in extras[-1]["content"]
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            assert kinds == ["html"]
        else:
            assert kinds == ["image", "html"]
            assert _image(base64.b64decode(extras[0]["content"])).format == "PNG"
    monkeypatch.setitem(sys.modules, "pytest_html", None)
    assert pytest_html_extras(model) == []


def test_the_plugin_writes_the_report_and_feeds_pytest_html(pytester: pytest.Pytester) -> None:
    """`pytest --mllm-model demo --mllm-report out/` writes every file; pytest-html gets the plot."""
    pytest.importorskip("pytest_html")
    pytest.importorskip("matplotlib")
    out = pytester.path / "out"
    html = pytester.path / "report.html"
    result = pytester.runpytest_subprocess(
        "--mllm-model=demo", f"--mllm-report={out}", "--html", str(html),
        "--self-contained-html", "-p", "no:cacheprovider",
    )
    result.assert_outcomes(passed=18)
    result.stdout.fnmatch_lines(["mllmprobe wrote report: *out (results.json, demo.png, profile.png, index.html)"])
    assert sorted(p.name for p in out.iterdir()) == ["demo.png", "index.html", "profile.png", "results.json"]
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema_version"] == 2 and doc["models"]["demo"]["first_failing_stage"] is None
    page = html.read_text()
    assert "data:image/png;base64" in page and "stage.connector" in page
