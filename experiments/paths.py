"""One path layer for every file a run or a sweep touches: local paths, ``gs://`` and ``s3://``.

The hosts of a TPU pod share no file system, so a workdir may be a bucket URL.
Local paths go through ``os`` exactly as before (byte-for-byte the same files,
renames for atomicity, ``O_EXCL`` for the lock); URLs go through
``etils.epath`` (the path library orbax itself uses) on fsspec's ``gcsfs`` /
``s3fs``. What differs on an object store, and why it is still safe:

* **No directories.** A "directory" is a key prefix: it exists once an object
  under it does; :func:`makedirs` is a no-op there.
* **Atomic writes.** An object appears whole or not at all (a single PUT), so
  :func:`write_bytes_with` builds the bytes in memory and writes them in one
  request: a reader never sees half a ``results.json``. There is no rename
  (a "move" is copy + delete of every object); nothing here relies on one.
* **Create-if-absent.** :func:`create_exclusive` is a conditional write: GCS
  ``ifGenerationMatch=0``, S3 ``If-None-Match: *``; the store refuses the
  second writer (HTTP 412), which is what makes the workdir lock atomic.

``EPATH_USE_TF=false`` is set here unless the user set it: etils would
otherwise reach ``gs://`` through TensorFlow's GCS file system, which has no
conditional write and knows no ``s3://`` at all.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
from collections.abc import Callable
from typing import Any, BinaryIO, Optional

URL_SCHEMES = ("gs://", "s3://")

os.environ.setdefault("EPATH_USE_TF", "false")


def _no_listings_cache() -> None:
    """Every listing asks the store: a cached one would hide checkpoints that another
    process (or this one, through orbax) wrote since, and resume from an older step."""
    try:
        import fsspec.config
    except ImportError:  # then no URL can be opened at all, and is_url paths say so
        return
    for protocol in ("gs", "gcs", "s3", "s3a"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_no_listings_cache()


def is_url(path: str) -> bool:
    """Whether ``path`` names an object store (``gs://`` or ``s3://``) rather than a local path."""
    return str(path).startswith(URL_SCHEMES)


def _epath(path: str) -> Any:
    from etils import epath  # imported on first use: local runs need none of fsspec

    return epath.Path(path)


def join(base: str, *parts: str) -> str:
    """``os.path.join`` for local paths; ``/``-joined keys for URLs."""
    if not is_url(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def absolute(path: str) -> str:
    """The absolute local path, or the URL unchanged (a URL is never made a local folder)."""
    return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _epath(path).is_dir() if is_url(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
    """Names directly under ``path`` (for a URL: objects and prefixes one level down)."""
    if not is_url(path):
        return os.listdir(path)
    return [p.name for p in _epath(path).iterdir()]


def makedirs(path: str) -> None:
    """Create ``path`` and its parents locally; nothing to do on an object store."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def remove_tree(path: str) -> None:
    """Remove a file or a directory tree at ``path``, if there is one."""
    if is_url(path):
        p = _epath(path)
        if p.is_dir():
            p.rmtree()
        elif p.exists():
            p.unlink()
    elif os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def remove(path: str) -> None:
    """Remove the file at ``path`` (FileNotFoundError if absent)."""
    if is_url(path):
        p = _epath(path)
        if not p.exists():
            raise FileNotFoundError(path)
        p.unlink()
    else:
        os.remove(path)


def move(src: str, dst: str) -> None:
    """Move a file or a tree. On an object store a copy of every object, then a delete."""
    if not is_url(src):
        shutil.move(src, dst)
        return
    fs, _ = _filesystem(src)
    prefix = src.rstrip("/")
    objects = fs.find(prefix)  # every object under the prefix, or the object itself
    for key in objects:
        relative = key.rstrip("/")[len(fs._strip_protocol(prefix)):].lstrip("/")
        fs.cp_file(key, join(dst, relative) if relative else dst)
    fs.rm(objects)


def read_bytes(path: str) -> bytes:
    if is_url(path):
        p = _epath(path)
        if not p.exists():
            raise FileNotFoundError(path)
        return p.read_bytes()
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def write_bytes_with(path: str, writer: Callable[[BinaryIO], Any]) -> None:
    """``writer(file)``, then the result lands at ``path`` whole or not at all.

    Locally: into ``<path>.tmp-<pid>``, renamed onto ``path``. On an object
    store: into memory, then one PUT (an object is atomic per write).
    """
    if is_url(path):
        buffer = io.BytesIO()
        writer(buffer)
        _epath(path).write_bytes(buffer.getvalue())
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            writer(f)
        os.replace(tmp, path)
    except BaseException:
        # A full disk, a failed rename or an interrupt leaves no temporary file behind.
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def upload_file(local_path: str, path: str) -> None:
    """Copy the local file ``local_path`` to ``path``, which lands whole or not at all.

    To a URL: one upload streamed from the file (s3fs and gcsfs switch to a multipart or
    resumable upload for large files; the object appears only when it completes), so a
    checkpoint's large array files are never held in memory. Locally: a copy renamed
    into place, its folders created as needed (as a key's prefixes are on a store)."""
    if is_url(path):
        fs, key = _filesystem(path)
        fs.put_file(local_path, key)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(local_path, "rb") as src:
        write_bytes_with(path, lambda dst: shutil.copyfileobj(src, dst))


def download_file(path: str, local_path: str) -> None:
    """Copy ``path`` (a URL or a local file) to the local file ``local_path``."""
    if is_url(path):
        fs, key = _filesystem(path)
        fs.get_file(key, local_path)
        return
    shutil.copyfile(path, local_path)


def age_s(path: str) -> Optional[float]:
    """Seconds since ``path`` was last modified (None if absent or unknown)."""
    try:
        if is_url(path):
            return time.time() - _epath(path).stat().mtime
        return time.time() - os.path.getmtime(path)
    except (OSError, AttributeError, ValueError):
        return None


def remove_stale_temporaries(directory: str) -> list[str]:
    """Remove ``*.tmp-<pid>`` files under a local ``directory`` (not below
    ``checkpoints``, which orbax cleans itself) whose process is gone from this
    host: what a killed write left. The names removed."""
    if is_url(directory) or not os.path.isdir(directory):
        return []
    removed = []
    for name in os.listdir(directory):
        stem, sep, pid = name.rpartition(".tmp-")
        if not sep or not stem or not pid.isdigit() or process_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            os.remove(os.path.join(directory, name))
            removed.append(name)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (a lock's holder, a temporary's writer).

    Signal 0 checks without signalling. PermissionError means the process exists but
    belongs to another user: alive. A finished child not yet reaped is a zombie and
    still counts as alive until its parent waits for it.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_bytes(path: str, data: bytes) -> None:
    write_bytes_with(path, lambda f: f.write(data))


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def create_exclusive(path: str, data: bytes) -> bool:
    """Write ``data`` at ``path`` only if nothing is there; False if something is.

    Atomic, content included: locally the bytes go to a temporary file first,
    which is then hard-linked to ``path`` (``link`` fails if ``path`` exists,
    and never leaves an empty file: a full disk fails on the temporary file,
    which is removed); on GCS a write with ``ifGenerationMatch=0``, on S3 one
    with ``If-None-Match: *`` (fsspec's ``mode="create"``), which the store
    refuses once the object exists.
    """
    if not is_url(path):
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return True
    fs, key = _filesystem(path)
    try:
        fs.pipe_file(key, data, mode="create")
    except FileExistsError:
        return False
    except OSError as e:
        if _is_precondition_failure(e):
            return False
        raise
    return True


def _is_precondition_failure(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e} {getattr(e, 'code', '')}"
    return "412" in text or "PreconditionFailed" in text or "conditionNotMet" in text


def _filesystem(url: str) -> tuple[Any, str]:
    """(the fsspec file system epath uses for ``url``, the key within it)."""
    import fsspec

    protocol = url.split("://", 1)[0]
    return fsspec.filesystem(protocol), url


# How long the reachability probe waits for a TCP connection to the store: an unreachable
# endpoint is refused in seconds, not after the storage clients' minutes of retries.
CONNECT_TIMEOUT_S = 5.0


def unusable_url(url: str) -> Optional[str]:
    """Why a ``gs://`` or ``s3://`` URL cannot hold a run's files, or None.

    In order, each refusal one line naming the cause: no bucket named; the
    store's endpoint unreachable (one TCP connection, bounded by
    :data:`CONNECT_TIMEOUT_S`); no credentials found (unless anonymous access
    was asked for); then a probe object is written and removed, which finds
    no such bucket and no permission. Nothing is left behind.
    """
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if not bucket:
        return "names no bucket"
    problem = unreachable_endpoint(url) or missing_credentials(url)
    if problem:
        return problem
    probe = join(url, f".write-probe-{os.getpid()}")
    try:
        _epath(probe).write_bytes(b"")
        _epath(probe).unlink()
    except Exception as e:  # noqa: BLE001 - every client error becomes one line with its cause
        return f"cannot be written ({describe_error(e, bucket)})"
    return None


def endpoint(url: str) -> str:
    """The HTTP endpoint the storage client will talk to for ``url``, as a URL.

    ``gs://``: ``$STORAGE_EMULATOR_HOST`` (gcsfs's setting), else Google's.
    ``s3://``: fsspec's ``s3`` ``endpoint_url`` setting, ``$AWS_ENDPOINT_URL_S3`` or
    ``$AWS_ENDPOINT_URL`` (botocore's), else Amazon's.
    """
    import fsspec.config

    if url.startswith("gs://"):
        host = os.environ.get("STORAGE_EMULATOR_HOST", "")
        if host in ("", "default"):
            return "https://storage.googleapis.com"
        return host if host.startswith(("http://", "https://")) else f"http://{host}"
    conf = fsspec.config.conf.get("s3", {})
    configured = (conf.get("endpoint_url") or conf.get("client_kwargs", {}).get("endpoint_url")
                  or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    return configured or "https://s3.amazonaws.com"


def unreachable_endpoint(url: str) -> Optional[str]:
    """"no network connection ..." when no TCP connection to the store opens in
    :data:`CONNECT_TIMEOUT_S` seconds, else None."""
    import socket
    from urllib.parse import urlsplit

    where = endpoint(url)
    parts = urlsplit(where)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        return f"cannot be reached (no network connection to the store at {where}: {reason})"
    return None


def missing_credentials(url: str) -> Optional[str]:
    """"no usable credentials ..." when the store's client would find none, else None.

    Without this, gcsfs falls back to anonymous access and a bucket that needs
    credentials fails later, mid-run, with an HTTP 401. Anonymous access asked
    for explicitly (gcsfs's ``token="anon"``, e.g. ``FSSPEC_GS_TOKEN=anon``; s3fs's
    ``anon=True``) and an explicit token are taken as given.
    """
    import fsspec.config

    if url.startswith("gs://"):
        if fsspec.config.conf.get("gs", {}).get("token") or fsspec.config.conf.get(
                "gcs", {}).get("token"):
            return None
        try:
            import google.auth

            google.auth.default()
        except Exception as e:  # noqa: BLE001 - DefaultCredentialsError, or a transport error
            return (f"cannot be used (no usable credentials: {' '.join(str(e).split())[:160]}; "
                    "run `gcloud auth application-default login` or set "
                    "GOOGLE_APPLICATION_CREDENTIALS)")
        return None
    conf = fsspec.config.conf.get("s3", {})
    if conf.get("anon") or conf.get("key"):
        return None
    import botocore.session

    if botocore.session.get_session().get_credentials() is None:
        return ("cannot be used (no usable credentials: botocore found none; set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
    return None


def describe_error(e: BaseException, bucket: str) -> str:
    """One line for a storage client's error: the likely cause first, then the client's words."""
    text = " ".join(str(e).split())[:200]
    lowered = f"{type(e).__name__} {text}".lower()
    no_bucket = "bucket" in lowered and "not" in lowered and "found" in lowered
    if "nosuchbucket" in lowered or no_bucket or isinstance(e, FileNotFoundError):
        cause = f"no such bucket {bucket!r}"
    elif any(w in lowered for w in ("credential", "unauthenticated", "401", "token", "signature")):
        cause = "no usable credentials"
    elif any(w in lowered for w in ("403", "forbidden", "accessdenied", "permission")):
        cause = "permission denied"
    elif any(w in lowered for w in ("connect", "resolve", "unreachable", "timed out", "timeout",
                                    "name or service")):
        cause = "no network connection to the store"
    else:
        cause = type(e).__name__
    return f"{cause}: {text}" if text else cause
