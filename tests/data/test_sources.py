"""Tests of grasp_jax.data.sources: digits, the Tiny-ImageNet folder, TFDS errors."""

from __future__ import annotations

import numpy as np
import pytest

from grasp_jax import data
from grasp_jax.data import sources

from tests.helpers.data import ONE_DEVICE, eval_batches, train_batches
from tests.helpers.fake_datasets import write_tiny_imagenet


def test_digits_split_is_fixed_and_stratified():
    images, labels = sources.digits_arrays("train")
    test_images, test_labels = sources.digits_arrays("test")
    assert images.shape == (1437, 8, 8, 1) and images.dtype == np.uint8
    assert len(test_labels) == 360 and 35 <= np.bincount(test_labels).min()
    again, _ = sources.digits_arrays("train")
    np.testing.assert_array_equal(images, again)


def test_missing_tfds_dir_names_it(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=f"cifar10 is not prepared in data_dir {tmp_path}.*tfds build cifar10",
    ):
        data.train_dataset("cifar10", global_batch_size=8, seed=0, data_dir=str(tmp_path))


def test_imagenet_message_says_where_the_tars_go(tmp_path):
    manual = tmp_path / "downloads" / "manual"
    with pytest.raises(FileNotFoundError, match=f"ILSVRC2012_img_train.tar .* into {manual}"):
        data.eval_dataset("imagenet2012", global_batch_size=8, data_dir=str(tmp_path))


# --------------------------------------------------------------------------
# Tiny-ImageNet from a fake tiny-imagenet-200 folder.


def test_tiny_imagenet_folder(tmp_path):
    folder = write_tiny_imagenet(tmp_path)
    # Either the folder or its parent is accepted.
    for data_dir in (folder, tmp_path):
        batch = next(
            train_batches(
                "tiny_imagenet",
                data_dir=str(data_dir),
                global_batch_size=4,
                seed=0,
                process_index=0,
                process_count=1,
                local_device_count=2,
            )
        )
        assert batch["image"].shape == (2, 2, 64, 64, 3) and batch["image"].dtype == np.uint8
    evals = eval_batches("tiny_imagenet", data_dir=str(folder), global_batch_size=2, **ONE_DEVICE)
    labels = np.concatenate([b["label"][b["mask"]] for b in evals])
    # Labels follow sorted wnids: n02 -> 1, n01 -> 0, n03 -> 2 (val_0, val_1, val_2).
    np.testing.assert_array_equal(labels, [1, 0, 2])
    # The registry has 200 classes, the fake folder 3: the error says which are short.
    with pytest.raises(ValueError, match="lacks 2 examples"):
        data.scoring_batch("tiny_imagenet", data_dir=str(folder), samples_per_class=2, seed=0)


def test_tiny_imagenet_validation_labels_come_from_the_annotations(tmp_path):
    # The authors' issue #6: val/images/ holds every class in one folder, so reading
    # val/ as an ImageFolder labels all of it alike (under 1% accuracy). Here each
    # validation image is one flat gray level that encodes its class, and the
    # annotation file lists the classes out of order.
    wnids = ("n03", "n01", "n02")
    val_wnids = ["n02", "n01", "n03", "n01", "n03", "n02"]
    level = {wnid: 40 + 80 * i for i, wnid in enumerate(sorted(wnids))}

    def gray(i, wnid):
        return np.full((64, 64, 3), level[wnid], np.uint8)

    folder = write_tiny_imagenet(tmp_path, wnids, per_class=1, val_wnids=val_wnids, val_pixels=gray)
    files, file_labels = sources.tiny_imagenet_files(
        data.get_info("tiny_imagenet"), "val", str(folder)
    )
    assert [f.rsplit("/", 2)[-2:] for f in files][0] == ["images", "val_0.JPEG"]
    np.testing.assert_array_equal(file_labels, [sorted(wnids).index(w) for w in val_wnids])
    evals = eval_batches("tiny_imagenet", data_dir=str(folder), global_batch_size=3, **ONE_DEVICE)
    images = np.concatenate([b["image"][0] for b in evals])
    labels = np.concatenate([b["label"][0] for b in evals])
    # Read the gray level back from the uint8 pixels of channel 0.
    seen = np.rint(images[..., 0].mean(axis=(1, 2)))
    expected = np.asarray([level[sorted(wnids)[label]] for label in labels])
    np.testing.assert_allclose(seen, expected, atol=2)
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_tiny_imagenet_missing_dir(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=f"no tiny-imagenet-200 folder .* at {tmp_path / 'absent'}"
    ):
        data.train_dataset(
            "tiny_imagenet", data_dir=str(tmp_path / "absent"), global_batch_size=4, seed=0
        )
    with pytest.raises(ValueError, match="pass data_dir="):
        data.train_dataset("tiny_imagenet", global_batch_size=4, seed=0)
