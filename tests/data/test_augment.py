"""Tests of grasp_jax.data.augment: crops, flips and the ImageNet resizes."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from grasp_jax.data import augment


def test_pad_crop_flip_gives_flipped_crops_of_the_padded_images():
    images = tf.random.stateless_uniform(
        [64, 6, 5, 2], seed=[1, 2], minval=1, maxval=256, dtype=tf.int32
    )
    out = augment.pad_crop_flip(images, tf.constant([3, 4], tf.int64), padding=2).numpy()
    padded = np.pad(images.numpy(), [(0, 0), (2, 2), (2, 2), (0, 0)])
    seen = set()
    for image, crop in zip(padded, out, strict=True):
        matches = [
            (dy, dx, flip)
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
            if np.array_equal(crop[:, ::-1] if flip else crop, image[dy : dy + 6, dx : dx + 5])
        ]
        assert matches
        seen.update(matches)
    # Offsets and flips vary across the batch.
    assert {flip for _, _, flip in seen} == {False, True} and len({dy for dy, _, _ in seen}) > 2


def _jpeg(height, width):
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return tf.io.encode_jpeg(pixels)


def test_imagenet_crops_take_the_asked_size():
    jpeg = _jpeg(48, 80)
    for size in (32, 224):
        crop = augment.random_resized_crop_flip(jpeg, tf.constant([0, 1], tf.int64), size)
        assert crop.shape == (size, size, 3)
        assert augment.resize_center_crop(jpeg, size).shape == (size, size, 3)
    # The center crop keeps the 224/256 ratio of the standard protocol at any size.
    assert augment.eval_resize(224) == 256
    assert augment.eval_resize(32) == 37 and augment.eval_resize(64) == 73


def test_center_crop_is_the_middle_of_the_resized_image():
    # A 74 x 111 image: the shorter side becomes eval_resize(64) = 73, the longer
    # round(111 * 73 / 74) = 110, and the crop starts at ((73-64)//2, (110-64)//2).
    jpeg = _jpeg(74, 111)
    resized = tf.image.resize(
        tf.io.decode_jpeg(jpeg, channels=3), [73, 110], method="bilinear", antialias=True
    )
    expected = resized[4 : 4 + 64, 23 : 23 + 64]
    np.testing.assert_array_equal(augment.resize_center_crop(jpeg, 64).numpy(), expected.numpy())
