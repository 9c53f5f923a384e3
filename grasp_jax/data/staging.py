"""A TFDS data dir in a bucket (``gs://``, ``s3://``), read through a local copy.

tf.data would read ``gs://`` with TensorFlow's own GCS client, which takes its
endpoint from no setting (TF 2.21 always talks to ``storage.googleapis.com``,
so it cannot be pointed at an emulator or a private endpoint), finds
credentials by its own rules, and TF has no ``s3://`` file system at all. So a
dataset in a bucket is copied once to a local cache with fsspec's ``gcsfs`` /
``s3fs`` (the clients a bucket workdir uses, with the same credentials and
endpoint settings) and TFDS reads the copy:

* Only datasets a run reads whole into memory at start (``cache_decoded``:
  CIFAR-10/100) are copied from ``gs://``; a streamed one (ImageNet, ~150 GB)
  is handed to TFDS as given, and TensorFlow streams it from GCS with its own
  client (untested here: no emulator can stand in for it). ``s3://`` is always
  copied: TensorFlow cannot read it at all.
* Only ``<data_dir>/<name>/`` is copied: the dataset's prepared versions.
* A file already in the cache with the size the bucket lists is not copied
  again, so a second run (or each cell of a sweep) only lists the bucket.
* Each file lands under a temporary name and is renamed into place, so a copy
  cut short is never taken for a whole file; the copy is byte for byte, so the
  integrity checks (:mod:`grasp_jax.data.integrity`) that then read it check
  the bucket's bytes, and every size is compared with the bucket's listing.

The cache is ``$GRASP_JAX_DATA_CACHE``, else ``~/.cache/grasp_jax/datasets``,
laid out as ``<cache>/<scheme>/<bucket>/<path>``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

URL_SCHEMES = ("gs://", "s3://")
CACHE_ENV = "GRASP_JAX_DATA_CACHE"


class DataDirUnreadable(OSError):
    """A bucket data dir cannot be listed or copied; the message is one line naming it."""


def is_url(data_dir: str | None) -> bool:
    return data_dir is not None and str(data_dir).startswith(URL_SCHEMES)


def cache_root() -> Path:
    """Where bucket datasets are copied: ``$GRASP_JAX_DATA_CACHE`` or ``~/.cache/...``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "grasp_jax" / "datasets"


def cache_dir_for(url: str) -> Path:
    """The local folder that mirrors the bucket data dir ``url``."""
    scheme, rest = url.split("://", 1)
    return cache_root() / scheme / rest.strip("/")


def is_copied(data_dir: str | None, read_whole: bool) -> bool:
    """Whether TFDS reads ``data_dir`` from a local copy: a bucket URL holding a dataset
    read whole at start (``read_whole``), or any ``s3://`` one."""
    return is_url(data_dir) and (read_whole or str(data_dir).startswith("s3://"))


def local_data_dir(data_dir: str | None, name: str, *, read_whole: bool) -> str | None:
    """The data dir TFDS should read: ``data_dir`` as given, or, where :func:`is_copied`,
    the local copy of ``<data_dir>/<name>/`` brought up to date (see the module docstring)."""
    if not is_copied(data_dir, read_whole):
        return data_dir
    return _staged(str(data_dir).rstrip("/"), name)


@functools.lru_cache(maxsize=8)  # the run's checks and every pipeline of the process share it
def _staged(url: str, name: str) -> str:
    import fsspec

    scheme = url.split("://", 1)[0]
    prefix = f"{url}/{name}"
    try:
        fs = fsspec.filesystem(scheme)
        listing: dict[str, Any] = fs.find(prefix, detail=True)
    except Exception as e:  # noqa: BLE001 - every client error becomes one line with its cause
        raise DataDirUnreadable(f"data_dir {url} cannot be listed ({_one_line(e)})") from None
    local_root = cache_dir_for(url)
    if not listing:
        # Nothing to copy: TFDS then reports the dataset as not prepared, naming the
        # cache folder; say here which bucket folder was empty.
        print(f"data_dir {url}: no objects under {prefix}/", flush=True)
        return str(local_root)
    bucket_prefix = fs._strip_protocol(url).rstrip("/")
    copied = 0
    for key, meta in sorted(listing.items()):
        if meta.get("type") == "directory":
            continue
        relative = key[len(bucket_prefix):].lstrip("/")
        target = local_root / relative
        size = int(meta.get("size") or 0)
        if target.is_file() and target.stat().st_size == size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.part-{os.getpid()}")
        try:
            fs.get_file(key, str(partial))
        except Exception as e:  # noqa: BLE001
            partial.unlink(missing_ok=True)
            raise DataDirUnreadable(
                f"data_dir {url}: {scheme}://{key} cannot be copied ({_one_line(e)})") from None
        if partial.stat().st_size != size:
            got = partial.stat().st_size
            partial.unlink()
            raise DataDirUnreadable(f"data_dir {url}: {scheme}://{key} came as {got} bytes, "
                                    f"the bucket lists {size}")
        os.replace(partial, target)
        copied += 1
    if copied:
        print(f"data_dir {url}: copied {copied} file(s) of {name} to {local_root}", flush=True)
    return str(local_root)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())[:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
