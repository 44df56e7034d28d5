"""The one entry point: ``plan`` checks everything cheaply, ``evaluate`` does the work.

Flow: settings -> data, thresholds, model structure (``plan``) -> load, extract, answer ->
probes -> scores and verdicts (``evaluate``) -> :class:`~pytest_mllmprobe.results.Results`.
Nothing here imports pytest.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .data import Dataset, fold_indices, load_dataset, split_indices
from .errors import ConfigError
from .models import ModelSpec, StageMap, detect_stages, load_model, load_structure, resolve_model
from .models.load import pick_device
from .prompts import DEFAULT_QUESTION, build_prompt
from .results import LocusResult, ModelResult, Results, stage_of
from .settings import Settings
from .stats import METRICS, chance_level

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ModelPlan:
    """One model, checked and mapped, before any weight is loaded."""

    spec: ModelSpec
    stage_map: StageMap
    thresholds: Any

    @property
    def loci(self) -> tuple[str, ...]:
        return self.stage_map.loci

    def stage_overrides(self, settings: Settings) -> tuple[dict[str, str], dict[str, str]]:
        """Module paths that replace detection, with where each was written: the model's
        ``modules`` section of the threshold files, then ``--mllm-stages`` (which wins)."""
        paths = {**self.thresholds.modules, **settings.stages}
        sources = {k: v for k, v in self.thresholds.module_sources.items() if k not in settings.stages}
        return paths, sources


@dataclass(frozen=True)
class Plan:
    """The checked run: data, its split (or folds) and every model's stage map and rules.

    With k-fold cross-validation, ``test`` is every image (each is tested once, in its fold)
    and ``folds`` holds the ``(train, test)`` pairs; otherwise ``folds`` is ``((train, test),)``.
    """

    settings: Settings
    dataset: Dataset
    train: np.ndarray
    test: np.ndarray
    models: tuple[ModelPlan, ...]
    folds: tuple[tuple[np.ndarray, np.ndarray], ...] = ()


def plan(settings: Settings) -> Plan:
    """Validate data, thresholds and every model's structure; raise ConfigError on bad input."""
    from .thresholds import load_thresholds

    if not settings.models:
        raise ConfigError("no model given: pass --mllm-model demo, a saved model folder, or a hub id")
    specs = [resolve_model(name) for name in settings.models]
    labels = [s.label for s in specs]
    dupes = sorted({label for label in labels if labels.count(label) > 1})
    if dupes:
        raise ConfigError(
            f"--mllm-model: two models share the name {dupes[0]!r}; give them folders with "
            "different names so their tests can be told apart"
        )
    dataset = _dataset(settings, specs)
    if settings.folds:
        folds = tuple(fold_indices(dataset, settings.folds, settings.seed))
        test = np.sort(np.concatenate([te for _, te in folds]))
        train = np.array([], dtype=np.int64)
    else:
        train, test = split_indices(dataset, settings.test_size, settings.seed)
        folds = ((train, test),)
    threshold_set = load_thresholds(list(settings.thresholds), metric=settings.metric)
    models = []
    for spec in specs:
        structure = load_structure(spec, trust_remote_code=settings.trust_remote_code)
        unmapped = ModelPlan(spec, None, threshold_set.for_model(spec.label, spec.source))
        stage_map = detect_stages(structure, *unmapped.stage_overrides(settings))
        del structure
        models.append(replace(unmapped, stage_map=stage_map))
    return Plan(settings, dataset, train, test, tuple(models), folds)


def _dataset(settings: Settings, specs: list[ModelSpec]) -> Dataset:
    source = settings.data
    if source is None:
        if not all(s.is_demo for s in specs):
            others = ", ".join(s.source for s in specs if not s.is_demo)
            raise ConfigError(
                f"--mllm-data is required for {others}: give an image folder (data/<class>/<image>), "
                "a .csv/.jsonl manifest, a MedMNIST-style .npz, a dataset .yaml or module:function "
                "(only --mllm-model demo brings its own data)"
            )
        from .demo import DEMO_DATA

        source = str(DEMO_DATA)
    return load_dataset(
        source, max_samples=settings.max_samples, seed=settings.seed,
        skip_bad_images=settings.skip_bad_images,
    )


def evaluate(the_plan: Plan, model_plan: ModelPlan, progress: Progress | None = None) -> ModelResult:
    """Load one model, extract every locus in one pass, fit the probes, judge the rules."""
    from .answer import class_continuations
    from .extract import extract
    from .verdicts import judge, stage_scores

    settings = the_plan.settings
    dataset = the_plan.dataset
    timings: dict[str, float] = {}
    class_names = list(dataset.class_names)
    spoken = list(dataset.display_names)  # the names the prompt lists and the answer is scored on
    # Detected on the meta device at plan time; replaced by the loaded model's when it loads.
    stage_map = model_plan.stage_map
    generated: list[str] | None = None

    halved: list[int] = []

    def compute() -> Any:
        nonlocal stage_map, generated
        start = time.perf_counter()
        with quiet_transformers():
            loaded = load_model(
                model_plan.spec, device=settings.device, dtype=settings.dtype,
                trust_remote_code=settings.trust_remote_code, device_map=settings.device_map,
            )
        stage_map = detect_stages(loaded.model, *model_plan.stage_overrides(settings))
        timings["load_s"] = time.perf_counter() - start
        prompt = build_prompt(loaded.processor, spoken, dataset.prompt or DEFAULT_QUESTION)
        tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
        continuations = class_continuations(tokenizer, prompt, spoken)
        start = time.perf_counter()
        features = extract(
            loaded.model, loaded.processor, stage_map,
            images=lambda index: [dataset.image(i) for i in index],
            prompts=[prompt] * len(dataset),
            continuations=continuations,
            batch_size=settings.batch_size, device=loaded.device, dtype=loaded.dtype,
            progress=(lambda done, total: progress(model_plan.spec.label, done, total)) if progress else None,
            on_oom=halved.append,
        )
        timings["extract_s"] = time.perf_counter() - start
        if halved:  # out of memory: the batch size was halved (reported in the summary)
            timings.update(oom_halvings=float(len(halved)), batch_size_asked=float(settings.batch_size),
                           batch_size=float(halved[-1]))
        if settings.answer == "generate":
            from .answer import generate_answers

            start = time.perf_counter()
            test_index = [int(i) for i in the_plan.test]
            generated = generate_answers(
                loaded.model, loaded.processor, lambda index: [dataset.image(test_index[i]) for i in index],
                [prompt] * len(test_index), batch_size=settings.batch_size,
                device=loaded.device, dtype=loaded.dtype,
            )
            timings["generate_s"] = time.perf_counter() - start
        return features  # the model is freed when this returns

    # Generated answers are not cached: a generate run always loads the model.
    cache_dir = settings.cache_dir if settings.answer != "generate" else None
    if cache_dir is None:
        features = compute()
    else:
        from .cache import cached_features, extraction_key

        key, meta = extraction_key(the_plan, model_plan)  # reads no weights
        start = time.perf_counter()
        features, hit = cached_features(cache_dir, key, compute, meta)
        timings["cache"] = 1.0 if hit else 0.0
        if hit:
            timings.update(load_s=0.0, extract_s=0.0, cache_read_s=time.perf_counter() - start)

    start = time.perf_counter()
    labels = dataset.labels
    test = the_plan.test
    # the probes train where the features were extracted (a GPU when there is one)
    probed = _probe_on_device(features.loci, labels, the_plan.folds, test, settings,
                              str(pick_device(settings.device)), timings)
    timings["probe_s"] = time.perf_counter() - start

    from .probes import score

    y_test = labels[test]
    k = len(class_names)
    chance = {m: chance_level(m, y_test, k) for m in METRICS}
    loci: dict[str, LocusResult] = {}
    for name in stage_map.loci:
        if name == "answer":
            answer_scores = features.answer_scores[test]
            ok = np.isfinite(answer_scores).all(axis=1)
            # A NaN/inf answer is no answer: counted wrong.
            said = np.where(ok, np.nan_to_num(answer_scores).argmax(axis=1), -1)
            proba = np.where(ok[:, None], _softmax_rows(np.nan_to_num(answer_scores)), 0.0)
            likelihood = score(y_test, proba, said)
            answers = {"mode": settings.answer, "likelihood": _answer_summary(likelihood)}
            chosen = likelihood
            if generated is not None:
                from .answer import parse_answer
                from .probes import one_hot

                parsed = np.array([parse_answer(text, spoken) for text in generated])
                chosen = score(y_test, one_hot(parsed, k), parsed)
                answers["generate"] = {
                    **_answer_summary(chosen),
                    "parse_failure_rate": float(np.mean(parsed < 0)),
                    "examples": [
                        {"id": dataset.ids[int(i)], "text": text, "parsed": spoken[p] if p >= 0 else None}
                        for i, text, p in list(zip(the_plan.test, generated, parsed))[:5]
                    ],
                }
            loci[name] = _locus(name, k, chosen, chance, finite=bool(ok.all()))
        else:
            pooled, per_fold, finite = probed[name]
            loci[name] = _locus(name, features.loci[name].shape[1], pooled, chance, finite=finite,
                                fold_accuracy=per_fold)
    metric = model_plan.thresholds.metric
    stage_values = stage_scores(loci, stage_map.consumed_vision_layers, metric, stage_map.llm_entry)
    verdicts = judge(loci, stage_values, stage_map.consumed_vision_layers, model_plan.thresholds,
                     stage_map.llm_entry)
    return ModelResult(
        label=model_plan.spec.label,
        source=model_plan.spec.source,
        stage_map=stage_map.to_dict(),
        class_names=tuple(class_names),
        metric=metric,
        n_train=int(len(the_plan.folds[0][0])),
        n_test=int(len(test)),
        loci=loci,
        scores=stage_values,
        verdicts=verdicts,
        thresholds=model_plan.thresholds.to_dict(),
        timings=timings,
        answers=answers,
    )


def _probe_on_device(features: dict[str, np.ndarray], labels: np.ndarray, folds: Any, test: np.ndarray,
                     settings: Settings, device: str, timings: dict[str, float]) -> dict[str, Any]:
    """:func:`_probe_loci` on ``device``; out of memory on an accelerator falls back to the CPU.

    The extraction's cached accelerator memory is handed back first (the model is gone by now).
    A fallback is recorded as ``timings["probe_cpu_fallback"]`` and said in the run summary.
    """
    if device == "cpu":
        return _probe_loci(features, labels, folds, test, settings, device)
    import torch

    from .extract import free_accelerator_memory

    free_accelerator_memory()
    try:
        return _probe_loci(features, labels, folds, test, settings, device)
    except torch.OutOfMemoryError:
        free_accelerator_memory()
        timings["probe_cpu_fallback"] = 1.0
        return _probe_loci(features, labels, folds, test, settings, "cpu")


def _probe_loci(features: dict[str, np.ndarray], labels: np.ndarray, folds: Any, test: np.ndarray,
                settings: Settings, device: str = "cpu") -> dict[str, tuple[Any, list[float] | None, bool]]:
    """Probe every locus on every fold; pool the out-of-fold outcomes in ``test`` order.

    Returns, per locus: the pooled score, the per-fold accuracies (``None`` for one split), and
    whether its features were finite (NaN/inf loci are scored as the best constant guess).
    """
    from .probes import fit_probes, majority_score, score

    k = int(labels.max()) + 1
    finite = {name: bool(np.isfinite(X).all()) for name, X in features.items()}
    usable = {name: X for name, X in features.items() if finite[name]}
    position = {int(i): n for n, i in enumerate(test)}
    predicted = {name: np.full(len(test), -1) for name in features}
    proba = {name: np.zeros((len(test), k)) for name in features}
    per_fold: dict[str, list[float]] = {name: [] for name in features}
    for train, fold_test in folds:
        scores = fit_probes(usable, labels, train, fold_test, kind=settings.probe, seed=settings.probe_seed,
                            device=device)
        where = [position[int(i)] for i in fold_test]
        for name in features:
            fold_score = scores[name] if finite[name] else majority_score(labels[train], labels[fold_test], k)
            predicted[name][where] = fold_score.predicted
            proba[name][where] = fold_score.probabilities
            per_fold[name].append(fold_score.accuracy)
    y_test = labels[test]
    return {
        name: (score(y_test, proba[name], predicted[name]),
               per_fold[name] if len(folds) > 1 else None, finite[name])
        for name in features
    }


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and notices while loading (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _answer_summary(answer: Any) -> dict[str, float | None]:
    return {m: (float(answer.metric(m)) if np.isfinite(answer.metric(m)) else None) for m in METRICS}


def _softmax_rows(values: np.ndarray) -> np.ndarray:
    shifted = values - values.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def _locus(name: str, dim: int, probe_score: Any, chance: dict[str, float], finite: bool = True,
           fold_accuracy: list[float] | None = None) -> LocusResult:
    parts = name.split(".")
    layer = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    readout = parts[2] if len(parts) > 2 else None
    return LocusResult(
        name=name, stage=stage_of(name), layer=layer, readout=readout, dim=int(dim),
        accuracy=probe_score.accuracy, balanced_accuracy=probe_score.balanced_accuracy,
        macro_f1=probe_score.macro_f1, auroc=probe_score.auroc,
        chance=dict(chance), correct=probe_score.correct, finite=finite, fold_accuracy=fold_accuracy,
    )


class Evaluator:
    """Evaluates each model once, on demand, and compares it with its reference when asked.

    The reference is the model named by ``settings.compare_to`` (same run, same data and split)
    or the model's entry in the ``settings.baseline`` file; ``update_baseline`` skips comparisons.
    """

    def __init__(self, the_plan: Plan, progress: Progress | None = None) -> None:
        self.plan = the_plan
        self.progress = progress
        self._results: dict[str, ModelResult | BaseException] = {}
        self._raw: dict[str, ModelResult] = {}
        settings = the_plan.settings
        labels = [m.spec.label for m in the_plan.models]
        if settings.compare_to is not None:
            if settings.compare_to not in labels:
                raise ConfigError(
                    f"--mllm-compare-to {settings.compare_to!r} is not one of the models of this run "
                    f"({', '.join(labels)}); name the reference by its label"
                )
            reference = self.model_plan(settings.compare_to)
            for model in the_plan.models:
                if model.loci != reference.loci:
                    raise ConfigError(
                        f"--mllm-compare-to {settings.compare_to!r}: model {model.spec.label!r} has "
                        f"another architecture ({len(model.loci)} loci, the reference "
                        f"{len(reference.loci)}); compare checkpoints of the same architecture"
                    )
        self.baseline: dict[str, Any] | None = None
        if settings.baseline and not settings.update_baseline:
            from .baseline import check_compatible, load_baseline

            self.baseline = load_baseline(settings.baseline)
            summary = data_summary(the_plan)
            # With --mllm-compare-to the others are compared with the reference model, and only
            # the reference with the baseline; otherwise every model with its baseline entry.
            users = [settings.compare_to] if settings.compare_to is not None else labels
            for model in the_plan.models:
                if model.spec.label not in users:
                    continue
                check_compatible(
                    self.baseline["models"].get(model.spec.label), model.spec.label, settings.baseline,
                    fingerprint=summary["fingerprint"], test_ids=summary["test_ids"],
                    loci=model.loci, class_names=list(the_plan.dataset.class_names),
                )

    def model_plan(self, label: str) -> ModelPlan:
        return next(m for m in self.plan.models if m.spec.label == label)

    def raw(self, label: str) -> ModelResult:
        """The model's own result, before any comparison."""
        if label not in self._raw:
            self._raw[label] = evaluate(self.plan, self.model_plan(label), self.progress)
        return self._raw[label]

    def result(self, label: str) -> ModelResult:
        """The model's result with its comparison applied; errors are cached and re-raised."""
        if label not in self._results:
            try:
                self._results[label] = self._compared(label)
            except Exception as exc:  # one broken model is not re-run for every test
                self._results[label] = exc
        value = self._results[label]
        if isinstance(value, BaseException):
            raise value
        return value

    def entry(self, label: str) -> dict[str, Any]:
        from .baseline import entry_from_result

        return entry_from_result(self.raw(label), data_summary(self.plan), self.plan.settings.to_dict())

    def _compared(self, label: str) -> ModelResult:
        from dataclasses import replace

        from .baseline import compare, regressed_stages

        result = self.raw(label)
        settings = self.plan.settings
        if settings.compare_to is not None and label != settings.compare_to:
            reference, what = self.entry(settings.compare_to), f"model {settings.compare_to!r}"
            kind, name = "model", settings.compare_to
        elif self.baseline is not None:
            reference, what = self.baseline["models"][label], f"baseline {settings.baseline!r}"
            kind, name = "baseline", str(settings.baseline)
        else:
            return result
        verdicts = compare(result, reference, self.model_plan(label).thresholds, what)
        comparison = {
            "against": what, "kind": kind, "reference": name,
            "regressed_stages": regressed_stages(verdicts),
        }
        return replace(result, verdicts=verdicts, comparison=comparison)


def run(models: list[str] | tuple[str, ...] | str, data: str | None = None, **options: Any) -> Results:
    """Probe every locus of every model; the same numbers the pytest items assert.

    >>> results = run("demo")                      # doctest: +SKIP
    >>> results["demo"].profile                    # doctest: +SKIP
    """
    if isinstance(models, str):
        models = [models]
    unknown = sorted(set(options) - set(Settings.field_names()))
    if unknown:
        raise TypeError(f"run() got unknown settings {unknown}; valid: {', '.join(Settings.field_names())}")
    for key in ("thresholds",):
        if isinstance(options.get(key), str):
            options[key] = (options[key],)
    settings = Settings(models=tuple(models), data=data, **options)
    the_plan = plan(settings)
    evaluator = Evaluator(the_plan)
    results = {m.spec.label: evaluator.result(m.spec.label) for m in the_plan.models}
    return Results(models=results, settings=settings.to_dict(), data=data_summary(the_plan))


def data_summary(the_plan: Plan) -> dict[str, Any]:
    dataset = the_plan.dataset
    return {
        "root": dataset.root,
        "n_images": len(dataset),
        "class_names": list(dataset.class_names),
        "class_counts": np.bincount(dataset.labels, minlength=len(dataset.class_names)).tolist(),
        "fingerprint": dataset.fingerprint,
        "test_size": the_plan.settings.test_size,
        "seed": the_plan.settings.seed,
        "test_ids": [dataset.ids[i] for i in the_plan.test],
        "folds": len(the_plan.folds),
        "grouped": dataset.groups is not None,
        "predefined_split": dataset.predefined_split is not None,
        "skipped": [list(s) for s in dataset.skipped],
    }
