"""Tests of grasp_jax.input_pipeline.

Most logic is tested on ``digits`` (in scikit-learn's wheel, so always present
and fast); TFDS datasets use ``tfds.testing.mock_data``; the real CIFAR-10
copy in ../shared/tfds is used when present.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from grasp_jax import input_pipeline as ip

SHARED_TFDS = Path(__file__).parents[1].parent / "shared" / "tfds"
needs_cifar10 = pytest.mark.skipif(
    not (SHARED_TFDS / "cifar10").is_dir(), reason=f"no CIFAR-10 copy at {SHARED_TFDS}"
)

# digits: 1,437 training examples, so 22 steps of 64 per epoch.
DIGITS_STEPS = 1437 // 64


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def digits_train(**kwargs):
    defaults = dict(global_batch_size=64, seed=0, process_index=0, process_count=1, local_device_count=1)
    return ip.train_iterator("digits", **{**defaults, **kwargs})


# --------------------------------------------------------------------------
# Registry and layout.


def test_registry_lists_the_datasets():
    assert set(ip.dataset_names()) == {"cifar10", "cifar100", "imagenet2012", "tiny_imagenet", "digits"}
    info = ip.get_info("cifar10")
    assert (info.num_classes, info.image_shape, info.num_train, info.num_test) == (
        10,
        (32, 32, 3),
        50_000,
        10_000,
    )
    for info in ip.DATASETS.values():
        assert len(info.mean) == len(info.std) == info.image_shape[-1]


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(
        ValueError, match="valid names: cifar10, cifar100, digits, imagenet2012, tiny_imagenet"
    ):
        ip.get_info("mnist")
    with pytest.raises(ValueError, match="Unknown dataset 'svhn'"):
        ip.train_iterator("svhn", global_batch_size=8, seed=0)


def test_device_batch_layout():
    assert ip.device_batch_layout(256, process_count=2, local_device_count=4) == (4, 32)
    with pytest.raises(ValueError, match=r"global_batch_size=100 .* total device count 8 \(2 processes x 4"):
        ip.device_batch_layout(100, process_count=2, local_device_count=4)
    with pytest.raises(ValueError, match="global_batch_size=6"):
        digits_train(global_batch_size=6, local_device_count=4)


def test_shard_batch():
    batch = {"image": np.zeros((8, 2, 2, 1)), "label": np.arange(8)}
    out = ip.shard_batch(batch, 4)
    assert out["image"].shape == (4, 2, 2, 2, 1)
    np.testing.assert_array_equal(out["label"][1], [2, 3])
    with pytest.raises(ValueError, match="num_devices=3"):
        ip.shard_batch(batch, 3)


# --------------------------------------------------------------------------
# Training stream on digits.


def test_train_batch_shapes_and_dtypes():
    batch = next(digits_train(local_device_count=4))
    assert batch["image"].shape == (4, 16, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (4, 16) and batch["label"].dtype == np.int32
    assert set(batch) == {"image", "label"}
    assert ip.steps_per_epoch("digits", 64, process_count=1) == DIGITS_STEPS


def test_digits_split_is_fixed_and_stratified():
    images, labels = ip._digits_arrays("train")
    test_images, test_labels = ip._digits_arrays("test")
    assert images.shape == (1437, 8, 8, 1) and images.dtype == np.uint8
    assert len(test_labels) == 360 and 35 <= np.bincount(test_labels).min()
    again, _ = ip._digits_arrays("train")
    np.testing.assert_array_equal(images, again)


def test_one_epoch_is_a_permutation_of_the_split():
    # 1,437 = 3 x 479: one epoch with no remainder dropped.
    epoch = take(digits_train(global_batch_size=479), 3)
    labels = np.concatenate([b["label"][0] for b in epoch])
    images = np.concatenate([b["image"][0] for b in epoch])
    _, split_labels = ip._digits_arrays("train")
    assert np.array_equal(np.bincount(labels), np.bincount(split_labels))
    assert not np.array_equal(labels, split_labels)  # shuffled
    # Normalization: digits mean/std are those of this split.
    assert abs(images.mean()) < 0.01 and abs(images.std() - 1) < 0.01


def test_same_seed_same_batches_other_seed_other_batches():
    # 30 steps cross the epoch boundary at step 22.
    a = take(digits_train(seed=3), 30)
    assert_batches_equal(a, take(digits_train(seed=3), 30))
    b = take(digits_train(seed=4), 30)
    assert not np.array_equal(a[0]["label"], b[0]["label"])
    # Epochs are shuffled differently.
    assert not np.array_equal(a[0]["label"], a[DIGITS_STEPS]["label"])


@pytest.mark.parametrize("start_step", [5, DIGITS_STEPS, DIGITS_STEPS + 3])
def test_start_step_resumes_exactly(start_step):
    full = take(digits_train(seed=7), start_step + 4)
    resumed = take(digits_train(seed=7, start_step=start_step), 4)
    assert_batches_equal(full[start_step:], resumed)


def test_processes_read_disjoint_halves():
    per_process = [
        take(digits_train(global_batch_size=64, process_index=i, process_count=2, local_device_count=2), 22)
        for i in range(2)
    ]
    # 1437 // 2 = 718 examples each; 718 // 32 = 22 steps of 2 x 16.
    assert per_process[0][0]["image"].shape == (2, 16, 8, 8, 1)
    assert ip.steps_per_epoch("digits", 64, process_count=2) == 22
    rows = [
        {b.tobytes() for batch in batches for b in batch["image"].reshape(-1, 64)} for batches in per_process
    ]
    assert rows[0].isdisjoint(rows[1])


def test_pad_crop_flip_gives_flipped_crops_of_the_padded_images():
    images = tf.random.stateless_uniform([64, 6, 5, 2], seed=[1, 2], minval=1, maxval=256, dtype=tf.int32)
    out = ip._pad_crop_flip(images, tf.constant([3, 4], tf.int64), padding=2).numpy()
    padded = np.pad(images.numpy(), [(0, 0), (2, 2), (2, 2), (0, 0)])
    seen = set()
    for image, crop in zip(padded, out):
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


# --------------------------------------------------------------------------
# Evaluation.


def test_eval_covers_every_example_once():
    batches = list(
        ip.eval_iterator(
            "digits", global_batch_size=64, process_index=0, process_count=1, local_device_count=2
        )
    )
    assert len(batches) == ip.num_eval_steps("digits", 64, process_count=1) == 6
    assert batches[0]["mask"].shape == (2, 32) and batches[0]["mask"].dtype == bool
    mask = np.concatenate([b["mask"].reshape(-1) for b in batches])
    labels = np.concatenate([b["label"].reshape(-1) for b in batches])
    images = np.concatenate([b["image"].reshape(-1, 8, 8, 1) for b in batches])
    assert mask.sum() == 360 and mask[:360].all()
    _, test_labels = ip._digits_arrays("test")
    np.testing.assert_array_equal(labels[mask], test_labels)
    assert not images[~mask].any()


def test_eval_multi_process_pads_to_equal_steps():
    seen = []
    for i in range(3):
        batches = list(
            ip.eval_iterator(
                "digits", global_batch_size=48, process_index=i, process_count=3, local_device_count=1
            )
        )
        assert len(batches) == 8  # ceil(120 / 16)
        seen.append(np.concatenate([b["label"][b["mask"]] for b in batches]))
    _, test_labels = ip._digits_arrays("test")
    np.testing.assert_array_equal(np.concatenate(seen), test_labels)


# --------------------------------------------------------------------------
# Scoring batches.


def test_scoring_batch_is_class_balanced_and_ordered():
    batch = ip.scoring_batch("digits", samples_per_class=5, seed=0)
    assert batch["image"].shape == (50, 8, 8, 1) and batch["image"].dtype == np.float32
    np.testing.assert_array_equal(batch["label"], np.repeat(np.arange(10), 5))


def test_scoring_batch_takes_the_first_examples_in_stream_order():
    small = ip.scoring_batch("digits", samples_per_class=3, seed=0)
    large = ip.scoring_batch("digits", samples_per_class=5, seed=0)
    per_class = large["image"].reshape(10, 5, 8, 8, 1)[:, :3]
    np.testing.assert_array_equal(small["image"], per_class.reshape(30, 8, 8, 1))


def test_scoring_draws_are_fresh_and_reproducible():
    a = ip.scoring_batch("digits", samples_per_class=4, seed=0, draw=0)
    b = ip.scoring_batch("digits", samples_per_class=4, seed=0, draw=1)
    assert not np.array_equal(a["image"], b["image"])
    assert_batches_equal([a], [ip.scoring_batch("digits", samples_per_class=4, seed=0, draw=0)])


def test_scoring_batch_too_few_examples():
    with pytest.raises(ValueError, match="lacks 200 examples"):
        ip.scoring_batch("digits", samples_per_class=200, seed=0)


def test_first_batches_are_the_first_training_batches():
    first = ip.first_batches("digits", 3, 32, seed=2)
    assert first[0]["image"].shape == (32, 8, 8, 1)
    stream = take(
        ip.train_iterator(
            "digits", global_batch_size=32, seed=2, process_index=0, process_count=1, local_device_count=1
        ),
        3,
    )
    assert_batches_equal(first, [{k: v[0] for k, v in b.items()} for b in stream])


# --------------------------------------------------------------------------
# TFDS datasets with mock data.


def test_cifar100_mock_train_eval_and_resume():
    with tfds.testing.mock_data(num_examples=48):
        common = dict(global_batch_size=8, seed=5, process_index=0, process_count=1, local_device_count=2)
        full = take(ip.train_iterator("cifar100", **common), 8)
        assert full[0]["image"].shape == (2, 4, 32, 32, 3)
        # 6 steps per epoch: step 7 is in the second epoch.
        assert_batches_equal(full[7:], take(ip.train_iterator("cifar100", start_step=7, **common), 1))
        # Decoding before (training) or after (first_batches) the shuffle agrees.
        first = ip.first_batches("cifar100", 2, 8, seed=5)
        stream = take(ip.train_iterator("cifar100", **{**common, "local_device_count": 1}), 2)
        assert_batches_equal(first, [{k: v[0] for k, v in b.items()} for b in stream])
        evals = list(
            ip.eval_iterator(
                "cifar100", global_batch_size=32, process_index=0, process_count=1, local_device_count=1
            )
        )
        assert [int(b["mask"].sum()) for b in evals] == [32, 16]


def test_imagenet_mock_shapes():
    with tfds.testing.mock_data(num_examples=6):
        batch = next(
            ip.train_iterator(
                "imagenet2012",
                global_batch_size=4,
                seed=0,
                process_index=0,
                process_count=1,
                local_device_count=2,
            )
        )
        assert batch["image"].shape == (2, 2, 224, 224, 3) and batch["image"].dtype == np.float32
        evals = list(
            ip.eval_iterator(
                "imagenet2012", global_batch_size=4, process_index=0, process_count=1, local_device_count=1
            )
        )
        assert evals[0]["image"].shape == (1, 4, 224, 224, 3)
        assert sum(int(b["mask"].sum()) for b in evals) == 6


def test_missing_tfds_dir_names_it(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=f"cifar10 is not prepared in data_dir {tmp_path}.*tfds build cifar10"
    ):
        ip.train_iterator("cifar10", global_batch_size=8, seed=0, data_dir=str(tmp_path))


def test_imagenet_message_says_where_the_tars_go(tmp_path):
    manual = tmp_path / "downloads" / "manual"
    with pytest.raises(FileNotFoundError, match=f"ILSVRC2012_img_train.tar .* into {manual}"):
        ip.eval_iterator("imagenet2012", global_batch_size=8, data_dir=str(tmp_path))


# --------------------------------------------------------------------------
# Tiny-ImageNet from a fake tiny-imagenet-200 folder.


def make_tiny_imagenet(root: Path, wnids=("n02", "n01", "n03"), per_class=4) -> Path:
    folder = root / "tiny-imagenet-200"
    rng = np.random.default_rng(0)

    def write_jpeg(path, channels=3):
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (64, 64, channels), dtype=np.uint8)
        path.write_bytes(tf.io.encode_jpeg(pixels).numpy())

    (folder / "wnids.txt").parent.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        for i in range(per_class):
            write_jpeg(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", channels=1 if i == 0 else 3)
    rows = [f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63" for i, wnid in enumerate(wnids)]
    for row in rows:
        write_jpeg(folder / "val" / "images" / row.split("\t")[0])
    (folder / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    return folder


def test_tiny_imagenet_folder(tmp_path):
    folder = make_tiny_imagenet(tmp_path)
    # Either the folder or its parent is accepted.
    for data_dir in (folder, tmp_path):
        batch = next(
            ip.train_iterator(
                "tiny_imagenet",
                data_dir=str(data_dir),
                global_batch_size=4,
                seed=0,
                process_index=0,
                process_count=1,
                local_device_count=2,
            )
        )
        assert batch["image"].shape == (2, 2, 64, 64, 3) and batch["image"].dtype == np.float32
    evals = list(
        ip.eval_iterator(
            "tiny_imagenet",
            data_dir=str(folder),
            global_batch_size=2,
            process_index=0,
            process_count=1,
            local_device_count=1,
        )
    )
    labels = np.concatenate([b["label"][b["mask"]] for b in evals])
    # Labels follow sorted wnids: n02 -> 1, n01 -> 0, n03 -> 2 (val_0, val_1, val_2).
    np.testing.assert_array_equal(labels, [1, 0, 2])
    # The registry has 200 classes, the fake folder 3: the error says which are short.
    with pytest.raises(ValueError, match="lacks 2 examples"):
        ip.scoring_batch("tiny_imagenet", data_dir=str(folder), samples_per_class=2, seed=0)


def test_tiny_imagenet_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no tiny-imagenet-200 folder .* at {tmp_path / 'absent'}"):
        ip.train_iterator("tiny_imagenet", data_dir=str(tmp_path / "absent"), global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="pass data_dir="):
        ip.train_iterator("tiny_imagenet", global_batch_size=4, seed=0)


# --------------------------------------------------------------------------
# Real CIFAR-10.


@needs_cifar10
def test_cifar10_batches_and_normalization():
    batch = next(
        ip.train_iterator(
            "cifar10",
            data_dir=str(SHARED_TFDS),
            global_batch_size=16,
            seed=0,
            process_index=0,
            process_count=1,
            local_device_count=1,
            shuffle_buffer_size=256,
        )
    )
    assert batch["image"].shape == (1, 16, 32, 32, 3) and batch["label"].dtype == np.int32
    evals = ip.eval_dataset(
        "cifar10",
        data_dir=str(SHARED_TFDS),
        global_batch_size=1000,
        process_index=0,
        process_count=1,
        local_device_count=1,
    )
    images = np.concatenate([b["image"][0] for b in evals.take(2).as_numpy_iterator()])
    # Reference means are exact; its stds (about 0.2) are below the pixel std
    # (about 0.25), so normalized images have std about 1.2.
    np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0, atol=0.1)
    np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1.22, atol=0.1)


# --------------------------------------------------------------------------
# Devices.


def test_prefetch_to_device_single_device():
    batches = take(digits_train(local_device_count=jax.local_device_count()), 3)
    on_device = list(ip.prefetch_to_device(iter(batches), size=2))
    assert len(on_device) == 3
    assert isinstance(on_device[0]["image"], jax.Array)
    np.testing.assert_array_equal(np.asarray(on_device[2]["label"]), batches[2]["label"])
    with pytest.raises(ValueError, match="number of devices"):
        next(ip.prefetch_to_device(iter([{"x": np.zeros((jax.local_device_count() + 1, 2))}])))


@pytest.mark.slow  # a fresh interpreter importing jax and tensorflow
def test_four_fake_devices_in_a_subprocess():
    script = textwrap.dedent("""
        import jax, numpy as np
        from grasp_jax import input_pipeline as ip
        assert jax.local_device_count() == 4
        batches = ip.prefetch_to_device(ip.train_iterator("digits", global_batch_size=32, seed=0))
        batch = next(batches)
        assert batch["image"].shape == (4, 8, 8, 8, 1), batch["image"].shape
        assert len(batch["image"].sharding.device_set) == 4
        sums = jax.pmap(lambda x: x.sum())(batch["label"])
        assert sums.shape == (4,)
        print("ok")
        """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
