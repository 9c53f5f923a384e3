"""Damaged dataset files are named in one line before a run writes anything.

The runner's checks (``experiments/run.py``, ``grasp_jax/data/integrity.py``) are
exercised on copies of a prepared dataset, damaged as a disk, a copy or a
download would damage them: a missing ``dataset_info.json``, junk in it, a shard
cut short, one flipped byte in a record's payload. A small imagenet2012 prepared
by TFDS's own builder (``fake_datasets.write_imagenet2012``, in several shards)
covers the multi-file split and the streamed path, where a damaged record is
only met while reading.
"""

import shutil
import struct
from pathlib import Path

import pytest

from grasp_jax.data import get_info, integrity

from experiments import run
from tests.helpers.fake_datasets import write_imagenet2012
from tests.helpers.runs import run_cli

TFDS_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "tfds"
CIFAR = TFDS_DIR / "cifar10"
needs_cifar = pytest.mark.skipif(not CIFAR.is_dir(), reason="needs the CIFAR-10 copy in "
                                 "../shared/tfds")


def _flip_payload_byte(path: Path, record: int = 3) -> None:
    """Flip one bit inside the payload of the ``record``-th record (not its framing)."""
    data = bytearray(path.read_bytes())
    offset = 0
    for _ in range(record):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        offset += length + integrity.RECORD_FRAMING_BYTES
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    data[offset + 12 + length // 2] ^= 0x04
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


@pytest.fixture
def cifar_copy(tmp_path):
    data_dir = tmp_path / "tfds"
    shutil.copytree(CIFAR, data_dir / "cifar10")
    for p in data_dir.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return data_dir


def _shard(data_dir: Path, split: str) -> Path:
    return next((data_dir / "cifar10" / "3.0.2").glob(f"cifar10-{split}.tfrecord-*"))


@needs_cifar
@pytest.mark.parametrize("damage, file, needle", [
    ("missing_info", "dataset_info.json", "is missing"),
    ("junk_info", "dataset_info.json", "not valid JSON"),
    ("truncated_train", "train", "cut short"),
    ("flipped_train", "train", "damaged record"),
    ("flipped_test", "test", "damaged record"),
    ("missing_test", "test", "is missing"),
])
def test_a_damaged_cifar10_is_refused_naming_the_file_with_nothing_written(
        cifar_copy, tmp_path, capsys, damage, file, needle):
    folder = cifar_copy / "cifar10" / "3.0.2"
    target = folder / file if file.endswith(".json") else _shard(cifar_copy, file)
    if damage.startswith("missing"):
        target.unlink()
    elif damage == "junk_info":
        target.write_text('{"name": "cifar10", "splits": [')
    elif damage.startswith("truncated"):
        _truncate(target)
    else:
        _flip_payload_byte(target)
    workdir = tmp_path / "w"
    with pytest.raises(SystemExit) as e:
        run.main(["--dataset", "cifar10", "--arch", "small_vgg", "--data_dir", str(cifar_copy),
                  "--max_steps", "1", "--workdir", str(workdir)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(target) in err and needle in err, err
    assert "tfds build cifar10" in err and "--overwrite" in err, err
    assert not workdir.exists()


@needs_cifar
def test_the_intact_cifar10_copy_passes_every_check():
    info = get_info("cifar10")
    integrity.check_dataset(info, str(TFDS_DIR), records=True)


# --------------------------------------------------------------------------
# A split in several files; a damaged record met while streaming.

SHARDS = 3


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return write_imagenet2012(tmp_path_factory.mktemp("imagenet"), num_validation=6,
                              train_per_class=6, num_shards=SHARDS)


@pytest.fixture
def imagenet_copy(imagenet, tmp_path):
    data_dir = tmp_path / "tfds"
    shutil.copytree(imagenet.data_dir / "imagenet2012", data_dir / "imagenet2012")
    return data_dir


def _train_files(data_dir: Path) -> list[Path]:
    info = get_info("imagenet2012")
    return [p for p, _ in integrity.split_shards(info, "train", str(data_dir))]


def test_an_intact_multi_file_split_passes_and_its_sizes_add_up(imagenet_copy):
    info = get_info("imagenet2012")
    shards = integrity.split_shards(info, "train", str(imagenet_copy))
    assert len(shards) == SHARDS
    integrity.check_dataset(info, str(imagenet_copy), records=True)
    # The size check's premise, as tfds 4.9 writes it: files = numBytes + 16 bytes a record.
    total = sum(p.stat().st_size for p, _ in shards)
    assert total == integrity._split_bytes(info, "train", str(imagenet_copy)) + 16 * sum(
        n for _, n in shards)


def test_a_truncated_shard_among_several_is_named_by_the_size_check(imagenet_copy):
    target = _train_files(imagenet_copy)[1]
    _truncate(target)
    with pytest.raises(integrity.DatasetDamaged, match="cut short") as e:
        integrity.check_split_files(get_info("imagenet2012"), "train", str(imagenet_copy))
    assert str(target) in str(e.value) and "--manual_dir" in str(e.value)


@pytest.mark.parametrize("damage", ["missing_info", "truncated_shard"])
def test_a_damaged_imagenet_is_refused_by_the_runner_with_nothing_written(
        imagenet_copy, tmp_path, capsys, damage):
    folder = imagenet_copy / "imagenet2012" / "5.1.0"
    if damage == "missing_info":
        target = folder / "dataset_info.json"
        target.unlink()
    else:
        target = _train_files(imagenet_copy)[2]
        _truncate(target)
    workdir = tmp_path / "w"
    with pytest.raises(SystemExit) as e:
        run.main(["--dataset", "imagenet2012", "--arch", "small_vgg", "--image_size", "32",
                  "--method", "random", "--data_dir", str(imagenet_copy),
                  "--max_steps", "1", "--workdir", str(workdir)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(target) in err and "tfds build imagenet2012" in err, err
    assert not workdir.exists()


def test_a_flipped_byte_passes_the_size_check_and_fails_record_verification(imagenet_copy):
    info = get_info("imagenet2012")
    target = _train_files(imagenet_copy)[2]
    _flip_payload_byte(target, record=1)
    integrity.check_split_files(info, "train", str(imagenet_copy))  # sizes are intact
    with pytest.raises(integrity.DatasetDamaged, match="damaged record") as e:
        integrity.verify_records(info, "train", str(imagenet_copy))
    assert str(target) in str(e.value)


def test_a_damaged_record_met_while_streaming_is_named_with_its_file(imagenet_copy):
    import tensorflow as tf

    from grasp_jax import data

    info = get_info("imagenet2012", image_size=16)
    target = _train_files(imagenet_copy)[1]
    _flip_payload_byte(target, record=2)
    ds = data.train_dataset(info, global_batch_size=4, seed=0, data_dir=str(imagenet_copy),
                            process_index=0, process_count=1, local_device_count=1)
    with pytest.raises(tf.errors.DataLossError) as e:
        for _ in ds.take(50).as_numpy_iterator():
            pass
    assert integrity.is_data_loss(e.value)
    message = integrity.damaged_record_message(e.value, info, str(imagenet_copy))
    assert str(target) in message and "tfds build imagenet2012" in message, message
    assert "\n" not in message


@pytest.mark.slow
def test_a_run_meeting_a_damaged_streamed_record_exits_1_in_one_line(imagenet_copy, tmp_path):
    target = _train_files(imagenet_copy)[0]
    _flip_payload_byte(target, record=1)
    r = run_cli(["--dataset", "imagenet2012", "--arch", "small_vgg", "--image_size", "32",
                 "--method", "random", "--sparsity", "0.5", "--batch_size", "4",
                 "--max_steps", "3", "--no-gradient_flow", "--data_dir", str(imagenet_copy),
                 "--workdir", str(tmp_path / "w")], timeout=600)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and str(target) in errors[0], r.stderr[-3000:]
