"""grasp_jax.data on a synthetic imagenet2012 in the real manual-download format.

``fake_datasets.write_imagenet2012`` writes ``ILSVRC2012_img_train.tar`` (a tar
of per-synset tars of JPEGs) and ``ILSVRC2012_img_val.tar`` under
``downloads/manual`` and has TFDS's own imagenet2012 builder prepare them, so
these tests read what ``tfds build imagenet2012`` would have written.
"""

from __future__ import annotations

import dataclasses
import tarfile

import numpy as np
import pytest

from grasp_jax import data
from grasp_jax.data import seeds, sources, streams

from tests.helpers.data import ONE_DEVICE, assert_batches_equal, eval_batches, take, train_batches
from tests.helpers.fake_datasets import write_imagenet2012

SMALL = data.get_info("imagenet2012", image_size=32)


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return write_imagenet2012(tmp_path_factory.mktemp("imagenet"))


def class_of_color(images: np.ndarray, labels: tuple[int, ...]) -> np.ndarray:
    """The class whose color (see fake_datasets) is nearest each image's mean color.

    ``images``: uint8 pixels (training, evaluation) or normalized float32 (scoring).
    """
    info = data.get_info("imagenet2012")
    pixels = images.mean(axis=(1, 2))
    if images.dtype == np.float32:
        pixels = (pixels * np.asarray(info.std) + np.asarray(info.mean)) * 255
    colors = np.stack([np.random.default_rng(label).integers(40, 216, 3) for label in labels])
    nearest = np.argmin(((pixels[:, None] - colors[None]) ** 2).sum(-1), axis=1)
    return np.asarray(labels)[nearest]


def test_the_manual_tars_have_the_real_layout(fake):
    manual = fake.data_dir / "downloads" / "manual"
    with tarfile.open(manual / "ILSVRC2012_img_train.tar") as train:
        assert sorted(train.getnames()) == sorted(f"{w}.tar" for w in fake.wnids)
        inner = tarfile.open(fileobj=train.extractfile(f"{fake.wnids[0]}.tar"))
        assert inner.getnames()[0] == f"{fake.wnids[0]}_0.JPEG"
    with tarfile.open(manual / "ILSVRC2012_img_val.tar") as val:
        assert val.getnames()[0] == "ILSVRC2012_val_00000001.JPEG"
    # The first validation labels of TFDS's validation_labels.txt.
    assert fake.validation_labels[:3] == (65, 970, 230)


def test_training_stream_reads_every_image_once_per_epoch(fake):
    data_dir = str(fake.data_dir)
    steps = data.steps_per_epoch(SMALL, 8, data_dir=data_dir, process_count=1)
    assert steps == fake.num_train // 8 == 3
    common = dict(global_batch_size=8, seed=0, data_dir=data_dir)
    epoch = take(train_batches(SMALL, **common, **{**ONE_DEVICE, "local_device_count": 2}), steps)
    assert epoch[0]["image"].shape == (2, 4, 32, 32, 3) and epoch[0]["image"].dtype == np.uint8
    labels = np.concatenate([b["label"].reshape(-1) for b in epoch])
    assert sorted(labels.tolist()) == sorted(list(fake.labels) * fake.train_per_class)
    images = np.concatenate([b["image"].reshape(-1, 32, 32, 3) for b in epoch])
    np.testing.assert_array_equal(class_of_color(images, fake.labels), labels)
    # Resuming at step 4 (in epoch 1) gives the uninterrupted stream's batch.
    full = take(train_batches(SMALL, **common, **ONE_DEVICE), 5)
    assert_batches_equal(
        full[4:], take(train_batches(SMALL, start_step=4, **common, **ONE_DEVICE), 1)
    )


@pytest.mark.parametrize("info", [SMALL, data.get_info("imagenet2012")], ids=["32px", "224px"])
def test_validation_labels_match_the_images(fake, info):
    evals = eval_batches(info, global_batch_size=4, data_dir=str(fake.data_dir), **ONE_DEVICE)
    size = info.image_shape[0]
    assert [b["image"].shape for b in evals] == [(1, 4, size, size, 3)] * 2
    mask = np.concatenate([b["mask"][0] for b in evals])
    labels = np.concatenate([b["label"][0] for b in evals])[mask]
    images = np.concatenate([b["image"][0] for b in evals])[mask]
    assert mask.sum() == len(fake.validation_labels)
    assert sorted(labels.tolist()) == sorted(fake.validation_labels)
    np.testing.assert_array_equal(class_of_color(images, fake.labels), labels)


def test_scoring_stream_is_regenerable(fake):
    batches = data.scoring_stream(SMALL, 6, 5, seed=0, data_dir=str(fake.data_dir))
    first, second = list(batches()), list(batches())
    assert [b["image"].shape for b in first] == [(5, 32, 32, 3)] * 6
    assert_batches_equal(first, second)
    assert_batches_equal(list(batches(start=4)), first[4:])
    labels = np.concatenate([b["label"] for b in first])
    assert set(labels.tolist()) <= set(fake.labels)
    images = np.concatenate([b["image"] for b in first])
    np.testing.assert_array_equal(class_of_color(images, fake.labels), labels)


# --------------------------------------------------------------------------
# File order: a split in several files, shuffle buffer smaller than the split.

SHARDS = 4


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    # 24 training images in 4 files of 6 (the real train split: 1,024 files).
    return write_imagenet2012(tmp_path_factory.mktemp("imagenet_sharded"), num_shards=SHARDS)


def file_order(source, seed, epoch, stream=0):
    key = seeds.file_order_key(seeds.stream_key(seed, stream), epoch)
    return [ex["image"] for ex in source.in_file_order(key).as_numpy_iterator()]


def stored_images(source):
    return [ex["image"] for ex in source.dataset.as_numpy_iterator()]


def test_the_file_order_depends_on_seed_and_epoch_and_reads_each_record_once(sharded):
    source = sources.load_source(SMALL, "train", str(sharded.data_dir), 0, 1, drop_remainder=True)
    assert source.num_examples == sharded.num_train
    stored = stored_images(source)
    orders = {(s, e): file_order(source, s, e) for s, e in [(0, 0), (0, 1), (1, 0)]}
    for order in orders.values():
        assert sorted(order) == sorted(stored)
    assert orders[0, 0] == file_order(source, 0, 0)  # a pure function of (seed, epoch)
    assert orders[0, 0] != stored
    assert orders[0, 0] != orders[1, 0] and orders[0, 0] != orders[0, 1]


def test_the_files_are_permuted_whole(sharded):
    # One record from each of the (<= 16) files in turn: record k of the order
    # is record k // SHARDS of file k % SHARDS of the permutation.
    source = sources.load_source(SMALL, "train", str(sharded.data_dir), 0, 1, drop_remainder=True)
    stored, per_file = stored_images(source), sharded.num_train // SHARDS
    files = [stored[f * per_file : (f + 1) * per_file] for f in range(SHARDS)]
    key = seeds.file_order_key(seeds.stream_key(0, 0), 0)
    perm = seeds.permutation(key, SHARDS).numpy()
    assert sorted(perm.tolist()) == list(range(SHARDS))
    expected = [files[perm[k % SHARDS]][k // SHARDS] for k in range(sharded.num_train)]
    assert file_order(source, 0, 0) == expected


def test_process_slices_in_file_order_are_disjoint_and_complete(sharded):
    # 3 processes of 8 images: the slices cut the 6-image files mid-file.
    source = sources.load_source(SMALL, "train", str(sharded.data_dir), 0, 1, drop_remainder=True)
    slices = []
    for index in range(3):
        part = sources.load_source(SMALL, "train", str(sharded.data_dir), index, 3, True)
        order = file_order(part, 0, 0, stream=index)
        assert sorted(order) == sorted(stored_images(part))
        slices += order
    assert sorted(slices) == sorted(stored_images(source))


def test_a_small_buffer_reads_the_files_in_a_seeded_order(sharded):
    # With a buffer of 1 an epoch is the file order alone: it must vary with
    # the seed and the epoch (a fixed file order gave every seed the same).
    common = dict(global_batch_size=8, data_dir=str(sharded.data_dir), shuffle_buffer_size=1)
    steps = data.steps_per_epoch(SMALL, 8, data_dir=str(sharded.data_dir), process_count=1)

    def epoch_labels(seed):
        batches = take(train_batches(SMALL, seed=seed, **common, **ONE_DEVICE), 2 * steps)
        epochs = (batches[:steps], batches[steps:])
        return [np.concatenate([b["label"].ravel() for b in epoch]) for epoch in epochs]

    (seed0_e0, seed0_e1), (seed1_e0, _) = epoch_labels(0), epoch_labels(1)
    for labels in (seed0_e0, seed0_e1, seed1_e0):
        assert sorted(labels.tolist()) == sorted(list(sharded.labels) * sharded.train_per_class)
    assert seed0_e0.tolist() != seed1_e0.tolist() and seed0_e0.tolist() != seed0_e1.tolist()


def test_resuming_in_file_order_matches_the_uninterrupted_stream(sharded):
    common = dict(global_batch_size=8, seed=0, data_dir=str(sharded.data_dir))
    info = dataclasses.replace(SMALL, shuffle_buffer_size=8)  # < 24: file order is on
    full = take(train_batches(info, **common, **ONE_DEVICE), 7)
    resumed = take(train_batches(info, start_step=4, **common, **ONE_DEVICE), 3)
    assert_batches_equal(full[4:], resumed)
    labels = np.concatenate([b["label"].ravel() for b in full[:3]])
    assert sorted(labels.tolist()) == sorted(list(sharded.labels) * sharded.train_per_class)


def test_the_file_order_is_used_only_when_the_buffer_is_smaller_than_the_slice(sharded):
    source = sources.load_source(SMALL, "train", str(sharded.data_dir), 0, 1, drop_remainder=True)
    key = seeds.stream_key(0, 0)
    assert streams.epoch_reader(source, source.dataset, source.num_examples)(key) is source.dataset
    assert streams.epoch_reader(source, source.dataset, 8) is source.in_file_order
