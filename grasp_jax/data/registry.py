"""The dataset registry: a table of one ``DatasetInfo`` entry per dataset.

The entry's type lives in ``spec`` (a leaf module), so that the loaders and
augmentations it names can take a ``DatasetInfo`` without importing this table.

Adding a dataset is one entry here (plus, for a new on-disk format, a loader in
``sources.py``). Normalization constants are those of the authors' reference
code, so that numbers are comparable with the paper (the CIFAR "std" values
there are not the true pixel std, which is about 0.25; they are kept on
purpose).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

from grasp_jax.data import sources
from grasp_jax.data.augment import NORMALIZE_ONLY, PAD_CROP_FLIP, RESIZED_CROP_FLIP
from grasp_jax.data.spec import DatasetInfo

DATASETS: Mapping[str, DatasetInfo] = MappingProxyType(
    {
        "cifar10": DatasetInfo(
            name="cifar10",
            num_classes=10,
            image_shape=(32, 32, 3),
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2023, 0.1994, 0.2010),
            num_train=50_000,
            num_test=10_000,
            train_split="train",
            test_split="test",
            source=sources.tfds_source,
            augmentation=PAD_CROP_FLIP,
            padding=4,
            cache_decoded=True,
        ),
        "cifar100": DatasetInfo(
            name="cifar100",
            num_classes=100,
            image_shape=(32, 32, 3),
            mean=(0.5071, 0.4867, 0.4408),
            std=(0.2675, 0.2565, 0.2761),
            num_train=50_000,
            num_test=10_000,
            train_split="train",
            test_split="test",
            source=sources.tfds_source,
            augmentation=PAD_CROP_FLIP,
            padding=4,
            cache_decoded=True,
        ),
        "tiny_imagenet": DatasetInfo(
            name="tiny_imagenet",
            num_classes=200,
            image_shape=(64, 64, 3),
            mean=(0.4802, 0.4481, 0.3975),
            std=(0.2770, 0.2691, 0.2821),
            num_train=100_000,
            num_test=10_000,
            train_split="train",
            test_split="val",
            source=sources.tiny_imagenet_source,
            augmentation=PAD_CROP_FLIP,
            padding=4,
        ),
        "imagenet2012": DatasetInfo(
            name="imagenet2012",
            num_classes=1000,
            image_shape=(224, 224, 3),
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            num_train=1_281_167,
            num_test=50_000,
            train_split="train",
            test_split="validation",
            source=sources.tfds_source,
            augmentation=RESIZED_CROP_FLIP,
            shuffle_buffer_size=16_384,
            manual_download=True,
        ),
        # sklearn.datasets.load_digits (1,797 images, values 0..16, rescaled to
        # 0..255) split by train_test_split(test_size=360, stratify=labels,
        # random_state=0): 1,437 train / 360 test, 35-37 test images per class.
        # mean/std are those of the training split.
        "digits": DatasetInfo(
            name="digits",
            num_classes=10,
            image_shape=(8, 8, 1),
            mean=(0.3054,),
            std=(0.3760,),
            num_train=1_437,
            num_test=360,
            train_split="train",
            test_split="test",
            source=sources.digits_source,
            augmentation=NORMALIZE_ONLY,
        ),
    }
)


def dataset_names() -> tuple[str, ...]:
    """Names accepted by every function taking a dataset ``name``."""
    return tuple(sorted(DATASETS))


def get_info(name: str, *, image_size: int | None = None) -> DatasetInfo:
    """The registry entry for ``name``; ValueError listing valid names if unknown.

    Args:
      name: a registry name (see ``dataset_names()``).
      image_size: the side of the square images the pipeline produces, for
        datasets whose images are resized anyway (``imagenet2012``: the random
        resized crop for training; for evaluation the shorter side is resized
        to ``round(image_size * 256 / 224)`` and the center cropped). None
        keeps the registry's size. Others accept only their native size.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(dataset_names())}.")
    info = DATASETS[name]
    if image_size is None or image_size == info.image_shape[0]:
        return info
    if info.augmentation != RESIZED_CROP_FLIP:
        raise ValueError(
            f"{name}: image_size={image_size} is not its native size {info.image_shape[0]}; only "
            "datasets whose images are resized (imagenet2012) take another image_size."
        )
    if image_size < 1:
        raise ValueError(f"image_size={image_size} must be >= 1.")
    return dataclasses.replace(info, image_shape=(image_size, image_size, info.image_shape[-1]))


def resolve(dataset: str | DatasetInfo) -> DatasetInfo:
    """``dataset`` itself if already a ``DatasetInfo`` (e.g. from ``get_info(name,
    image_size=...)``), else its registry entry."""
    return dataset if isinstance(dataset, DatasetInfo) else get_info(dataset)
