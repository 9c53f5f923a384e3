"""Small synthetic datasets written in their real on-disk formats, for end-to-end tests.

``write_tiny_imagenet`` writes an unpacked ``tiny-imagenet-200`` folder;
``write_imagenet2012`` (below) writes an ``imagenet2012`` data dir that
``grasp_jax.data`` reads as it would the real one.
"""

from __future__ import annotations

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
