"""Helpers shared by the tests of grasp_jax.data (tests/test_data_*.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from grasp_jax import data

SHARED_TFDS = Path(__file__).parents[1].parent / "shared" / "tfds"
needs_cifar10 = pytest.mark.skipif(
    not (SHARED_TFDS / "cifar10").is_dir(), reason=f"no CIFAR-10 copy at {SHARED_TFDS}"
)

# digits: 1,437 training examples, so 22 steps of 64 per epoch.
DIGITS_STEPS = 1437 // 64

# One process with one device, unless a test says otherwise.
ONE_DEVICE = dict(process_index=0, process_count=1, local_device_count=1)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def train_batches(dataset, **kwargs):
    """``data.train_dataset(dataset, **kwargs)`` as numpy batches."""
    return data.train_dataset(dataset, **kwargs).as_numpy_iterator()


def eval_batches(dataset, **kwargs):
    """Every batch of ``data.eval_dataset(dataset, **kwargs)``, as numpy."""
    return list(data.eval_dataset(dataset, **kwargs).as_numpy_iterator())


def digits_train(**kwargs):
    defaults = dict(global_batch_size=64, seed=0, **ONE_DEVICE)
    return train_batches("digits", **{**defaults, **kwargs})


def unsharded(batches):
    """Single-device batches ``[1, b, ...]`` as ``[b, ...]``."""
    return [{k: v[0] for k, v in b.items()} for b in batches]
