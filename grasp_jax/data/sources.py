"""Sources: one process's slice of a dataset split, as a fixed-order tf.data.Dataset.

A source loader is ``(info, split, data_dir, shard) -> Source``, with
``shard`` a ``layout.Shard`` (which process of how many, and whether the split's
remainder is dropped); each registry entry (``registry.DATASETS``) names its
loader. Nothing is ever downloaded: a missing dataset is an error that
names the folder looked in and says how to fill it.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from grasp_jax.data import staging
from grasp_jax.data.layout import Shard
from grasp_jax.data.seeds import permutation
from grasp_jax.data.spec import DatasetInfo

# Image formats a source's ``image`` may hold.
PIXELS = "pixels"  # uint8 HWC
ENCODED = "encoded"  # PNG/JPEG bytes
FILE = "file"  # a path to such bytes, read only when the image is needed

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_IMAGENET_ORDER_SEED = 0
_DIGITS_TEST_SIZE = 360
_DIGITS_SPLIT_SEED = 0
# Files read at once when reading in shuffled file order (TFDS's default
# interleave cycle); one record from each in turn, so the shuffle buffer
# mixes this many random files from its first fill on.
INTERLEAVED_FILES = 16


@dataclasses.dataclass(frozen=True)
class Source:
    """One process's slice of a split, in a fixed order.

    ``dataset`` yields {'image', 'label' int32}; ``image_format`` says what
    ``image`` holds (``PIXELS``, ``ENCODED`` or ``FILE``). ``in_file_order``,
    where the slice is stored in several files, maps a stateless key (int64
    [2]) to the same examples with the files read in an order drawn from the
    key (each file's records in their stored order); None where there is no
    such choice.
    """

    dataset: tf.data.Dataset
    num_examples: int
    image_format: str
    in_file_order: Callable[[tf.Tensor], tf.data.Dataset] | None = None


SourceLoader = Callable[["DatasetInfo", str, "str | None", Shard], Source]


def _hide_gpus_from_tf() -> None:
    # TF must not reserve accelerator memory that JAX needs; tf.data runs on CPU.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialized its devices; nothing to do.
        pass


def load_source(
    info: DatasetInfo,
    split: str,
    data_dir: str | None,
    index: int,
    count: int,
    drop_remainder: bool,
) -> Source:
    """Process ``index`` of ``count``'s slice of ``split``, read by the entry's loader."""
    _hide_gpus_from_tf()
    return info.source(info, split, data_dir, Shard(index, count, drop_remainder))


def _array_source(
    images: np.ndarray, labels: np.ndarray, shard: Shard, image_format: str
) -> Source:
    start, stop = shard.range(len(labels))
    ds = tf.data.Dataset.from_tensor_slices(
        {"image": images[start:stop], "label": labels[start:stop]}
    )
    return Source(ds, stop - start, image_format=image_format)


# ---------------------------------------------------------------------------
# TensorFlow Datasets.


def tfds_source(info: DatasetInfo, split: str, data_dir: str | None, shard: Shard) -> Source:
    """A prepared TFDS dataset named ``info.name``, images kept encoded; a bucket
    ``data_dir`` may be read from a local copy (grasp_jax.data.staging)."""
    data_dir = staging.local_data_dir(data_dir, info.name, read_whole=info.cache_decoded)
    builder = tfds.builder(info.name, data_dir=data_dir)
    subsplit = tfds.split_for_jax_process(
        split,
        process_index=shard.index,
        process_count=shard.count,
        drop_remainder=shard.drop_remainder,
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
    ds = ds.map(_image_and_label, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    in_file_order = tfds_file_order_reader(builder, subsplit)
    return Source(ds, num_examples, image_format=ENCODED, in_file_order=in_file_order)


def _image_and_label(example: dict) -> dict:
    return {"image": example["image"], "label": tf.cast(example["label"], tf.int32)}


def tfds_file_order_reader(
    builder: Any, split: str
) -> Callable[[tf.Tensor], tf.data.Dataset] | None:
    """``key -> dataset``: ``split`` of a prepared TFDS dataset, its files in a drawn order.

    The split's file instructions (file, records skipped, records taken; a
    process's sub-split cuts the files at its ends) are permuted by
    ``seeds.permutation(key, n)`` and read ``INTERLEAVED_FILES`` at a time, one
    record from each in turn, deterministically. The examples are exactly
    those of the fixed-order dataset, each once, images still encoded. None
    if the split is one file (nothing to choose) or not in TFRecord files.
    """
    try:
        instructions = builder.info.splits[split].file_instructions
    except KeyError:  # No split files recorded (tfds.testing.mock_data): nothing to order.
        return None
    if len(instructions) < 2:
        return None
    if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
        warnings.warn(
            f"{builder.info.name}: files are {builder.info.file_format}, not TFRecord; "
            "they are read in a fixed order.",
            stacklevel=2,
        )
        return None
    paths = tf.constant([os.fspath(f.filename) for f in instructions])
    skips = tf.constant([f.skip for f in instructions], tf.int64)
    takes = tf.constant([f.take for f in instructions], tf.int64)
    features = builder.info.features

    def records(i: tf.Tensor) -> tf.data.Dataset:
        return tf.data.TFRecordDataset(paths[i]).skip(skips[i]).take(takes[i])

    def parse(record: tf.Tensor) -> dict:
        example = features.deserialize_example(
            record, decoders={"image": tfds.decode.SkipDecoding()}
        )
        return _image_and_label(example)

    def read(key: tf.Tensor) -> tf.data.Dataset:
        order = tf.data.Dataset.from_tensor_slices(permutation(key, len(instructions)))
        ds = order.interleave(
            records,
            cycle_length=min(INTERLEAVED_FILES, len(instructions)),
            block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    return read


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


# ---------------------------------------------------------------------------
# Tiny-ImageNet, from the unpacked tiny-imagenet-200 folder.


def tiny_imagenet_root(data_dir: str | None) -> Path:
    """The tiny-imagenet-200 folder: ``data_dir`` itself or its child of that name."""
    if data_dir is None:
        raise ValueError(
            "tiny_imagenet is not in the TFDS catalog: pass data_dir=<the unpacked "
            f"tiny-imagenet-200 folder> (from {TINY_IMAGENET_URL})."
        )
    given = Path(data_dir)
    for root in (given, given / "tiny-imagenet-200"):
        if (root / "wnids.txt").is_file():
            return root
    raise FileNotFoundError(
        f"tiny_imagenet: no tiny-imagenet-200 folder (with wnids.txt) at "
        f"{given} or {given / 'tiny-imagenet-200'}. Download {TINY_IMAGENET_URL}"
        f" and unzip it into {given}."
    )


def tiny_imagenet_files(
    info: DatasetInfo, split: str, data_dir: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """File paths and labels; label = index of the wnid in sorted order.

    Sorted order matches torchvision's ImageFolder, which the reference used.
    Training files are put in one fixed pseudo-random order (as TFDS does when
    preparing a dataset), so that each process's contiguous slice holds all
    classes rather than a block of them. Validation labels come from
    ``val/val_annotations.txt``: ``val/images/`` holds every class in one
    folder, so reading it as an ImageFolder (as the authors' issue #6 found)
    gives one wrong label for all and under 1% accuracy.
    """
    root = tiny_imagenet_root(data_dir)
    wnids = sorted(
        line.strip() for line in (root / "wnids.txt").read_text().splitlines() if line.strip()
    )
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
        rows = sorted(
            line.split("\t")[:2] for line in annotations.read_text().splitlines() if line.strip()
        )
        paths = [str(root / "val" / "images" / name) for name, _ in rows]
        labels = [label_of[wnid] for _, wnid in rows]
    return np.asarray(paths, dtype=object), np.asarray(labels, dtype=np.int32)


def tiny_imagenet_source(
    info: DatasetInfo, split: str, data_dir: str | None, shard: Shard
) -> Source:
    """Tiny-ImageNet's JPEG files, read lazily (see ``tiny_imagenet_files``)."""
    images, labels = tiny_imagenet_files(info, split, data_dir)
    return _array_source(images, labels, shard, image_format=FILE)


# ---------------------------------------------------------------------------
# scikit-learn's 8x8 digits.


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified split of sklearn's digits, as uint8 [N, 8, 8, 1]."""
    # Imported here: only this dataset needs scikit-learn.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    pixels, labels = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(
        pixels,
        labels,
        test_size=_DIGITS_TEST_SIZE,
        stratify=labels,
        random_state=_DIGITS_SPLIT_SEED,
    )
    x, y = (train_x, train_y) if split == "train" else (test_x, test_y)
    # Values are 0..16; map them onto 0..255 so every source shares one scale.
    images = np.rint(x * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8, 1)
    return images, y.astype(np.int32)


def digits_source(info: DatasetInfo, split: str, data_dir: str | None, shard: Shard) -> Source:
    """sklearn's digits as pixels (``data_dir`` is ignored)."""
    images, labels = digits_arrays(split)
    return _array_source(images, labels, shard, image_format=PIXELS)
