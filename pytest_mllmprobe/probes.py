"""Probes: small classifiers trained on frozen, pooled features.

Estimators follow scikit-learn conventions: ``__init__`` stores hyper-parameters only, fitted
attributes end in ``_``, ``fit`` returns ``self``. Features are standardised with statistics of
the training split only.

- :class:`LinearProbe` (default): multinomial logistic regression (softmax) on standardised
  features, L2-regularised (scikit-learn's ``LogisticRegression``, lbfgs).
- :class:`MLPProbe`: the paper's probe, a two-layer MLP (ReLU, dropout 0.1) trained with AdamW,
  lr 1e-4, cosine schedule with 5% warm-up, 20 epochs, batch size 4. :func:`fit_probes` trains
  the MLPs of all loci of the same width together, as one batched network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .stats import accuracy, auroc, balanced_accuracy, macro_f1

PROBES = ("linear", "mlp")


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
    """Softmax (multinomial logistic) probe on standardised features."""

    def __init__(self, C: float = 1.0, max_iter: int = 2000) -> None:
        self.C = C
        self.max_iter = max_iter

    def fit(self, X: np.ndarray, y: np.ndarray) -> LinearProbe:
        from sklearn.linear_model import LogisticRegression

        X = _check_X(X, None, "LinearProbe")
        self.scaler_ = _Standardiser().fit(X)
        self.n_features_in_ = X.shape[1]
        self.model_ = LogisticRegression(C=self.C, max_iter=self.max_iter)
        self.model_.fit(self.scaler_.transform(X), y)
        self.classes_ = self.model_.classes_
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = _check_X(X, self.n_features_in_, "LinearProbe")
        return self.model_.predict(self.scaler_.transform(X))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, columns in ``classes_`` order."""
        X = _check_X(X, self.n_features_in_, "LinearProbe")
        return self.model_.predict_proba(self.scaler_.transform(X))


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


def _train_mlps(X: np.ndarray, y: np.ndarray, n_classes: int, cfg: MLPProbe) -> dict[str, np.ndarray]:
    """Train ``L`` independent MLPs at once on ``X [L, N, D]`` with shared labels ``y [N]``."""
    import torch

    generator = torch.Generator().manual_seed(cfg.seed)
    n_loci, n, d = X.shape
    h = cfg.hidden
    xs = torch.as_tensor(X, dtype=torch.float32)
    ys = torch.as_tensor(y, dtype=torch.long)
    bound1, bound2 = 1 / math.sqrt(d), 1 / math.sqrt(h)
    w1 = ((torch.rand(n_loci, d, h, generator=generator) * 2 - 1) * bound1).requires_grad_()
    b1 = ((torch.rand(n_loci, 1, h, generator=generator) * 2 - 1) * bound1).requires_grad_()
    w2 = ((torch.rand(n_loci, h, n_classes, generator=generator) * 2 - 1) * bound2).requires_grad_()
    b2 = ((torch.rand(n_loci, 1, n_classes, generator=generator) * 2 - 1) * bound2).requires_grad_()
    params = [w1, b1, w2, b2]
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = max(1, steps_per_epoch * cfg.epochs)
    warm = max(1, int(round(cfg.warmup * total)))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
    with torch.enable_grad():
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                hidden = torch.relu(torch.bmm(xs[:, idx], w1) + b1)
                if cfg.dropout > 0:
                    keep = (torch.rand(hidden.shape, generator=generator) >= cfg.dropout).float()
                    hidden = hidden * keep / (1 - cfg.dropout)
                logits = torch.bmm(hidden, w2) + b2
                target = ys[idx].expand(n_loci, -1).reshape(-1)
                # Sum over loci so each probe gets its own, unscaled gradient.
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, n_classes), target, reduction="none"
                ).reshape(n_loci, -1).mean(dim=1).sum()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                scheduler.step()
    return {name: p.detach().numpy() for name, p in zip(("w1", "b1", "w2", "b2"), params)}


def _mlp_logits(params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    hidden = np.maximum(np.matmul(X, params["w1"]) + params["b1"], 0)
    return np.matmul(hidden, params["w2"]) + params["b2"]


@dataclass(frozen=True)
class ProbeScore:
    """A probe's outcome on the test split: metrics, per-sample predictions and class scores.

    ``probabilities`` is ``[n_test, K]`` (columns in class-index order), used for AUROC.
    """

    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    auroc: float
    correct: np.ndarray
    predicted: np.ndarray
    probabilities: np.ndarray

    def metric(self, name: str) -> float:
        return float(getattr(self, name))


def score(y_true: np.ndarray, probabilities: np.ndarray, predicted: np.ndarray | None = None) -> ProbeScore:
    """Score class probabilities ``[n, K]``; ``predicted`` defaults to their argmax (-1: no answer)."""
    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if predicted is None:
        predicted = probabilities.argmax(axis=1)
    predicted = np.asarray(predicted)
    k = probabilities.shape[1]
    return ProbeScore(
        accuracy=accuracy(y_true, predicted),
        balanced_accuracy=balanced_accuracy(y_true, predicted),
        macro_f1=macro_f1(y_true, predicted, k),
        auroc=auroc(y_true, probabilities),
        correct=y_true == predicted,
        predicted=predicted,
        probabilities=probabilities,
    )


def one_hot(predicted: np.ndarray, k: int) -> np.ndarray:
    """Probabilities that put all mass on ``predicted`` (a row of -1 gets none)."""
    out = np.zeros((len(predicted), k))
    rows = np.flatnonzero(np.asarray(predicted) >= 0)
    out[rows, np.asarray(predicted)[rows]] = 1.0
    return out


def majority_score(y_train: np.ndarray, y_test: np.ndarray, k: int) -> ProbeScore:
    """The score of always answering the most frequent training class."""
    majority = np.bincount(np.asarray(y_train), minlength=k).argmax()
    return score(y_test, one_hot(np.full(len(y_test), majority), k))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def _full_columns(proba: np.ndarray, classes: np.ndarray, k: int) -> np.ndarray:
    """Spread probabilities over the train classes into all ``k`` class columns."""
    out = np.zeros((proba.shape[0], k))
    out[:, classes] = proba
    return out


def fit_probes(
    features: dict[str, np.ndarray],
    labels: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    *,
    kind: str = "linear",
    seed: int = 0,
) -> dict[str, ProbeScore]:
    """Train one probe per locus on ``train`` and score it on ``test``."""
    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}; choose one of {', '.join(PROBES)}")
    y_train, y_test = labels[train], labels[test]
    k = int(labels.max()) + 1
    results: dict[str, ProbeScore] = {}
    if kind == "linear":
        for name, X in features.items():
            probe = LinearProbe().fit(X[train], y_train)
            proba = probe.predict_proba(X[test])
            results[name] = score(y_test, _full_columns(proba, probe.classes_, k))
        return results
    # MLP: one batched network per feature width.
    by_width: dict[int, list[str]] = {}
    for name, X in features.items():
        by_width.setdefault(X.shape[1], []).append(name)
    classes = np.unique(y_train)
    codes = np.searchsorted(classes, y_train)
    cfg = MLPProbe(seed=seed)
    for names in by_width.values():
        scalers = [_Standardiser().fit(features[n][train]) for n in names]
        x_train = np.stack([s.transform(features[n][train]) for s, n in zip(scalers, names)])
        x_test = np.stack([s.transform(features[n][test]) for s, n in zip(scalers, names)])
        params = _train_mlps(x_train.astype(np.float32), codes, len(classes), cfg)
        probabilities = _softmax(_mlp_logits(params, x_test.astype(np.float32)))
        for name, proba in zip(names, probabilities):
            results[name] = score(y_test, _full_columns(proba, classes, k))
    return results
