"""Checkpoints of an ``s3://`` workdir, written and read by orbax in a local mirror.

Why a mirror: orbax 0.12.8 writes arrays through tensorstore with a kvstore spec it
builds from the path itself and gives only ``gs://`` a remote driver (any other path
must be an absolute local one: ``_use_gcs_driver`` and ``_normalize_path`` in
``orbax/checkpoint/_src/serialization/tensorstore_utils.py``), and it finalizes a step
anywhere but on ``gs://`` by renaming its temporary directory, which on S3 would be a
copy and delete of every object, not atomic. So orbax works on a local directory,
exactly as for a local workdir, and each finished step is copied to the bucket
through the path layer (:mod:`experiments.paths`):

* **Upload.** Once orbax has finalized step N in the mirror (renamed into place),
  every file of ``<mirror>/N/`` becomes one object under ``<workdir>/checkpoints/N/``
  (each written whole), then the commit marker ``N/upload_complete.json`` is written
  **last**: a manifest naming every file and its size. A step without its marker is
  an unfinished upload (the process was killed mid-copy): it is never restored, and
  process 0 removes it when the next run opens the workdir, as orbax removes its
  temporary directories.
* **When.** In a background thread started by each save, which waits for orbax to
  finish writing the step (``CheckpointManager.wait_until_finished``) and then
  uploads it; the next save, ``wait`` and ``close`` wait for that upload first, as
  orbax's own next save waits for the previous one. Training goes on during both the
  write and the upload, so it is held up no more than on a local workdir unless an
  upload takes longer than the interval between saves. Not orbax's
  ``AsyncOptions(post_finalization_callback=...)``: orbax calls it before it renames
  the step's temporary directory into place, without the step, so the upload would
  have to read orbax's private temporary names.
* **Retention.** The mirror keeps only the newest step; the bucket keeps the newest
  ``max_to_keep`` committed ones, older ones deleted after each upload, marker first
  (a step cut short while being deleted is then an unfinished one, never a committed
  one with files missing).
* **Restore.** A committed step is downloaded into the mirror file by file as its
  manifest lists them (each size checked against it) and orbax restores it from
  there; the digest check is the same as for any workdir. A step that fails is moved
  aside on the bucket (``checkpoints.damaged/``) and the next older one is tried.
* **Several processes.** The state a run saves is the replicated host copy, and
  orbax's numpy handler writes host arrays from process 0 alone (on a shared local or
  ``gs://`` directory the other processes take part in orbax's barriers but write
  none of the state). So here only process 0 saves: its mirror holds the whole step,
  which it uploads; the other processes' saves return at once, and every process's
  CheckpointManager runs alone (itself its only active process and primary host), so
  no orbax barrier waits for a process that does not save. Every process downloads
  the step it restores into its own mirror, keyed by its process index so that
  processes sharing a host do not share a mirror. The processes already agree on
  which step they restore, as on a shared directory: each tries the committed steps
  newest first, and process 0 alone moves a damaged one aside.
* **The mirror.** ``$GRASP_JAX_CHECKPOINT_CACHE``, else ``<system temp>/
  grasp_jax_checkpoints``, in a folder named by a hash of the checkpoints URL and the
  process index. It is emptied when a checkpointer opens it (it may hold a step the
  bucket no longer has) and removed when it closes; it holds at most two steps (the
  newest and the one being written).

``gs://`` workdirs keep orbax's own path (tensorstore's GCS driver and a commit file);
local ones are written in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
from typing import Callable, Optional

from experiments import paths

STAGED_SCHEMES = ("s3://",)
MARKER = "upload_complete.json"
CACHE_ENV = "GRASP_JAX_CHECKPOINT_CACHE"


class IncompleteStep(OSError):
    """A step on the bucket is not whole: no marker, or a file missing or of another size."""


def is_staged(workdir: str) -> bool:
    """Whether the checkpoints of ``workdir`` go through a local mirror (``s3://``)."""
    return str(workdir).startswith(STAGED_SCHEMES)


def cache_root() -> str:
    """Where mirrors live: ``$GRASP_JAX_CHECKPOINT_CACHE``, else the system temp folder's
    ``grasp_jax_checkpoints``."""
    configured = os.environ.get(CACHE_ENV)
    root = configured or os.path.join(tempfile.gettempdir(), "grasp_jax_checkpoints")
    return os.path.abspath(os.path.expanduser(root))


def mirror_dir(directory: str, process_index: int) -> str:
    """The local mirror of the checkpoints URL ``directory`` for one process."""
    key = hashlib.sha256(directory.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(cache_root(), f"{key}-p{process_index}")


def step_dirs(directory: str) -> list[int]:
    """Every step with objects under ``directory``, committed or not, oldest first."""
    if not paths.isdir(directory):
        return []
    return sorted(int(name) for name in paths.listdir(directory) if name.isdigit())


def is_committed(directory: str, step: int) -> bool:
    return paths.exists(paths.join(directory, str(step), MARKER))


def committed_steps(directory: str) -> list[int]:
    """The steps under ``directory`` whose upload finished (marker present), oldest first."""
    return [step for step in step_dirs(directory) if is_committed(directory, step)]


def local_files(step_dir: str) -> dict[str, int]:
    """``{relative path with '/': size}`` of every file under a local step folder."""
    files = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            full = os.path.join(root, name)
            files[os.path.relpath(full, step_dir).replace(os.sep, "/")] = os.path.getsize(full)
    return dict(sorted(files.items()))


def upload_step(local_step_dir: str, directory: str, step: int) -> dict:
    """Copy a finished local step to ``<directory>/<step>/``, the marker last; its manifest.

    Objects already there (an unfinished upload of the same step) are removed first, so
    the step on the bucket is exactly the local one."""
    files = local_files(local_step_dir)
    if not files:
        raise FileNotFoundError(f"{local_step_dir} holds no checkpoint files to upload")
    target = paths.join(directory, str(step))
    remove_step(directory, step)
    for relative in files:
        paths.upload_file(os.path.join(local_step_dir, *relative.split("/")),
                          paths.join(target, relative))
    manifest = {"step": step, "files": files}
    paths.write_text(paths.join(target, MARKER), json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _manifest(directory: str, step: int) -> dict[str, int]:
    source = paths.join(directory, str(step), MARKER)
    try:
        manifest = json.loads(paths.read_text(source))
    except FileNotFoundError:
        raise IncompleteStep(f"{source} is missing: the upload of step {step} did not "
                             "finish") from None
    except ValueError as e:
        raise IncompleteStep(f"{source} is not JSON ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or not all(
            isinstance(k, str) and isinstance(v, int) for k, v in files.items()):
        raise IncompleteStep(f"{source} is not a manifest this runner wrote")
    for relative in files:
        parts = relative.split("/")
        if relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise IncompleteStep(f"{source} names a file outside its step: {relative!r}")
    return files


def download_step(directory: str, step: int, local_step_dir: str) -> None:
    """Copy the committed ``<directory>/<step>/`` to ``local_step_dir`` (replaced), every
    file its manifest lists; IncompleteStep when one is missing or of another size."""
    files = _manifest(directory, step)
    source = paths.join(directory, str(step))
    shutil.rmtree(local_step_dir, ignore_errors=True)
    for relative, size in files.items():
        local = os.path.join(local_step_dir, *relative.split("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        try:
            paths.download_file(paths.join(source, relative), local)
        except FileNotFoundError:
            raise IncompleteStep(f"{paths.join(source, relative)} is missing") from None
        got = os.path.getsize(local)
        if got != size:
            raise IncompleteStep(f"{paths.join(source, relative)} has {got} bytes, its "
                                 f"manifest {size}")


def remove_step(directory: str, step: int) -> None:
    """Delete ``<directory>/<step>/``: the marker first, so that no reader sees a
    committed step with files missing."""
    target = paths.join(directory, str(step))
    with contextlib.suppress(FileNotFoundError):
        paths.remove(paths.join(target, MARKER))
    paths.remove_tree(target)


def remove_unfinished(directory: str) -> list[int]:
    """Delete the steps whose upload did not finish (no marker); the steps removed."""
    unfinished = [step for step in step_dirs(directory) if not is_committed(directory, step)]
    for step in unfinished:
        remove_step(directory, step)
    return unfinished


def keep_newest(directory: str, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` committed steps; the steps removed."""
    steps = committed_steps(directory)
    old = steps[:max(0, len(steps) - keep)]
    for step in old:
        remove_step(directory, step)
    return old


class BackgroundUpload:
    """One upload at a time on a thread; its error is raised by the next :meth:`wait`."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def start(self, work: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                work()
            except BaseException as e:  # noqa: BLE001 - handed to the caller by wait()
                self._error = e

        # Not a daemon: an interpreter exiting mid-upload finishes it first (a kill
        # leaves an unfinished step, which the next run removes).
        self._thread = threading.Thread(target=run, name="checkpoint-upload")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
