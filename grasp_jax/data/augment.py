"""Decoding, augmentation and normalization: pure TF functions on stream elements.

Augmentation that has the same shape for every image works on whole batches:
tf.data's per-example overhead, not the arithmetic, dominates the cost of small
images. Seeds come from ``seeds.augment_seed``.

Two outputs. Training and evaluation batches leave the host as uint8 pixels
(a quarter of the bytes of float32, and no host arithmetic per pixel); the
device normalizes them (``on_device.normalize_pixels``, the formula of
``normalized``). ImageNet's antialiased resize yields fractional values, which
are rounded to the nearest level, as torchvision's PIL resize does in the
authors' pipeline. Scoring data stays float32, normalized on the host from the
unrounded values, bit for bit as before (``normalize=True`` below).
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from grasp_jax.data.seeds import augment_seed
from grasp_jax.data.sources import FILE, PIXELS
from grasp_jax.data.spec import DatasetInfo

# Training augmentations a registry entry may name.
PAD_CROP_FLIP = "pad_crop_flip"  # CIFAR: zero-pad, random crop, horizontal flip
RESIZED_CROP_FLIP = "resized_crop_flip"  # ImageNet: RandomResizedCrop, horizontal flip
NORMALIZE_ONLY = "normalize_only"

# ImageNet evaluation: resize the shorter side to 256, crop the central 224;
# other sizes keep the ratio.
_IMAGENET_RESIZE, _IMAGENET_CROP = 256, 224


def encoded(image: tf.Tensor, image_format: str) -> tf.Tensor:
    """The encoded bytes of an ``ENCODED`` or ``FILE`` image."""
    return tf.io.read_file(image) if image_format == FILE else image


def pixels(image: tf.Tensor, info: DatasetInfo, image_format: str) -> tf.Tensor:
    """uint8 HWC pixels of a source image in any format, checked against the registry shape."""
    if image_format == PIXELS:
        return image
    decoded = tf.io.decode_image(
        encoded(image, image_format), channels=info.image_shape[-1], expand_animations=False
    )
    return tf.ensure_shape(decoded, info.image_shape)


def normalized(image: tf.Tensor, info: DatasetInfo) -> tf.Tensor:
    """uint8 or float pixels in [0, 255] -> float32 (x / 255 - mean) / std.

    ``on_device.normalize_pixels`` computes the same formula, in the same order.
    """
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(info.mean)) / tf.constant(info.std)


def pad_crop_flip(images: tf.Tensor, seed: tf.Tensor, padding: int) -> tf.Tensor:
    """Per image of a [B, H, W, C] batch: zero-pad, random crop back to H x W, random flip."""
    offset_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    offsets = tf.random.stateless_uniform(
        [batch, 2], seed=offset_seed, minval=0, maxval=2 * padding + 1, dtype=tf.int32
    )
    flips = tf.random.stateless_uniform([batch, 1], seed=flip_seed) < 0.5
    padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    rows = offsets[:, :1] + tf.range(height)[None]
    # A flip is the crop's columns read right to left.
    columns = tf.where(flips, tf.range(width - 1, -1, -1)[None], tf.range(width)[None])
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, offsets[:, 1:] + columns, axis=2, batch_dims=1)


def rounded_pixels(image: tf.Tensor) -> tf.Tensor:
    """Float pixels in [0, 255] -> uint8, each to the nearest level (ties to even)."""
    return tf.saturate_cast(tf.round(image), tf.uint8)


def random_resized_crop_flip(jpeg: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
    """Inception-style crop (area 8%-100%, aspect 3/4-4/3), resize to size x size, flip.

    float32 pixels in [0, 255], unrounded (the scoring data's values).
    """
    image, flip_seed = _resized_crop(jpeg, seed, size)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def random_resized_crop_flip_pixels(jpeg: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
    """``random_resized_crop_flip`` rounded to uint8: the same crop, resize and flip.

    Rounding before the flip (a permutation) equals rounding after it, and the
    flip of 150 KB of uint8 costs a quarter of that of float32.
    """
    image, flip_seed = _resized_crop(jpeg, seed, size)
    return tf.image.stateless_random_flip_left_right(rounded_pixels(image), seed=flip_seed)


def crop_window(jpeg: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Inception's random crop of a JPEG: int32 [offset_y, offset_x, height, width].

    Area 8%-100% of the image, aspect ratio 3/4-4/3 (10 tries, then the whole
    image), read from the JPEG header alone.
    """
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(jpeg),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.concat([begin[:2], crop_size[:2]], axis=0)


def _resized_crop(jpeg: tf.Tensor, seed: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """The float32 resized crop of ``random_resized_crop_flip`` and its flip seed."""
    box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    # Decoding only the window is much cheaper than decoding the full JPEG.
    image = tf.image.decode_and_crop_jpeg(jpeg, crop_window(jpeg, box_seed), channels=3)
    image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    return image, flip_seed


def eval_resize(size: int) -> int:
    """The shorter side before the center crop: 256 for 224, in proportion otherwise."""
    return round(size * _IMAGENET_RESIZE / _IMAGENET_CROP)


def resize_center_crop(jpeg: tf.Tensor, size: int) -> tf.Tensor:
    """Resize the shorter side to ``eval_resize(size)``, then take the central size x size."""
    image = tf.io.decode_jpeg(jpeg, channels=3)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = eval_resize(size) / tf.reduce_min(shape)
    new_shape = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, new_shape, method="bilinear", antialias=True)
    top = (new_shape[0] - size) // 2
    left = (new_shape[1] - size) // 2
    return tf.image.crop_to_bounding_box(image, top, left, size, size)


# ---------------------------------------------------------------------------
# Training: stream elements (epoch, (index, example)) -> augmented batches.


def _needs_example_transform(info: DatasetInfo, image_format: str) -> bool:
    return image_format != PIXELS or info.augmentation == RESIZED_CROP_FLIP


def _example_transform(
    info: DatasetInfo, image_format: str, key: tf.Tensor, normalize: bool
) -> Callable[..., tuple]:
    """Per stream element ``(epoch, (index, example))``: decode, and the ImageNet crop.

    Keeps the element's structure, with the image as pixels in [0, 255]: uint8,
    or (ImageNet's crop with ``normalize``) float32 unrounded.
    """
    resized_crop = random_resized_crop_flip if normalize else random_resized_crop_flip_pixels

    def transform(epoch, indexed):
        index, ex = indexed
        if info.augmentation == RESIZED_CROP_FLIP:
            image = resized_crop(
                encoded(ex["image"], image_format),
                augment_seed(key, epoch, index),
                info.image_shape[0],
            )
        else:
            image = pixels(ex["image"], info, image_format)
        return epoch, (index, {"image": image, "label": ex["label"]})

    return transform


def _batch_transform(info: DatasetInfo, key: tf.Tensor, normalize: bool) -> Callable[..., dict]:
    """Per batch of stream elements: pad-crop-flip (if any), and normalization if asked.

    The batch is seeded by its first element, i.e. by (key, epoch, step), since
    batches never straddle epochs.
    """

    def transform(epochs, indexed):
        indices, ex = indexed
        image = ex["image"]
        if info.augmentation == PAD_CROP_FLIP:
            image = pad_crop_flip(image, augment_seed(key, epochs[0], indices[0]), info.padding)
        if normalize:
            image = normalized(image, info)
        return {"image": image, "label": ex["label"]}

    return transform


def augmented_batches(
    info: DatasetInfo,
    stream: tf.data.Dataset,
    image_format: str,
    key: tf.Tensor,
    batch_size: int,
    *,
    normalize: bool,
) -> tf.data.Dataset:
    """Stream elements -> augmented batches of ``batch_size``.

    ``normalize``: float32 ``normalized`` images (the scoring data); otherwise
    uint8 pixels for the device to normalize (training).
    """
    if _needs_example_transform(info, image_format):
        stream = stream.map(
            _example_transform(info, image_format, key, normalize),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    ds = stream.batch(batch_size, drop_remainder=True)
    transform = _batch_transform(info, key, normalize)
    return ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# ---------------------------------------------------------------------------
# Evaluation: no randomness.


def eval_pixels(image: tf.Tensor, info: DatasetInfo, image_format: str) -> tf.Tensor:
    """uint8 evaluation pixels: the decoded image, or ImageNet's center crop rounded."""
    if info.augmentation == RESIZED_CROP_FLIP:
        return rounded_pixels(resize_center_crop(encoded(image, image_format), info.image_shape[0]))
    return pixels(image, info, image_format)


def eval_batch(ex: dict, mask: tf.Tensor) -> dict:
    """A batch of (example, mask) pairs as one dict; the device normalizes the uint8 images
    and zeroes the padding (``on_device.normalize_pixels(..., mask=)``)."""
    return {"image": ex["image"], "label": ex["label"], "mask": mask}
