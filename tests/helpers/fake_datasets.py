"""Small synthetic datasets written in their real on-disk formats, for end-to-end tests.

``write_tiny_imagenet`` writes an unpacked ``tiny-imagenet-200`` folder;
``write_imagenet2012`` (below) writes an ``imagenet2012`` data dir that
``grasp_jax.data`` reads as it would the real one.
"""

from __future__ import annotations

import dataclasses
import io
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf


def _write_jpeg(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_jpeg(pixels).numpy())


def write_tiny_imagenet(
    root: Path,
    wnids: Sequence[str] = ("n02", "n01", "n03"),
    per_class: int = 4,
    val_wnids: Sequence[str] | None = None,
    val_pixels=None,
) -> Path:
    """Writes ``root/tiny-imagenet-200`` as the real archive unpacks, and returns it.

    Layout: ``wnids.txt`` (in the given, unsorted order), ``train/<wnid>/images/
    <wnid>_<i>.JPEG`` (the first of each class grayscale, as some real ones are)
    with ``train/<wnid>/<wnid>_boxes.txt``, ``val/images/val_<i>.JPEG`` with
    ``val/val_annotations.txt`` (file, wnid, box) and unlabeled ``test/images/``.
    Image ``val_<i>`` belongs to ``val_wnids[i]`` (default: one per wnid, in
    order); ``val_pixels(i, wnid)`` may give its 64x64x3 uint8 pixels (default:
    noise).
    """
    folder = root / "tiny-imagenet-200"
    rng = np.random.default_rng(0)

    def noise(channels=3):
        return rng.integers(0, 256, (64, 64, channels), dtype=np.uint8)

    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        for i in range(per_class):
            image = folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG"
            _write_jpeg(image, noise(channels=1 if i == 0 else 3))
        boxes = [f"{wnid}_{i}.JPEG\t0\t0\t63\t63" for i in range(per_class)]
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
    val_wnids = list(wnids if val_wnids is None else val_wnids)
    rows = [f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63" for i, wnid in enumerate(val_wnids)]
    for i, wnid in enumerate(val_wnids):
        pixels = noise() if val_pixels is None else val_pixels(i, wnid)
        _write_jpeg(folder / "val" / "images" / f"val_{i}.JPEG", pixels)
    (folder / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    _write_jpeg(folder / "test" / "images" / "test_0.JPEG", noise())
    return folder


# --------------------------------------------------------------------------
# ImageNet 2012 in its manual-download format, prepared by TFDS's own builder.


@dataclasses.dataclass(frozen=True)
class FakeImagenet:
    """What ``write_imagenet2012`` wrote.

    Attributes:
      data_dir: the TFDS data dir to pass as ``data_dir`` (holds
        ``downloads/manual/*.tar`` and, once prepared, ``imagenet2012/5.1.0``).
      wnids: the synsets with training images, in ``labels.txt`` order.
      labels: their labels (indices into TFDS's 1,000-synset list).
      train_per_class: training images per synset.
      validation_labels: the label of ``ILSVRC2012_val_<i>.JPEG``, i = 1, 2, ...
    """

    data_dir: Path
    wnids: tuple[str, ...]
    labels: tuple[int, ...]
    train_per_class: int
    validation_labels: tuple[int, ...]

    @property
    def num_train(self) -> int:
        return len(self.wnids) * self.train_per_class


def _tfds_imagenet_file(name: str) -> list[str]:
    """Lines of a text file shipped with TFDS's imagenet2012 builder."""
    import tensorflow_datasets as tfds

    path = tfds.core.tfds_path(f"datasets/imagenet2012/{name}")
    return path.read_text().strip().splitlines()


def _class_image(rng: np.random.Generator, label: int, shape: tuple[int, int]) -> np.ndarray:
    # A color per class plus noise, so that a class is learnable if a test wants it.
    color = np.random.default_rng(label).integers(40, 216, 3)
    noise = rng.integers(-40, 41, (*shape, 3))
    return np.clip(color + noise, 0, 255).astype(np.uint8)


def _add_to_tar(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(payload)
    tar.addfile(member, io.BytesIO(payload))


def _jpeg_bytes(pixels: np.ndarray) -> bytes:
    return tf.io.encode_jpeg(pixels).numpy()


def write_imagenet2012(
    data_dir: Path,
    *,
    num_validation: int = 6,
    train_per_class: int = 4,
    image_shape: tuple[int, int] = (40, 52),
    prepare: bool = True,
    num_shards: int | None = None,
) -> FakeImagenet:
    """Writes a tiny ``imagenet2012`` as the real manual download, and prepares it.

    TFDS's builder (tfds 4.9.10, ``datasets/imagenet2012``) reads
    ``<data_dir>/downloads/manual/ILSVRC2012_img_train.tar``, a tar of one
    ``<wnid>.tar`` per synset, each a tar of ``<wnid>_<i>.JPEG`` labelled by
    that wnid, and ``ILSVRC2012_img_val.tar``, a flat tar of
    ``ILSVRC2012_val_<8 digits>.JPEG`` whose labels it takes from its own
    ``validation_labels.txt``: the k-th file name in sorted order gets the k-th
    line. So the ``num_validation`` validation images get the first labels of
    that file, and the synsets with training images are those same synsets
    (each image colored by its class). With ``prepare``, TFDS's own
    ``download_and_prepare`` turns the tars into the TFDS layout that
    ``grasp_jax.data`` reads, exactly as ``tfds build imagenet2012`` would;
    ``num_shards`` makes it write each split in that many files (the real
    train split has 1,024; TFDS writes a tiny split as one file otherwise).
    """
    synsets = _tfds_imagenet_file("labels.txt")
    val_wnids = _tfds_imagenet_file("validation_labels.txt")[:num_validation]
    wnids = tuple(sorted(set(val_wnids), key=synsets.index))
    rng = np.random.default_rng(0)
    manual = data_dir / "downloads" / "manual"
    manual.mkdir(parents=True, exist_ok=True)
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train_tar:
        for wnid in wnids:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as synset_tar:
                for i in range(train_per_class):
                    pixels = _class_image(rng, synsets.index(wnid), image_shape)
                    _add_to_tar(synset_tar, f"{wnid}_{i}.JPEG", _jpeg_bytes(pixels))
            _add_to_tar(train_tar, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val_tar:
        for i, wnid in enumerate(val_wnids):
            pixels = _class_image(rng, synsets.index(wnid), image_shape)
            _add_to_tar(val_tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg_bytes(pixels))
    if prepare:
        prepare_imagenet2012(data_dir, num_shards=num_shards)
    return FakeImagenet(
        data_dir=data_dir,
        wnids=wnids,
        labels=tuple(synsets.index(w) for w in wnids),
        train_per_class=train_per_class,
        validation_labels=tuple(synsets.index(w) for w in val_wnids),
    )


def prepare_imagenet2012(data_dir: Path, num_shards: int | None = None) -> None:
    """``tfds build imagenet2012 --data_dir=data_dir`` from its ``downloads/manual`` tars.

    ``num_shards`` files per split (TFDS's ``DownloadConfig.num_shards``); None
    lets TFDS choose by size.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder("imagenet2012", data_dir=str(data_dir))
    config = tfds.download.DownloadConfig(
        manual_dir=str(data_dir / "downloads" / "manual"),
        compute_stats=tfds.download.ComputeStatsMode.SKIP,
        num_shards=num_shards,
    )
    builder.download_and_prepare(download_config=config)
