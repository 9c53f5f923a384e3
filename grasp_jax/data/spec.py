"""What the data package knows about a dataset: the ``DatasetInfo`` of one registry entry.

A leaf module: the registry (``registry.DATASETS``) is a table of these, and the
loaders (``sources``) and augmentations (``augment``, ``in_memory``) that an
entry names take one as an argument, so the type sits below all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from grasp_jax.data.layout import Shard

# loader(info, split, data_dir, shard) -> sources.Source: how one split is read.
SourceLoader = Callable[["DatasetInfo", str, "str | None", Shard], Any]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about one dataset.

    Attributes:
      name: registry name, also the TFDS name for TFDS datasets.
      num_classes: number of labels.
      image_shape: (height, width, channels) of the images a model receives.
      mean: per-channel mean of pixels in [0, 1], subtracted before dividing by
        ``std``.
      std: per-channel divisor.
      num_train: examples in the full training split.
      num_test: examples in the full evaluation split.
      train_split: split name used for training.
      test_split: split name used for evaluation.
      source: the loader of a split (``sources.SourceLoader``), e.g.
        ``sources.tfds_source``.
      augmentation: training augmentation, one of ``"pad_crop_flip"``,
        ``"resized_crop_flip"``, ``"normalize_only"``.
      padding: zero padding (pixels per side) before the random crop.
      cache_decoded: decode each split once per process and hold its pixels in
        memory, shared by every pipeline (``in_memory``; small datasets only).
      shuffle_buffer_size: tf.data shuffle buffer; None means the whole split
        (an exact uniform permutation per epoch). A smaller one over a split
        stored in several files also reads the files in a per-epoch seeded
        order (see ``streams``, "File order").
      manual_download: TFDS cannot fetch it; the user places archives by hand.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_train: int
    num_test: int
    train_split: str
    test_split: str
    source: SourceLoader
    augmentation: str
    padding: int = 0
    cache_decoded: bool = False
    shuffle_buffer_size: int | None = None
    manual_download: bool = False
