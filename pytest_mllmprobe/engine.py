"""The one entry point: ``plan`` checks everything cheaply, ``evaluate`` does the work.

Flow: settings -> data, thresholds, model structure (``plan``) -> load, extract, answer ->
probes -> scores and verdicts (``evaluate``) -> :class:`~pytest_mllmprobe.results.Results`.
Nothing here imports pytest.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .data import Dataset, fold_indices, load_dataset, split_indices
from .errors import ConfigError
from .models import LoadedModel, ModelAdapter, ModelSpec, StageMap, adapter_for, detect_stages, resolve_model
from .models.load import pick_device, placement
from .models.peft_adapter import add_bases
from .prompts import DEFAULT_QUESTION, build_prompt
from .results import LocusResult, ModelResult, Results
from .settings import Settings

if TYPE_CHECKING:
    from .extract import Features
    from .selection import Need, Selection

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ModelPlan:
    """One model, checked and mapped, before any weight is loaded."""

    spec: ModelSpec
    stage_map: StageMap
    thresholds: Any
    #: how the model is loaded, fed and read (:mod:`pytest_mllmprobe.models.adapter`)
    adapter: ModelAdapter
    #: where each stage lives in the module tree (:func:`~pytest_mllmprobe.models.changes.stage_roots`)
    roots: dict[str, str] = field(default_factory=dict)
    #: tensor names in the saved files -> the model's names (a compared full fine-tune's weights)
    tensor_names: dict[str, str] = field(default_factory=dict)

    @property
    def loci(self) -> tuple[str, ...]:
        return self.stage_map.loci

    def stage_overrides(self, settings: Settings) -> tuple[dict[str, str], dict[str, str]]:
        """Module paths that replace detection, with where each was written: the adapter's
        ``stages``, the model's ``modules`` section of the threshold files, then ``--mllm-stages``
        (which wins)."""
        own = dict(self.adapter.stages)
        paths = {**own, **self.thresholds.modules, **settings.stages}
        sources = {k: f"--mllm-model {self.spec.source} (the adapter's stages[{k!r}])" for k in own}
        sources.update(self.thresholds.module_sources)
        sources = {k: v for k, v in sources.items() if k not in settings.stages}
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
    #: ``--mllm-compare-to base``: each PEFT adapter's label -> its base's label
    references: dict[str, str] = field(default_factory=dict)


def plan(settings: Settings) -> Plan:
    """Validate data, thresholds and every model's structure; raise ConfigError on bad input."""
    from .thresholds import load_thresholds

    specs = _model_specs(settings)
    adapters = [adapter_for(spec, trust_remote_code=settings.trust_remote_code, base_model=settings.base_model)
                for spec in specs]
    references = add_bases(settings.compare_to, specs, adapters)  # --mllm-compare-to base
    _preflight(settings, specs, adapters)
    dataset = _dataset(settings, specs)
    if settings.answer_orders > len(dataset.class_names):
        raise ConfigError(
            f"--mllm-answer-orders {settings.answer_orders}: the prompt lists {len(dataset.class_names)} options, "
            f"which have only {len(dataset.class_names)} cyclic rotations; use at most {len(dataset.class_names)}"
        )
    from .distributed import check_world, current

    group = current()
    check_world(len(dataset), settings.batch_size, group)  # more ranks than images
    if group is not None and settings.device_map is not None:
        raise ConfigError(
            f"--mllm-device-map {settings.device_map} spreads one model over every GPU, but under torchrun each "
            f"of the {group.world} ranks extracts on its own GPU: drop --mllm-device-map, or run one process"
        )
    train, test, folds = _split(settings, dataset)
    threshold_set = load_thresholds(list(settings.thresholds), metric=settings.metric)
    models = tuple(_model_plan(settings, spec, adapter, threshold_set) for spec, adapter in zip(specs, adapters))
    return Plan(settings, dataset, train, test, models, folds, references)


def _preflight(settings: Settings, specs: list[ModelSpec], adapters: list[ModelAdapter]) -> None:
    """The device exists; every local model folder's config can be read (remote code only when the
    user opts in) and its weight files are whole (headers only)."""
    from pathlib import Path

    from .preflight import check_device, check_weights

    check_device(settings.device)
    for spec, adapter in zip(specs, adapters):
        if not spec.entry_point and Path(spec.source).is_dir():
            adapter.config()
            check_weights(spec.source)


def _model_specs(settings: Settings) -> list[ModelSpec]:
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
    return specs


def _model_plan(settings: Settings, spec: ModelSpec, adapter: ModelAdapter, threshold_set: Any) -> ModelPlan:
    """One model's rules and stage map, detected on the ``meta`` device (no weights read)."""
    from .models.changes import stage_roots, tensor_names

    structure = adapter.structure()
    unmapped = ModelPlan(spec, None, threshold_set.for_model(spec.label, spec.source), adapter)
    stage_map = detect_stages(structure, *unmapped.stage_overrides(settings))
    # a compared full fine-tune: its saved tensors' names (headers only), for per-stage fingerprints
    names = tensor_names(spec.source, structure, adapter) if settings.compare_to is not None else {}
    return replace(unmapped, stage_map=stage_map, roots=stage_roots(structure, stage_map), tensor_names=names)


def _split(settings: Settings, dataset: Dataset) -> tuple[np.ndarray, np.ndarray, tuple[Any, ...]]:
    """``(train, test, folds)``: k folds whose test parts cover every image, or one split.

    By default (``folds`` unset) the data's own split is used when it has one; otherwise every
    image is tested once, in one of ``DEFAULT_FOLDS`` folds (fewer when a class, or its patients,
    is too small for that many; one split when even two folds are impossible). ``folds=1`` asks
    for one seeded split of ``test_size``.
    """
    from .settings import DEFAULT_FOLDS

    k = settings.folds
    if k is None and dataset.predefined_split is None:
        for tried in range(DEFAULT_FOLDS, 1, -1):
            try:
                return _folded(dataset, tried, settings.seed)
            except ConfigError:
                continue
    elif k is not None and k > 1:
        return _folded(dataset, k, settings.seed)
    train, test = split_indices(dataset, settings.test_size, settings.seed)
    return train, test, ((train, test),)


def _folded(dataset: Dataset, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, tuple[Any, ...]]:
    folds = tuple(fold_indices(dataset, k, seed))
    test = np.sort(np.concatenate([te for _, te in folds]))
    return np.array([], dtype=np.int64), test, folds


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


def evaluate(the_plan: Plan, model_plan: ModelPlan, progress: Progress | None = None,
             keep: Callable[[LoadedModel], None] | None = None, selection: Selection | None = None) -> ModelResult:
    """One model through the pipeline: load, extract, answer, probe, score, judge.

    ``keep`` receives the loaded model once its features are extracted (a PEFT adapter of the same
    run takes its base from there instead of loading it again). ``selection`` (default: every
    test) names the tests to judge: only the loci they read are extracted and scored."""
    run = ModelRun(the_plan, model_plan, progress, selection)
    run.keep = keep
    features = run.features()  # load + extract + answer, or the feature cache
    probed = run.probe(features)
    loci = run.score(features, probed)
    if "random-init" in the_plan.settings.controls:
        run.random_init(loci)
    return run.judge(loci)


class ModelRun:
    """The steps of :func:`evaluate` for one model, sharing its settings, stage map and timings.

    The stage map detected on the ``meta`` device at plan time is replaced by the loaded
    model's; generated answers (``--mllm-answer generate``) are kept beside the features.
    """

    def __init__(self, the_plan: Plan, model_plan: ModelPlan, progress: Progress | None = None,
                 selection: Selection | None = None) -> None:
        from .selection import everything

        self.plan = the_plan
        #: the tests to judge and the loci they read (:mod:`pytest_mllmprobe.selection`)
        self.selection = selection if selection is not None else everything(model_plan.stage_map)
        #: how this run differs from a full one (partial selection, early stop, skipped checks)
        self.notes: list[str] = []
        self.model_plan = model_plan
        self.settings = the_plan.settings
        self.dataset = the_plan.dataset
        self.progress = progress
        self.stage_map = model_plan.stage_map
        #: the names the prompt lists and the answer is scored on
        self.spoken = list(self.dataset.display_names)
        self.generated: list[str] | None = None
        #: the ``answers`` record of the result (set by :meth:`score`)
        self.answers: dict[str, Any] | None = None
        self.timings: dict[str, float] = {}
        #: bootstrap intervals of the stage figures, and how the uncertainty was measured
        self.stage_intervals: dict[str, tuple[float, float]] = {}
        self.uncertainty: dict[str, Any] = {}
        #: the random-initialisation twin's stage scores and cost (``--mllm-controls random-init``)
        self.twin: dict[str, Any] | None = None
        self.keep: Callable[[LoadedModel], None] | None = None
        #: a rank other than 0 under torch.distributed: extracts its shard for rank 0, nothing else
        self.serving = False
        self._keys: dict[bool, tuple[str, dict[str, Any]]] = {}

    # -- load, extract, answer ------------------------------------------------------------
    def features(self) -> Features:
        """The pooled features and answer scores: from the cache when it holds them."""
        # Generated answers are not cached: a generate run always loads the model.
        cache_dir = self.settings.cache_dir if self.settings.answer != "generate" else None
        need = self.selection.need
        if cache_dir is None:
            return self.compute(need)
        from .cache import cached_features
        from .selection import everything

        key, meta = self.key()
        start = time.perf_counter()
        features, hit = cached_features(cache_dir, key, self.compute, meta, need=need,
                                        whole=everything(self.model_plan.stage_map).need)
        self.timings["cache"] = 1.0 if hit else 0.0
        self.timings["cached_loci"] = float(len(features.loci) - self.timings.get("pooled_loci", 0.0))
        if hit:
            self.timings.update(load_s=0.0, extract_s=0.0, pooled_loci=0.0, cache_read_s=time.perf_counter() - start)
        return features

    def key(self, random_init: bool = False) -> tuple[str, dict[str, Any]]:
        """This model's extraction key and cache metadata (:func:`.cache.extraction_key`; reads
        no weights), or its random-initialisation twin's: computed once per run, though both the
        feature cache and, under torch.distributed, the ranks' comparison ask for it."""
        if random_init not in self._keys:
            from .cache import extraction_key

            variant = f"random-init seed={self.settings.probe_seed}" if random_init else None
            self._keys[random_init] = extraction_key(self.plan, self.model_plan, variant)
        return self._keys[random_init]

    def compute(self, need: Need | None = None) -> Features:
        """Load the model, extract the loci of ``need`` (default: the selection's), score the answer
        and generate answers if asked; the model is freed after.

        Under torch.distributed (:mod:`.distributed`) every rank extracts its shard of the
        images and the features are gathered; rank 0 alone generates answers and hands the
        model on."""
        from .distributed import EXTRACT

        need = need if need is not None else self.selection.need
        features, loaded, prompt = self.on_ranks(EXTRACT, lambda rows: self._compute(rows, need), need)
        if self.serving:
            return features
        if self.settings.answer == "generate":
            self.generated = self.answer(loaded, prompt)
        if self.keep is not None:
            self.keep(loaded)
        return features

    def _compute(self, rows: range, need: Need) -> tuple[Features, LoadedModel, str]:
        from .selection import NO_FLOW_NOTE

        loaded = self.load()
        prompt = build_prompt(loaded.processor, self.spoken, self.dataset.prompt or DEFAULT_QUESTION)
        language_model = need.answer or any(n.startswith("llm.") for n in need.loci)
        self.check_flow(loaded, prompt, language_model)
        if not language_model:  # its forwards stop before the language model, which this selection never needs
            self.notes.append(NO_FLOW_NOTE)
        features = self.extract(loaded, prompt, need, rows)
        if need.answer:
            features.variant_scores = self.answer_variants(loaded, rows)
        return features, loaded, prompt

    def on_ranks(self, command: int, local: Callable[[range], Any], need: Need | None = None) -> Any:
        """``local(rows)`` on every image, or, under torch.distributed, on this rank's shard: rank
        0 tells the serving ranks to do the same (``command``, for the loci of ``need``; default
        all), every rank votes on its part, and the features (the first item of ``local``'s
        result, or the result) are gathered in image order."""
        from .distributed import RANDOM_INIT, check_intact, current, shards

        check_intact()  # a group abandoned earlier in the session cannot extract anything more
        group = current()
        n = len(self.dataset)
        if group is None:
            return local(range(n))
        if group.leader:
            index = next(i for i, m in enumerate(self.plan.models) if m is self.model_plan)
            group.send(command, index, *need_mask(self.model_plan.stage_map, need))
        what = f"the extraction of {self.model_plan.spec.label!r}"
        try:
            key = self.key(random_init=command == RANDOM_INIT)[0]
        except Exception as exc:  # files missing on this node: still take part, and differ
            key = f"unreadable {type(exc).__name__}"
        group.same(key, what)  # the same model, data and settings on every node
        parts = shards(n, self.settings.batch_size, group.world)
        failure, out = None, None
        try:
            out = local(parts[group.rank])
        except BaseException as exc:  # every rank learns of it from the vote (a timeout or ^C too)
            failure = exc
        start = time.perf_counter()
        try:
            group.vote(failure, what)  # also waits for the slowest rank
        except BaseException:
            out = None  # the traceback keeps this frame: let the loaded model go
            raise
        voted = time.perf_counter()
        features = out[0] if isinstance(out, tuple) else out
        gathered = gather_features(group, features, [len(p) for p in parts], what)
        # extract_s is this rank's own share; rank_wait_s the wait for the slowest rank
        self.timings.update(ranks=float(group.world), rank_wait_s=voted - start,
                            gather_s=time.perf_counter() - voted)
        return (gathered, *out[1:]) if isinstance(out, tuple) else gathered

    def load(self) -> LoadedModel:
        start = time.perf_counter()
        adapter = self.model_plan.adapter
        with quiet_transformers():
            model, processor = adapter.load(self.settings.device, self.settings.dtype, self.settings.device_map)
        device, dtype = placement(model, self.settings.device, self.settings.dtype, self.settings.device_map)
        loaded = LoadedModel(self.model_plan.spec, model, processor, device, dtype, adapter)
        self.stage_map = detect_stages(loaded.model, *self.model_plan.stage_overrides(self.settings))
        self.timings["load_s"] = time.perf_counter() - start
        return loaded

    def random_init(self, loci: dict[str, LocusResult]) -> None:
        """The random-initialisation floor (``--mllm-controls random-init``): the same architecture
        with re-initialised weights (transformers' own ``_init_weights``, seeded with the probe
        seed), extracted and probed on the same folds; cached like any model's features."""
        from . import scoring
        from .cache import cached_features
        from .probes import cross_fit

        if self.settings.device_map is not None:
            raise ConfigError(
                "--mllm-controls random-init builds the twin on one device and cannot follow "
                f"--mllm-device-map {self.settings.device_map}: drop one of the two"
            )
        start = time.perf_counter()
        own = dict(self.timings)  # the twin's load and extraction must not overwrite the model's
        compute = self.compute_random_init
        if self.settings.cache_dir is not None:
            key, meta = self.key(random_init=True)
            twin, hit = cached_features(self.settings.cache_dir, key, compute, meta)
        else:
            twin, hit = compute(), False
        probed = cross_fit(twin.loci, self.dataset.labels, self.plan.folds, self.plan.test,
                           kind=self.settings.probe, seed=self.settings.probe_seed,
                           device=str(pick_device(self.settings.device)))
        y_test = self.dataset.labels[self.plan.test]
        twin_loci = dict(loci)
        for name, out in probed.items():
            twin_score = scoring.score(y_test, out.probabilities)
            values = {m: twin_score.metric(m) for m in loci[name].chance}
            loci[name].random_init = {**values, "above": {m: loci[name].metric(m) - v for m, v in values.items()}}
            twin_loci[name] = scoring.locus_result(name, twin.loci[name].shape[1], twin_score, loci[name].chance)
        from .verdicts import stage_scores

        stage_map, metric = self.stage_map, self.model_plan.thresholds.metric
        # the twin's own answer is not a floor of anything: its stage scores stop at FHS_L
        twin_scores = stage_scores(twin_loci, stage_map.consumed_vision_layers, metric, stage_map.llm_entry)
        self.twin = {
            "scores": {k: v for k, v in twin_scores.items() if k != "P_final"},
            "seed": self.settings.probe_seed, "cached": bool(hit), "cost_s": time.perf_counter() - start,
        }
        self.timings.clear()
        self.timings.update(own, random_init_s=self.twin["cost_s"])

    def compute_random_init(self) -> Features:
        """Load the model, replace it by its class built from its config (fresh, seeded weights),
        and extract every locus (each rank its shard, under torch.distributed)."""
        from .distributed import RANDOM_INIT

        return self.on_ranks(RANDOM_INIT, self._compute_random_init)

    def _compute_random_init(self, rows: range) -> Features:
        import torch

        loaded = self.load()  # the processor, the placement and the class; the weights are dropped
        kind, config = type(loaded.model), loaded.model.config
        loaded = replace(loaded, model=None)
        from .extract import free_accelerator_memory

        free_accelerator_memory()
        torch.manual_seed(self.settings.probe_seed)
        with quiet_transformers(), torch.device(loaded.device):
            twin = kind(config)
        loaded = replace(loaded, model=twin.to(dtype=loaded.dtype).eval())
        prompt = build_prompt(loaded.processor, self.spoken, self.dataset.prompt or DEFAULT_QUESTION)
        return self.extract(loaded, prompt, rows=rows)

    def check_flow(self, loaded: LoadedModel, prompt: str, language_model: bool = True) -> None:
        """The stage map proven on one image: vision feeds the connector, the connector the LLM
        (that last part only with ``language_model``: its forwards stop before the decoder)."""
        from .models.flow import check_data_flow

        start = time.perf_counter()
        adapter, family_name = loaded.adapter, self.stage_map.family
        inputs = adapter.encode(loaded.processor, [self.dataset.image(0)], [prompt], loaded.device, loaded.dtype,
                                family_name=family_name)
        check_data_flow(loaded.model, self.stage_map, {**inputs, **adapter.positions(inputs, family_name=family_name)},
                        language_model)
        self.timings["flow_check_s"] = time.perf_counter() - start

    def extract(self, loaded: LoadedModel, prompt: str, need: Need | None = None, rows: range | None = None) -> Features:
        """Every locus of ``need`` (default: all) for the images ``rows`` (default: all) in one
        forward pass per batch, stopped after the last needed locus when the answer is not
        needed; out of memory halves the batch size."""
        from .answer import class_continuations
        from .extract import extract

        tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
        label, halved = self.model_plan.spec.label, []
        rows = range(len(self.dataset)) if rows is None else rows
        start = time.perf_counter()
        features = extract(
            loaded.model, loaded.processor, self.stage_map,
            images=lambda index: [self.dataset.image(rows[i]) for i in index],
            prompts=[prompt] * len(rows),
            continuations=class_continuations(tokenizer, prompt, self.spoken),
            batch_size=self.settings.batch_size, device=loaded.device, dtype=loaded.dtype,
            progress=(lambda done, total: self.progress(label, done, total)) if self.progress else None,
            on_oom=halved.append, adapter=loaded.adapter, need=need,
        )
        self.timings["extract_s"] = time.perf_counter() - start
        self.timings["pooled_loci"] = float(len(features.loci))
        self.notes += features.notes
        from .lens import capture

        first_ids = [c[0] for c in class_continuations(tokenizer, prompt, self.spoken)]
        features.lens, features.lens_note = capture(loaded.model, self.stage_map.llm_layers[-1], first_ids)
        if halved:  # reported in the summary
            self.timings.update(oom_halvings=float(len(halved)), batch_size_asked=float(self.settings.batch_size),
                                batch_size=float(halved[-1]))
        return features

    def variants(self) -> list[tuple[str, str, list[str]]]:
        """``(name, question template, option order)`` of every extra scoring of the answer: the
        cyclic rotations of the option order (``--mllm-answer-orders``), then the dataset's other
        wordings (``prompts``), each with the options in their own order."""
        template = self.dataset.prompt or DEFAULT_QUESTION
        spoken = list(self.spoken)
        out = [(f"order.{r}", template, spoken[r:] + spoken[:r]) for r in range(1, self.settings.answer_orders)]
        out += [(f"prompt.{j}", wording, spoken) for j, wording in enumerate(self.dataset.prompts, 1)]
        return out

    def answer_variants(self, loaded: LoadedModel, rows: range | None = None) -> dict[str, np.ndarray]:
        """The answer scores of the images ``rows`` (default: all) under each variant prompt: one
        forward per batch and variant (answer scores only; no locus is read), columns in class
        order whatever the order the prompt lists them in."""
        from .answer import class_continuations, score_answers

        variants = self.variants()
        if not variants:
            return {}
        tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
        rows = range(len(self.dataset)) if rows is None else rows
        start = time.perf_counter()
        out = {}
        for name, template, order in variants:
            prompt = build_prompt(loaded.processor, order, template)
            out[name] = score_answers(
                loaded.model, loaded.processor, loaded.adapter, self.stage_map.family,
                lambda index: [self.dataset.image(rows[i]) for i in index], [prompt] * len(rows),
                class_continuations(tokenizer, prompt, self.spoken),
                batch_size=self.settings.batch_size, device=loaded.device, dtype=loaded.dtype,
            )
        self.timings["answer_variants_s"] = time.perf_counter() - start
        return out

    def answer(self, loaded: LoadedModel, prompt: str) -> list[str]:
        """Greedy answers to the test images (``--mllm-answer generate``)."""
        from .answer import generate_answers

        start = time.perf_counter()
        test = [int(i) for i in self.plan.test]
        texts = generate_answers(
            loaded.model, loaded.processor, lambda index: [self.dataset.image(test[i]) for i in index],
            [prompt] * len(test), batch_size=self.settings.batch_size, device=loaded.device, dtype=loaded.dtype,
            adapter=loaded.adapter, family_name=self.stage_map.family,
        )
        self.timings["generate_s"] = time.perf_counter() - start
        return texts

    # -- probe, score, judge ----------------------------------------------------------------
    def probe(self, features: Features) -> dict[str, Any]:
        """Out-of-fold probe outputs of every locus, trained where the features were extracted."""
        from .probes import cross_fit_on_device

        if not features.loci:  # only the answer was selected: nothing to probe
            return {}
        start = time.perf_counter()
        probed = cross_fit_on_device(
            features.loci, self.dataset.labels, self.plan.folds, self.plan.test,
            kind=self.settings.probe, seed=self.settings.probe_seed,
            device=str(pick_device(self.settings.device)), timings=self.timings,
            permutations=self.settings.control_permutations,
        )
        self.timings["probe_s"] = time.perf_counter() - start
        return probed

    def score(self, features: Features, probed: dict[str, Any]) -> dict[str, LocusResult]:
        """Every locus's metrics (and the answer's) on the test images, in pipeline order."""
        from . import scoring

        test = self.plan.test
        y_test = self.dataset.labels[test]
        k = len(self.dataset.class_names)
        chance = scoring.chance_levels(y_test, k)
        answer = None
        if features.answer_scores is not None and self.selection.need.answer:
            answer = scoring.answer_score(
                y_test, features.answer_scores[test], self.settings.answer, generated=self.generated,
                spoken=self.spoken, test_ids=[self.dataset.ids[int(i)] for i in test],
            )
            self.answers = answer.answers
        position = {int(i): n for n, i in enumerate(test)}
        folds = [np.array([position[int(i)] for i in fold_test]) for _, fold_test in self.plan.folds]
        loci: dict[str, LocusResult] = {}
        sets = {}
        for name in self.stage_map.loci:
            if name == "answer":
                if answer is not None:
                    loci[name] = scoring.locus_result(name, k, answer.chosen, chance, finite=answer.finite)
                    sets[name] = answer.chosen
                continue
            if name not in probed:  # not selected: not extracted, not scored
                continue
            out = probed[name]
            probe_score = scoring.score(y_test, out.probabilities)
            sets[name] = probe_score
            loci[name] = scoring.locus_result(
                name, features.loci[name].shape[1], probe_score, chance, finite=out.finite,
                fold_accuracy=scoring.fold_accuracies(probe_score.correct, folds),
            )
            if out.controls is not None:
                loci[name].control = control(y_test, loci[name], out.controls, k)
        if answer is None:  # the selection reads neither the answer nor the lens
            self.intervals(loci, sets, y_test)
            return loci
        lens_note, lens_head = self.lens(features, y_test, chance, folds, loci, sets)
        self.answers = {**(self.answers or {}), "lens": {
            "note": lens_note, "layers": sum(1 for n in loci if n.startswith("lens.")),
            "head": lens_head, "cost": "no forward: read from the last-token rows the extraction keeps",
        }}
        invariance = scoring.invariance_groups(y_test, features.answer_scores[test], {
            n: v[test] for n, v in features.variant_scores.items()}, self.variants(),
            (self.dataset.prompt or DEFAULT_QUESTION, list(self.spoken)))
        if invariance:
            self.answers["invariance"] = {**invariance, "cost_s": self.timings.get("answer_variants_s")}
        self.intervals(loci, sets, y_test)
        return loci

    def lens(self, features: Features, y_test: np.ndarray, chance: dict[str, float], folds: list[np.ndarray],
             loci: dict[str, LocusResult], sets: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
        """The logit lens loci ``lens.<i>`` (added to ``loci`` and ``sets``), scored like the probes
        on the test images: ``(None, what the lens read through)``, or ``(why there is none, None)``."""
        from . import scoring
        from .lens import PREFIX, READOUT, logits, verify
        from .models.load import pick_dtype

        last = [f"llm.{i}.last" for i in range(len(self.stage_map.llm_layers))]
        if features.lens is None or features.first_logits is None or not all(n in features.loci for n in last):
            return features.lens_note or "the features hold no last-token rows or no final norm and LM head", None
        dtype = str(pick_dtype(self.settings.dtype, pick_device(self.settings.device))).replace("torch.", "")
        head, note = verify(features.lens, features.loci[last[-1]], features.first_logits, dtype)
        if head is None:
            return note, None
        test = self.plan.test
        k = len(self.dataset.class_names)
        for i, name in enumerate(last):
            z = logits(head, features.loci[name][test])
            ok = np.isfinite(z).all(axis=1)
            said = np.where(ok, np.nan_to_num(z).argmax(axis=1), -1)
            proba = np.where(ok[:, None], scoring.softmax_rows(np.nan_to_num(z)), 0.0)
            lens_score = scoring.score(y_test, proba, said)
            locus = scoring.locus_result(f"{PREFIX}{i}", k, lens_score, chance, finite=bool(ok.all()),
                                         fold_accuracy=scoring.fold_accuracies(lens_score.correct, folds))
            locus.stage, locus.readout = "llm", READOUT  # drawn at its decoder layer; no test of its own
            loci[locus.name] = locus
            sets[locus.name] = lens_score
        return None, head.meta()

    def intervals(self, loci: dict[str, LocusResult], sets: dict[str, Any], y_test: np.ndarray) -> None:
        """95% bootstrap intervals of every locus metric, stage score and transition ratio
        (patients resampled when the data has groups); none with ``bootstrap=0``."""
        from .uncertainty import ScoreSet, bootstrap_intervals
        from .verdicts import fed_locus, stage_figures

        n_resamples = self.settings.bootstrap
        groups = self.dataset.groups
        units = None if groups is None else np.asarray(groups, dtype=object)[self.plan.test]
        self.uncertainty = {
            "bootstrap_resamples": n_resamples, "unit": "patient" if units is not None else "image",
            "n_units": int(len(set(units.tolist())) if units is not None else len(y_test)),
            "confidence": 0.95, "method": "percentile bootstrap (scipy.stats.bootstrap)",
            "permutations": self.settings.control_permutations,
        }
        self.stage_intervals = {}
        if n_resamples < 1:
            return
        start = time.perf_counter()
        metric = self.model_plan.thresholds.metric
        stage_map = self.stage_map
        fed = fed_locus(loci, stage_map.consumed_vision_layers, metric)
        partial = not self.selection.full

        def derived(per_set: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
            figures = stage_figures(lambda n: per_set[n][metric], per_set, stage_map.consumed_vision_layers,
                                    stage_map.llm_entry, fed, stage_map.loci)
            lens_last, last = f"lens.{len(stage_map.llm_layers) - 1}", f"llm.{len(stage_map.llm_layers) - 1}.last"
            if lens_last in per_set:
                with np.errstate(divide="ignore", invalid="ignore"):
                    figures["lens/llm"] = per_set[lens_last][metric] / per_set[last][metric]
            if partial:  # figures of loci a selection left out have no interval
                figures = {k: v for k, v in figures.items() if not np.isnan(v).all()}
            return figures

        found = bootstrap_intervals(
            y_test, {n: ScoreSet(v.probabilities, v.predicted) for n, v in sets.items()},
            len(self.dataset.class_names), units=units, n_resamples=n_resamples,
            seed=self.settings.probe_seed, derived=derived,
        )
        for key, interval in found.items():
            name, _, metric_name = key.partition("/")
            if name in loci and metric_name in loci[name].chance:
                loci[name].intervals[metric_name] = interval
            else:
                self.stage_intervals[key] = interval
        self.timings["bootstrap_s"] = time.perf_counter() - start

    def judge(self, loci: dict[str, LocusResult]) -> ModelResult:
        """Stage scores and every rule's verdict: the model's result."""
        from .verdicts import judge, stage_scores

        stage_map, thresholds = self.stage_map, self.model_plan.thresholds
        stage_values = stage_scores(loci, stage_map.consumed_vision_layers, thresholds.metric, stage_map.llm_entry,
                                    stage_map.loci)
        intervals = self.stage_intervals
        verdicts = judge(loci, stage_values, stage_map.consumed_vision_layers, thresholds, stage_map.llm_entry,
                         intervals, invariance=(self.answers or {}).get("invariance"), stages=self.selection.stages)
        selection = self.selection.to_dict()
        selection["notes"] = list(dict.fromkeys([*filter(None, [self.selection.note()]), *self.notes]))
        return ModelResult(
            label=self.model_plan.spec.label, source=self.model_plan.spec.source, stage_map=stage_map.to_dict(),
            class_names=tuple(self.dataset.class_names), metric=thresholds.metric,
            n_train=int(len(self.plan.folds[0][0])), n_test=int(len(self.plan.test)),
            loci=loci, scores=stage_values, verdicts=verdicts, thresholds=thresholds.to_dict(),
            timings=self.timings, answers=self.answers, intervals=dict(intervals),
            uncertainty=dict(self.uncertainty), random_init=self.twin, selection=selection,
        )


def gather_features(group: Any, features: Features, sizes: list[int], what: str) -> Features:
    """Every rank's features of its shard, gathered in image order (the logit lens's head is
    read from the weights, the same on every rank: this rank's is kept)."""
    loci = {name: group.gather_rows(features.loci[name], sizes, name) for name in sorted(features.loci)}
    first = None
    if features.first_logits is not None:
        first = group.gather_rows(features.first_logits, sizes, "the first-token logits")
    variants = {name: group.gather_rows(scores, sizes, f"the {name} answer scores")
                for name, scores in sorted(features.variant_scores.items())}
    answer = None
    if features.answer_scores is not None:
        answer = group.gather_rows(features.answer_scores, sizes, "the answer scores")
    return replace(
        features, loci=loci, answer_scores=answer,
        first_logits=first, variant_scores=variants,
        batch_size=group.smallest(features.batch_size or 0, f"the batch size of {what}") or None,
    )


def need_mask(stage_map: StageMap, need: Need | None) -> tuple[bool, list[int]]:
    """``need`` as rank 0 sends it: the answer flag and one 0/1 per locus of the model (all 1:
    ``None``, everything)."""
    from .selection import everything

    universe = sorted(everything(stage_map).need.loci)
    if need is None:
        return True, [1] * len(universe)
    return need.answer, [int(name in need.loci) for name in universe]


def need_of(stage_map: StageMap, answer: bool, mask: list[int]) -> Need:
    """The :class:`~.selection.Need` rank 0 sent (:func:`need_mask`)."""
    from .selection import Need, everything

    universe = sorted(everything(stage_map).need.loci)
    return Need(frozenset(name for name, bit in zip(universe, mask) if bit), bool(answer))


def serve(the_plan: Plan, group: Any) -> None:
    """A rank other than 0: extract its shard of whatever model rank 0 asks for, until it says stop.

    A failure of this rank's part is told to rank 0 by the vote, and a rank that sees other files
    than rank 0 is refused on every rank (rank 0 reports both); a broken collective
    (:class:`~.distributed.RankLost`) ends the loop with that error."""
    from .distributed import EXTRACT, STOP, RankFailed

    while True:
        command, index, answer, mask = group.receive()
        if command == STOP:
            return
        model_plan = the_plan.models[index]
        run = ModelRun(the_plan, model_plan)
        run.serving = True
        try:
            if command == EXTRACT:
                run.compute(need_of(model_plan.stage_map, answer, mask))
            else:
                run.compute_random_init()
        except (RankFailed, ConfigError):
            continue
        finally:
            from .extract import free_accelerator_memory

            free_accelerator_memory()


def stop_serving(group: Any) -> None:
    """Rank 0: the serving ranks may stop (a rank already lost is not waited for)."""
    from .distributed import STOP, RankLost

    if group is None or not group.leader:
        return
    with contextlib.suppress(RankLost):
        group.send(STOP)


def control(y_test: np.ndarray, locus: LocusResult, controls: np.ndarray, k: int) -> dict[str, Any]:
    """A locus's control task from its probes on permuted labels (``controls [P, n_test, K]``)."""
    from .uncertainty import ScoreSet, control_summary

    observed = {m: locus.metric(m) for m in locus.chance}
    return control_summary(y_test, observed, [ScoreSet(p, p.argmax(axis=1)) for p in controls], k)


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
        #: model label -> the tests asked of it (:meth:`select`); absent: every test
        self._selections: dict[str, Selection] = {}
        settings = the_plan.settings
        labels = [m.spec.label for m in the_plan.models]
        #: model label -> the label of the model it is compared with (same run, same data and split)
        self.references = dict(the_plan.references)
        if settings.compare_to is not None and not self.references:
            if settings.compare_to not in labels:
                raise ConfigError(
                    f"--mllm-compare-to {settings.compare_to!r} is not one of the models of this run "
                    f"({', '.join(labels)}); name the reference by its label"
                )
            self.references = {label: settings.compare_to for label in labels if label != settings.compare_to}
        for label, name in self.references.items():
            model, reference = self.model_plan(label), self.model_plan(name)
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
            users = [label for label in labels if label not in self.references]
            for model in the_plan.models:
                if model.spec.label not in users:
                    continue
                check_compatible(
                    self.baseline["models"].get(model.spec.label), model.spec.label, settings.baseline,
                    fingerprint=summary["fingerprint"], test_ids=summary["test_ids"], fold_of=summary["fold_of"],
                    loci=model.loci, class_names=list(the_plan.dataset.class_names),
                    settings=settings.to_dict(), metric=model.thresholds.metric,
                )

    def model_plan(self, label: str) -> ModelPlan:
        return next(m for m in self.plan.models if m.spec.label == label)

    def select(self, label: str, tests: Any = None, reason: str | None = None) -> Selection:
        """Ask only ``tests`` (locus and ``stage.<stage>`` names; ``None``: all) of model ``label``,
        before its evaluation: only the loci they read are extracted, scored and judged.

        An output that stands for the whole model (``reason``, or one of the settings':
        :func:`.selection.whole_model_reason`) extracts and judges everything, and the result
        says why. Call it before :meth:`result`; a model whose tests were all left out is simply
        never asked for (and never loaded)."""
        from .selection import everything, select, whole_model_reason

        if label in self._raw:
            raise RuntimeError(f"model {label!r} is already evaluated; select its tests before")
        stage_map = self.model_plan(label).stage_map
        reason = reason or whole_model_reason(self.plan.settings)
        if tests is None:
            chosen = everything(stage_map)
        else:
            tests = list(tests)
            chosen = select(stage_map, tests, label, reason=reason)
            if reason is not None and len(set(tests)) < len(everything(stage_map).tests):
                chosen = everything(stage_map, f"every locus was extracted: {reason}", tests)
        self._selections[label] = chosen
        return chosen

    def raw(self, label: str) -> ModelResult:
        """The model's own result, before any comparison."""
        if label not in self._raw:
            self._raw[label] = evaluate(self.plan, self.model_plan(label), self.progress, keep=self._keeper(label),
                                        selection=self._selections.get(label))
            taker = self.model_plan(label).adapter
            if hasattr(taker, "offer_base"):  # a base it was offered and did not need is let go
                taker.offer_base(None, None)
        return self._raw[label]

    def _keeper(self, label: str) -> Callable[[LoadedModel], None] | None:
        """Hand this model, once extracted, to a PEFT adapter of the run that is based on it and
        not evaluated yet: the base's weights are read once for both."""
        from .models.peft_adapter import PeftAdapter

        mine = self.model_plan(label).adapter
        for model in self.plan.models:
            adapter = model.adapter
            if (isinstance(adapter, PeftAdapter) and adapter.base_adapter is mine
                    and model.spec.label not in self._raw):
                return lambda loaded: adapter.offer_base(loaded.model, loaded.processor)
        return None

    def changes(self, label: str) -> dict[str, Any] | None:
        """Which stages the model's weights changed, per stage (:mod:`.models.changes`)."""
        from .models.changes import fine_tune_changes

        model, name = self.model_plan(label), self.references.get(label)
        reference = self.model_plan(name) if name is not None else None
        return fine_tune_changes(model, reference)

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

        from .baseline import compare, power, regressed_stages
        from .models.changes import contradictions

        if label in self.references:  # the reference first: a PEFT adapter may take its loaded base
            self.raw(self.references[label])
        result = self.raw(label)
        settings = self.plan.settings
        changes = self.changes(label)
        if label in self.references:
            name = self.references[label]
            reference, what = self.entry(name), f"{'base ' if self.plan.references else ''}model {name!r}"
            kind = "model"
        elif self.baseline is not None:
            reference, what = self.baseline["models"][label], f"baseline {settings.baseline!r}"
            kind, name = "baseline", str(settings.baseline)
        else:
            return replace(result, changes=changes) if changes is not None else result
        groups = self.plan.dataset.groups
        test_groups = None if groups is None else np.asarray(groups, dtype=object)[self.plan.test]
        thresholds = self.model_plan(label).thresholds
        verdicts = compare(result, reference, thresholds, what, test_groups)
        comparison = {
            "against": what, "kind": kind, "reference": name,
            "regressed_stages": regressed_stages(verdicts),
            "power": power(result, reference, thresholds, test_groups),
        }
        if changes is not None:
            comparison["contradictions"] = contradictions(changes, comparison["regressed_stages"])
        return replace(result, verdicts=verdicts, comparison=comparison, changes=changes)


def run(models: list[str] | tuple[str, ...] | str, data: str | None = None, *, tests: Any = None,
        **options: Any) -> Results | None:
    """Probe every locus of every model; the same numbers the pytest items assert.

    ``tests`` (locus and ``stage.<stage>`` names, as the pytest items are named) evaluates only
    those tests: only the loci they read are extracted (``-k`` in pytest does the same).

    Under torch.distributed (an initialised process group, or started by torchrun: the group is
    then joined here) every rank must call ``run`` with the same arguments: each extracts its
    share of the images, rank 0 fits the probes and gets the :class:`Results`; the other ranks
    get ``None``.

    >>> results = run("demo")                      # doctest: +SKIP
    >>> results["demo"].profile                    # doctest: +SKIP
    >>> run("demo", tests=["vision.0", "stage.vision"])  # doctest: +SKIP
    """
    if isinstance(models, str):
        models = [models]
    unknown = sorted(set(options) - set(Settings.field_names()))
    if unknown:
        raise TypeError(f"run() got unknown settings {unknown}; valid: {', '.join(Settings.field_names())}")
    for key in ("thresholds", "controls"):
        if isinstance(options.get(key), str):
            options[key] = (options[key],)
    from .distributed import finish, rank_device, start

    settings = Settings(models=tuple(models), data=data, **options)
    group = start(settings.device, settings.dist_backend)
    try:  # a group joined here is left here (one the caller made is left alone)
        settings = replace(settings, device=rank_device(settings.device, group))
        the_plan = plan(settings)
        evaluator = Evaluator(the_plan)
        if tests is not None:
            tests = [tests] if isinstance(tests, str) else list(tests)
            for m in the_plan.models:
                evaluator.select(m.spec.label, tests)
        if group is not None and not group.leader:
            serve(the_plan, group)
            return None
        try:
            results = {m.spec.label: evaluator.result(m.spec.label) for m in the_plan.models}
        finally:
            stop_serving(group)
    finally:
        finish()
    return Results(models=results, settings=settings.to_dict(), data=data_summary(the_plan))


def fold_of(the_plan: Plan) -> list[int]:
    """The fold that tested each test image, in test order (all 0 for one split)."""
    where = {int(i): n for n, (_, fold_test) in enumerate(the_plan.folds) for i in fold_test}
    return [where[int(i)] for i in the_plan.test]


def power_report(settings: Settings, drop: float) -> list[str]:
    """``--mllm-power DROP``: for the data at hand (its split or folds, its patients), the
    smallest drop a comparison can detect and the test units ``drop`` needs, at a few accuracies
    of the reference; reads the data and the thresholds, never a model."""
    from .stats import POWER, min_detectable_drop, units_needed
    from .thresholds import load_thresholds

    if not 0.0 < drop < 1.0:
        raise ConfigError(f"--mllm-power {drop}: give the drop to detect as a fraction in (0, 1), e.g. 0.02")
    specs = [resolve_model(name) for name in settings.models] or [resolve_model("demo")]
    dataset = _dataset(settings, specs)
    _, test, folds = _split(settings, dataset)
    regression = load_thresholds(list(settings.thresholds), metric=settings.metric).for_model(
        specs[0].label, specs[0].source).regression
    alpha = regression.get("alpha") or 0.05
    max_drop = regression.get("max_drop")
    if dataset.groups is not None:
        n_units, unit = len(set(np.asarray(dataset.groups, dtype=object)[test].tolist())), "patients"
    else:
        n_units, unit = len(test), "images"
    how = f"{len(folds)} folds" if len(folds) > 1 else "one split"
    lines = [
        f"mllmprobe power: {dataset.root}: {len(test)} test images, {n_units} independent test {unit} ({how}); "
        f"one-sided alpha {alpha:g} (regression.alpha, before the Holm correction: a gate of m tests needs "
        f"alpha / m for its first one), power {POWER:g}",
        "  formula: drop = (z(1-alpha) + z(power)) * sqrt(2 p (1 - p) / n); docs/method.md",
    ]
    for p in (0.95, 0.9, 0.8, 0.7, 0.5):
        needed = units_needed(p, drop, alpha)
        verdict = "enough" if needed <= n_units else f"{needed - n_units} more"
        lines.append(
            f"  reference accuracy {p:.2f}: a drop of {drop:g} needs {needed} test {unit} ({verdict}); "
            f"with {n_units} the smallest detectable drop is {min_detectable_drop(p, n_units, alpha):.3f}"
        )
    if max_drop is not None and max_drop < min_detectable_drop(0.95, n_units, alpha):
        lines.append(f"  regression.max_drop {max_drop:g} lies below what these {n_units} {unit} can detect at any "
                     "of these accuracies: the gate would pass such drops unseen")
    return lines


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
        "fold_of": fold_of(the_plan),
        "grouped": dataset.groups is not None,
        "predefined_split": dataset.predefined_split is not None,
        "skipped": [list(s) for s in dataset.skipped],
    }
