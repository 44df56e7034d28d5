"""The pytest face: options and ini keys, collection of probe items, summary, JUnit figures.

Importing this module costs nothing: the engine (torch, transformers, scikit-learn) is imported
only when ``--mllm-model`` (or the ``mllm_model`` ini key) names a model.
Precedence: command line > ini file > built-in default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from .errors import ConfigError

GROUP = "mllmprobe"
MARKER = "featureprobe"
XUNIT_WITH_TESTCASE_PROPERTIES = ("xunit1", "legacy")


@dataclass(frozen=True)
class Option:
    flag: str
    dest: str
    default: Any
    help: str
    kind: str = "string"  # string | int | float | bool | list
    choices: tuple[str, ...] | None = None

    @property
    def ini(self) -> str:
        return self.dest


OPTIONS = (
    Option("--mllm-model", "mllm_model", [], "model to probe: 'demo' (bundled), a local folder saved with save_pretrained, or a hub id; repeat for several models (default: none, the plugin stays off)", "list"),
    Option("--mllm-data", "mllm_data", None, "image folder laid out as DATA/<class>/<image> (default: the bundled demo data, only with --mllm-model demo)"),
    Option("--mllm-thresholds", "mllm_thresholds", [], "threshold YAML file or folder, merged over the shipped thresholds/default.yaml; repeatable (default: the shipped default only)", "list"),
    Option("--mllm-device", "mllm_device", "auto", "device for the forward pass: auto, cpu, cuda or cuda:N (default: auto = first GPU if any, else cpu)"),
    Option("--mllm-dtype", "mllm_dtype", "auto", "weights dtype (default: auto = float32 on cpu, bfloat16 on a GPU)", choices=("auto", "float32", "bfloat16", "float16")),
    Option("--mllm-batch-size", "mllm_batch_size", 8, "images per forward pass (default: 8)", "int"),
    Option("--mllm-max-samples", "mllm_max_samples", None, "use a class-stratified, seeded subset of this many images (default: every image)", "int"),
    Option("--mllm-seed", "mllm_seed", 0, "seed of the train/test split, subsampling and MLP probes (default: 0)", "int"),
    Option("--mllm-probe", "mllm_probe", "linear", "probe: linear (softmax regression) or mlp (the paper's 2-layer MLP) (default: linear)", choices=("linear", "mlp")),
    Option("--mllm-test-size", "mllm_test_size", 0.3, "fraction of images held out to score probes and the answer (default: 0.3)", "float"),
    Option("--mllm-metric", "mllm_metric", None, "metric every rule uses, overriding the threshold files: accuracy or balanced_accuracy (default: from the threshold files, shipped: accuracy)", choices=("accuracy", "balanced_accuracy")),
    Option("--mllm-stages", "mllm_stages", None, "override stage detection: vision=PATH,connector=PATH,llm=PATH (module paths; default: detected)"),
    Option("--mllm-trust-remote-code", "mllm_trust_remote_code", False, "allow models that run their own code from the model folder or hub (default: off)", "bool"),
)


class _Keys:
    settings = pytest.StashKey["Any"]()
    plan = pytest.StashKey["Any"]()
    results = pytest.StashKey["dict[str, Any]"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(GROUP, "feature probing of multimodal LLMs (pytest-mllmprobe)")
    for opt in OPTIONS:
        kwargs: dict[str, Any] = {"dest": opt.dest, "help": opt.help}
        if opt.kind == "bool":
            kwargs["action"] = "store_true"
            kwargs["default"] = None
        elif opt.kind == "list":
            kwargs["action"] = "append"
            kwargs["default"] = None
            kwargs["metavar"] = opt.flag[7:].upper()
        else:
            kwargs["default"] = None
            kwargs["metavar"] = opt.flag[7:].upper()
            if opt.kind in ("int", "float"):
                kwargs["type"] = int if opt.kind == "int" else float
        if opt.choices:
            kwargs["choices"] = list(opt.choices)
        group.addoption(opt.flag, **kwargs)
        ini_type = {"list": "args", "bool": "bool"}.get(opt.kind, "string")
        parser.addini(opt.ini, f"{opt.help} [ini mirror of {opt.flag}]", type=ini_type, default=None)


def _value(config: pytest.Config, opt: Option) -> Any:
    """Command line first, then the ini key, then the default; converted and checked."""
    cli = config.getoption(opt.dest)
    if cli not in (None, []):
        return cli
    raw = config.getini(opt.ini)
    if raw in (None, "", []):
        return opt.default
    if opt.kind in ("list", "bool"):
        return raw
    try:
        value: Any = {"int": int, "float": float}.get(opt.kind, str)(str(raw).strip())
    except ValueError:
        raise pytest.UsageError(f"ini key {opt.ini} = {raw!r} is not a valid {opt.kind} (see {opt.flag} in pytest --help)") from None
    if opt.choices and value not in opt.choices:
        raise pytest.UsageError(f"ini key {opt.ini} = {raw!r}: choose one of {', '.join(opt.choices)}")
    return value


def settings_from_config(config: pytest.Config) -> Any:
    """Build :class:`~pytest_mllmprobe.settings.Settings`, or ``None`` when no model is given."""
    from .settings import Settings, parse_stage_overrides

    values = {opt.dest: _value(config, opt) for opt in OPTIONS}
    if not values["mllm_model"]:
        return None
    return Settings(
        models=tuple(values["mllm_model"]),
        data=values["mllm_data"],
        thresholds=tuple(values["mllm_thresholds"]),
        device=values["mllm_device"],
        dtype=values["mllm_dtype"],
        batch_size=values["mllm_batch_size"],
        max_samples=values["mllm_max_samples"],
        seed=values["mllm_seed"],
        probe=values["mllm_probe"],
        test_size=values["mllm_test_size"],
        trust_remote_code=bool(values["mllm_trust_remote_code"]),
        metric=values["mllm_metric"],
        stages=parse_stage_overrides(values["mllm_stages"]),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: a feature-probing test generated by pytest-mllmprobe")
    try:
        settings = settings_from_config(config)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    if settings is not None:
        config.stash[_Keys.settings] = settings
        config.stash[_Keys.results] = {}
        config.pluginmanager.register(ProbeReporter(config), "mllmprobe-reporter")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Add one item per locus and per stage rule, before ``-k``/``-m`` deselection runs."""
    settings = config.stash.get(_Keys.settings, None)
    if settings is None:
        return
    from . import engine
    from .items import ModelNode

    try:
        plan = engine.plan(settings)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_Keys.plan] = plan
    for model_plan in plan.models:
        node = ModelNode.from_parent(session, name=model_plan.spec.label, nodeid=f"mllm/{model_plan.spec.label}")
        node.setup_plan(plan, model_plan, config.stash[_Keys.results])
        new = node.collect()
        # Report the node like any collector, so "collected N items" and --collect-only count it.
        config.hook.pytest_collectreport(report=pytest.CollectReport(node.nodeid, "passed", None, new))
        items.extend(new)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Attach the item's figures to its report, so they travel to the xdist controller too."""
    report = yield
    figures = getattr(item, "figures", None)
    if call.when == "call" and figures is not None:
        report.mllm = figures
        report.mllm_model = item.model_summary  # type: ignore[attr-defined]
    return report


def junit_family(config: pytest.Config) -> str:
    try:
        return str(config.getini("junit_family"))
    except ValueError:
        return "xunit2"


def _suite_property(config: pytest.Config, name: str, value: str) -> None:
    """Suite-level ``<property>`` (schema-valid under every junit_family)."""
    for plugin in config.pluginmanager.get_plugins():
        add = getattr(plugin, "add_global_property", None)
        if callable(add) and hasattr(plugin, "family"):
            add(name, value)
            return


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    settings = config.stash.get(_Keys.settings, None)
    if settings is None:
        return None
    return [
        f"mllmprobe: models={', '.join(settings.models)} data={settings.data or 'bundled demo'} "
        f"probe={settings.probe} test_size={settings.test_size} seed={settings.seed}"
    ]


class ProbeReporter:
    """Collects the figures of every probe report (also those from xdist workers) for the
    JUnit suite properties and the terminal summary. Registered only when a model is given."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.summaries: dict[str, dict[str, Any]] = {}
        self.outcomes: dict[str, list[str]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        figures = getattr(report, "mllm", None)
        if report.when != "call" or figures is None:
            return
        summary = getattr(report, "mllm_model", None)
        if summary is not None and summary["label"] not in self.summaries:
            self.summaries[summary["label"]] = summary
            _suite_property(
                self.config, f"mllmprobe:{summary['label']}:profile",
                f"{summary['profile']}; {summary['diagnosis']}",
            )
        self.outcomes.setdefault(figures["model"], []).append(report.outcome)
        if junit_family(self.config) not in XUNIT_WITH_TESTCASE_PROPERTIES:
            _suite_property(self.config, f"mllmprobe:{report.nodeid}", json.dumps(figures, sort_keys=True))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.summaries:
            return
        tr = terminalreporter
        tr.write_sep("=", "mllmprobe: feature health")
        for label, summary in self.summaries.items():
            outcomes = self.outcomes.get(label, [])
            failed = sum(1 for o in outcomes if o == "failed")
            tr.write_line(
                f"{label} ({summary['family']}, {summary['n_test']} test images; "
                f"connector reads {summary['consumed']})"
            )
            tr.write_line(f"  profile: {summary['profile']}")
            healthy = summary["first_failing_stage"] is None
            tr.write_line(f"  {summary['diagnosis']}", red=not healthy, green=healthy)
            tr.write_line(f"  {len(outcomes)} probe tests ran, {failed} failed")
