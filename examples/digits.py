"""scikit-learn's bundled 8x8 digits as JAX-ready arrays (no download), for the examples."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from sklearn.datasets import load_digits


def train_test(test_fraction: float = 0.2, seed: int = 0) -> tuple[dict, dict]:
    """Two dicts ``{"image": [N, 8, 8, 1] float32 in [0, 1], "label": [N] int32}``."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return ({"image": images[train], "label": labels[train]},
            {"image": images[test], "label": labels[test]})


def class_balanced(data: dict, per_class: int) -> dict:
    """The first ``per_class`` examples of each class, class by class (GraSP's scoring batch)."""
    picks = np.concatenate([np.flatnonzero(data["label"] == c)[:per_class]
                            for c in np.unique(data["label"])])
    return {k: v[picks] for k, v in data.items()}


def batches(data: dict, batch_size: int, seed: int = 0) -> Iterator[dict]:
    """Shuffled batches forever, a new permutation each epoch."""
    rng = np.random.default_rng(seed)
    n = len(data["label"])
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            yield {k: v[idx] for k, v in data.items()}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=-1) == labels))
