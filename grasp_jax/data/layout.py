"""How a global batch is laid out over processes and their local devices.

Pure arithmetic on shapes (plus one tf.data reshape); nothing here places data
on a device: that is the runner's business (``experiments/devices.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import numpy as np
import tensorflow as tf

Batch = dict[str, np.ndarray]


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """``(index, count)`` of this process, JAX's where not given; checked."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process_index={index} must lie in [0, process_count={count}).")
    return index, count


def device_batch_layout(
    global_batch_size: int,
    *,
    process_count: int | None = None,
    local_device_count: int | None = None,
) -> tuple[int, int]:
    """Splits a global batch into ``(local_device_count, per_device_batch)``.

    Every process holds ``global_batch_size // process_count`` examples, spread
    evenly over its local devices.

    Raises:
      ValueError: naming the numbers, if the global batch does not divide evenly
        over all devices of all processes.
    """
    count = jax.process_count() if process_count is None else process_count
    devices = jax.local_device_count() if local_device_count is None else local_device_count
    if count < 1 or devices < 1:
        raise ValueError(
            f"process_count={count} and local_device_count={devices} must be positive."
        )
    total_devices = count * devices
    if global_batch_size < 1 or global_batch_size % total_devices:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"the total device count {total_devices} ({count} processes x "
            f"{devices} local devices)."
        )
    return devices, global_batch_size // total_devices


def shard_batch(batch: Mapping[str, np.ndarray], num_devices: int) -> Batch:
    """Reshapes each ``[B, ...]`` array of a batch to ``[num_devices, B // num_devices, ...]``."""
    out = {}
    for key, value in batch.items():
        if value.shape[0] % num_devices:
            raise ValueError(
                f"batch[{key!r}] has leading size {value.shape[0]}, not "
                f"divisible by num_devices={num_devices}."
            )
        out[key] = value.reshape((num_devices, -1) + value.shape[1:])
    return out


def reshape_for_devices(num_devices: int) -> Callable[[dict], dict]:
    """tf.data counterpart of ``shard_batch``, applied after batching."""

    def reshape(batch):
        return {
            k: tf.reshape(v, tf.concat([[num_devices, -1], tf.shape(v)[1:]], 0))
            for k, v in batch.items()
        }

    return reshape


@dataclasses.dataclass(frozen=True)
class Shard:
    """Process ``index`` of ``count``: which contiguous part of a split it reads.

    With ``drop_remainder`` every process gets ``n // count`` examples (training:
    equal steps everywhere); without, the first ``n % count`` get one more
    (evaluation: every example read once).
    """

    index: int
    count: int
    drop_remainder: bool

    def range(self, num_examples: int) -> tuple[int, int]:
        """``[start, stop)`` of this shard in a split of ``num_examples``."""
        return process_range(num_examples, self.index, self.count, self.drop_remainder)


def process_range(
    num_examples: int, index: int, count: int, drop_remainder: bool
) -> tuple[int, int]:
    """Contiguous [start, stop) of process ``index``, as tfds.even_splits does."""
    per, extra = divmod(num_examples, count)
    if drop_remainder:
        return index * per, (index + 1) * per
    start = index * per + min(index, extra)
    return start, start + per + (1 if index < extra else 0)
