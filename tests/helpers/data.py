"""Helpers shared by the tests of grasp_jax.data (tests/data/) and its users."""

from __future__ import annotations

import chex
import numpy as np
import pytest

from grasp_jax import data
from grasp_jax.data import on_device

from tests.helpers.paths import SHARED_TFDS

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
    """Two lists of batches hold the same batches, key for key and bit for bit."""
    chex.assert_trees_all_equal(a, b)


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


def normalized(images: np.ndarray, dataset) -> np.ndarray:
    """uint8 batch images as the steps normalize them on the device (float32)."""
    info = data.registry.resolve(dataset)
    return np.asarray(on_device.normalize_pixels(images, info.mean, info.std))
