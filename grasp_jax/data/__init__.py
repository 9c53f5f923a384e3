"""Input pipelines: tfds/tf.data datasets, augmentation, scoring batches, sharding.

Datasets (see ``DATASETS`` in ``registry.py``): ``cifar10``, ``cifar100`` and
``imagenet2012`` from TensorFlow Datasets; ``tiny_imagenet`` read from the
standard unpacked ``tiny-imagenet-200`` folder; ``digits``, the 8x8
handwritten digits that scikit-learn ships inside its wheel (a real dataset
that needs no download). Nothing is ever downloaded.

Modules
    spec            ``DatasetInfo``, what the package knows of a dataset (a leaf module)
    registry        a table, one ``DatasetInfo`` entry each; ``get_info(name, image_size=)``
    sources         loaders of one process's slice of a split (TFDS, folder, arrays)
    integrity       checks of a prepared TFDS dataset's files; damaged ones named
    in_memory       small splits decoded once per process, shared by every pipeline
    augment         decoding, crops, flips, normalization (stateless TF ops)
    on_device       normalization of uint8 batches inside the jitted steps (jax)
    seeds           the stateless keys every random choice is derived from
    streams         restartable training streams, padded evaluation passes
    score_batches   class-balanced scoring draws, the regenerable scoring stream
    layout          batch layout over processes and local devices

Batch format
    A dict of numpy arrays: ``image`` NHWC, ``label`` int32, and for evaluation
    ``mask`` bool (False on padding). Training and evaluation images are uint8
    pixels, normalized on the device by ``on_device.normalize_pixels`` (a
    quarter of the bytes of float32 to move); scoring images are float32,
    normalized per channel on the host.
    ``train_dataset`` and ``eval_dataset`` give every array two leading
    dimensions ``[local_device_count, per_device_batch, ...]``, ready for
    ``jax.pmap``; iterate them with ``.as_numpy_iterator()``. Placing batches on
    devices is the runner's job (``experiments/devices.py``). Scoring batches
    are unsharded ``[B, ...]``.

Every function taking ``dataset`` accepts a registry name or a ``DatasetInfo``
(e.g. ``get_info("imagenet2012", image_size=32)`` for small-image runs).
"""

from grasp_jax.data.layout import Batch, device_batch_layout, shard_batch
from grasp_jax.data.registry import DATASETS, dataset_names, get_info
from grasp_jax.data.score_batches import first_batches, scoring_batch, scoring_stream
from grasp_jax.data.spec import DatasetInfo
from grasp_jax.data.streams import eval_dataset, num_eval_steps, steps_per_epoch, train_dataset

__all__ = [
    "DATASETS",
    "Batch",
    "DatasetInfo",
    "dataset_names",
    "device_batch_layout",
    "eval_dataset",
    "first_batches",
    "get_info",
    "num_eval_steps",
    "scoring_batch",
    "scoring_stream",
    "shard_batch",
    "steps_per_epoch",
    "train_dataset",
]
