"""Restartable, deterministic training streams and padded evaluation passes.

Determinism and resuming
    The training stream is a pure function of (dataset, seed, process, batch
    layout). Epoch ``e`` is the process's slice shuffled with a seed derived from
    (seed, process, e) and truncated to whole batches. Augmentation uses
    stateless random ops seeded from (seed, process, e, i), where ``i`` is the
    position in the epoch of the batch's first example (ImageNet: of each
    example, whose crops differ in size before resizing). Therefore
    ``train_dataset(..., start_step=s)`` yields exactly the batches ``s, s+1,
    ...`` of an uninterrupted run, without replaying earlier epochs. (A global
    ``tf.random.set_seed`` changes tf.data's shuffle seeds, so keep it fixed
    between a run and its resumption.)

File order
    A shuffle buffer holding the whole slice (CIFAR, Tiny-ImageNet, digits)
    draws a uniform permutation of it each epoch, so the slice is read in its
    fixed order. A smaller buffer (ImageNet: 16,384 of ~1.28M) only mixes
    nearby records: read in a fixed order, every epoch would start with the
    same first files, whatever the seed. So a source stored in several files
    with a buffer smaller than it is read with its files in an order drawn
    from (seed, process, epoch) (``epoch_reader``), as TFDS's own
    ``shuffle_files`` does but seeded per epoch, so that resuming stays exact.
    (The authors' PyTorch loader permutes all images every epoch; file order +
    buffer is the usual approximation for sharded record files.)

Sharding
    Each process reads its own contiguous slice of the split
    (``tfds.split_for_jax_process``) and builds batches of
    ``global_batch_size // process_count`` examples, shaped
    ``[local_device_count, per_device_batch, ...]`` for ``jax.pmap``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from grasp_jax.data import augment
from grasp_jax.data.in_memory import pipeline_source
from grasp_jax.data.layout import device_batch_layout, reshape_for_devices, resolve_process
from grasp_jax.data.registry import resolve
from grasp_jax.data.seeds import file_order_key, shuffle_seed, stream_key
from grasp_jax.data.sources import Source, load_source
from grasp_jax.data.spec import DatasetInfo

EpochReader = Callable[[tf.Tensor], tf.data.Dataset]


def epoch_reader(source: Source, examples: tf.data.Dataset, buffer_size: int) -> EpochReader:
    """``file_order_key -> dataset``: how an epoch reads the slice before its shuffle.

    Rule (see the module doc): ``source.in_file_order`` when the source has a
    file order to choose and ``buffer_size`` is smaller than the slice;
    otherwise ``examples`` (the source, perhaps held decoded in memory) in its
    fixed order, whatever the key.
    """
    if source.in_file_order is None or buffer_size >= source.num_examples:
        return lambda _key: examples
    return source.in_file_order


def epoch_examples(
    read: EpochReader, key: tf.Tensor, epoch: Any, buffer_size: int, take: int
) -> tf.data.Dataset:
    """Epoch ``epoch`` of a stream: elements ``(epoch, (index, example))``.

    ``read`` gets the epoch's file-order key from (key, epoch); its examples
    are shuffled with a seed from (key, epoch) and truncated to ``take``;
    augmentation is seeded from (key, epoch, index). None depends on what came
    before, which makes resuming at any step exact.
    """
    epoch = tf.cast(epoch, tf.int64)
    ds = read(file_order_key(key, epoch)).shuffle(
        buffer_size, seed=shuffle_seed(key, epoch), reshuffle_each_iteration=False
    )
    # No per-element function here: it would run serially and cap throughput.
    return tf.data.Dataset.zip(
        (tf.data.Dataset.from_tensors(epoch).repeat(), ds.take(take).enumerate())
    )


def host_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity masks
        return os.cpu_count() or 1


def pipeline_options(threads: int | None = None) -> tf.data.Options:
    """tf.data's options for every pipeline here: deterministic, on a thread pool of its own.

    * ``deterministic``: parallel maps keep their input order, so a stream is a
      pure function of its seed and resuming is exact whatever the threads do.
    * A private pool of ``threads`` (default: ``host_cores()``) threads, so
      tf.data does not share TF's global inter-op pool (nor its size) with
      whatever else the process runs in TF.
    * ``max_intra_op_parallelism = 1``: each op of an element runs on the thread
      that runs the element. Elements already run in parallel; splitting a
      224 x 224 resize or a batch's normalization over idle threads only adds
      the cost of waking them (CPU time spent spinning, not working).
    * Autotuning sets the parallelism of each map and the prefetch depth.
    """
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = threads or host_cores()
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = True
    return options


def deterministic(ds: tf.data.Dataset, threads: int | None = None) -> tf.data.Dataset:
    """``ds`` with ``pipeline_options(threads)``: ordered, on its own thread pool."""
    return ds.with_options(pipeline_options(threads))


def training_steps(num_examples: int, local_batch: int, info: DatasetInfo) -> int:
    """Whole batches of ``local_batch`` in ``num_examples``; ValueError if none."""
    steps = num_examples // local_batch
    if steps == 0:
        raise ValueError(
            f"{info.name}: the per-process batch of {local_batch} is larger than "
            f"the {num_examples} training examples this process holds."
        )
    return steps


def training_batches(
    info: DatasetInfo,
    source: Source,
    *,
    key: tf.Tensor,
    local_batch: int,
    num_devices: int,
    start_step: int,
    shuffle_buffer_size: int | None,
    normalize: bool = False,
) -> tf.data.Dataset:
    """The infinite training stream of ``source`` from ``start_step`` (see the module doc).

    uint8 images, or with ``normalize`` float32 normalized ones (the scoring stream).
    """
    steps = training_steps(source.num_examples, local_batch, info)
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0.")
    first_epoch, step_in_epoch = divmod(start_step, steps)
    buffer_size = shuffle_buffer_size or info.shuffle_buffer_size or source.num_examples
    read = epoch_reader(source, source.dataset, buffer_size)
    epochs = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
    ds = epochs.flat_map(lambda e: epoch_examples(read, key, e, buffer_size, steps * local_batch))
    # Only the first epoch is partial; skipping happens before any decoding.
    ds = ds.skip(step_in_epoch * local_batch)
    ds = augment.augmented_batches(
        info, ds, source.image_format, key, local_batch, normalize=normalize
    )
    ds = ds.map(reshape_for_devices(num_devices))
    return deterministic(ds.prefetch(tf.data.AUTOTUNE))


# ---------------------------------------------------------------------------
# Public pipelines. ``dataset`` is a registry name or a ``DatasetInfo`` from
# ``get_info(name, image_size=...)``.


def _process_batch(
    dataset: str | DatasetInfo, global_batch_size: int, process_count: int | None
) -> tuple[DatasetInfo, int, int]:
    """``(info, process_count, examples per process)``, the batch checked to divide."""
    info = resolve(dataset)
    _, count = resolve_process(0, process_count)
    device_batch_layout(global_batch_size, process_count=count, local_device_count=1)
    return info, count, global_batch_size // count


def steps_per_epoch(
    dataset: str | DatasetInfo,
    global_batch_size: int,
    *,
    data_dir: str | None = None,
    process_count: int | None = None,
) -> int:
    """Training steps in one epoch (the remainder of each epoch is dropped)."""
    info, count, local_batch = _process_batch(dataset, global_batch_size, process_count)
    source = load_source(info, info.train_split, data_dir, 0, count, drop_remainder=True)
    return training_steps(source.num_examples, local_batch, info)


def train_dataset(
    dataset: str | DatasetInfo,
    *,
    global_batch_size: int,
    seed: int,
    data_dir: str | None = None,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
    shuffle_buffer_size: int | None = None,
) -> tf.data.Dataset:
    """Infinite, augmented, shuffled training batches of this process.

    Iterate it with ``.as_numpy_iterator()`` for numpy batches on the host.

    Args:
      dataset: a registry name (see ``dataset_names()``) or a ``DatasetInfo``.
      global_batch_size: examples per step summed over all processes.
      seed: fixes the order and augmentation of every epoch.
      data_dir: TFDS data dir, or the tiny-imagenet-200 folder (or its parent);
        ignored by ``digits``. None means TFDS's default.
      start_step: first step to produce; the stream from here equals that of an
        uninterrupted run from step 0.
      process_index, process_count, local_device_count: default to JAX's.
      shuffle_buffer_size: overrides the registry's (whole split by default).

    Returns:
      A tf.data.Dataset of {'image' [D, b, H, W, C] uint8, 'label' [D, b]
      int32} with D local devices and b examples per device. The images are
      augmented pixels; the device normalizes them
      (``on_device.normalize_pixels(images, info.mean, info.std)``).
    """
    info = resolve(dataset)
    index, count = resolve_process(process_index, process_count)
    num_devices, per_device = device_batch_layout(
        global_batch_size, process_count=count, local_device_count=local_device_count
    )
    source = pipeline_source(info, info.train_split, data_dir, index, count, drop_remainder=True)
    return training_batches(
        info,
        source,
        key=stream_key(seed, index),
        local_batch=num_devices * per_device,
        num_devices=num_devices,
        start_step=start_step,
        shuffle_buffer_size=shuffle_buffer_size,
    )


def _eval_steps(total: int, count: int, local_batch: int) -> int:
    # Every process runs the same number of (collective) eval steps, so all
    # pad up to the largest slice, which has ceil(total / count) examples.
    return max(1, math.ceil(math.ceil(total / count) / local_batch))


def num_eval_steps(
    dataset: str | DatasetInfo,
    global_batch_size: int,
    *,
    data_dir: str | None = None,
    process_count: int | None = None,
) -> int:
    """Evaluation batches per process: enough for the largest process slice."""
    info, count, local_batch = _process_batch(dataset, global_batch_size, process_count)
    total = load_source(info, info.test_split, data_dir, 0, 1, drop_remainder=False).num_examples
    return _eval_steps(total, count, local_batch)


def eval_dataset(
    dataset: str | DatasetInfo,
    *,
    global_batch_size: int,
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
) -> tf.data.Dataset:
    """One pass over this process's slice of the evaluation split.

    Padded with zero images to ``num_eval_steps`` full batches; ``mask`` is False
    on padding, so summing ``mask``-weighted metrics over all processes counts
    every test example exactly once. The dataset can be iterated repeatedly
    (``.as_numpy_iterator()`` for numpy batches).

    Returns:
      A tf.data.Dataset of {'image' [D, b, H, W, C] uint8, 'label' [D, b]
      int32, 'mask' [D, b] bool}; the device normalizes the images
      (``on_device.normalize_pixels(images, info.mean, info.std, mask=mask)``
      also zeroes the padding).
    """
    info = resolve(dataset)
    index, count = resolve_process(process_index, process_count)
    num_devices, per_device = device_batch_layout(
        global_batch_size, process_count=count, local_device_count=local_device_count
    )
    local_batch = num_devices * per_device
    source = pipeline_source(info, info.test_split, data_dir, index, count, drop_remainder=False)
    total = load_source(info, info.test_split, data_dir, 0, 1, drop_remainder=False).num_examples
    steps = _eval_steps(total, count, local_batch)
    images = source.dataset.map(
        lambda ex: {
            "image": augment.eval_pixels(ex["image"], info, source.image_format),
            "label": ex["label"],
        },
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    # Elements are (example, mask); zipping in the mask avoids a serial per-element map.
    real = tf.data.Dataset.zip((images, tf.data.Dataset.from_tensors(True).repeat()))
    blank = {
        "image": tf.zeros(info.image_shape, images.element_spec["image"].dtype),
        "label": tf.constant(0, tf.int32),
    }
    padding = tf.data.Dataset.from_tensors((blank, False)).repeat(
        steps * local_batch - source.num_examples
    )
    ds = real.concatenate(padding).batch(local_batch, drop_remainder=True)
    ds = ds.map(augment.eval_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.map(reshape_for_devices(num_devices))
    return deterministic(ds.prefetch(tf.data.AUTOTUNE))
