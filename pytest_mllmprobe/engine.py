"""The one entry point: ``plan`` checks everything cheaply, ``evaluate`` does the work.

Flow: settings -> data, thresholds, model structure (``plan``) -> load, extract, answer ->
probes -> scores and verdicts (``evaluate``) -> :class:`~pytest_mllmprobe.results.Results`.
Nothing here imports pytest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import Dataset, load_image_folder, split_indices
from .errors import ConfigError
from .models import ModelSpec, StageMap, detect_stages, load_model, load_structure, resolve_model
from .prompts import build_prompt
from .results import LocusResult, ModelResult, Results, stage_of
from .settings import Settings
from .stats import chance_level

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


@dataclass(frozen=True)
class Plan:
    settings: Settings
    dataset: Dataset
    train: np.ndarray
    test: np.ndarray
    models: tuple[ModelPlan, ...]


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
    train, test = split_indices(dataset.labels, settings.test_size, settings.seed)
    threshold_set = load_thresholds(list(settings.thresholds), metric=settings.metric)
    models = []
    for spec in specs:
        structure = load_structure(spec, trust_remote_code=settings.trust_remote_code)
        stage_map = detect_stages(structure, settings.stages)
        del structure
        models.append(ModelPlan(spec, stage_map, threshold_set.for_model(spec.label, spec.source)))
    return Plan(settings, dataset, train, test, tuple(models))


def _dataset(settings: Settings, specs: list[ModelSpec]) -> Dataset:
    if settings.data is None:
        if all(s.is_demo for s in specs):
            from .demo import DEMO_DATA

            return load_image_folder(DEMO_DATA, max_samples=settings.max_samples, seed=settings.seed)
        others = ", ".join(s.source for s in specs if not s.is_demo)
        raise ConfigError(
            f"--mllm-data is required for {others}: give an image folder laid out as "
            "data/<class>/<image> (only --mllm-model demo brings its own data)"
        )
    return load_image_folder(settings.data, max_samples=settings.max_samples, seed=settings.seed)


def evaluate(the_plan: Plan, model_plan: ModelPlan, progress: Progress | None = None) -> ModelResult:
    """Load one model, extract every locus in one pass, fit the probes, judge the rules."""
    from .answer import class_continuations
    from .extract import extract
    from .probes import fit_probes
    from .verdicts import judge, stage_scores

    settings = the_plan.settings
    dataset = the_plan.dataset
    timings: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model(
        model_plan.spec, device=settings.device, dtype=settings.dtype,
        trust_remote_code=settings.trust_remote_code,
    )
    stage_map = detect_stages(loaded.model, settings.stages)
    timings["load_s"] = time.perf_counter() - start

    class_names = list(dataset.class_names)
    prompt = build_prompt(loaded.processor, class_names)
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    continuations = class_continuations(tokenizer, prompt, class_names)

    start = time.perf_counter()
    features = extract(
        loaded.model, loaded.processor, stage_map,
        images=lambda index: [dataset.image(i) for i in index],
        prompts=[prompt] * len(dataset),
        continuations=continuations,
        batch_size=settings.batch_size, device=loaded.device, dtype=loaded.dtype,
        progress=(lambda done, total: progress(model_plan.spec.label, done, total)) if progress else None,
    )
    timings["extract_s"] = time.perf_counter() - start
    del loaded

    start = time.perf_counter()
    labels = dataset.labels
    train, test = the_plan.train, the_plan.test
    finite = {name: bool(np.isfinite(X).all()) for name, X in features.loci.items()}
    probe_input = {name: X for name, X in features.loci.items() if finite[name]}
    scores = fit_probes(probe_input, labels, train, test, kind=settings.probe, seed=settings.seed)
    timings["probe_s"] = time.perf_counter() - start

    from .probes import majority_score, score

    y_test = labels[test]
    k = len(class_names)
    chance = {m: chance_level(m, y_test, k) for m in ("accuracy", "balanced_accuracy")}
    loci: dict[str, LocusResult] = {}
    for name in stage_map.loci:
        if name == "answer":
            answer_scores = features.answer_scores[test]
            ok = np.isfinite(answer_scores).all(axis=1)
            # A NaN/inf answer is no answer: counted wrong.
            said = np.where(ok, np.nan_to_num(answer_scores).argmax(axis=1), -1)
            loci[name] = _locus(name, k, score(y_test, said), chance, finite=bool(ok.all()))
        elif finite[name]:
            loci[name] = _locus(name, features.loci[name].shape[1], scores[name], chance)
        else:
            # Nothing can be read from NaN/inf features: score the best constant guess.
            loci[name] = _locus(name, features.loci[name].shape[1],
                                majority_score(labels[train], y_test), chance, finite=False)
    metric = model_plan.thresholds.metric
    stage_values = stage_scores(loci, stage_map.consumed_vision_layers, metric)
    verdicts = judge(loci, stage_values, stage_map.consumed_vision_layers, model_plan.thresholds)
    return ModelResult(
        label=model_plan.spec.label,
        source=model_plan.spec.source,
        stage_map=stage_map.to_dict(),
        class_names=tuple(class_names),
        metric=metric,
        n_train=int(len(train)),
        n_test=int(len(test)),
        loci=loci,
        scores=stage_values,
        verdicts=verdicts,
        thresholds=model_plan.thresholds.to_dict(),
        timings=timings,
    )


def _locus(name: str, dim: int, probe_score: Any, chance: dict[str, float], finite: bool = True) -> LocusResult:
    parts = name.split(".")
    layer = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    readout = parts[2] if len(parts) > 2 else None
    return LocusResult(
        name=name, stage=stage_of(name), layer=layer, readout=readout, dim=int(dim),
        accuracy=probe_score.accuracy, balanced_accuracy=probe_score.balanced_accuracy,
        chance=dict(chance), correct=probe_score.correct, finite=finite,
    )


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
    results = {m.spec.label: evaluate(the_plan, m) for m in the_plan.models}
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
    }
