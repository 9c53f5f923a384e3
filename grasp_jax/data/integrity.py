"""Checks that a prepared TFDS dataset's files are whole, with errors that name the file.

A prepared TFDS dataset is a folder ``<data_dir>/<name>/<version>`` holding
``dataset_info.json`` (per split: the records of each shard file,
``shardLengths``, and ``numBytes``, the sum of the serialized records' sizes),
``features.json`` and one TFRecord file per shard. A TFRecord file is a chain
of records, each framed as::

    uint64 length | uint32 masked CRC-32C of length | length bytes | uint32 masked CRC-32C of data

so a whole split's files hold exactly ``numBytes + 16 x records`` bytes (tfds
4.9 writes ``numBytes`` that way), and a file holds a whole chain of
``shardLengths[i]`` records ending at its last byte.

Two levels, both before a run writes anything:

* :func:`check_split_files` — ``dataset_info.json`` is present, readable JSON
  that lists the split (``features.json``, where present, readable JSON too),
  every shard file is present and readable, and the files' sizes add up;
  where they do not, each file's record chain is walked (headers only) to
  name the file that is cut short or padded. Cheap at any size.
* :func:`verify_records` — every record's CRCs are read and checked, and each
  file's record count compared with ``shardLengths``: a flipped byte anywhere
  is named with its file. Reads the whole split, so it is meant for the splits
  a run reads into memory at start anyway (CIFAR).

A bucket data dir (``gs://``, ``s3://``) that a run reads from a local copy
(:mod:`grasp_jax.data.staging`: the splits read whole at start, anything on s3) is
checked in that copy, made (or brought up to date) before the checks; one that
TensorFlow streams from GCS itself (ImageNet) is checked on the store, through
``etils.epath`` (the path library TFDS and orbax use): presence, sizes and record
chains are read from the bucket, not skipped.

A streamed split too large to verify at start (ImageNet) can still meet a
damaged record mid-run; :func:`damaged_record_message` turns TensorFlow's
``DataLossError`` (which names only an offset) into one line naming the file.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from grasp_jax.data import staging
from grasp_jax.data.spec import DatasetInfo

# Bytes framing each TFRecord record: length (8), its CRC (4), the data's CRC (4).
RECORD_FRAMING_BYTES = 16
_VERIFY_BATCH = 1024  # records per tf.data element while verifying: per-record overhead dominates


class DatasetDamaged(ValueError):
    """A dataset file is missing, unreadable or damaged; the message names it and the fix."""


def is_tfds(info: DatasetInfo) -> bool:
    """Whether the entry is read from a prepared TFDS folder (the files checked here)."""
    from grasp_jax.data import sources

    return info.source is sources.tfds_source


OBJECT_STORE_SCHEMES = ("gs://", "s3://")


def _is_store(path: str) -> bool:
    return str(path).startswith(OBJECT_STORE_SCHEMES)


def _as_path(path: str) -> Any:
    """A ``pathlib.Path`` for a local path; an ``etils.epath.Path`` for an object-store URL
    (``pathlib`` would fold ``gs://b/x`` into the local ``gs:/b/x``, which never exists,
    and the check would pass without looking)."""
    if _is_store(path):
        from etils import epath

        return epath.Path(path)
    return Path(path)


def _size_and_mtime_ns(path: Any) -> tuple[int, int]:
    stat = path.stat()
    if hasattr(stat, "st_size"):
        return stat.st_size, stat.st_mtime_ns
    return int(stat.length), int(float(stat.mtime or 0) * 1e9)  # etils' StatResult


def dataset_root(data_dir: str | None) -> Any:
    """The TFDS data dir: ``data_dir``, else TFDS's default (``$TFDS_DATA_DIR`` or ~). For a
    bucket ``data_dir`` with a local copy (grasp_jax.data.staging), that copy, which is what
    TFDS reads; without one (a dataset TensorFlow streams from the bucket), the bucket."""
    if staging.is_url(data_dir):
        copy = staging.cache_dir_for(str(data_dir).rstrip("/"))
        if copy.is_dir():
            return copy
    if data_dir is not None:
        return _as_path(data_dir)
    import tensorflow_datasets as tfds

    return _as_path(os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR)


def version_dir(info: DatasetInfo, data_dir: str | None) -> Path:
    """``<data_dir>/<name>/<version>``, the version being the one TFDS's builder reads."""
    import tensorflow_datasets as tfds

    return dataset_root(data_dir) / info.name / str(tfds.builder_cls(info.name).VERSION)


def prepare_command(info: DatasetInfo, data_dir: str | None) -> str:
    """The command that prepares the dataset again over a damaged copy."""
    root = dataset_root(data_dir)
    if info.manual_download:
        return (f"`tfds build {info.name} --data_dir={root} --manual_dir={root / 'downloads'}"
                "/manual --overwrite` (with the original archives in that manual_dir)")
    return (f"`tfds build {info.name} --data_dir={root} --overwrite` on a machine with "
            "internet access (or copy a whole prepared copy over it)")


def _damaged(info: DatasetInfo, data_dir: str | None, path: Path | str, what: str
             ) -> DatasetDamaged:
    return DatasetDamaged(f"{info.name}: {path} {what}; prepare the dataset again: "
                          f"{prepare_command(info, data_dir)}")


def _read_json(info: DatasetInfo, data_dir: str | None, path: Path) -> Any:
    if not path.is_file():
        raise _damaged(info, data_dir, path, "is missing")
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise _damaged(info, data_dir, path, f"cannot be read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _damaged(info, data_dir, path, f"is not valid JSON ({e})") from None


def split_shards(info: DatasetInfo, split: str, data_dir: str | None
                 ) -> list[tuple[Path, int]] | None:
    """(file, records) per shard of ``split`` from the checked info files; None if the
    dataset is not prepared in ``data_dir`` at all (the loader says so, with how to fix)."""
    folder = version_dir(info, data_dir)
    if not folder.is_dir():
        return None
    listed = _read_json(info, data_dir, folder / "dataset_info.json")
    if (folder / "features.json").exists():  # a registered builder can do without it
        _read_json(info, data_dir, folder / "features.json")
    names = [s.get("name") for s in listed.get("splits", [])] if isinstance(listed, dict) else []
    if split not in names:
        raise _damaged(info, data_dir, folder / "dataset_info.json",
                       f"lists no {split!r} split (it lists {names})")
    import tensorflow_datasets as tfds

    try:
        split_info = tfds.builder(info.name, data_dir=str(dataset_root(data_dir))
                                  ).info.splits[split]
        paths = [_as_path(os.fspath(p)) for p in split_info.filepaths]
        lengths = [int(n) for n in split_info.shard_lengths]
    except Exception as e:  # noqa: BLE001 - tfds raises many types for a bad info file
        raise _damaged(info, data_dir, folder / "dataset_info.json",
                       f"does not describe split {split!r} ({type(e).__name__}: {e})") from None
    if len(paths) != len(lengths):
        raise _damaged(info, data_dir, folder / "dataset_info.json",
                       f"lists {len(lengths)} shard lengths for {len(paths)} files of {split!r}")
    return list(zip(paths, lengths))


def record_chain_problem(path: Path, records: int) -> str | None:
    """What is wrong with the record framing of one TFRecord file expected to hold
    ``records`` records (headers only: lengths, not CRCs), or None."""
    size = _size_and_mtime_ns(path)[0]
    offset, count = 0, 0
    with path.open("rb") as f:
        while offset < size:
            header = f.read(8)
            if len(header) < 8:
                return f"ends inside the header of record {count} (byte {offset} of {size})"
            (length,) = struct.unpack("<Q", header)
            end = offset + length + RECORD_FRAMING_BYTES
            if end > size:
                return (f"is cut short: record {count} at byte {offset} needs {end} bytes, "
                        f"the file has {size}")
            offset, count = end, count + 1
            f.seek(offset)
    if count != records:
        return f"holds {count} records, dataset_info.json says {records}"
    return None


def check_split_files(info: DatasetInfo, split: str, data_dir: str | None) -> None:
    """DatasetDamaged naming the file unless ``split``'s info and shard files are
    present, readable and of plausible sizes (see the module's docstring)."""
    shards = split_shards(info, split, data_dir)
    if shards is None:
        return
    total = 0
    for path, records in shards:
        if not path.is_file():
            raise _damaged(info, data_dir, path, f"is missing (a shard of split {split!r})")
        try:
            with path.open("rb") as f:
                f.read(1)
        except OSError as e:
            raise _damaged(info, data_dir, path, f"cannot be read ({e.strerror or e})") from None
        size = _size_and_mtime_ns(path)[0]
        if size < RECORD_FRAMING_BYTES * records:
            raise _damaged(info, data_dir, path, f"has {size} bytes, too few for its {records} "
                           "records")
        total += size
    expected = _split_bytes(info, split, data_dir)
    if expected is not None and total == expected + RECORD_FRAMING_BYTES * sum(
            n for _, n in shards):
        return
    # The sizes do not add up (or are not recorded): walk each chain to find the file.
    for path, records in shards:
        problem = record_chain_problem(path, records)
        if problem:
            raise _damaged(info, data_dir, path, problem)


def _split_bytes(info: DatasetInfo, split: str, data_dir: str | None) -> int | None:
    listed = json.loads((version_dir(info, data_dir) / "dataset_info.json").read_text())
    for entry in listed.get("splits", []):
        if entry.get("name") == split and int(entry.get("numBytes", 0) or 0) > 0:
            return int(entry["numBytes"])
    return None


def verify_records(info: DatasetInfo, split: str, data_dir: str | None) -> None:
    """DatasetDamaged naming the file unless every record of ``split`` passes its CRC
    checks and each file holds the records dataset_info.json lists. Reads every byte."""
    shards = split_shards(info, split, data_dir)
    for path, records in shards or ():
        _verify_file(info, data_dir, path, records)


def _verify_file(info: DatasetInfo, data_dir: str | None, path: Path, records: int) -> None:
    size, mtime_ns = _size_and_mtime_ns(path)
    if _verified(os.fspath(path), size, mtime_ns, records):
        return
    problem = _file_problem(path, records)
    if problem:
        _verified.cache_clear()  # a damaged file is never remembered as verified
        raise _damaged(info, data_dir, path, problem)


@functools.lru_cache(maxsize=64)
def _verified(path: str, size: int, mtime_ns: int, records: int) -> bool:
    # Remembered per (file, size, mtime): a sweep checks the same split for every cell.
    return _file_problem(_as_path(path), records) is None


def _file_problem(path: Path, records: int) -> str | None:
    import tensorflow as tf

    ds = tf.data.TFRecordDataset(os.fspath(path), buffer_size=1 << 22).batch(_VERIFY_BATCH)
    try:
        count = int(ds.reduce(tf.constant(0, tf.int64),
                              lambda n, batch: n + tf.size(batch, out_type=tf.int64)))
    except tf.errors.DataLossError as e:
        return f"has a damaged record ({_tf_message(e)})"
    except tf.errors.OpError as e:
        return f"cannot be read ({_tf_message(e)})"
    if count != records:
        return f"holds {count} records, dataset_info.json says {records}"
    return None


def _tf_message(error: Exception) -> str:
    # TF prefixes the failing op's function name; keep the part that says what happened.
    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", text.splitlines()[0] if text else "").strip()


def check_dataset(info: DatasetInfo, data_dir: str | None, *, records: bool) -> None:
    """:func:`check_split_files` for the training and test splits, then (``records``)
    :func:`verify_records` for both. Nothing to check for other than TFDS sources."""
    if not is_tfds(info):
        return
    try:
        # A bucket data dir is copied (or brought up to date) here, before any check: the
        # checks then read the copy, byte for byte the bucket's files, sizes compared.
        staging.local_data_dir(data_dir, info.name, read_whole=info.cache_decoded)
    except staging.DataDirUnreadable as e:
        raise DatasetDamaged(f"{info.name}: {e}") from None
    splits = (info.train_split, info.test_split)
    for split in splits:
        check_split_files(info, split, data_dir)
    if records:
        for split in splits:
            verify_records(info, split, data_dir)


# --------------------------------------------------------------------------
# A damaged record met while streaming.

_OFFSET = re.compile(r"(?:corrupted|truncated) record at (\d+)")


def is_data_loss(error: BaseException) -> bool:
    """Whether ``error`` is TensorFlow's report of a damaged record."""
    import tensorflow as tf

    return isinstance(error, tf.errors.DataLossError)


def damaged_record_message(error: BaseException, info: DatasetInfo, data_dir: str | None
                           ) -> str:
    """One line for a DataLossError met while reading ``info``'s files: the file that
    fails at the offset TensorFlow reports (its training and test split files are
    probed there), and how to fix it."""
    found = _at_offset(info, data_dir, _OFFSET.search(_tf_message(error)))
    where = found or f"a record file under {version_dir(info, data_dir)}"
    return (f"{info.name}: {where} has a damaged record ({_tf_message(error)}); prepare the "
            f"dataset again: {prepare_command(info, data_dir)}")


def _at_offset(info: DatasetInfo, data_dir: str | None, match: re.Match | None) -> str | None:
    if match is None or not is_tfds(info):
        return None
    from tensorflow.python.lib.io import _pywrap_record_io  # reads one record at an offset

    # TF reports a bad length header at the record's start, bad data 12 bytes on.
    reported = int(match.group(1))
    for split in (info.train_split, info.test_split):
        try:
            shards = split_shards(info, split, data_dir) or []
        except DatasetDamaged:
            continue
        for path, _ in shards:
            try:
                starts = [o for o in (reported, reported - 12) if _record_starts_at(path, o)]
                if not starts:
                    continue
                _pywrap_record_io.RandomRecordReader(os.fspath(path)).read(starts[0])
            except Exception:  # noqa: BLE001 - the failing read is what is looked for
                return os.fspath(path)
    return None


def _record_starts_at(path: Path, offset: int) -> bool:
    """Whether a record of the file's chain starts at ``offset`` (headers only): a
    reader's offset means nothing in a file whose records start elsewhere."""
    size, at = _size_and_mtime_ns(path)[0], 0
    with path.open("rb") as f:
        while at < offset and at + 8 <= size:
            f.seek(at)
            (length,) = struct.unpack("<Q", f.read(8))
            at += length + RECORD_FRAMING_BYTES
    return at == offset and offset < size
