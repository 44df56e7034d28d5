"""Probes: small classifiers trained on frozen, pooled features.

Estimators follow scikit-learn conventions: ``__init__`` stores hyper-parameters only, fitted
attributes end in ``_``, ``fit`` returns ``self``. Features are standardised with statistics of
the training split only.

- :class:`LinearProbe` (default): multinomial logistic regression (softmax) on standardised
  features, L2-regularised: scikit-learn's ``LogisticRegression(C=1)`` objective, fitted in
  torch (float32, full-batch L-BFGS). :func:`fit_probes` fits each locus's probe on its own (all
  its folds and label sets as one batched problem), on any torch device. ``kind="sklearn"`` fits
  scikit-learn's own ``LogisticRegression`` per locus (the reference; slower).
- :class:`MLPProbe`: the paper's probe, a two-layer MLP (ReLU, dropout 0.1) trained with AdamW,
  lr 1e-4, cosine schedule with 5% warm-up, 20 epochs, batch size 4. :func:`fit_probes` trains
  the MLPs of all loci of the same width together, as one batched network.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .scoring import ProbeScore, one_hot, score, softmax_rows

PROBES = ("linear", "mlp", "sklearn")


class _Standardiser:
    def fit(self, X: np.ndarray) -> _Standardiser:
        self.mean_ = X.mean(axis=0)
        std = X.std(axis=0)
        self.scale_ = np.where(std > 1e-12, std, 1.0)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean_) / self.scale_


def _check_X(X: np.ndarray, expected: int | None, who: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"{who} expects a 2-D feature array [samples, features], got shape {X.shape}")
    if expected is not None and X.shape[1] != expected:
        raise ValueError(f"X has {X.shape[1]} features, but the {who} expects {expected}")
    if not np.isfinite(X).all():
        raise ValueError(f"{who}: X holds NaN or infinite values")
    return X


class LinearProbe:
    """Softmax (multinomial logistic) probe on standardised features, L2-regularised.

    Minimises ``sum_i CE_i + ||W||^2 / (2 C)`` (intercept unpenalised), the objective of
    scikit-learn's ``LogisticRegression(C=C)``: two classes use one weight vector (binomial),
    more classes one per class (multinomial). Fitted in float32 by full-batch L-BFGS in torch,
    see :func:`fit_linear`.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 500, device: str = "cpu") -> None:
        self.C = C
        self.max_iter = max_iter
        self.device = device

    def fit(self, X: np.ndarray, y: np.ndarray) -> LinearProbe:
        X = _check_X(X, None, "LinearProbe")
        self.scaler_ = _Standardiser().fit(X)
        self.n_features_in_ = X.shape[1]
        self.classes_ = np.unique(y)
        codes = np.searchsorted(self.classes_, y)
        coef, intercept = fit_linear(
            self.scaler_.transform(X)[None], codes, len(self.classes_),
            C=self.C, max_iter=self.max_iter, device=self.device,
        )
        self.coef_, self.intercept_ = coef[0], intercept[0]
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, columns in ``classes_`` order."""
        X = _check_X(X, self.n_features_in_, "LinearProbe")
        return _linear_proba(self.coef_[None], self.intercept_[None], self.scaler_.transform(X)[None])[0]


PARALLEL_WORK = 50_000_000
"""Multiply-adds per step below which a CPU fit runs on one thread: small batched problems gain
nothing from more, and on a busy machine OpenMP spin-waiting makes them many times slower."""
CPU_GROUP_BYTES = 24 * 2**20
"""First-layer weights per group of MLP probes trained together on the CPU (below glibc's 32 MiB
mmap ceiling)."""


@contextlib.contextmanager
def _cpu_threads(device: Any, work: int) -> Iterator[None]:
    """Run small CPU fits single-threaded; restore torch's thread count afterwards."""
    import torch

    before = torch.get_num_threads()
    wanted = max(1, min(before, work // PARALLEL_WORK))
    if str(device).startswith("cuda") or wanted == before:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_linear(
    X: np.ndarray, y: np.ndarray, n_classes: int, *, C: float = 1.0, max_iter: int = 500,
    tol: float = 1e-5, device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``L`` independent L2 logistic regressions at once on ``X [L, N, D]``, labels ``y [N]``.

    Returns ``coef [L, D, M]`` and ``intercept [L, M]`` with ``M = n_classes`` (``M = 1`` for two
    classes: the logit of class 1 against class 0, as scikit-learn's binomial model; ``M = 0`` for
    one class). The objectives of the loci are independent, so L-BFGS on their sum (full batch,
    strong-Wolfe line search, float32) reaches every locus's own minimiser. The loss is scaled
    by ``1 / N`` (same minimiser as scikit-learn's ``sum CE + ||W||^2 / 2C``) for float32 range.

    ``y`` may also be ``[S, N]``: ``S`` label sets (the real labels and permuted ones, for the
    control task), each fitted on every locus in the same batch without copying ``X``; the
    result is then ``coef [S, L, D, M]`` and ``intercept [S, L, M]``.
    """
    y = np.asarray(y)
    sets = y[None] if y.ndim == 1 else y
    [(coef, intercept)] = fit_linear_folds([X], [sets], n_classes, C=C, max_iter=max_iter, tol=tol, device=device)
    return (coef[0], intercept[0]) if y.ndim == 1 else (coef, intercept)


def fit_linear_folds(
    xs: list[np.ndarray], label_sets: list[np.ndarray], n_classes: int, *, C: float = 1.0,
    max_iter: int = 500, tol: float = 1e-5, device: str = "cpu",
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`fit_linear` for every fold of a cross-validation in one batch.

    ``xs[g]`` is fold ``g``'s training features ``[L, n_g, D]`` and ``label_sets[g]`` its ``[S, n_g]``
    label sets; returns per fold ``coef [S, L, D, M]`` and ``intercept [S, L, M]``. The folds'
    sample counts may differ: shorter ones are padded with rows that carry no weight, and each
    fold's loss keeps its own ``1 / n_g`` scale, so every (fold, set, locus) problem reaches its
    own minimiser. One batch instead of one per fold: small problems are bound by L-BFGS's
    per-step overhead, not by arithmetic.
    """
    import torch

    folds = len(xs)
    n_loci, _, d = xs[0].shape
    n_sets = len(label_sets[0])
    sizes = [x.shape[1] for x in xs]
    m = 0 if n_classes < 2 else (1 if n_classes == 2 else n_classes)
    if m == 0 or min(sizes) == 0:
        return [(np.zeros((n_sets, n_loci, d, m), np.float32), np.zeros((n_sets, n_loci, m), np.float32))
                for _ in xs]
    n = max(sizes)
    stacked = np.zeros((folds, n_loci, n, d), np.float32)
    targets = np.zeros((folds, n_sets, n), np.int64)
    mask = np.zeros((folds, n), np.float32)
    for g, (x, labels) in enumerate(zip(xs, label_sets)):
        stacked[g, :, :sizes[g]] = x
        targets[g, :, :sizes[g]] = labels
        mask[g, :sizes[g]] = 1.0
    x_t = torch.as_tensor(stacked, device=device).transpose(2, 3)                # [G, L, D, N]
    target = torch.as_tensor(targets, device=device)[:, None, :, :].expand(folds, n_loci, n_sets, n)
    weight = torch.as_tensor(mask / np.asarray(sizes, np.float32)[:, None], device=device)[:, None, None, :]
    alpha = torch.as_tensor(1.0 / (2.0 * C * np.asarray(sizes, np.float32)), device=device)
    alpha = alpha.reshape(folds, 1, 1, 1, 1)
    # Class-major weights, the label sets stacked as rows: logits [G, L, S*M, N] = W [G, L, S*M, D]
    # @ X^T, one matrix product per (fold, locus) for every label set. With M a handful of
    # classes, this is much faster than X @ W (a [D, M] right factor is too skinny for the CPU
    # kernels); X^T is a view, not a copy.
    w = torch.zeros(folds, n_loci, n_sets, m, d, device=device, requires_grad=True)
    b = torch.zeros(folds, n_loci, n_sets, m, 1, device=device, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=tol,
        tolerance_change=1e-10, line_search_fn="strong_wolfe",
    )
    problems = folds * n_loci * n_sets

    def closure() -> Any:
        optimiser.zero_grad()
        logits = torch.matmul(w.reshape(folds, n_loci, n_sets * m, d), x_t).reshape(folds, n_loci, n_sets, m, n) + b
        logits = logits.reshape(problems, m, n)
        if m == 1:  # binomial: the reference class's logit is zero
            logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
        ce = torch.nn.functional.cross_entropy(logits, target.reshape(problems, n), reduction="none")
        loss = (ce.reshape(folds, n_loci, n_sets, n) * weight).sum() + (alpha * w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), _cpu_threads(device, problems * n * d * m):
        optimiser.step(closure)
    coef = w.detach().transpose(1, 2).transpose(3, 4).cpu().numpy()             # [G, S, L, D, M]
    intercept = b.detach().transpose(1, 2).cpu().numpy()[..., 0]                # [G, S, L, M]
    return [(coef[g], intercept[g]) for g in range(folds)]


def _linear_proba(coef: np.ndarray, intercept: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``[L, N, K]`` class probabilities of fitted linear probes on ``X [L, N, D]``."""
    if coef.shape[-1] == 0:
        return np.ones(X.shape[:2] + (1,))
    z = np.matmul(X.astype(np.float64), coef.astype(np.float64)) + intercept[:, None, :]
    if z.shape[-1] == 1:
        z = np.concatenate([np.zeros_like(z), z], axis=-1)
    return softmax_rows(z)


class MLPProbe:
    """Two-layer MLP probe (ReLU, dropout), the paper's recipe by default."""

    def __init__(
        self,
        hidden: int = 256,
        dropout: float = 0.1,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        epochs: int = 20,
        batch_size: int = 4,
        warmup: float = 0.05,
        seed: int = 0,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.warmup = warmup
        self.seed = seed

    def fit(self, X: np.ndarray, y: np.ndarray) -> MLPProbe:
        X = _check_X(X, None, "MLPProbe")
        self.scaler_ = _Standardiser().fit(X)
        self.n_features_in_ = X.shape[1]
        self.classes_ = np.unique(y)
        codes = np.searchsorted(self.classes_, y)
        self.params_ = _train_mlps(self.scaler_.transform(X)[None], codes, len(self.classes_), self)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = _check_X(X, self.n_features_in_, "MLPProbe")
        logits = _mlp_logits(self.params_, self.scaler_.transform(X)[None])
        return self.classes_[logits[0].argmax(axis=1)]


def _train_mlps(
    X: np.ndarray, y: np.ndarray, n_classes: int, cfg: MLPProbe, device: Any = "cpu"
) -> dict[str, np.ndarray]:
    """Train ``L`` independent MLPs at once on ``X [L, N, D]`` with shared labels ``y [N]``.

    Weights, data order and dropout masks come from generators seeded with ``cfg.seed`` (the
    initial weights and the order on the CPU, so they do not depend on ``device``).
    """
    import torch

    generator = torch.Generator().manual_seed(cfg.seed)
    on_cpu = torch.device(device).type == "cpu"
    masks = generator if on_cpu else torch.Generator(device=device).manual_seed(cfg.seed)
    n_loci, n, d = X.shape
    h = cfg.hidden
    xs = torch.as_tensor(X, dtype=torch.float32, device=device)
    ys = torch.as_tensor(y, dtype=torch.long, device=device)
    bound1, bound2 = 1 / math.sqrt(d), 1 / math.sqrt(h)

    def uniform(*shape: int, bound: float) -> Any:
        return ((torch.rand(*shape, generator=generator) * 2 - 1) * bound).to(device).requires_grad_()

    w1 = uniform(n_loci, d, h, bound=bound1)
    b1 = uniform(n_loci, 1, h, bound=bound1)
    w2 = uniform(n_loci, h, n_classes, bound=bound2)
    b2 = uniform(n_loci, 1, n_classes, bound=bound2)
    # On the CPU the loci train in groups whose first-layer weights stay below glibc's mmap
    # threshold: a gradient above it is a fresh mmap every step, zeroed by the kernel (more
    # system time than compute). The groups share each step's batch and dropout draw, so the
    # weights are those of one batched fit.
    size = n_loci if not on_cpu else max(1, min(n_loci, CPU_GROUP_BYTES // (4 * d * h)))
    groups = [slice(i, min(i + size, n_loci)) for i in range(0, n_loci, size)]
    params = [[p[g].detach().clone().requires_grad_() for p in (w1, b1, w2, b2)] for g in groups]
    del w1, b1, w2, b2
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = max(1, steps_per_epoch * cfg.epochs)
    warm = max(1, int(round(cfg.warmup * total)))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    optimisers = [_adamw(group, cfg) for group in params]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in optimisers]
    with torch.enable_grad(), _cpu_threads(device, n_loci * cfg.batch_size * d * h):
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=generator).to(device)
            for start in range(0, n, cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                keep = None
                if cfg.dropout > 0:
                    draw = torch.rand((n_loci, len(idx), h), generator=masks, device=device)
                    keep = (draw >= cfg.dropout).float() / (1 - cfg.dropout)
                target = ys[idx]
                for g, (w1, b1, w2, b2), optimiser, scheduler in zip(groups, params, optimisers, schedulers):
                    hidden = torch.relu(torch.bmm(xs[g][:, idx], w1) + b1)
                    if keep is not None:
                        hidden = hidden * keep[g]
                    logits = torch.bmm(hidden, w2) + b2
                    # Sum over loci so each probe gets its own, unscaled gradient.
                    loss = torch.nn.functional.cross_entropy(
                        logits.reshape(-1, n_classes), target.expand(len(logits), -1).reshape(-1), reduction="none"
                    ).reshape(len(logits), -1).mean(dim=1).sum()
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    scheduler.step()
    return {name: torch.cat([group[i].detach() for group in params]).cpu().numpy()
            for i, name in enumerate(("w1", "b1", "w2", "b2"))}


def _adamw(params: list[Any], cfg: MLPProbe) -> Any:
    """AdamW, fused where torch has the kernel (no temporaries of the weights' size per step)."""
    import torch

    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without the kernel
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _mlp_logits(params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    hidden = np.maximum(np.matmul(X, params["w1"]) + params["b1"], 0)
    return np.matmul(hidden, params["w2"]) + params["b2"]


def majority_score(y_train: np.ndarray, y_test: np.ndarray, k: int) -> ProbeScore:
    """The score of always answering the most frequent training class."""
    majority = np.bincount(np.asarray(y_train), minlength=k).argmax()
    return score(y_test, one_hot(np.full(len(y_test), majority), k))


def _full_columns(proba: np.ndarray, classes: np.ndarray, k: int) -> np.ndarray:
    """Spread probabilities over the train classes into all ``k`` class columns."""
    out = np.zeros((proba.shape[0], k))
    out[:, classes] = proba
    return out


def fit_predict(
    features: dict[str, np.ndarray],
    labels: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    *,
    kind: str = "linear",
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """Train one probe per locus on ``train``; its class probabilities on ``test`` (``[n_test, K]``).

    ``linear`` probes are fitted one locus at a time and ``mlp`` probes of all loci of the same
    width together, as one batched network, on ``device`` (the engine passes the extraction
    device); ``sklearn`` fits scikit-learn's ``LogisticRegression(C=1)`` per locus on the CPU
    (the reference the ``linear`` probe is tested against). Columns are all
    ``K = labels.max() + 1`` classes.
    """
    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}; choose one of {', '.join(PROBES)}")
    y_train = np.asarray(labels)[train]
    [fitted] = fit_folds(features, labels, [(train, test)], [y_train[None]], kind=kind, seed=seed, device=device)
    return {name: proba[0] for name, proba in fitted.items()}


def fit_predict_sets(
    features: dict[str, np.ndarray], labels: np.ndarray, label_sets: np.ndarray, train: np.ndarray,
    test: np.ndarray, *, kind: str = "mlp", seed: int = 0, device: str = "cpu",
) -> dict[str, np.ndarray]:
    """MLP or sklearn probes (:func:`fit_predict`) for ``S`` sets of training labels
    (``label_sets [S, n_train]``, e.g. the real ones and permutations of them): ``[S, n_test, K]``
    per locus. The sets are fitted one after the other (linear probes: :func:`_linear_folds`).
    Every set must hold the classes of ``labels[train]``.
    """
    if kind not in ("mlp", "sklearn"):
        raise ValueError(f"fit_predict_sets fits mlp or sklearn probes, not {kind!r}; linear ones: fit_folds")
    label_sets = np.asarray(label_sets)
    k = int(labels.max()) + 1
    n_sets = len(label_sets)
    results: dict[str, np.ndarray] = {}
    if kind == "sklearn":
        from sklearn.linear_model import LogisticRegression

        for name, X in features.items():
            X = _check_X(X, None, "sklearn probe")
            scaler = _Standardiser().fit(X[train])
            out = np.zeros((n_sets, len(test), k))
            for s, y_set in enumerate(label_sets):
                model = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(X[train]), y_set)
                out[s] = _full_columns(model.predict_proba(scaler.transform(X[test])), model.classes_, k)
            results[name] = out
        return results
    by_width: dict[int, list[str]] = {}
    for name, X in features.items():
        X = _check_X(X, None, f"{kind} probe of {name}")
        by_width.setdefault(X.shape[1], []).append(name)
    classes = np.unique(label_sets[0])
    codes = np.searchsorted(classes, label_sets)
    cfg = MLPProbe(seed=seed)
    for names in by_width.values():
        x_train, x_test = _standardised_stack(features, names, train, test)
        probabilities = np.stack([
            softmax_rows(_mlp_logits(_train_mlps(x_train, codes[s], len(classes), cfg, device=device), x_test))
            for s in range(n_sets)
        ], axis=1)
        for name, proba in zip(names, probabilities):  # proba [S, n_test, len(classes)]
            results[name] = np.stack([_full_columns(p, classes, k) for p in proba])
    return {name: results[name] for name in features}


def fit_probes(
    features: dict[str, np.ndarray], labels: np.ndarray, train: np.ndarray, test: np.ndarray, *,
    kind: str = "linear", seed: int = 0, device: str = "cpu",
) -> dict[str, ProbeScore]:
    """:func:`fit_predict`, each locus scored on ``labels[test]``."""
    predicted = fit_predict(features, labels, train, test, kind=kind, seed=seed, device=device)
    return {name: score(labels[test], proba) for name, proba in predicted.items()}


@dataclass(frozen=True)
class OutOfFold:
    """One locus's probe outputs for the run's test images, each from the fold that held it out.

    ``probabilities`` is ``[n_test, K]`` in test order; ``finite`` is False when the locus's
    features hold NaN/inf, and then each fold answers its training majority class instead.
    ``controls`` is ``[P, n_test, K]``: the same probe fitted on ``P`` permutations of each
    fold's training labels (the control task), or ``None``.
    """

    probabilities: np.ndarray
    finite: bool
    controls: np.ndarray | None = None


def permuted_labels(y_train: np.ndarray, permutations: int, seed: int, fold: int) -> np.ndarray:
    """``[P, n_train]``: ``P`` seeded shuffles of one fold's training labels (class counts kept)."""
    rng = np.random.default_rng([seed, fold, 0x5E1EC7])
    return np.stack([rng.permutation(y_train) for _ in range(permutations)]) if permutations else \
        np.zeros((0, len(y_train)), dtype=np.asarray(y_train).dtype)


def cross_fit(
    features: dict[str, np.ndarray], labels: np.ndarray, folds: Any, test: np.ndarray, *,
    kind: str = "linear", seed: int = 0, device: str = "cpu", permutations: int = 0,
) -> dict[str, OutOfFold]:
    """Probe every locus on every ``(train, fold_test)`` of ``folds``; pool the held-out
    probabilities in ``test`` order (``test`` is the union of the folds' test parts).

    With ``permutations``, the control task is fitted in the same batch: the same probe on
    permuted training labels of each fold, scored on the same held-out images. The linear
    probes of one locus (every fold, and every permuted label set) are one batched fit, apart
    from the other loci's (:func:`_linear_folds`).
    """
    k = int(labels.max()) + 1
    finite = {name: bool(np.isfinite(X).all()) for name, X in features.items()}
    usable = {name: X for name, X in features.items() if finite[name]}
    position = {int(i): n for n, i in enumerate(test)}
    proba = {name: np.zeros((1 + permutations, len(test), k)) for name in features}
    folds = list(folds)
    label_sets = [np.concatenate([labels[train][None], permuted_labels(labels[train], permutations, seed, number)])
                  for number, (train, _) in enumerate(folds)]
    fitted_folds = fit_folds(usable, labels, folds, label_sets, kind=kind, seed=seed, device=device)
    for (train, fold_test), fitted in zip(folds, fitted_folds):
        majority = one_hot(np.full(len(fold_test), np.bincount(labels[train], minlength=k).argmax()), k)
        where = [position[int(i)] for i in fold_test]
        for name in features:
            proba[name][:, where] = fitted[name] if finite[name] else majority
    return {
        name: OutOfFold(proba[name][0], finite[name], proba[name][1:] if permutations else None)
        for name in features
    }


def fit_folds(features: dict[str, np.ndarray], labels: np.ndarray, folds: list[Any], label_sets: list[np.ndarray],
              *, kind: str, seed: int, device: str) -> list[dict[str, np.ndarray]]:
    """Every fold's probes for every label set, fitted on ``device``: per fold, ``[S, n_test, K]``
    per locus. Linear probes of all folds are one batch; MLP and sklearn probes go fold by fold,
    set by set (an MLP's weights for every set at once would not fit in memory at a real scale)."""
    if kind == "linear":
        return _linear_folds(features, labels, folds, label_sets, device)
    return [fit_predict_sets(features, labels, sets, train, fold_test, kind=kind, seed=seed, device=device)
            for sets, (train, fold_test) in zip(label_sets, folds)]


FOLD_BATCH_VALUES = 4_000_000
"""Standardised feature values of one locus (over all folds) below which the folds of a
cross-validation are fitted in one L-BFGS batch: small problems are bound by L-BFGS's per-step
overhead; larger ones go fold by fold, so that memory stays at one fold's copy."""


def _linear_folds(features: dict[str, np.ndarray], labels: np.ndarray, folds: list[Any],
                  label_sets: list[np.ndarray], device: str) -> list[dict[str, np.ndarray]]:
    """Linear probes of every fold (:func:`fit_linear_folds`): per fold, ``[S, n_test, K]`` per locus.

    The real labels (set 0) and the permuted ones (the control task) are two separate fits, so
    the real probe does not depend on how many permutations the run asked for; and each locus is
    fitted on its own, so that it does not depend on which other loci the run fits (a ``-k`` run
    against a full one): L-BFGS on several loci at once shares one line search and one stopping
    test, which leaves each locus at a slightly different point short of its minimiser. Small
    problems batch every fold together; larger ones go one fold at a time (``FOLD_BATCH_VALUES``).
    """
    k = int(labels.max()) + 1
    out: list[dict[str, np.ndarray]] = [{} for _ in folds]
    classes = [np.unique(sets[0]) for sets in label_sets]
    codes = [np.searchsorted(c, sets) for c, sets in zip(classes, label_sets)]
    groups = [(0, 1)] + ([(1, len(label_sets[0]))] if len(label_sets[0]) > 1 else [])
    same_classes = len({len(c) for c in classes}) == 1
    for name, X in features.items():
        X = _check_X(X, None, f"linear probe of {name}")
        n_values = sum(len(train) + len(test) for train, test in folds) * X.shape[1]
        batches = [list(range(len(folds)))] if n_values <= FOLD_BATCH_VALUES and same_classes else \
            [[g] for g in range(len(folds))]
        for batch in batches:
            stacks = {g: _standardised_stack(features, [name], *folds[g]) for g in batch}
            parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {g: [] for g in batch}
            for lo, hi in groups:
                fitted = fit_linear_folds([stacks[g][0] for g in batch], [codes[g][lo:hi] for g in batch],
                                          len(classes[batch[0]]), device=device)
                for g, pair in zip(batch, fitted):
                    parts[g].append(pair)
            for g in batch:
                coef = np.concatenate([c for c, _ in parts[g]])                     # [S, 1, D, M]
                intercept = np.concatenate([i for _, i in parts[g]])
                [p] = np.stack([_linear_proba(coef[s], intercept[s], stacks[g][1]) for s in range(len(coef))], axis=1)
                out[g][name] = np.stack([_full_columns(q, classes[g], k) for q in p])
            del stacks
    return out


def cross_fit_on_device(
    features: dict[str, np.ndarray], labels: np.ndarray, folds: Any, test: np.ndarray, *,
    kind: str, seed: int, device: str, timings: dict[str, float], permutations: int = 0,
) -> dict[str, OutOfFold]:
    """:func:`cross_fit` on ``device``; out of accelerator memory, on the CPU instead.

    The extraction's cached accelerator memory is handed back first (the model is gone by now).
    A fallback is recorded as ``timings["probe_cpu_fallback"]`` and said in the run summary.
    """
    if device == "cpu":
        return cross_fit(features, labels, folds, test, kind=kind, seed=seed, device=device, permutations=permutations)
    import torch

    from .extract import free_accelerator_memory

    free_accelerator_memory()
    try:
        return cross_fit(features, labels, folds, test, kind=kind, seed=seed, device=device, permutations=permutations)
    except torch.OutOfMemoryError:
        free_accelerator_memory()
        timings["probe_cpu_fallback"] = 1.0
        return cross_fit(features, labels, folds, test, kind=kind, seed=seed, device="cpu", permutations=permutations)


def _standardised_stack(
    features: dict[str, np.ndarray], names: list[str], train: np.ndarray, test: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``[L, n_train, D]`` and ``[L, n_test, D]`` float32, each locus standardised on train."""
    d = features[names[0]].shape[1]
    x_train = np.empty((len(names), len(train), d), np.float32)
    x_test = np.empty((len(names), len(test), d), np.float32)
    for i, name in enumerate(names):
        X = np.asarray(features[name], dtype=np.float32)
        scaler = _Standardiser().fit(X[train])
        x_train[i] = scaler.transform(X[train])
        x_test[i] = scaler.transform(X[test])
    return x_train, x_test
