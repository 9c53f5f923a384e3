"""Tests of grasp_jax.data.augment: crops, flips and the ImageNet resizes."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import tensorflow as tf

from grasp_jax import data
from grasp_jax.data import augment, on_device, sources


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


# --------------------------------------------------------------------------
# uint8 output: the float pipeline's values, rounded (the device normalizes).


def _photo_jpeg(height, width, seed):
    """A JPEG (quality 90) of smooth colour with grain, as photographs have."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (1, height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    smooth = tf.image.resize(coarse, [height, width], method="bicubic")[0].numpy()
    pixels = np.clip(smooth + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)
    return tf.io.encode_jpeg(pixels, quality=90)


def reference_random_resized_crop_flip(jpeg, seed, size):
    """The ImageNet training crop as the float32 pipeline computed it (kept verbatim)."""
    box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.image.extract_jpeg_shape(jpeg)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=box_seed,
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    offset_y, offset_x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(crop_size)
    image = tf.image.decode_and_crop_jpeg(
        jpeg, tf.stack([offset_y, offset_x, height, width]), channels=3
    )
    image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    window = tf.stack([offset_y, offset_x, height, width])
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed), image, window


DRAWS = 300


def _draws(jpeg, size):
    """(uint8 crop, reference float crop, the same unflipped, reference window, window)
    for DRAWS seeds."""
    def draw(i):
        seed = tf.stack([tf.constant(7, tf.int64), i])
        reference, unflipped, ref_window = reference_random_resized_crop_flip(jpeg, seed, size)
        box_seed = tf.random.experimental.stateless_split(seed, 2)[0]
        return (augment.random_resized_crop_flip_pixels(jpeg, seed, size), reference,
                unflipped, ref_window, augment.crop_window(jpeg, box_seed))

    ds = tf.data.Dataset.range(DRAWS).map(draw).batch(DRAWS)
    return next(ds.as_numpy_iterator())


def test_training_crops_are_the_float_pipelines_crops_rounded():
    # 72 x 96 cropped to 8%-100% and resized to 32: crops both shrink and grow.
    for jpeg in (_photo_jpeg(72, 96, 0), _photo_jpeg(96, 60, 1)):
        pixels, reference, unflipped, _, _ = _draws(jpeg, 32)
        assert pixels.dtype == np.uint8 and pixels.shape == (DRAWS, 32, 32, 3)
        assert np.abs(pixels - reference).max() <= 0.5
        # The same crop, resize and flip: numpy's round, like tf.round, breaks ties to even.
        np.testing.assert_array_equal(pixels, np.round(reference).astype(np.uint8))
        # About half the crops are flipped.
        flipped = [np.array_equal(p, np.round(u[:, ::-1])) and not np.array_equal(p, np.round(u))
                   for p, u in zip(pixels, unflipped)]
        assert 0.35 < np.mean(flipped) < 0.65


def test_crop_windows_have_the_papers_scale_and_aspect():
    height, width = 300, 400
    _, _, _, ref_windows, windows = _draws(_photo_jpeg(height, width, 2), 16)
    np.testing.assert_array_equal(windows, ref_windows)
    area = windows[:, 2] * windows[:, 3] / (height * width)
    aspect = windows[:, 3] / windows[:, 2]
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0
    assert aspect.min() >= 3 / 4 - 0.02 and aspect.max() <= 4 / 3 + 0.02
    assert (windows[:, :2] >= 0).all()
    assert (windows[:, 0] + windows[:, 2] <= height).all()
    assert (windows[:, 1] + windows[:, 3] <= width).all()
    # Uniform area in [0.08, 1] (rejections bias it a little downward): mean about 0.5.
    assert 0.35 < area.mean() < 0.6 and np.median(aspect) == pytest.approx(1.0, abs=0.15)


def test_evaluation_crops_are_the_float_center_crops_rounded_and_normalize_exactly():
    info = data.get_info("imagenet2012", image_size=64)
    jpeg = _photo_jpeg(74, 111, 3)
    pixels = augment.eval_pixels(jpeg, info, sources.ENCODED).numpy()
    reference = augment.resize_center_crop(jpeg, 64).numpy()
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, np.round(reference).astype(np.uint8))
    # On the device: exactly the host's normalization of the rounded crop, within half a
    # level of the unrounded one.
    on_host = augment.normalized(tf.constant(np.round(reference)), info).numpy()
    on_dev = np.asarray(jax.jit(
        lambda x: on_device.normalize_pixels(x, info.mean, info.std))(pixels))
    np.testing.assert_array_equal(on_dev, on_host)
    unrounded = augment.normalized(tf.constant(reference), info).numpy()
    assert np.abs(on_dev - unrounded).max() <= 0.5 / 255 / min(info.std) + 1e-6
