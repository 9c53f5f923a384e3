"""The local copy of a bucket data dir (grasp_jax.data.staging), on fsspec's in-memory
file system: the copying logic without a network or an emulator (the object-store
tests run it against a GCS emulator)."""

import fsspec
import pytest

from grasp_jax.data import staging


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    monkeypatch.setenv(staging.CACHE_ENV, str(tmp_path / "cache"))
    staging._staged.cache_clear()
    fs = fsspec.filesystem("memory")
    fs.pipe({"/tfds/toy/1.0.0/dataset_info.json": b"{}",
             "/tfds/toy/1.0.0/toy-train.tfrecord-00000-of-00001": b"x" * 100,
             "/tfds/other/1.0.0/dataset_info.json": b"{}"})
    yield fs, tmp_path / "cache"
    fs.rm("/tfds", recursive=True)
    staging._staged.cache_clear()


def test_which_data_dirs_are_copied():
    assert not staging.is_copied(None, read_whole=True)
    assert not staging.is_copied("/data/tfds", read_whole=True)
    assert staging.is_copied("gs://b/tfds", read_whole=True)
    assert not staging.is_copied("gs://b/tfds", read_whole=False)  # TensorFlow streams it
    assert staging.is_copied("s3://b/tfds", read_whole=False)  # TensorFlow cannot read s3
    assert staging.local_data_dir("/data/tfds", "toy", read_whole=True) == "/data/tfds"
    assert staging.local_data_dir("gs://b/tfds", "toy", read_whole=False) == "gs://b/tfds"


def test_cache_dir_mirrors_the_bucket_path(monkeypatch, tmp_path):
    monkeypatch.setenv(staging.CACHE_ENV, str(tmp_path))
    assert staging.cache_dir_for("gs://b/some/tfds/") == tmp_path / "gs" / "b" / "some" / "tfds"


def test_the_dataset_folder_is_copied_once_and_again_when_a_size_changes(bucket):
    fs, cache = bucket
    local = staging._staged("memory://tfds", "toy")
    copy = cache / "memory" / "tfds"
    assert local == str(copy)
    shard = copy / "toy" / "1.0.0" / "toy-train.tfrecord-00000-of-00001"
    assert shard.read_bytes() == b"x" * 100 and (copy / "toy/1.0.0/dataset_info.json").exists()
    assert not (copy / "other").exists()  # only the dataset's own folder

    # Same sizes: nothing is fetched (a local edit of equal size survives).
    shard.write_bytes(b"y" * 100)
    staging._staged.cache_clear()
    staging._staged("memory://tfds", "toy")
    assert shard.read_bytes() == b"y" * 100

    # The bucket's file changed size: it is copied again, and no partial file is left.
    fs.pipe("/tfds/toy/1.0.0/toy-train.tfrecord-00000-of-00001", b"z" * 60)
    staging._staged.cache_clear()
    staging._staged("memory://tfds", "toy")
    assert shard.read_bytes() == b"z" * 60
    assert not [p for p in copy.rglob("*") if ".part-" in p.name]


def test_an_unlistable_data_dir_is_one_line_naming_it(monkeypatch, bucket):
    def refuse(*args, **kwargs):
        raise ConnectionError("Cannot connect to host 127.0.0.1:9\nretries exhausted")

    with monkeypatch.context() as patch, pytest.raises(staging.DataDirUnreadable) as e:
        patch.setattr(type(fsspec.filesystem("memory")), "find", refuse)
        staging._staged("memory://tfds", "toy")
    assert str(e.value).startswith("data_dir memory://tfds cannot be listed (ConnectionError:")
    assert "\n" not in str(e.value)
