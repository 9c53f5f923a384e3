"""Small splits decoded once per process and held in memory, shared by every pipeline.

A short run reads CIFAR's training split several times before its first step: the
class-balanced scoring draw, the gradient-flow batch and the training stream each
shuffle the whole split, and each pass read and parsed 50,000 records again (and the
training stream decoded them all before its first batch). For entries with
``cache_decoded`` (CIFAR-10/100: 150 MiB of uint8 pixels) the split is instead decoded
once into numpy arrays, and every pipeline of the process starts from those arrays in
the stored order. Decoding is deterministic, and ``augment`` treats decoded pixels and
encoded images alike, so every batch is bit-identical to reading the files.

The arrays are kept per (entry, split, data_dir, process shard) for the life of the
process; :func:`clear` drops them, for when the files behind a key change in a running
process (``tfds.testing.mock_data`` in tests).
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from grasp_jax.data import augment
from grasp_jax.data.layout import Shard
from grasp_jax.data.sources import PIXELS, Source, load_source
from grasp_jax.data.spec import DatasetInfo

_DECODE_BATCH = 2048


def pipeline_source(
    info: DatasetInfo,
    split: str,
    data_dir: str | None,
    index: int,
    count: int,
    drop_remainder: bool,
) -> Source:
    """The source a pipeline reads: :func:`load_source`'s, decoded and cached in memory
    when the entry asks for it (``info.cache_decoded``)."""
    if not info.cache_decoded:
        return load_source(info, split, data_dir, index, count, drop_remainder)
    return _decoded(info, split, data_dir, Shard(index, count, drop_remainder))


@functools.lru_cache(maxsize=4)  # a train and a test split, for a run or two in one process
def _decoded(info: DatasetInfo, split: str, data_dir: str | None, shard: Shard) -> Source:
    source = load_source(info, split, data_dir, shard.index, shard.count, shard.drop_remainder)
    decoded = source.dataset.map(
        lambda ex: {"image": augment.pixels(ex["image"], info, source.image_format),
                    "label": ex["label"]},
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    ).batch(_DECODE_BATCH)
    parts = list(decoded.as_numpy_iterator())
    images = np.concatenate([p["image"] for p in parts]) if parts else np.zeros(
        (0, *info.image_shape), np.uint8)
    labels = np.concatenate([p["label"] for p in parts]) if parts else np.zeros((0,), np.int32)
    if len(labels) != source.num_examples:
        raise ValueError(
            f"{info.name} {split}: decoded {len(labels)} examples, the source says "
            f"{source.num_examples}"
        )
    dataset = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
    return Source(dataset, len(labels), image_format=PIXELS)


def clear() -> None:
    """Drop every split held in memory; the next pipeline decodes its split again."""
    _decoded.cache_clear()
