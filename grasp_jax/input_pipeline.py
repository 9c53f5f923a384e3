"""TEMPORARY shim: the input pipeline now lives in ``grasp_jax.data``.

Kept only so that callers not yet switched keep working; import from
``grasp_jax.data`` instead. ``train_iterator(...)`` is
``data.train_dataset(...).as_numpy_iterator()`` (likewise ``eval_iterator``), and
``prefetch_to_device`` moved to ``experiments/devices.py`` (device placement
belongs to the runner). Delete this module once nothing imports it.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from grasp_jax.data import (  # noqa: F401  (re-exports)
    DATASETS,
    Batch,
    DatasetInfo,
    dataset_names,
    device_batch_layout,
    eval_dataset,
    first_batches,
    get_info,
    num_eval_steps,
    scoring_batch,
    scoring_stream,
    shard_batch,
    steps_per_epoch,
    train_dataset,
)


def train_iterator(dataset: str | DatasetInfo, **kwargs: Any) -> Iterator[Batch]:
    """``train_dataset(...).as_numpy_iterator()``."""
    return train_dataset(dataset, **kwargs).as_numpy_iterator()


def eval_iterator(dataset: str | DatasetInfo, **kwargs: Any) -> Iterator[Batch]:
    """``eval_dataset(...).as_numpy_iterator()``."""
    return eval_dataset(dataset, **kwargs).as_numpy_iterator()


def prefetch_to_device(
    batches: Iterable[Any],
    size: int = 2,
    devices: Sequence[jax.Device] | None = None,
    axis_name: str = "devices",
) -> Iterator[Any]:
    """TEMPORARY copy of ``experiments.devices.prefetch_to_device`` (the core must not
    import ``experiments``), kept only until ``experiments/train.py`` imports it from
    there; it goes with this shim."""
    devices = list(jax.local_devices() if devices is None else devices)
    mesh = jax.sharding.Mesh(np.asarray(devices), (axis_name,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis_name))

    def put(x):
        if x.shape[0] != len(devices):
            raise ValueError(
                f"leading dimension {x.shape[0]} of a batch array "
                f"must equal the number of devices {len(devices)}."
            )
        return jax.device_put(x, sharding)

    iterator = iter(batches)
    queue = collections.deque()
    for batch in itertools.islice(iterator, size):
        queue.append(jax.tree_util.tree_map(put, batch))
    while queue:
        yield queue.popleft()
        for batch in itertools.islice(iterator, 1):
            queue.append(jax.tree_util.tree_map(put, batch))
