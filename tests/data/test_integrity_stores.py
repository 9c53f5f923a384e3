"""The dataset integrity checks on an object-store data_dir go through etils.epath
rather than being skipped: exercised here on local files through that code path."""

import shutil

import pytest

from grasp_jax.data import get_info, integrity

from tests.helpers.fake_datasets import write_imagenet2012


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return write_imagenet2012(tmp_path_factory.mktemp("imagenet"), num_validation=6,
                              train_per_class=6, num_shards=3)


@pytest.fixture
def through_epath(imagenet, tmp_path, monkeypatch):
    """A copy of the dataset, every path of which the checks open as an object-store path."""
    data_dir = tmp_path / "tfds"
    shutil.copytree(imagenet.data_dir / "imagenet2012", data_dir / "imagenet2012")
    monkeypatch.setattr(integrity, "_is_store", lambda path: True)
    return data_dir


def test_a_url_data_dir_is_an_epath_not_a_folded_local_path():
    from etils import epath

    root = integrity.dataset_root("gs://bucket/tfds")
    assert isinstance(root, epath.Path) and str(root) == "gs://bucket/tfds"
    assert str(integrity.dataset_root("/local/tfds")) == "/local/tfds"


def test_an_intact_dataset_passes_the_checks_through_epath(through_epath):
    from etils import epath

    info = get_info("imagenet2012")
    shards = integrity.split_shards(info, "train", str(through_epath))
    assert shards and all(isinstance(p, epath.Path) for p, _ in shards)
    integrity.check_dataset(info, str(through_epath), records=False)


def test_a_truncated_shard_is_named_through_epath(through_epath):
    info = get_info("imagenet2012")
    target = integrity.split_shards(info, "train", str(through_epath))[1][0]
    raw = target.read_bytes()
    target.write_bytes(raw[: len(raw) - 40])
    with pytest.raises(integrity.DatasetDamaged, match="cut short") as e:
        integrity.check_split_files(info, "train", str(through_epath))
    assert str(target) in str(e.value)
