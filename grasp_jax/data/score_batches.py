"""The data pruning scores with: class-balanced draws and the first training batches.

Everything here ignores the calling process: every host computes the same
batches, hence the same scores and masks. A multi-host scorer deals whole
chunks of each (full) batch to the devices of all processes and lets each
process keep the chunks of its own devices (``experiments.methods.deal_chunks``
does so): regenerating a scoring batch on every host costs one batch of
decoding and augmentation per host, small beside the forward and
Hessian-vector passes it feeds, and keeps the chunk layout independent of the
process count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf

from grasp_jax.data import augment
from grasp_jax.data.in_memory import pipeline_source
from grasp_jax.data.layout import Batch
from grasp_jax.data.registry import resolve
from grasp_jax.data.seeds import stream_key
from grasp_jax.data.spec import DatasetInfo
from grasp_jax.data.streams import (
    deterministic,
    epoch_examples,
    epoch_reader,
    training_batches,
    training_steps,
)


def _flag(keep: tf.Tensor, element: tuple) -> tf.Tensor:
    return keep


def _without_flag(keep: tf.Tensor, element: tuple) -> tuple:
    return element


def _too_few_examples(
    info: DatasetInfo, kept: tf.data.Dataset, samples_per_class: int
) -> ValueError:
    """The error naming the classes short of examples, from a second, label-only pass."""
    labels = np.fromiter((element[1][1]["label"] for element in kept.as_numpy_iterator()), np.int32)
    found = np.bincount(labels, minlength=info.num_classes)
    short = {c: int(n) for c, n in enumerate(found) if n < samples_per_class}
    return ValueError(
        f"{info.name}: the training split lacks {samples_per_class} examples for "
        f"some classes (class: count found) {short}."
    )


def scoring_batch(
    dataset: str | DatasetInfo,
    *,
    samples_per_class: int,
    seed: int,
    draw: int = 0,
    data_dir: str | None = None,
) -> Batch:
    """A class-balanced batch of augmented training images, as GraSP scores with.

    Walks a freshly shuffled, augmented pass over the whole training split and
    keeps the first ``samples_per_class`` examples of each class in stream order,
    then orders them class by class (all of class 0, then class 1, ...), as the
    authors' ``GraSP_fetch_data`` does; so the two halves of the batch hold
    different classes. Each ``draw`` (one per scoring iteration) is an
    independent stream, and the result ignores the process: every host gets the
    same batch, so all hosts compute the same masks.

    Returns:
      {'image' [num_classes * samples_per_class, H, W, C] float32,
       'label' [num_classes * samples_per_class] int32}, unsharded.
    """
    info = resolve(dataset)
    if samples_per_class < 1:
        raise ValueError(f"samples_per_class={samples_per_class} must be >= 1.")
    if draw < 0:
        raise ValueError(f"draw={draw} must be >= 0.")
    source = pipeline_source(info, info.train_split, data_dir, 0, 1, drop_remainder=True)
    # Negative stream ids never collide with training streams (process ids).
    key = stream_key(seed, -1 - draw)
    buffer_size = info.shuffle_buffer_size or source.num_examples
    read = epoch_reader(source, source.dataset, buffer_size)
    stream = epoch_examples(read, key, 0, buffer_size, source.num_examples)
    wanted = info.num_classes * samples_per_class

    def count_and_flag(counts, element):
        # Flags the first samples_per_class examples of each class; selecting
        # before decoding means only the kept images are decoded and augmented.
        label = element[1][1]["label"]
        keep = counts[label] < samples_per_class
        counts = tf.tensor_scatter_nd_add(counts, [[label]], [1])
        return counts, (keep, element)

    kept = stream.scan(tf.zeros([info.num_classes], tf.int32), count_and_flag)
    kept = kept.filter(_flag).map(_without_flag)
    kept = kept.take(wanted)
    batches = augment.augmented_batches(
        info, kept, source.image_format, key, wanted, normalize=True
    )
    batch = next(deterministic(batches).as_numpy_iterator(), None)
    if batch is None:  # The split ran out first.
        raise _too_few_examples(info, kept, samples_per_class)
    # A stable sort keeps stream order within each class.
    order = np.argsort(batch["label"], kind="stable")
    return {"image": batch["image"][order], "label": batch["label"][order]}


def scoring_stream(
    dataset: str | DatasetInfo,
    num_batches: int,
    batch_size: int,
    *,
    seed: int,
    data_dir: str | None = None,
) -> Callable[..., Iterator[Batch]]:
    """The first ``num_batches`` training batches of a single-process run, regenerable.

    What the authors' ImageNet pruning reads (``num_iters`` batches of a fixed
    size, 250 in the paper, from the shuffled training loader with training
    augmentation: RandomResizedCrop + horizontal flip + mean/std). Each call of
    the returned function starts a fresh iterator over the same batches, bit for
    bit, so a two-pass scorer sums g over a first pass and Hg over a second
    while holding one batch at a time; ``batches(start=k)`` restarts at batch
    ``k`` without reading the ones before. Independent of the calling process:
    every host regenerates every full batch and keeps its own chunks (see the
    module doc). Batches past the first epoch of a small split come from the
    next epoch, as in training.

    Returns:
      ``batches(start=0) -> iterator`` of {'image' [batch_size, H, W, C]
      float32, 'label' [batch_size] int32}, unsharded: batches ``start`` to
      ``num_batches - 1``.
    """
    info = resolve(dataset)
    if num_batches < 1 or batch_size < 1:
        raise ValueError(f"num_batches={num_batches} and batch_size={batch_size} must be >= 1.")
    source = pipeline_source(info, info.train_split, data_dir, 0, 1, drop_remainder=True)
    training_steps(source.num_examples, batch_size, info)  # fail here, not at the first batch

    def batches(start: int = 0) -> Iterator[Batch]:
        if not 0 <= start <= num_batches:
            raise ValueError(f"start={start} must lie in [0, num_batches={num_batches}].")
        ds = training_batches(
            info,
            source,
            key=stream_key(seed, 0),
            local_batch=batch_size,
            num_devices=1,
            start_step=start,
            shuffle_buffer_size=None,
            normalize=True,  # scoring data: float32, normalized on the host as always
        )
        # Drop the device axis of size 1 inside tf.data: batches arrive unsharded.
        ds = ds.take(num_batches - start).map(lambda b: {k: v[0] for k, v in b.items()})
        return ds.as_numpy_iterator()

    return batches


def first_batches(
    dataset: str | DatasetInfo,
    num_batches: int,
    batch_size: int,
    *,
    seed: int,
    data_dir: str | None = None,
) -> list[Batch]:
    """``scoring_stream``'s batches as a list (all held in memory at once).

    Independent of the calling process, so every host gets the same list.
    """
    return list(scoring_stream(dataset, num_batches, batch_size, seed=seed, data_dir=data_dir)())
