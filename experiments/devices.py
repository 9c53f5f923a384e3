"""Placing host batches on this process's devices.

The data package (``grasp_jax.data``) stops at numpy batches shaped
``[local_device_count, per_device_batch, ...]``; the runner, which owns the
devices and the mesh, moves them here.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np


def prefetch_to_device(
    batches: Iterable[Any],
    size: int = 2,
    devices: Sequence[jax.Device] | None = None,
    axis_name: str = "devices",
) -> Iterator[Any]:
    """Puts batches on the local devices ``size`` steps ahead of their use.

    Every array's leading dimension (the device dimension of
    ``grasp_jax.data.train_dataset`` and ``eval_dataset``) is split over
    ``devices`` (default: ``jax.local_devices()``), which is the layout
    ``jax.pmap`` expects, so transfers overlap computation. ``axis_name`` names
    the mesh axis of the resulting sharding (e.g. the pmap axis name, so
    batches and pmap outputs share one mesh).
    """
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
