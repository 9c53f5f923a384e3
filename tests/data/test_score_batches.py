"""Tests of grasp_jax.data.score_batches: class-balanced draws and the scoring stream."""

from __future__ import annotations

import numpy as np
import pytest

from grasp_jax import data

from tests.helpers.data import assert_batches_equal, normalized, take, train_batches, unsharded


def test_scoring_batch_is_class_balanced_and_ordered():
    batch = data.scoring_batch("digits", samples_per_class=5, seed=0)
    assert batch["image"].shape == (50, 8, 8, 1) and batch["image"].dtype == np.float32
    np.testing.assert_array_equal(batch["label"], np.repeat(np.arange(10), 5))


def test_scoring_batch_takes_the_first_examples_in_stream_order():
    small = data.scoring_batch("digits", samples_per_class=3, seed=0)
    large = data.scoring_batch("digits", samples_per_class=5, seed=0)
    per_class = large["image"].reshape(10, 5, 8, 8, 1)[:, :3]
    np.testing.assert_array_equal(small["image"], per_class.reshape(30, 8, 8, 1))


def test_scoring_draws_are_fresh_and_reproducible():
    a = data.scoring_batch("digits", samples_per_class=4, seed=0, draw=0)
    b = data.scoring_batch("digits", samples_per_class=4, seed=0, draw=1)
    assert not np.array_equal(a["image"], b["image"])
    assert_batches_equal([a], [data.scoring_batch("digits", samples_per_class=4, seed=0, draw=0)])


def test_scoring_batch_too_few_examples():
    with pytest.raises(ValueError, match="lacks 200 examples"):
        data.scoring_batch("digits", samples_per_class=200, seed=0)


def test_first_batches_are_the_first_training_batches():
    first = data.first_batches("digits", 3, 32, seed=2)
    assert first[0]["image"].shape == (32, 8, 8, 1)
    stream = take(
        train_batches(
            "digits",
            global_batch_size=32,
            seed=2,
            process_index=0,
            process_count=1,
            local_device_count=1,
        ),
        3,
    )
    # The same examples: float32 normalized on the host, the training ones uint8
    # normalized (bit for bit alike) on the device.
    assert first[0]["image"].dtype == np.float32
    stream = [{**b, "image": normalized(b["image"], "digits")} for b in unsharded(stream)]
    assert_batches_equal(first, stream)


def test_scoring_stream_regenerates_the_same_batches_each_pass():
    batches = data.scoring_stream("digits", 4, 25, seed=1)
    first_pass, second_pass = list(batches()), list(batches())
    assert [b["image"].shape for b in first_pass] == [(25, 8, 8, 1)] * 4
    assert_batches_equal(first_pass, second_pass)
    assert_batches_equal(first_pass, data.first_batches("digits", 4, 25, seed=1))
    # Two iterators side by side do not disturb each other.
    a, b = batches(), batches()
    assert_batches_equal([next(a), next(a)], [next(b), next(b)])
    # Restarting at a batch gives the rest of the same pass.
    assert_batches_equal(list(batches(start=3)), first_pass[3:])
    assert list(batches(start=4)) == []
    with pytest.raises(ValueError, match="start=5"):
        batches(start=5)
    other = list(data.scoring_stream("digits", 4, 25, seed=2)())
    assert not np.array_equal(first_pass[0]["image"], other[0]["image"])
    with pytest.raises(ValueError, match="num_batches=0"):
        data.scoring_stream("digits", 0, 25, seed=1)


def test_scoring_stream_past_one_epoch_and_too_large_batches():
    # digits has 1,437 training images: 2 batches of 700 per epoch, the third from epoch 1.
    batches = list(data.scoring_stream("digits", 3, 700, seed=0)())
    assert len(batches) == 3
    assert_batches_equal(batches, data.first_batches("digits", 3, 700, seed=0))
    with pytest.raises(ValueError, match="per-process batch of 2000 is larger"):
        data.scoring_stream("digits", 1, 2000, seed=0)
