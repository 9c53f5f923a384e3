"""Input pipelines: tfds/tf.data datasets, augmentation, scoring batches, sharding.

Datasets (see ``DATASETS``): ``cifar10``, ``cifar100`` and ``imagenet2012`` from
TensorFlow Datasets; ``tiny_imagenet`` read from the standard unpacked
``tiny-imagenet-200`` folder; ``digits``, the 8x8 handwritten digits that
scikit-learn ships inside its wheel (a real dataset that needs no download).
Nothing is ever downloaded: a missing dataset is an error that names the folder
looked in and says how to fill it.

Batch format
    A dict of numpy arrays: ``image`` float32 NHWC (normalized per channel),
    ``label`` int32, and for evaluation ``mask`` bool (False on padding). The
    training and evaluation iterators give every array two leading dimensions
    ``[local_device_count, per_device_batch, ...]``, ready for ``jax.pmap``;
    ``prefetch_to_device`` moves such batches onto the local devices.

Sharding
    Each process reads its own contiguous slice of the split
    (``tfds.split_for_jax_process``) and builds batches of
    ``global_batch_size // process_count`` examples.

Determinism and resuming
    The training stream is a pure function of (dataset, seed, process, batch
    layout). Epoch ``e`` is the process's slice shuffled with a seed derived from
    (seed, process, e) and truncated to whole batches. Augmentation uses
    stateless random ops seeded from (seed, process, e, i), where ``i`` is the
    position in the epoch of the batch's first example (ImageNet: of each
    example, whose crops differ in size before resizing). Therefore ``train_iterator(..., start_step=s)`` yields exactly the batches
    ``s, s+1, ...`` of an uninterrupted run, without replaying earlier epochs.
    (A global ``tf.random.set_seed`` changes tf.data's shuffle seeds, so keep it
    fixed between a run and its resumption.)
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

Batch = dict[str, np.ndarray]

# Salts folded into the per-epoch key so that the shuffle seed and the
# augmentation seeds of one epoch are independent random streams.
_SHUFFLE_SALT = 0
_AUGMENT_SALT = 1
_MAX_SHUFFLE_SEED = 2**62

_PAD_CROP_FLIP = "pad_crop_flip"
_RESIZED_CROP_FLIP = "resized_crop_flip"
_NORMALIZE_ONLY = "normalize_only"

_IMAGENET_RESIZE = 256
_TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


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
      source: ``"tfds"``, ``"tiny_imagenet_folder"`` or ``"sklearn_digits"``.
      augmentation: training augmentation, one of ``"pad_crop_flip"``,
        ``"resized_crop_flip"``, ``"normalize_only"``.
      padding: zero padding (pixels per side) before the random crop.
      cache_decoded: keep the decoded training images in memory after the first
        epoch (small datasets only).
      shuffle_buffer_size: tf.data shuffle buffer; None means the whole split
        (an exact uniform permutation per epoch).
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
    source: str
    augmentation: str
    padding: int = 0
    cache_decoded: bool = False
    shuffle_buffer_size: int | None = None
    manual_download: bool = False


# Normalization constants are those of the authors' reference code, so that
# numbers are comparable with the paper (the CIFAR "std" values there are not
# the true pixel std, which is about 0.25; they are kept on purpose).
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
            source="tfds",
            augmentation=_PAD_CROP_FLIP,
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
            source="tfds",
            augmentation=_PAD_CROP_FLIP,
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
            source="tiny_imagenet_folder",
            augmentation=_PAD_CROP_FLIP,
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
            source="tfds",
            augmentation=_RESIZED_CROP_FLIP,
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
            source="sklearn_digits",
            augmentation=_NORMALIZE_ONLY,
        ),
    }
)

_TINY_IMAGENET_ORDER_SEED = 0
_DIGITS_TEST_SIZE = 360
_DIGITS_SPLIT_SEED = 0


def dataset_names() -> tuple[str, ...]:
    """Names accepted by every function taking a dataset ``name``."""
    return tuple(sorted(DATASETS))


def get_info(name: str) -> DatasetInfo:
    """The registry entry for ``name``; ValueError listing valid names if unknown."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(dataset_names())}.")
    return DATASETS[name]


# ---------------------------------------------------------------------------
# Batch layout across processes and devices.


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process_index={index} must lie in [0, process_count={count}).")
    return index, count


def device_batch_layout(
    global_batch_size: int, *, process_count: int | None = None, local_device_count: int | None = None
) -> tuple[int, int]:
    """Splits a global batch into ``(local_device_count, per_device_batch)``.

    Every process holds ``global_batch_size // process_count`` examples, spread
    evenly over its local devices.

    Raises:
      ValueError: naming the numbers, if the global batch does not divide evenly
        over all devices of all processes.
    """
    count = jax.process_count() if process_count is None else process_count
    devices = jax.local_device_count() if local_device_count is None else local_device_count
    if count < 1 or devices < 1:
        raise ValueError(f"process_count={count} and local_device_count={devices} must be positive.")
    total_devices = count * devices
    if global_batch_size < 1 or global_batch_size % total_devices:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"the total device count {total_devices} ({count} processes x "
            f"{devices} local devices)."
        )
    return devices, global_batch_size // total_devices


def shard_batch(batch: Mapping[str, np.ndarray], num_devices: int) -> Batch:
    """Reshapes each ``[B, ...]`` array of a batch to ``[num_devices, B // num_devices, ...]``."""
    out = {}
    for key, value in batch.items():
        if value.shape[0] % num_devices:
            raise ValueError(
                f"batch[{key!r}] has leading size {value.shape[0]}, not "
                f"divisible by num_devices={num_devices}."
            )
        out[key] = value.reshape((num_devices, -1) + value.shape[1:])
    return out


def _reshape_for_devices(num_devices: int) -> Callable[[dict], dict]:
    """tf.data counterpart of ``shard_batch``, applied after batching."""

    def reshape(batch):
        return {
            k: tf.reshape(v, tf.concat([[num_devices, -1], tf.shape(v)[1:]], 0)) for k, v in batch.items()
        }

    return reshape


def _process_range(num_examples: int, index: int, count: int, drop_remainder: bool) -> tuple[int, int]:
    """Contiguous [start, stop) of process ``index``, as tfds.even_splits does."""
    per, extra = divmod(num_examples, count)
    if drop_remainder:
        return index * per, (index + 1) * per
    start = index * per + min(index, extra)
    return start, start + per + (1 if index < extra else 0)


# ---------------------------------------------------------------------------
# Sources: a fixed-order dataset of {'image', 'label'} for one process.


@dataclasses.dataclass(frozen=True)
class _Source:
    """One process's slice of a split, in a fixed order.

    ``dataset`` yields {'image', 'label' int32}; ``image_format`` says what
    ``image`` holds: ``"pixels"`` (uint8 HWC), ``"encoded"`` (PNG/JPEG bytes) or
    ``"file"`` (a path to such bytes, read only when the image is needed).
    """

    dataset: tf.data.Dataset
    num_examples: int
    image_format: str


def _hide_gpus_from_tf() -> None:
    # TF must not reserve accelerator memory that JAX needs; tf.data runs on CPU.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialized its devices; nothing to do.
        pass


def _load_source(
    info: DatasetInfo, split: str, data_dir: str | None, index: int, count: int, drop_remainder: bool
) -> _Source:
    _hide_gpus_from_tf()
    if info.source == "tfds":
        return _tfds_source(info, split, data_dir, index, count, drop_remainder)
    if info.source == "tiny_imagenet_folder":
        images, labels = _tiny_imagenet_files(info, split, data_dir)
        start, stop = _process_range(len(labels), index, count, drop_remainder)
        ds = tf.data.Dataset.from_tensor_slices({"image": images[start:stop], "label": labels[start:stop]})
        return _Source(ds, stop - start, image_format="file")
    if info.source == "sklearn_digits":
        images, labels = _digits_arrays(split)
        start, stop = _process_range(len(labels), index, count, drop_remainder)
        ds = tf.data.Dataset.from_tensor_slices({"image": images[start:stop], "label": labels[start:stop]})
        return _Source(ds, stop - start, image_format="pixels")
    raise AssertionError(f"unhandled source {info.source!r}")


def _tfds_source(
    info: DatasetInfo, split: str, data_dir: str | None, index: int, count: int, drop_remainder: bool
) -> _Source:
    builder = tfds.builder(info.name, data_dir=data_dir)
    subsplit = tfds.split_for_jax_process(
        split, process_index=index, process_count=count, drop_remainder=drop_remainder
    )
    try:
        # Keep the bytes: decoding after shuffling/filtering is cheaper, and
        # ImageNet crops are decoded with decode_and_crop_jpeg.
        ds = builder.as_dataset(
            split=subsplit, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
        )
    except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
        # tfds signals "not prepared" with an AssertionError.
        raise FileNotFoundError(_missing_tfds_message(info, builder, data_dir)) from e
    num_examples = int(ds.cardinality())
    if num_examples < 0:
        num_examples = builder.info.splits[subsplit].num_examples
    ds = ds.map(
        lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)},
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return _Source(ds, num_examples, image_format="encoded")


def _missing_tfds_message(info: DatasetInfo, builder: Any, data_dir: str | None) -> str:
    # builder.data_dir is <root>/<name>/<version>.
    root = data_dir if data_dir is not None else str(Path(builder.data_dir).parents[1])
    if info.manual_download:
        return (
            f"{info.name} is not prepared in data_dir {root} (looked for "
            f"{builder.data_dir}). TFDS cannot download ImageNet: download "
            "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
            f"https://image-net.org into {Path(root) / 'downloads' / 'manual'} "
            "(where TFDS expects the tar files), then run "
            f"`tfds build {info.name} --data_dir={root}`."
        )
    return (
        f"{info.name} is not prepared in data_dir {root} (looked for "
        f"{builder.data_dir}); this library never downloads. On a machine "
        f"with internet access run `tfds build {info.name} --data_dir={root}` "
        "(or copy a prepared copy there), or pass the data_dir / set "
        "TFDS_DATA_DIR where it already is."
    )


def _tiny_imagenet_root(data_dir: str | None) -> Path:
    if data_dir is None:
        raise ValueError(
            "tiny_imagenet is not in the TFDS catalog: pass data_dir=<the unpacked "
            f"tiny-imagenet-200 folder> (from {_TINY_IMAGENET_URL})."
        )
    given = Path(data_dir)
    for root in (given, given / "tiny-imagenet-200"):
        if (root / "wnids.txt").is_file():
            return root
    raise FileNotFoundError(
        f"tiny_imagenet: no tiny-imagenet-200 folder (with wnids.txt) at "
        f"{given} or {given / 'tiny-imagenet-200'}. Download {_TINY_IMAGENET_URL}"
        f" and unzip it into {given}."
    )


def _tiny_imagenet_files(
    info: DatasetInfo, split: str, data_dir: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """File paths and labels; label = index of the wnid in sorted order.

    Sorted order matches torchvision's ImageFolder, which the reference used.
    Training files are put in one fixed pseudo-random order (as TFDS does when
    preparing a dataset), so that each process's contiguous slice holds all
    classes rather than a block of them.
    """
    root = _tiny_imagenet_root(data_dir)
    wnids = sorted(line.strip() for line in (root / "wnids.txt").read_text().splitlines() if line.strip())
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    paths, labels = [], []
    if split == info.train_split:
        for wnid in wnids:
            folder = root / "train" / wnid / "images"
            if not folder.is_dir():
                raise FileNotFoundError(f"tiny_imagenet: missing folder {folder}.")
            files = sorted(folder.glob("*.JPEG"))
            paths += [str(p) for p in files]
            labels += [label_of[wnid]] * len(files)
        order = np.random.default_rng(_TINY_IMAGENET_ORDER_SEED).permutation(len(paths))
        paths, labels = [paths[i] for i in order], [labels[i] for i in order]
    else:
        annotations = root / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise FileNotFoundError(f"tiny_imagenet: missing {annotations}.")
        rows = sorted(line.split("\t")[:2] for line in annotations.read_text().splitlines() if line.strip())
        paths = [str(root / "val" / "images" / name) for name, _ in rows]
        labels = [label_of[wnid] for _, wnid in rows]
    return np.asarray(paths, dtype=object), np.asarray(labels, dtype=np.int32)


def _digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified split of sklearn's digits, as uint8 [N, 8, 8, 1]."""
    # Imported here: only this dataset needs scikit-learn.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    pixels, labels = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(
        pixels, labels, test_size=_DIGITS_TEST_SIZE, stratify=labels, random_state=_DIGITS_SPLIT_SEED
    )
    x, y = (train_x, train_y) if split == "train" else (test_x, test_y)
    # Values are 0..16; map them onto 0..255 so every source shares one scale.
    images = np.rint(x * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8, 1)
    return images, y.astype(np.int32)


# ---------------------------------------------------------------------------
# Transforms (pure TF functions). Augmentation that has the same shape for
# every image works on whole batches: tf.data's per-example overhead, not the
# arithmetic, dominates the cost of small images.


def _encoded(image: tf.Tensor, image_format: str) -> tf.Tensor:
    """The encoded bytes of an ``"encoded"`` or ``"file"`` image."""
    return tf.io.read_file(image) if image_format == "file" else image


def _pixels(image: tf.Tensor, info: DatasetInfo, image_format: str) -> tf.Tensor:
    """uint8 HWC pixels of a source image in any format, checked against the registry shape."""
    if image_format == "pixels":
        return image
    decoded = tf.io.decode_image(
        _encoded(image, image_format), channels=info.image_shape[-1], expand_animations=False
    )
    return tf.ensure_shape(decoded, info.image_shape)


def _normalize(image: tf.Tensor, info: DatasetInfo) -> tf.Tensor:
    """uint8 or float pixels in [0, 255] -> float32 (x / 255 - mean) / std."""
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(info.mean)) / tf.constant(info.std)


def _pad_crop_flip(images: tf.Tensor, seed: tf.Tensor, padding: int) -> tf.Tensor:
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


def _random_resized_crop_flip(encoded: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
    """Inception-style crop (area 8%-100%, aspect 3/4-4/3), resize, flip."""
    box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.image.extract_jpeg_shape(encoded)
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
    # Decoding only the window is much cheaper than decoding the full JPEG.
    image = tf.image.decode_and_crop_jpeg(encoded, tf.stack([offset_y, offset_x, height, width]), channels=3)
    image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def _resize_center_crop(encoded: tf.Tensor, size: int) -> tf.Tensor:
    """Resize the shorter side to 256, then take the central size x size."""
    image = tf.io.decode_jpeg(encoded, channels=3)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = _IMAGENET_RESIZE / tf.reduce_min(shape)
    new_shape = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, new_shape, method="bilinear", antialias=True)
    top = (new_shape[0] - size) // 2
    left = (new_shape[1] - size) // 2
    return tf.image.crop_to_bounding_box(image, top, left, size, size)


def _augment_seed(key: tf.Tensor, epoch: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """Seed of example ``index`` of epoch ``epoch``, or of the batch it starts.

    Derived in the (parallel) transforms rather than in the stream, which is
    produced one element at a time and would be slowed by any per-element work.
    """
    return _fold_in(_fold_in(_fold_in(key, epoch), _AUGMENT_SALT), index)


def _needs_example_transform(info: DatasetInfo, image_format: str) -> bool:
    return image_format != "pixels" or info.augmentation == _RESIZED_CROP_FLIP


def _example_transform(info: DatasetInfo, image_format: str, key: tf.Tensor) -> Callable[..., tuple]:
    """Per stream element ``(epoch, (index, example))``: decode, and the ImageNet crop.

    Keeps the element's structure, with the image as pixels in [0, 255].
    """

    def transform(epoch, indexed):
        index, ex = indexed
        if info.augmentation == _RESIZED_CROP_FLIP:
            image = _random_resized_crop_flip(
                _encoded(ex["image"], image_format), _augment_seed(key, epoch, index), info.image_shape[0]
            )
        else:
            image = _pixels(ex["image"], info, image_format)
        return epoch, (index, {"image": image, "label": ex["label"]})

    return transform


def _batch_transform(info: DatasetInfo, key: tf.Tensor) -> Callable[..., dict]:
    """Per batch of stream elements: pad-crop-flip (if any) and normalization.

    The batch is seeded by its first element, i.e. by (key, epoch, step), since
    batches never straddle epochs.
    """

    def transform(epochs, indexed):
        indices, ex = indexed
        image = ex["image"]
        if info.augmentation == _PAD_CROP_FLIP:
            image = _pad_crop_flip(image, _augment_seed(key, epochs[0], indices[0]), info.padding)
        return {"image": _normalize(image, info), "label": ex["label"]}

    return transform


def _augmented_batches(
    info: DatasetInfo, stream: tf.data.Dataset, image_format: str, key: tf.Tensor, batch_size: int
) -> tf.data.Dataset:
    """Stream elements -> augmented, normalized batches of ``batch_size``."""
    if _needs_example_transform(info, image_format):
        stream = stream.map(
            _example_transform(info, image_format, key),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    ds = stream.batch(batch_size, drop_remainder=True)
    return ds.map(_batch_transform(info, key), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _eval_pixels(image: tf.Tensor, info: DatasetInfo, image_format: str) -> tf.Tensor:
    """Evaluation pixels in [0, 255]: the decoded image, or ImageNet's center crop."""
    if info.augmentation == _RESIZED_CROP_FLIP:
        return _resize_center_crop(_encoded(image, image_format), info.image_shape[0])
    return _pixels(image, info, image_format)


def _eval_batch_transform(info: DatasetInfo) -> Callable[..., dict]:
    """Normalizes a batch; padding images become exact zeros."""

    def transform(ex, mask):
        image = tf.where(mask[:, None, None, None], _normalize(ex["image"], info), 0.0)
        return {"image": image, "label": ex["label"], "mask": mask}

    return transform


# ---------------------------------------------------------------------------
# The shuffled example stream shared by training, scoring and first_batches.


def _fold_in(key: tf.Tensor, data: Any) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64))


def _stream_key(seed: int, stream: int) -> tf.Tensor:
    """Root key of one stream: training uses stream = process index."""
    return tf.constant([seed, stream], dtype=tf.int64)


def _epoch_examples(
    source: tf.data.Dataset, key: tf.Tensor, epoch: Any, buffer_size: int, take: int
) -> tf.data.Dataset:
    """Epoch ``epoch`` of a stream: elements ``(epoch, (index, example))``.

    The order is shuffled with a seed from (key, epoch) and truncated to
    ``take``; augmentation is seeded from (key, epoch, index).
    Neither depends on what came before, which makes resuming at any step exact.
    """
    epoch = tf.cast(epoch, tf.int64)
    shuffle_seed = tf.random.stateless_uniform(
        [],
        seed=_fold_in(_fold_in(key, epoch), _SHUFFLE_SALT),
        minval=0,
        maxval=_MAX_SHUFFLE_SEED,
        dtype=tf.int64,
    )
    ds = source.shuffle(buffer_size, seed=shuffle_seed, reshuffle_each_iteration=False)
    # No per-element function here: it would run serially and cap throughput.
    return tf.data.Dataset.zip((tf.data.Dataset.from_tensors(epoch).repeat(), ds.take(take).enumerate()))


def _deterministic(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def _train_dataset_for(
    info: DatasetInfo,
    source: _Source,
    *,
    key: tf.Tensor,
    local_batch: int,
    num_devices: int,
    start_step: int,
    shuffle_buffer_size: int | None,
    decode_before_shuffle: bool,
) -> tf.data.Dataset:
    steps = _steps_per_epoch(source.num_examples, local_batch, info)
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0.")
    first_epoch, step_in_epoch = divmod(start_step, steps)
    buffer_size = shuffle_buffer_size or info.shuffle_buffer_size or source.num_examples
    examples = source.dataset
    image_format = source.image_format
    # A buffer holding the whole split reads all of it every epoch, so the
    # cache below is complete after epoch one (a partial cache is discarded).
    if decode_before_shuffle and image_format != "pixels" and buffer_size >= source.num_examples:
        # Decoding is deterministic, so decoding before or after the shuffle gives
        # identical batches; before + cache saves re-decoding every epoch.
        examples = examples.map(
            lambda ex: {"image": _pixels(ex["image"], info, image_format), "label": ex["label"]},
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        ).cache()
        image_format = "pixels"
    epochs = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
    ds = epochs.flat_map(lambda e: _epoch_examples(examples, key, e, buffer_size, steps * local_batch))
    # Only the first epoch is partial; skipping happens before any decoding.
    ds = ds.skip(step_in_epoch * local_batch)
    ds = _augmented_batches(info, ds, image_format, key, local_batch)
    ds = ds.map(_reshape_for_devices(num_devices))
    return _deterministic(ds.prefetch(tf.data.AUTOTUNE))


def _steps_per_epoch(num_examples: int, local_batch: int, info: DatasetInfo) -> int:
    steps = num_examples // local_batch
    if steps == 0:
        raise ValueError(
            f"{info.name}: the per-process batch of {local_batch} is larger than "
            f"the {num_examples} training examples this process holds."
        )
    return steps


# ---------------------------------------------------------------------------
# Public pipelines.


def steps_per_epoch(
    name: str, global_batch_size: int, *, data_dir: str | None = None, process_count: int | None = None
) -> int:
    """Training steps in one epoch (the remainder of each epoch is dropped)."""
    info = get_info(name)
    _, count = _process(0, process_count)
    device_batch_layout(global_batch_size, process_count=count, local_device_count=1)
    local_batch = global_batch_size // count
    source = _load_source(info, info.train_split, data_dir, 0, count, drop_remainder=True)
    return _steps_per_epoch(source.num_examples, local_batch, info)


def train_dataset(
    name: str,
    *,
    global_batch_size: int,
    seed: int,
    data_dir: str | None = None,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
    shuffle_buffer_size: int | None = None,
) -> tf.data.Dataset:
    """Infinite, augmented, shuffled training batches of this process.

    Args:
      name: a registry name (see ``dataset_names()``).
      global_batch_size: examples per step summed over all processes.
      seed: fixes the order and augmentation of every epoch.
      data_dir: TFDS data dir, or the tiny-imagenet-200 folder (or its parent);
        ignored by ``digits``. None means TFDS's default.
      start_step: first step to produce; the stream from here equals that of an
        uninterrupted run from step 0.
      process_index, process_count, local_device_count: default to JAX's.
      shuffle_buffer_size: overrides the registry's (whole split by default).

    Returns:
      A tf.data.Dataset of {'image' [D, b, H, W, C] float32, 'label' [D, b]
      int32} with D local devices and b examples per device.
    """
    info = get_info(name)
    index, count = _process(process_index, process_count)
    num_devices, per_device = device_batch_layout(
        global_batch_size, process_count=count, local_device_count=local_device_count
    )
    source = _load_source(info, info.train_split, data_dir, index, count, drop_remainder=True)
    return _train_dataset_for(
        info,
        source,
        key=_stream_key(seed, index),
        local_batch=num_devices * per_device,
        num_devices=num_devices,
        start_step=start_step,
        shuffle_buffer_size=shuffle_buffer_size,
        decode_before_shuffle=info.cache_decoded,
    )


def train_iterator(
    name: str,
    *,
    global_batch_size: int,
    seed: int,
    data_dir: str | None = None,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
    shuffle_buffer_size: int | None = None,
) -> Iterator[Batch]:
    """``train_dataset`` as numpy batches (no device placement); see there."""
    return train_dataset(
        name,
        global_batch_size=global_batch_size,
        seed=seed,
        data_dir=data_dir,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
        local_device_count=local_device_count,
        shuffle_buffer_size=shuffle_buffer_size,
    ).as_numpy_iterator()


def num_eval_steps(
    name: str, global_batch_size: int, *, data_dir: str | None = None, process_count: int | None = None
) -> int:
    """Evaluation batches per process: enough for the largest process slice."""
    info = get_info(name)
    _, count = _process(0, process_count)
    device_batch_layout(global_batch_size, process_count=count, local_device_count=1)
    total = _load_source(info, info.test_split, data_dir, 0, 1, drop_remainder=False).num_examples
    return _eval_steps(total, count, global_batch_size // count)


def _eval_steps(total: int, count: int, local_batch: int) -> int:
    # Every process runs the same number of (collective) eval steps, so all
    # pad up to the largest slice, which has ceil(total / count) examples.
    return max(1, math.ceil(math.ceil(total / count) / local_batch))


def eval_dataset(
    name: str,
    *,
    global_batch_size: int,
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
) -> tf.data.Dataset:
    """One pass over this process's slice of the evaluation split.

    Padded with zero images to ``num_eval_steps`` full batches; ``mask`` is False
    on padding, so summing ``mask``-weighted metrics over all processes counts
    every test example exactly once. The dataset can be iterated repeatedly.

    Returns:
      A tf.data.Dataset of {'image' [D, b, H, W, C] float32, 'label' [D, b]
      int32, 'mask' [D, b] bool}.
    """
    info = get_info(name)
    index, count = _process(process_index, process_count)
    num_devices, per_device = device_batch_layout(
        global_batch_size, process_count=count, local_device_count=local_device_count
    )
    local_batch = num_devices * per_device
    source = _load_source(info, info.test_split, data_dir, index, count, drop_remainder=False)
    total = _load_source(info, info.test_split, data_dir, 0, 1, drop_remainder=False).num_examples
    steps = _eval_steps(total, count, local_batch)
    images = source.dataset.map(
        lambda ex: {"image": _eval_pixels(ex["image"], info, source.image_format), "label": ex["label"]},
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if info.cache_decoded:
        images = images.cache()  # Repeated evaluations skip decoding.
    # Elements are (example, mask); zipping in the mask avoids a serial per-element map.
    real = tf.data.Dataset.zip((images, tf.data.Dataset.from_tensors(True).repeat()))
    blank = {
        "image": tf.zeros(info.image_shape, images.element_spec["image"].dtype),
        "label": tf.constant(0, tf.int32),
    }
    padding = tf.data.Dataset.from_tensors((blank, False)).repeat(steps * local_batch - source.num_examples)
    ds = real.concatenate(padding).batch(local_batch, drop_remainder=True)
    ds = ds.map(_eval_batch_transform(info), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.map(_reshape_for_devices(num_devices))
    return _deterministic(ds.prefetch(tf.data.AUTOTUNE))


def eval_iterator(
    name: str,
    *,
    global_batch_size: int,
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
) -> Iterator[Batch]:
    """``eval_dataset`` as numpy batches (no device placement); see there."""
    return eval_dataset(
        name,
        global_batch_size=global_batch_size,
        data_dir=data_dir,
        process_index=process_index,
        process_count=process_count,
        local_device_count=local_device_count,
    ).as_numpy_iterator()


def prefetch_to_device(
    batches: Iterable[Any],
    size: int = 2,
    devices: Sequence[jax.Device] | None = None,
    axis_name: str = "devices",
) -> Iterator[Any]:
    """Puts batches on the local devices ``size`` steps ahead of their use.

    Every array's leading dimension (the device dimension of the iterators
    above) is split over ``devices`` (default: ``jax.local_devices()``), which
    is the layout ``jax.pmap`` expects, so transfers overlap computation.
    ``axis_name`` names the mesh axis of the resulting sharding (e.g. the pmap
    axis name, so batches and pmap outputs share one mesh).
    """
    devices = list(jax.local_devices() if devices is None else devices)
    mesh = jax.sharding.Mesh(np.asarray(devices), (axis_name,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis_name))

    def put(x):
        if x.shape[0] != len(devices):
            raise ValueError(
                f"leading dimension {x.shape[0]} of a batch array "
                f"must equal the number of devices {len(devices)}."
            )
        return jax.device_put(x, sharding)

    iterator = iter(batches)
    queue = collections.deque()
    for batch in itertools.islice(iterator, size):
        queue.append(jax.tree_util.tree_map(put, batch))
    while queue:
        yield queue.popleft()
        for batch in itertools.islice(iterator, 1):
            queue.append(jax.tree_util.tree_map(put, batch))


# ---------------------------------------------------------------------------
# Batches for pruning scores.


def _flag(keep: tf.Tensor, element: tuple) -> tf.Tensor:
    return keep


def _without_flag(keep: tf.Tensor, element: tuple) -> tuple:
    return element


def scoring_batch(
    name: str, *, samples_per_class: int, seed: int, draw: int = 0, data_dir: str | None = None
) -> Batch:
    """A class-balanced batch of augmented training images, as GraSP scores with.

    Walks a freshly shuffled, augmented pass over the whole training split and
    keeps the first ``samples_per_class`` examples of each class in stream order,
    then orders them class by class (all of class 0, then class 1, ...), as the
    authors' ``GraSP_fetch_data`` does; so the two halves of the batch hold
    different classes. Each ``draw`` (one per scoring iteration) is an
    independent stream, and the result ignores the process: every host gets the
    same batch, so all hosts compute the same masks.

    Returns:
      {'image' [num_classes * samples_per_class, H, W, C] float32,
       'label' [num_classes * samples_per_class] int32}, unsharded.
    """
    info = get_info(name)
    if samples_per_class < 1:
        raise ValueError(f"samples_per_class={samples_per_class} must be >= 1.")
    if draw < 0:
        raise ValueError(f"draw={draw} must be >= 0.")
    source = _load_source(info, info.train_split, data_dir, 0, 1, drop_remainder=True)
    # Negative stream ids never collide with training streams (process ids).
    key = _stream_key(seed, -1 - draw)
    stream = _epoch_examples(
        source.dataset, key, 0, info.shuffle_buffer_size or source.num_examples, source.num_examples
    )
    wanted = info.num_classes * samples_per_class

    def count_and_flag(counts, element):
        # Flags the first samples_per_class examples of each class; selecting
        # before decoding means only the kept images are decoded and augmented.
        label = element[1][1]["label"]
        keep = counts[label] < samples_per_class
        counts = tf.tensor_scatter_nd_add(counts, [[label]], [1])
        return counts, (keep, element)

    kept = stream.scan(tf.zeros([info.num_classes], tf.int32), count_and_flag)
    kept = kept.filter(_flag).map(_without_flag)
    kept = kept.take(wanted)
    batches = _augmented_batches(info, kept, source.image_format, key, wanted)
    batch = next(_deterministic(batches).as_numpy_iterator(), None)
    if batch is None:  # The split ran out first; a second, label-only pass says where.
        labels = np.fromiter((element[1][1]["label"] for element in kept.as_numpy_iterator()), np.int32)
        found = np.bincount(labels, minlength=info.num_classes)
        short = {c: int(n) for c, n in enumerate(found) if n < samples_per_class}
        raise ValueError(
            f"{name}: the training split lacks {samples_per_class} examples for "
            f"some classes (class: count found) {short}."
        )
    # A stable sort keeps stream order within each class.
    order = np.argsort(batch["label"], kind="stable")
    return {"image": batch["image"][order], "label": batch["label"][order]}


def first_batches(
    name: str, num_batches: int, batch_size: int, *, seed: int, data_dir: str | None = None
) -> list[Batch]:
    """The first ``num_batches`` training batches of a single-process run.

    What the reference scores ImageNet with. Independent of the calling
    process, so every host gets the same list.

    Returns:
      A list of {'image' [batch_size, H, W, C] float32, 'label' [batch_size]
      int32}, unsharded.
    """
    info = get_info(name)
    if num_batches < 1 or batch_size < 1:
        raise ValueError(f"num_batches={num_batches} and batch_size={batch_size} must be >= 1.")
    source = _load_source(info, info.train_split, data_dir, 0, 1, drop_remainder=True)
    ds = _train_dataset_for(
        info,
        source,
        key=_stream_key(seed, 0),
        local_batch=batch_size,
        num_devices=1,
        start_step=0,
        shuffle_buffer_size=None,
        # A one-off read: decoding the whole split up front would be wasted.
        decode_before_shuffle=False,
    )
    return [{k: v[0] for k, v in batch.items()} for batch in ds.take(num_batches).as_numpy_iterator()]
