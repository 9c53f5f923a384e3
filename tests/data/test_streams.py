"""Tests of grasp_jax.data.streams: training streams (order, resume, sharding) and eval.

Most logic is tested on ``digits`` (in scikit-learn's wheel, so always present
and fast); TFDS datasets use ``tfds.testing.mock_data``; the real CIFAR-10
copy in ../shared/tfds is used when present.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

from grasp_jax import data
from grasp_jax.data import in_memory, sources

from tests.helpers.data import (
    DIGITS_STEPS,
    ONE_DEVICE,
    SHARED_TFDS,
    assert_batches_equal,
    digits_train,
    eval_batches,
    needs_cifar10,
    normalized,
    take,
    train_batches,
    unsharded,
)


@pytest.fixture(autouse=True)
def _fresh_in_memory_splits():
    """Under ``tfds.testing.mock_data`` two tests share a (dataset, split) key but not the
    examples, so each test of this module decodes its own splits (and leaves none behind)."""
    in_memory.clear()
    yield
    in_memory.clear()

# --------------------------------------------------------------------------
# Training stream on digits.


def test_train_batch_shapes_and_dtypes():
    batch = next(digits_train(local_device_count=4))
    assert batch["image"].shape == (4, 16, 8, 8, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (4, 16) and batch["label"].dtype == np.int32
    assert set(batch) == {"image", "label"}
    assert data.steps_per_epoch("digits", 64, process_count=1) == DIGITS_STEPS


def test_one_epoch_is_a_permutation_of_the_split():
    # 1,437 = 3 x 479: one epoch with no remainder dropped.
    epoch = take(digits_train(global_batch_size=479), 3)
    labels = np.concatenate([b["label"][0] for b in epoch])
    images = normalized(np.concatenate([b["image"][0] for b in epoch]), "digits")
    _, split_labels = sources.digits_arrays("train")
    assert np.array_equal(np.bincount(labels), np.bincount(split_labels))
    assert not np.array_equal(labels, split_labels)  # shuffled
    # Normalization: digits mean/std are those of this split.
    assert abs(images.mean()) < 0.01 and abs(images.std() - 1) < 0.01


def test_same_seed_same_batches_other_seed_other_batches():
    # 30 steps cross the epoch boundary at step 22.
    a = take(digits_train(seed=3), 30)
    assert_batches_equal(a, take(digits_train(seed=3), 30))
    b = take(digits_train(seed=4), 30)
    assert not np.array_equal(a[0]["label"], b[0]["label"])
    # Epochs are shuffled differently.
    assert not np.array_equal(a[0]["label"], a[DIGITS_STEPS]["label"])


@pytest.mark.parametrize("start_step", [5, DIGITS_STEPS, DIGITS_STEPS + 3])
def test_start_step_resumes_exactly(start_step):
    full = take(digits_train(seed=7), start_step + 4)
    resumed = take(digits_train(seed=7, start_step=start_step), 4)
    assert_batches_equal(full[start_step:], resumed)


def test_processes_read_disjoint_halves():
    per_process = [
        take(
            digits_train(
                global_batch_size=64, process_index=i, process_count=2, local_device_count=2
            ),
            22,
        )
        for i in range(2)
    ]
    # 1437 // 2 = 718 examples each; 718 // 32 = 22 steps of 2 x 16.
    assert per_process[0][0]["image"].shape == (2, 16, 8, 8, 1)
    assert data.steps_per_epoch("digits", 64, process_count=2) == 22
    rows = [
        {b.tobytes() for batch in batches for b in batch["image"].reshape(-1, 64)}
        for batches in per_process
    ]
    assert rows[0].isdisjoint(rows[1])


# --------------------------------------------------------------------------
# Evaluation.


def test_eval_covers_every_example_once():
    batches = eval_batches(
        "digits", global_batch_size=64, process_index=0, process_count=1, local_device_count=2
    )
    assert len(batches) == data.num_eval_steps("digits", 64, process_count=1) == 6
    assert batches[0]["mask"].shape == (2, 32) and batches[0]["mask"].dtype == bool
    mask = np.concatenate([b["mask"].reshape(-1) for b in batches])
    labels = np.concatenate([b["label"].reshape(-1) for b in batches])
    images = np.concatenate([b["image"].reshape(-1, 8, 8, 1) for b in batches])
    assert mask.sum() == 360 and mask[:360].all()
    _, test_labels = sources.digits_arrays("test")
    np.testing.assert_array_equal(labels[mask], test_labels)
    assert not images[~mask].any()


def test_eval_multi_process_pads_to_equal_steps():
    seen = []
    for i in range(3):
        batches = eval_batches(
            "digits", global_batch_size=48, process_index=i, process_count=3, local_device_count=1
        )
        assert len(batches) == 8  # ceil(120 / 16)
        seen.append(np.concatenate([b["label"][b["mask"]] for b in batches]))
    _, test_labels = sources.digits_arrays("test")
    np.testing.assert_array_equal(np.concatenate(seen), test_labels)


# --------------------------------------------------------------------------
# TFDS datasets with mock data.


def test_cifar100_mock_train_eval_and_resume():
    with tfds.testing.mock_data(num_examples=48):
        common = dict(
            global_batch_size=8, seed=5, process_index=0, process_count=1, local_device_count=2
        )
        full = take(train_batches("cifar100", **common), 8)
        assert full[0]["image"].shape == (2, 4, 32, 32, 3)
        # 6 steps per epoch: step 7 is in the second epoch.
        assert_batches_equal(full[7:], take(train_batches("cifar100", start_step=7, **common), 1))
        # Decoding before (training) or after (first_batches) the shuffle agrees, and
        # the float32 scoring batches are the uint8 training ones normalized on the device.
        first = data.first_batches("cifar100", 2, 8, seed=5)
        assert first[0]["image"].dtype == np.float32
        stream = unsharded(
            take(train_batches("cifar100", **{**common, "local_device_count": 1}), 2)
        )
        for batch in stream:
            batch["image"] = normalized(batch["image"], "cifar100")
        assert_batches_equal(first, stream)
        evals = eval_batches("cifar100", global_batch_size=32, **ONE_DEVICE)
        assert [int(b["mask"].sum()) for b in evals] == [32, 16]


def test_splits_held_in_memory_give_the_batches_read_from_the_files():
    held = data.get_info("cifar100")
    assert held.cache_decoded
    from_files = dataclasses.replace(held, cache_decoded=False)
    common = dict(global_batch_size=8, seed=3, **ONE_DEVICE)

    def batches(info):
        return (take(train_batches(info, **common), 8)  # 6 steps an epoch: into the second
                + take(train_batches(info, start_step=7, **common), 1)
                + data.first_batches(info, 2, 8, seed=3)
                + eval_batches(info, global_batch_size=32, **ONE_DEVICE))

    with tfds.testing.mock_data(num_examples=48):
        expected = batches(from_files)
        assert_batches_equal(batches(held), expected)
        source = in_memory.pipeline_source(held, "train", None, 0, 1, True)
        assert source.image_format == sources.PIXELS and source.num_examples == 48
        # Decoded once: every pipeline of the process reads the same arrays.
        assert in_memory.pipeline_source(held, "train", None, 0, 1, True) is source
        assert in_memory.pipeline_source(from_files, "train", None, 0, 1, True).image_format \
            == sources.ENCODED


def test_imagenet_mock_shapes():
    with tfds.testing.mock_data(num_examples=6):
        batch = next(
            train_batches(
                "imagenet2012",
                global_batch_size=4,
                seed=0,
                process_index=0,
                process_count=1,
                local_device_count=2,
            )
        )
        assert batch["image"].shape == (2, 2, 224, 224, 3) and batch["image"].dtype == np.uint8
        evals = eval_batches("imagenet2012", global_batch_size=4, **ONE_DEVICE)
        assert evals[0]["image"].shape == (1, 4, 224, 224, 3)
        assert sum(int(b["mask"].sum()) for b in evals) == 6


def test_imagenet_mock_small_images():
    small = data.get_info("imagenet2012", image_size=32)
    with tfds.testing.mock_data(num_examples=6):
        batch = next(train_batches(small, global_batch_size=4, seed=0, **ONE_DEVICE))
        assert batch["image"].shape == (1, 4, 32, 32, 3)
        evals = eval_batches(small, global_batch_size=4, **ONE_DEVICE)
        assert [b["image"].shape for b in evals] == [(1, 4, 32, 32, 3)] * 2
        assert sum(int(b["mask"].sum()) for b in evals) == 6
        assert np.isfinite(batch["image"]).all() and batch["image"].std() > 0


# --------------------------------------------------------------------------
# Real CIFAR-10.


@pytest.mark.slow
@needs_cifar10
def test_cifar10_batches_and_normalization():
    batch = next(
        train_batches(
            "cifar10",
            data_dir=str(SHARED_TFDS),
            global_batch_size=16,
            seed=0,
            shuffle_buffer_size=256,
            **ONE_DEVICE,
        )
    )
    assert batch["image"].shape == (1, 16, 32, 32, 3) and batch["label"].dtype == np.int32
    evals = data.eval_dataset(
        "cifar10", data_dir=str(SHARED_TFDS), global_batch_size=1000, **ONE_DEVICE
    )
    pixels = np.concatenate([b["image"][0] for b in evals.take(2).as_numpy_iterator()])
    assert pixels.dtype == np.uint8
    images = normalized(pixels, "cifar10")
    # Reference means are exact; its stds (about 0.2) are below the pixel std
    # (about 0.25), so normalized images have std about 1.2.
    np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0, atol=0.1)
    np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1.22, atol=0.1)


@needs_cifar10
def test_cifar10_scoring_draw_held_in_memory_equals_the_files():
    held = data.get_info("cifar10")
    from_files = dataclasses.replace(held, cache_decoded=False)
    draws = [data.scoring_batch(info, samples_per_class=3, seed=1, data_dir=str(SHARED_TFDS))
             for info in (held, from_files)]
    assert_batches_equal(draws[:1], draws[1:])
