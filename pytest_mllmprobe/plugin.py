"""The pytest face: options and ini keys, collection of probe items, summary, JUnit figures.

Importing this module costs nothing: the engine (torch, transformers, scikit-learn) is imported
only when ``--mllm-model`` (or the ``mllm_model`` ini key) names a model.
Precedence: command line > ini file > built-in default. There are no per-test markers to
override settings: the generated tests are not written by the user; per-model rules live in the
threshold YAML (``models:`` sections).
"""

from __future__ import annotations

import contextlib

import json
import os
from typing import Any

import pytest

from .errors import ConfigError
from .options import GROUP, MARKER, OPTIONS, XUNIT_WITH_TESTCASE_PROPERTIES, Option, junit_family

__all__ = ["GROUP", "MARKER", "OPTIONS", "Option", "mllm_results"]


class _Keys:
    settings = pytest.StashKey["Any"]()
    evaluator = pytest.StashKey["Any"]()
    sent = pytest.StashKey["set[str]"]()
    progress = pytest.StashKey["ExtractionProgress"]()
    group = pytest.StashKey["Any"]()


#: The first part of every generated node id: ``mllm/<model label>::<locus or stage rule>``.
NODE_ROOT = "mllm"


def model_node_path(label: str) -> str:
    """The path part of a model's node ids (``mllm/demo``); it names no file."""
    return f"{NODE_ROOT}/{label}"


def is_model_path(config: pytest.Config, path: str) -> bool:
    """``path`` (the part of a node id before ``::``) is a model node's, not a test file's."""
    return path.startswith(f"{NODE_ROOT}/") and not (config.rootpath / path).exists()


def keep_model_nodeids(config: pytest.Config) -> None:
    """Model node ids print as they are (``mllm/demo::connector``) from any folder.

    pytest rewrites node ids relative to the folder it was started from, for the verbose lines
    and the short summary (``FAILED ../mllm/demo::connector`` from a subfolder of the rootdir).
    A model node names no file, so that rewriting only changes the id people search and paste
    into ``-k``; test files' ids are left to pytest.
    """
    original = config.cwd_relative_nodeid

    def cwd_relative_nodeid(nodeid: Any) -> Any:
        if is_model_path(config, str(nodeid).split("::")[0]):
            return nodeid
        return original(nodeid)

    config.cwd_relative_nodeid = cwd_relative_nodeid  # type: ignore[method-assign]


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


#: Ini keys holding paths: relative values are read from the ini file's folder, as pytest does
#: for its own path keys. Inputs are rebased only when that path exists (a model may be a hub
#: id, data may be ``module:function``); outputs always.
INPUT_PATH_KEYS = ("mllm_model", "mllm_data", "mllm_thresholds", "mllm_baseline", "mllm_base_model")
OUTPUT_PATH_KEYS = ("mllm_save_baseline", "mllm_report", "mllm_cache_dir")


def _rebase(config: pytest.Config, key: str, value: str) -> str:
    from pathlib import Path

    if config.inipath is None or Path(value).is_absolute():
        return value
    candidate = config.inipath.parent / value
    if key in OUTPUT_PATH_KEYS or candidate.exists():
        return str(candidate)
    return value


def _value(config: pytest.Config, opt: Option) -> Any:
    """Command line first, then the ini key, then the default; converted and checked."""
    cli = config.getoption(opt.dest)
    if cli not in (None, []):
        return cli
    try:
        raw = config.getini(opt.ini)
    except (ValueError, TypeError, pytest.UsageError) as exc:  # pytest's own conversion of a bool ini value
        import re

        found = re.search(r"'([^']*)'\s*$", str(exc))  # pytest names the value: "invalid truth value 'x'"
        raw = found.group(1) if found else str(exc)
        raise pytest.UsageError(
            f"ini key {opt.ini} = {raw!r} is not true or false (see {opt.flag} in pytest --help)"
        ) from None
    if raw in (None, "", []):
        return opt.default
    if opt.kind == "bool":
        return raw
    if opt.kind == "list":
        return [_rebase(config, opt.ini, str(v)) for v in raw] if opt.ini in INPUT_PATH_KEYS else raw
    if opt.ini in INPUT_PATH_KEYS + OUTPUT_PATH_KEYS:
        return _rebase(config, opt.ini, str(raw).strip())
    try:
        value: Any = {"int": int, "float": float}.get(opt.kind, str)(str(raw).strip())
    except ValueError:
        raise pytest.UsageError(f"ini key {opt.ini} = {raw!r} is not a valid {opt.kind} (see {opt.flag} in pytest --help)") from None
    if opt.choices and value not in opt.choices:
        raise pytest.UsageError(f"ini key {opt.ini} = {raw!r}: choose one of {', '.join(opt.choices)}")
    return value


def settings_from_config(config: pytest.Config, require_model: bool = True) -> Any:
    """Build :class:`~pytest_mllmprobe.settings.Settings`, or ``None`` when no model is given
    (``require_model=False``: the settings without a model, for ``--mllm-power``)."""
    from .settings import Settings, parse_stage_overrides

    values = {opt.dest: _value(config, opt) for opt in OPTIONS}
    if not values["mllm_model"] and require_model:
        return None
    return Settings(
        models=tuple(values["mllm_model"]),
        data=values["mllm_data"],
        thresholds=tuple(values["mllm_thresholds"]),
        device=values["mllm_device"],
        device_map=values["mllm_device_map"],
        dtype=values["mllm_dtype"],
        batch_size=values["mllm_batch_size"],
        max_samples=values["mllm_max_samples"],
        seed=values["mllm_seed"],
        probe=values["mllm_probe"],
        test_size=values["mllm_test_size"],
        trust_remote_code=bool(values["mllm_trust_remote_code"]),
        metric=values["mllm_metric"],
        stages=parse_stage_overrides(values["mllm_stages"]),
        probe_seed=values["mllm_probe_seed"],
        baseline=values["mllm_baseline"],
        save_baseline=values["mllm_save_baseline"],
        update_baseline=bool(values["mllm_update_baseline"]),
        compare_to=values["mllm_compare_to"],
        base_model=values["mllm_base_model"],
        folds=values["mllm_folds"],
        bootstrap=values["mllm_bootstrap"],
        permutations=values["mllm_permutations"],
        answer_orders=values["mllm_answer_orders"],
        controls=tuple(values["mllm_controls"]),
        answer=values["mllm_answer"],
        dist_backend=values["mllm_dist_backend"],
        skip_bad_images=bool(values["mllm_skip_bad_images"]),
        cache_dir=_cache_dir(config, values),
    )


def _cache_dir(config: pytest.Config, values: dict[str, Any]) -> str | None:
    if values["mllm_no_cache"]:
        return None
    if values["mllm_cache_dir"]:
        return str(values["mllm_cache_dir"])
    cache = getattr(config, "cache", None)  # pytest's cache provider; absent with -p no:cacheprovider
    if cache is None:
        return None
    try:
        return str(cache.mkdir("mllmprobe"))
    except OSError as exc:  # a read-only working folder: run without the cache
        import warnings

        from .cache import CacheWarning

        warnings.warn(CacheWarning(
            f"the feature cache is off: pytest's cache folder cannot be created ({exc}); "
            "set --mllm-cache-dir to a writable folder to keep features between runs"
        ), stacklevel=1)
        return None


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """``--mllm-power DROP``: the test size a drop needs, for the data at hand; no model is loaded."""
    drop = config.getoption("mllm_power", None)
    if drop is None:
        return None
    from .engine import power_report

    try:
        settings = settings_from_config(config, require_model=False)
        lines = power_report(settings, float(drop))
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    for line in lines:
        print(line)
    return 0


@pytest.hookimpl(trylast=True)  # after the terminal reporter, JUnit and the cache provider are set up
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: a feature-probing test generated by pytest-mllmprobe")
    check_ini_was_read(config)
    try:
        settings = settings_from_config(config)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    if settings is not None:
        settings = join_ranks(config, settings)
        if serving_rank(config) is not None:  # under torchrun, rank 0 reports
            quiet_rank(config)
        if not hasattr(config, "workerinput") and serving_rank(config) is None:  # the writers only
            check_outputs(config, settings)
        config.stash[_Keys.settings] = settings
        config.stash[_Keys.sent] = set()
        config.pluginmanager.register(ProbeReporter(config, settings), "mllmprobe-reporter")
        keep_model_nodeids(config)
        progress = config.stash[_Keys.progress] = ExtractionProgress(config)
        config.pluginmanager.register(progress, "mllmprobe-progress")


def join_ranks(config: pytest.Config, settings: Any) -> Any:
    """Under torchrun: join the process group; this rank's device (its own GPU under NCCL)."""
    from .distributed import launched

    if not launched():
        return settings
    if getattr(config.option, "numprocesses", None) or hasattr(config, "workerinput"):
        raise pytest.UsageError(
            "torchrun and pytest-xdist (-n) both start processes for this run: use torchrun to split "
            "the images of a model over ranks, or -n to spread several models over workers, not both"
        )
    from dataclasses import replace

    from .distributed import rank_device, start

    try:
        group = start(settings.device, settings.dist_backend)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_Keys.group] = group
    config.add_cleanup(finish_ranks)
    return replace(settings, device=rank_device(settings.device, group))


def finish_ranks() -> None:
    from .distributed import finish

    finish()


def serving_rank(config: pytest.Config) -> Any:
    """The process group when this process is a rank other than 0 (it serves rank 0), else ``None``."""
    group = config.stash.get(_Keys.group, None)
    return group if group is not None and not group.leader else None


def check_outputs(config: pytest.Config, settings: Any) -> None:
    """The report folder and the baseline file can be written: checked now, not after the run."""
    from .preflight import check_output

    try:
        check_output(config.getoption("mllm_report") or config.getini("mllm_report"), "--mllm-report", folder=True)
        if settings.save_baseline:
            check_output(settings.save_baseline, "--mllm-save-baseline", folder=False)
        elif settings.update_baseline:
            check_output(settings.baseline, "--mllm-baseline (with --mllm-update-baseline)", folder=False)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None


def check_ini_was_read(config: pytest.Config) -> None:
    """Refuse a run whose ini file pytest chose from our option values (see :mod:`.inifile`)."""
    if getattr(config.option, "inifilename", None):  # -c names the file: nothing was guessed
        return
    import os
    import shlex

    from .inifile import misread_ini

    args = [*shlex.split(os.environ.get("PYTEST_ADDOPTS", "")), *map(str, config.invocation_params.args)]
    flags = [opt.flag for opt in OPTIONS if opt.kind != "bool"]
    positional = [str(a) for a in (getattr(config.option, "file_or_dir", None) or [])]
    found = misread_ini(config.invocation_params.dir, args, positional, flags, config.inipath)
    if found is None:
        return
    value = found.values[0]
    flag = next(a for a, b in zip(args, args[1:]) if b == value and a in flags)
    raise pytest.UsageError(
        f"pytest read {found.used or 'no configuration file'} instead of "
        f"{found.wanted or 'no configuration file'}, the one for this folder: in the space form "
        f"({flag} {value}) pytest takes {value!r} for a test path while it picks its configuration "
        "file, before this plugin's options exist, so the project's settings (mllm_thresholds, "
        f"markers, ...) would be skipped. Write the options with '=' ({flag}={value})"
        + (f", or name the file with -c {found.wanted}" if found.wanted else "")
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under pytest-xdist the controller collects nothing: check the inputs here, so that a bad
    model, data, threshold or baseline is a usage error (exit 4) and not "no tests ran"."""
    config = session.config
    settings = config.stash.get(_Keys.settings, None)
    if settings is None or hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    from . import engine

    try:
        engine.Evaluator(engine.plan(settings))
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None


def quiet_rank(config: pytest.Config) -> None:
    """A serving rank: its terminal output goes nowhere and it writes no JUnit file (rank 0's
    would be overwritten); usage errors still reach stderr."""
    from _pytest.junitxml import xml_key  # the LogXML plugin is stashed under this key

    xml = config.stash.get(xml_key, None)
    if xml is not None:
        config.pluginmanager.unregister(xml)
        del config.stash[xml_key]
    # pytest's cache: --lf/--nf/--sw bookkeeping is rank 0's (a serving rank would write back a stale copy)
    for name in ("lfplugin", "nfplugin", "stepwiseplugin"):
        plugin = config.pluginmanager.get_plugin(name)
        if plugin is not None:
            config.pluginmanager.unregister(plugin)
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None:
        sink = open(os.devnull, "w")  # noqa: SIM115 - closed with the session
        config.add_cleanup(sink.close)
        config.pluginmanager.unregister(terminal)
        config.pluginmanager.register(pytest.TerminalReporter(config, sink), "terminalreporter")


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> bool | None:
    """A serving rank runs no test: it extracts its share of each model rank 0 evaluates, until
    rank 0 is done (rank 0 runs the tests, fits the probes and reports)."""
    group = serving_rank(session.config)
    if group is None:
        return None
    evaluator = session.config.stash.get(_Keys.evaluator, None)
    from .distributed import RankLost
    from .engine import serve

    try:
        if evaluator is None:  # no model items (e.g. only a test file): wait for rank 0's stop
            group.receive()
        else:
            serve(evaluator.plan, group)
    except RankLost as exc:
        import sys

        message = f"mllmprobe rank {group.rank}: {exc}"
        capman = session.config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            sys.stderr.write(f"ERROR: {message}\n")  # this rank's terminal output goes nowhere
            sys.stderr.flush()
        pytest.exit(message, returncode=pytest.ExitCode.TESTS_FAILED)
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Add one item per locus and per stage rule, before ``-k``/``-m`` deselection runs."""
    settings = config.stash.get(_Keys.settings, None)
    if settings is None:
        return
    from . import engine
    from .items import ModelNode

    try:
        evaluator = engine.Evaluator(engine.plan(settings), progress=config.stash[_Keys.progress])
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_Keys.evaluator] = evaluator
    for model_plan in evaluator.plan.models:
        label = model_plan.spec.label
        node = ModelNode.from_parent(session, name=label, nodeid=model_node_path(label))
        node.setup_plan(model_plan, evaluator)
        new = node.collect()
        # Report the node like any collector, so "collected N items" and --collect-only count it.
        config.hook.pytest_collectreport(report=pytest.CollectReport(node.nodeid, "passed", None, new))
        items.extend(new)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Tell the engine which tests of each model were selected (``-k``, ``-m``, node ids,
    ``--lf``: ``session.items`` is final here, in every xdist worker too): only the loci they
    read are extracted. A model with no selected test is never evaluated, so never loaded."""
    evaluator = session.config.stash.get(_Keys.evaluator, None)
    if evaluator is None:
        return
    from .items import ModelNode, ProbeItem

    chosen: dict[str, set[str]] = {}
    reason = None
    for item in session.items:
        if isinstance(item, ProbeItem) and isinstance(item.parent, ModelNode):
            chosen.setdefault(item.parent.name, set()).add(item.name)
        elif "mllm_results" in getattr(item, "fixturenames", ()):
            reason = f"{item.nodeid} reads mllm_results, which holds every locus"
    config = session.config
    report = config.getoption("mllm_report") or config.getini("mllm_report")
    if reason is None and report:
        from .selection import whole_model_reason

        reason = whole_model_reason(evaluator.plan.settings, report)
    try:
        for model_plan in evaluator.plan.models:
            label = model_plan.spec.label
            evaluator.select(label, None if reason and label not in chosen else chosen.get(label, set()), reason)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Attach the item's figures to its report, so they travel to the xdist controller too."""
    report = yield
    figures = getattr(item, "figures", None)
    if call.when == "call" and figures is not None:
        report.mllm = figures
        report.mllm_model = item.model_summary  # type: ignore[attr-defined]
        label = figures["model"]
        sent = item.config.stash[_Keys.sent]
        if label not in sent:  # once per model and process: the baseline entry and results
            sent.add(label)
            evaluator = item.config.stash[_Keys.evaluator]
            report.mllm_entry = evaluator.entry(label)
            report.mllm_result = evaluator.result(label).to_dict()
            report.mllm_data = engine_data_summary(evaluator)
            if item.config.pluginmanager.hasplugin("html"):
                from .report.html_extras import pytest_html_extras

                report.extras = [*getattr(report, "extras", []), *pytest_html_extras(report.mllm_result)]
    return report


def engine_data_summary(evaluator: Any) -> dict[str, Any]:
    from .engine import data_summary

    return data_summary(evaluator.plan)


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
    if settings.folds == 1:
        split = f"test_size={settings.test_size}"
    else:
        split = f"folds={settings.folds or 'auto'}"
    lines = [
        f"mllmprobe: models={', '.join(settings.models)} data={settings.data or 'bundled demo'} "
        f"probe={settings.probe} {split} seed={settings.seed} bootstrap={settings.bootstrap} "
        f"permutations={settings.control_permutations}" + (f" controls={','.join(settings.controls)}" if settings.controls else "")
    ]
    group = config.stash.get(_Keys.group, None)
    if group is not None:
        lines.append(f"mllmprobe: rank {group.rank} of {group.world} ({group.backend}): every rank extracts "
                     "its share of the images; this rank fits the probes and reports")
    return lines


class ExtractionProgress:
    """Images/s and ETA of each model's extraction, on the terminal (not captured); quiet with -q.

    On a terminal one line is rewritten in place; in a CI log a line is printed at each quarter.
    Progress never breaks into pytest's own lines. A model is evaluated in the setup of its first
    test, after pytest has printed that test's location (``mllm/demo `` before the dots, or
    ``mllm/demo::vision.0 `` with ``-v``); so the location of a model's first test is held back
    (:meth:`pytest_runtest_logstart`) and written once its setup has ended
    (:meth:`pytest_runtest_logreport`): the progress lines stand on lines of their own, before it.
    Progress that interrupts any other line (a test of yours using ``mllm_results``) ends by
    writing that line's location again, so no result letter is left alone on a line.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        #: per model: time and images done at its first progress call
        self._start: dict[str, tuple[float, int]] = {}
        self._shown: dict[str, int] = {}
        #: model node paths whose first test has started
        self._started: set[str] = set()
        #: the location held back: (node id, what pytest keeps as its current location, the text)
        self._held: tuple[str, Any, str] | None = None
        #: per model whose progress is on screen: the interrupted location to write again, if any
        self._interrupted: dict[str, tuple[Any, str] | None] = {}

    # -- where pytest's lines begin -----------------------------------------------------------
    def _reporter(self) -> Any:
        """pytest's terminal reporter, when this process prints the test lines (not under xdist)."""
        if hasattr(self.config, "workerinput") or self.config.pluginmanager.hasplugin("dsession"):
            return None
        return self.config.pluginmanager.get_plugin("terminalreporter")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logstart(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        path = nodeid.split("::")[0]
        reporter = self._reporter()
        if reporter is None or not is_model_path(self.config, path):
            return
        first = path not in self._started
        self._started.add(path)
        if reporter.showlongtestinfo:  # -v: pytest writes the test's id, then PASSED
            if first:
                line = _location_line(reporter, nodeid, location)
                if line is not None:
                    reporter.write("\n")  # what pytest writes before the id
                    reporter.currentfspath = line  # so pytest writes nothing now
                    self._held = (nodeid, line, line)
        elif reporter.showfspath:  # the model's node path, then a letter per test
            fspath = self.config.rootpath / path
            if reporter.currentfspath == fspath:
                return
            # pytest's own way to end the previous line, then the path as the node id has it
            # (pytest would write it relative to the invocation folder: ../mllm/demo)
            fill = getattr(reporter, "_write_progress_information_filling_space", None)
            if reporter.currentfspath is not None and getattr(reporter, "_show_progress_info", False) and fill:
                fill()
            reporter.write("\n")
            reporter.currentfspath = fspath
            if first:
                self._held = (nodeid, fspath, f"{path} ")
            else:
                reporter.write(f"{path} ", flush=True)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """The model's first test has been set up (its evaluation is done): write its location."""
        if self._held is None or report.nodeid != self._held[0]:
            return
        reporter = self._reporter()
        _, key, text = self._held
        self._held = None
        if reporter is not None:
            if reporter.currentfspath not in (None, key):  # something else wrote a line meanwhile
                reporter.ensure_newline()
            reporter.write(text, flush=True)
            reporter.currentfspath = key

    # -- the progress lines ----------------------------------------------------------------
    def __call__(self, label: str, done: int, total: int) -> None:
        import time

        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None or self.config.get_verbosity() < 0:
            return
        now = time.perf_counter()
        # the first call comes after the first batch: rates count from there
        start, start_done = self._start.setdefault(label, (now, done))
        rate = (done - start_done) / (now - start) if done > start_done and now > start else None
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            self._show(reporter, label, done, total, rate)

    def _show(self, reporter: Any, label: str, done: int, total: int, rate: float | None) -> None:
        text = f"mllmprobe: {label}: extracted {done}/{total} images"
        if rate is not None:
            text += f", {rate:.1f} img/s" + (f", ETA {(total - done) / rate:.0f} s" if done < total else "")
        if reporter.isatty():
            if label not in self._interrupted:
                self._interrupted[label] = self._interrupt(reporter)
            reporter.rewrite(text, erase=True)
            if done == total:
                reporter.write("\n", flush=True)
                self._resume(reporter, label)
            return
        quarter = (4 * done) // max(total, 1)
        if quarter > self._shown.get(label, 0) or done == total:
            self._shown[label] = quarter
            if label not in self._interrupted:
                self._interrupted[label] = self._interrupt(reporter)
            reporter.write_line(text)
            if done == total:
                self._resume(reporter, label)

    def _interrupt(self, reporter: Any) -> tuple[Any, str] | None:
        """Start the progress at the beginning of a line; return the location it interrupts."""
        if self._held is not None:  # the line is empty: its location is written after the setup
            reporter.currentfspath = None
            return None
        key = reporter.currentfspath
        reporter.ensure_newline()
        if isinstance(key, str):  # -v: the test's id
            return key, key
        if key is not None and not isinstance(key, int):  # a path: the letters of its tests follow
            path = key.relative_to(self.config.rootpath).as_posix() if key.is_relative_to(self.config.rootpath) else None
            if path is not None and is_model_path(self.config, path):
                return key, f"{path} "
            return key, f"{os.path.relpath(key, reporter.startpath)} "
        return None

    def _resume(self, reporter: Any, label: str) -> None:
        """The progress is over: write the interrupted location again, its letters follow."""
        interrupted = self._interrupted.pop(label, None)
        self._start.pop(label, None)
        self._shown.pop(label, None)
        if interrupted is not None:
            key, text = interrupted
            reporter.write(text, flush=True)
            reporter.currentfspath = key


def _location_line(reporter: Any, nodeid: str, location: tuple[str, int | None, str]) -> str | None:
    """The id pytest writes for a test with ``-v`` (its ``_locationline``); ``None`` if unknown."""
    try:
        try:
            from _pytest.nodeid import NodeId  # pytest >= 9 takes a parsed node id

            parsed: Any = NodeId.parse(nodeid)
        except ImportError:
            parsed = nodeid
        return str(reporter._locationline(parsed, *location))
    except Exception:  # a pytest whose internals differ: pytest writes the id itself
        return None


class ProbeReporter:
    """Collects the figures of every probe report (also those from xdist workers) for the
    JUnit suite properties and the terminal summary. Registered only when a model is given."""

    def __init__(self, config: pytest.Config, settings: Any) -> None:
        self.config = config
        self.settings = settings
        self.summaries: dict[str, dict[str, Any]] = {}
        self.outcomes: dict[str, list[str]] = {}
        self.entries: dict[str, dict[str, Any]] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.data: dict[str, Any] | None = None
        self.ran: dict[str, set[str]] = {}
        self.written: list[str] = []
        self.errors: list[str] = []
        #: usage errors that xdist workers ended their sessions with
        self.usage_errors: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        figures = getattr(report, "mllm", None)
        if report.when != "call" or figures is None:
            return
        label = figures["model"]
        self.ran.setdefault(label, set()).add(figures["test"])
        if getattr(report, "mllm_entry", None) is not None:
            self.entries.setdefault(label, report.mllm_entry)
            self.results.setdefault(label, report.mllm_result)
            self.data = self.data or report.mllm_data
        summary = getattr(report, "mllm_model", None)
        if summary is not None and summary["label"] not in self.summaries:
            self.summaries[summary["label"]] = summary
            _suite_property(
                self.config, f"mllmprobe:{summary['label']}:profile",
                f"{summary['profile']}; {summary['diagnosis']}",
            )
        # one outcome per test: a rerun (pytest-rerunfailures) replaces the earlier outcome
        self.outcomes.setdefault(figures["model"], {})[report.nodeid] = report.outcome
        if junit_family(self.config) not in XUNIT_WITH_TESTCASE_PROPERTIES:
            _suite_property(self.config, f"mllmprobe:{report.nodeid}", json.dumps(figures, sort_keys=True))

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """An xdist worker ended: keep the usage error it stopped the session with, if any."""
        from .items import USAGE_ERROR_KEY

        message = (getattr(node, "workeroutput", None) or {}).get(USAGE_ERROR_KEY)
        if message and message not in self.usage_errors:
            self.usage_errors.append(message)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        """A session stopped on bad input ends with one ``ERROR:`` line on stderr, as pytest's
        own usage errors do (the controller prints those of its workers too)."""
        if hasattr(config, "workerinput"):
            return
        from .items import USAGE_ERRORS

        messages = list(dict.fromkeys([*config.stash.get(USAGE_ERRORS, []), *self.usage_errors]))
        if not messages:
            return
        import sys

        capman = config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            for message in messages:
                sys.stderr.write(f"ERROR: {message}\n")
            sys.stderr.flush()

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Write baselines and reports once, in the controller (not in xdist workers), and under
        torchrun in rank 0 only (which first lets the serving ranks stop).

        A file that cannot be written is reported in red and turns the exit code into 4; it never
        raises from here (that would be an internal error and hide the test outcomes).
        """
        group = self.config.stash.get(_Keys.group, None)
        if group is not None:
            from .distributed import RankLost, broken, stopped
            from .engine import stop_serving

            stop_serving(group)
            if not group.leader:
                if not stopped() and broken() is None:  # it never served (e.g. collection failed)
                    with contextlib.suppress(RankLost):
                        group.receive()  # rank 0's STOP: every rank takes part in every collective
                return
        if self.usage_errors:  # a worker stopped the run on bad input: the run's exit code is 4
            session.exitstatus = pytest.ExitCode.USAGE_ERROR
        if hasattr(self.config, "workerinput") or not self.entries:
            return
        from .items import RANK_LOST

        if RANK_LOST in self.config.stash:  # a rank died: nothing is written from a broken run
            self.errors.append("wrote no baseline or report: a torch.distributed rank was lost during the run")
            return
        target = self.settings.save_baseline or (self.settings.baseline if self.settings.update_baseline else None)
        folder = self.config.getoption("mllm_report") or self.config.getini("mllm_report")
        for what, write, where in (("baseline", self._write_baseline, target), ("report", self._write_report, folder)):
            if not where:
                continue
            try:
                write(where)
            except (OSError, ConfigError, ValueError) as exc:
                self.errors.append(f"could not write the {what} {where!r}: {exc}")
                if session.exitstatus == pytest.ExitCode.OK:
                    session.exitstatus = pytest.ExitCode.USAGE_ERROR

    def _write_baseline(self, target: str) -> None:
        from pathlib import Path

        from .baseline import load_baseline, merge, write_json_atomic

        flag = "--mllm-save-baseline" if self.settings.save_baseline else "--mllm-baseline"
        existing = load_baseline(target, flag) if Path(target).is_file() else None
        doc = merge(existing, {label: (entry, self.ran.get(label, set())) for label, entry in self.entries.items()})
        write_json_atomic(target, doc)
        self.written.append(f"baseline: {target} ({', '.join(sorted(self.entries))})")

    def _write_report(self, folder: str) -> None:
        from .report import write_report
        from .results import SCHEMA_VERSION

        doc = {
            "schema_version": SCHEMA_VERSION,
            "settings": self.settings.to_dict(),
            "data": self.data,
            "models": self.results,
        }
        reference = None
        if self.settings.baseline and not self.settings.update_baseline:
            from .baseline import load_baseline

            reference = load_baseline(self.settings.baseline)  # drawn dashed under each model
        outcome = write_report(doc, folder, reference=reference)
        self.written.append(f"report: {folder} ({', '.join(p.name for p in outcome.written)})")
        self.written += [f"report: {w}" for w in outcome.warnings]

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.summaries:
            return
        tr = terminalreporter
        tr.write_sep("=", "mllmprobe: feature health")
        for label, summary in self.summaries.items():
            outcomes = list(self.outcomes.get(label, {}).values())
            failed = sum(1 for o in outcomes if o == "failed")
            cached = "; features from the cache" if summary.get("cached") else ""
            tr.write_line(
                f"{label} ({summary['family']}, {summary['n_test']} test images; "
                f"connector reads {summary['consumed']}{cached})"
            )
            tr.write_line(f"  profile: {summary['profile']}")
            if summary.get("uncertainty"):
                tr.write_line(f"  {summary['uncertainty']}")
            if summary.get("random_init"):
                tr.write_line(f"  {summary['random_init']}")
            if summary.get("power"):
                tr.write_line(f"  {summary['power']}", yellow=True)
            if summary.get("answers"):
                tr.write_line(f"  {summary['answers']}")
            for key in ("lens", "invariance"):
                if summary.get(key):
                    tr.write_line(f"  {summary[key]}")
            for line in summary.get("selection") or []:
                tr.write_line(f"  {line}", yellow=True)
            if summary.get("memory"):
                tr.write_line(f"  {summary['memory']}", yellow=True)
            healthy = summary["first_failing_stage"] is None
            tr.write_line(f"  {summary['diagnosis']}", red=not healthy, green=healthy)
            if summary.get("changes"):
                tr.write_line(f"  {summary['changes']}")
            if summary.get("contradiction"):
                tr.write_line(f"  {summary['contradiction']}", red=True)
            tr.write_line(f"  {len(outcomes)} probe tests ran, {failed} failed")
        skipped = (self.data or {}).get("skipped") or []
        if skipped:
            tr.write_line(f"mllmprobe skipped {len(skipped)} unreadable image(s):", yellow=True)
            for image_id, reason in skipped[:20]:
                tr.write_line(f"  {image_id}: {reason}")
        for line in self.written:
            tr.write_line(f"mllmprobe wrote {line}")
        for line in self.errors:
            tr.write_line(f"mllmprobe {line}", red=True)


@pytest.fixture(scope="session")
def mllm_results(pytestconfig: pytest.Config, request: pytest.FixtureRequest) -> Any:
    """The results per model label, for custom assertions in your own tests::

        def test_connector_keeps_the_signal(mllm_results):
            demo = mllm_results["demo"]
            assert demo.loci["connector"].accuracy >= 0.9 * demo.loci["vision.2"].accuracy

    Each model is evaluated once per session (shared with the generated tests).
    """
    evaluator = pytestconfig.stash.get(_Keys.evaluator, None)
    if evaluator is None:
        pytest.skip("no model to probe: pass --mllm-model (or set the mllm_model ini key)")
    return ResultsView(evaluator, request.node)


class ResultsView:
    """Read-only mapping ``label -> ModelResult`` that evaluates on first access."""

    def __init__(self, evaluator: Any, node: Any = None) -> None:
        self._evaluator = evaluator
        self._node = node

    def __getitem__(self, label: str) -> Any:
        labels = self.labels()
        if label not in labels:
            raise KeyError(f"no model {label!r} in this run; models: {', '.join(labels)}")
        try:
            return self._evaluator.result(label)
        except ConfigError as exc:
            if self._node is None:
                raise
            from .items import end_with_usage_error

            end_with_usage_error(self._node, f"{label}: {exc}")
            raise  # not reached: the session ends

    def __iter__(self) -> Any:
        return iter(self.labels())

    def __len__(self) -> int:
        return len(self.labels())

    def labels(self) -> list[str]:
        return [m.spec.label for m in self._evaluator.plan.models]
