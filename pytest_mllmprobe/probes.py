"""Probes: small classifiers trained on frozen, pooled features.

Estimators follow scikit-learn conventions: ``__init__`` stores hyper-parameters only, fitted
attributes end in ``_``, ``fit`` returns ``self``. Features are standardised with statistics of
the training split only.

- :class:`LinearProbe` (default): multinomial logistic regression (softmax) on standardised
  features, L2-regularised: scikit-learn's ``LogisticRegression(C=1)`` objective, fitted in
  torch (float32, full-batch L-BFGS). :func:`fit_probes` fits the probes of all loci of the same
  width together, as one batched problem, on any torch device. ``kind="sklearn"`` fits
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
    """
    import torch

    n_loci, n, d = X.shape
    m = 0 if n_classes < 2 else (1 if n_classes == 2 else n_classes)
    if m == 0 or n == 0:
        return np.zeros((n_loci, d, m), np.float32), np.zeros((n_loci, m), np.float32)
    xs = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=device)
    ys = torch.as_tensor(np.asarray(y, dtype=np.int64), device=device)
    # Class-major weights: logits [L, M, N] = W [L, M, D] @ X^T. With M a handful of classes,
    # ``bmm`` is ~2.7x faster this way round than X @ W (a [D, M] right factor is too skinny for
    # the CPU kernels); X^T is a view, not a copy.
    w = torch.zeros(n_loci, m, d, device=device, requires_grad=True)
    b = torch.zeros(n_loci, m, 1, device=device, requires_grad=True)
    alpha = 1.0 / (2.0 * C * n)
    optimiser = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=tol,
        tolerance_change=1e-10, line_search_fn="strong_wolfe",
    )
    target = ys.expand(n_loci, -1)

    def closure() -> Any:
        optimiser.zero_grad()
        logits = torch.baddbmm(b, w, xs.transpose(1, 2))
        if m == 1:  # binomial: the reference class's logit is zero
            logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
        loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        loss = loss / n + alpha * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), _cpu_threads(device, n_loci * n * d * m):
        optimiser.step(closure)
    return w.detach().transpose(1, 2).cpu().numpy(), b.detach().cpu().numpy()[:, :, 0]


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

    ``linear`` and ``mlp`` probes of all loci of the same width are fitted together, as one
    batched problem on ``device`` (the engine passes the extraction device); ``sklearn`` fits
    scikit-learn's ``LogisticRegression(C=1)`` per locus on the CPU (the reference the
    ``linear`` probe is tested against). Columns are all ``K = labels.max() + 1`` classes.
    """
    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}; choose one of {', '.join(PROBES)}")
    y_train = labels[train]
    k = int(labels.max()) + 1
    results: dict[str, np.ndarray] = {}
    if kind == "sklearn":
        from sklearn.linear_model import LogisticRegression

        for name, X in features.items():
            X = _check_X(X, None, "sklearn probe")
            scaler = _Standardiser().fit(X[train])
            model = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(X[train]), y_train)
            results[name] = _full_columns(model.predict_proba(scaler.transform(X[test])), model.classes_, k)
        return results
    by_width: dict[int, list[str]] = {}
    for name, X in features.items():
        X = _check_X(X, None, f"{kind} probe of {name}")
        by_width.setdefault(X.shape[1], []).append(name)
    classes = np.unique(y_train)
    codes = np.searchsorted(classes, y_train)
    cfg = MLPProbe(seed=seed)
    for names in by_width.values():
        x_train, x_test = _standardised_stack(features, names, train, test)
        if kind == "linear":
            coef, intercept = fit_linear(x_train, codes, len(classes), device=device)
            probabilities = _linear_proba(coef, intercept, x_test)
        else:
            params = _train_mlps(x_train, codes, len(classes), cfg, device=device)
            probabilities = softmax_rows(_mlp_logits(params, x_test))
        for name, proba in zip(names, probabilities):
            results[name] = _full_columns(proba, classes, k)
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
    """

    probabilities: np.ndarray
    finite: bool


def cross_fit(
    features: dict[str, np.ndarray], labels: np.ndarray, folds: Any, test: np.ndarray, *,
    kind: str = "linear", seed: int = 0, device: str = "cpu",
) -> dict[str, OutOfFold]:
    """Probe every locus on every ``(train, fold_test)`` of ``folds``; pool the held-out
    probabilities in ``test`` order (``test`` is the union of the folds' test parts)."""
    k = int(labels.max()) + 1
    finite = {name: bool(np.isfinite(X).all()) for name, X in features.items()}
    usable = {name: X for name, X in features.items() if finite[name]}
    position = {int(i): n for n, i in enumerate(test)}
    proba = {name: np.zeros((len(test), k)) for name in features}
    for train, fold_test in folds:
        fitted = fit_predict(usable, labels, train, fold_test, kind=kind, seed=seed, device=device)
        majority = one_hot(np.full(len(fold_test), np.bincount(labels[train], minlength=k).argmax()), k)
        where = [position[int(i)] for i in fold_test]
        for name in features:
            proba[name][where] = fitted[name] if finite[name] else majority
    return {name: OutOfFold(proba[name], finite[name]) for name in features}


def cross_fit_on_device(
    features: dict[str, np.ndarray], labels: np.ndarray, folds: Any, test: np.ndarray, *,
    kind: str, seed: int, device: str, timings: dict[str, float],
) -> dict[str, OutOfFold]:
    """:func:`cross_fit` on ``device``; out of accelerator memory, on the CPU instead.

    The extraction's cached accelerator memory is handed back first (the model is gone by now).
    A fallback is recorded as ``timings["probe_cpu_fallback"]`` and said in the run summary.
    """
    if device == "cpu":
        return cross_fit(features, labels, folds, test, kind=kind, seed=seed, device=device)
    import torch

    from .extract import free_accelerator_memory

    free_accelerator_memory()
    try:
        return cross_fit(features, labels, folds, test, kind=kind, seed=seed, device=device)
    except torch.OutOfMemoryError:
        free_accelerator_memory()
        timings["probe_cpu_fallback"] = 1.0
        return cross_fit(features, labels, folds, test, kind=kind, seed=seed, device="cpu")


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
