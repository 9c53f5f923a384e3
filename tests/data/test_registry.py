"""Tests of grasp_jax.data.registry: the dataset entries and image_size."""

from __future__ import annotations

import pytest

from grasp_jax import data
from grasp_jax.data import registry


def test_registry_lists_the_datasets():
    assert set(data.dataset_names()) == {
        "cifar10",
        "cifar100",
        "imagenet2012",
        "tiny_imagenet",
        "digits",
    }
    info = data.get_info("cifar10")
    assert (info.num_classes, info.image_shape, info.num_train, info.num_test) == (
        10,
        (32, 32, 3),
        50_000,
        10_000,
    )
    for info in data.DATASETS.values():
        assert len(info.mean) == len(info.std) == info.image_shape[-1]
        assert callable(info.source)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(
        ValueError, match="valid names: cifar10, cifar100, digits, imagenet2012, tiny_imagenet"
    ):
        data.get_info("mnist")
    with pytest.raises(ValueError, match="Unknown dataset 'svhn'"):
        data.train_dataset("svhn", global_batch_size=8, seed=0)


def test_image_size_only_where_images_are_resized():
    small = data.get_info("imagenet2012", image_size=32)
    assert small.image_shape == (32, 32, 3)
    assert data.get_info("imagenet2012").image_shape == (224, 224, 3)  # the registry is untouched
    assert data.get_info("cifar10", image_size=32) is data.get_info("cifar10")
    with pytest.raises(ValueError, match="cifar10: image_size=64 is not its native size 32"):
        data.get_info("cifar10", image_size=64)
    with pytest.raises(ValueError, match="image_size=0"):
        data.get_info("imagenet2012", image_size=0)
    assert registry.resolve(small) is small
    assert registry.resolve("digits") is data.DATASETS["digits"]
