"""What the examples share: scikit-learn's bundled 8x8 digits (no download) and their flags."""

from __future__ import annotations

import argparse
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


def parse_flags(description: str, argv=None, *, steps: int) -> argparse.Namespace:
    """The flags every example takes: method, sparsity, steps, batch size, seed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--method", default="grasp", choices=["grasp", "snip", "synflow"])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)
