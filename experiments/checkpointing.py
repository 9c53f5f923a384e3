"""Orbax checkpoints of a run, and restoring the newest one that is intact.

Layout under ``<workdir>/checkpoints/<step>/``:

* ``state``: the training state as a pytree of arrays: ``step``, ``params``,
  ``batch_stats``, ``opt_state`` (the optax chain's NamedTuples, including
  :class:`grasp_jax.optim.MaskedUpdatesState`), ``masks`` (booleans) and ``rng``
  (the run's base key; per-step keys are ``fold_in(rng, step)``). The step is
  also the data position: the input pipeline restarts exactly at batch
  ``step``.
* ``meta``: JSON with what the run has learned about itself: best test
  accuracy and its step, and the run clock (``experiments.clock``).
* ``digest``: JSON with a CRC-32 of every leaf of ``state`` (its dtype,
  shape and bytes) and of ``meta``, computed from the host arrays before they
  are written. A restore recomputes them from what it read and refuses a
  checkpoint whose bytes differ: a flipped bit in a data file is otherwise
  restored without complaint (tensorstore checks the structure of its files,
  not every byte of the arrays in them). Checkpoints written before digests
  existed have no such item and restore unchecked.

Orbax writes each step to a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint intact. A checkpoint
damaged afterwards (a truncated or corrupted file, missing metadata) is moved
aside to ``<workdir>/checkpoints.damaged/`` by :meth:`Checkpointer.restore_newest`,
which then tries the next older one; a read that fails for a reason that says nothing
of the bytes (the store unreachable, a timeout, no memory) moves nothing and ends the
run, to be rerun (:func:`says_nothing_of_the_bytes`). A restore that fails says so in one line;
the libraries' own logging of the failure (absl, orbax, asyncio, tensorstore's
"Event loop is closed" from its background threads) is kept out of the console
and appended to ``<workdir>/errors.log``.

The workdir may be a bucket URL, and moving a damaged step aside is then a copy
and delete of its objects (``experiments.paths.move``). On ``gs://`` orbax writes
natively (tensorstore's GCS driver; a step is complete once its
``commit_success.txt`` exists, since an object store has no atomic rename). On
``s3://``, where orbax 0.12.8 cannot write, it writes to a local mirror from which
each finished step is uploaded, a commit marker last, and restores from a
downloaded copy (:mod:`experiments.checkpoint_staging`, which says how several
processes share the work). Either way :class:`Checkpointer` is the one interface,
and its steps are those in the workdir.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
import zlib
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments import checkpoint_staging, faults, paths

PyTree = Any
DAMAGED_DIR = "checkpoints.damaged"
DIGEST_ITEM = "digest"
ERRORS_LOG = faults.ERRORS_LOG
# CRC-32 (zlib's, ~1.6 GB/s a core here against ~0.7 for SHA-256): it detects every
# burst of up to 32 flipped bits and misses random damage with odds 2**-32 per leaf;
# damage, not an adversary, is what it guards against. Leaves are hashed on a thread
# pool (zlib releases the GIL).
DIGEST_ALGORITHM = "crc32"


class NoUsableCheckpoint(RuntimeError):
    """Checkpoints exist but none of them restores."""


class CheckpointUnreadable(NoUsableCheckpoint):
    """A checkpoint could not be read for a reason that says nothing of its bytes (the
    store unreachable or refusing, a timeout, no memory): nothing is moved aside."""


# What a failed read says about the reader or the store, not about the checkpoint: the
# exception types, and the status codes tensorstore and the cloud clients put first in
# their messages ("UNAVAILABLE: ..."). Moving a checkpoint aside for one of these would
# resume from an older step (work lost) or, through an outage, move every step aside.
_NOT_DAMAGE_TYPES = (ConnectionError, TimeoutError, MemoryError, PermissionError)
_NOT_DAMAGE_STATUS = re.compile(
    r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|UNAUTHENTICATED|PERMISSION_DENIED|"
    r"ABORTED|CANCELLED)\b")


def says_nothing_of_the_bytes(error: BaseException) -> bool:
    """Whether ``error`` (or one it was raised from) is the reader's or the store's
    failure rather than damage to the checkpoint it was reading."""
    seen: set[int] = set()
    e: Optional[BaseException] = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, _NOT_DAMAGE_TYPES) or _NOT_DAMAGE_STATUS.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


class DigestMismatch(ValueError):
    """A checkpoint's bytes are not those it was saved with."""


def _leaf_digest(x: Any) -> str:
    """CRC-32 of a host array's dtype, shape and bytes (C order), as 8 hex digits."""
    a = np.ascontiguousarray(np.asarray(x))
    crc = zlib.crc32(f"{a.dtype.str}{a.shape}".encode())
    if a.size:
        crc = zlib.crc32(memoryview(a.reshape(-1).view(np.uint8)), crc)
    return f"{crc:08x}"


def _meta_digest(meta: dict) -> str:
    return f"{zlib.crc32(json.dumps(meta, sort_keys=True).encode()):08x}"


_HASHERS = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                                 thread_name_prefix="checkpoint-digest")


def state_digest(state: PyTree, meta: dict) -> dict:
    """``{"algorithm", "leaves": {path: crc32}, "meta": crc32}`` of a checkpoint's content."""
    with_paths = jax.tree_util.tree_leaves_with_path(state)
    digests = _HASHERS.map(_leaf_digest, [leaf for _, leaf in with_paths])
    leaves = {jax.tree_util.keystr(path): d for (path, _), d in zip(with_paths, digests)}
    return {"algorithm": DIGEST_ALGORITHM, "leaves": leaves, "meta": _meta_digest(meta)}


def check_digest(saved: Any, state: PyTree, meta: dict) -> None:
    """DigestMismatch naming the first leaves whose restored bytes differ from the saved ones."""
    if not isinstance(saved, dict) or saved.get("algorithm") != DIGEST_ALGORITHM \
            or not isinstance(saved.get("leaves"), dict):
        raise DigestMismatch("its digest item is not a digest this runner wrote")
    now = state_digest(state, meta)
    bad = sorted(set(now["leaves"]) ^ set(saved["leaves"]))
    bad += [k for k, v in now["leaves"].items() if saved["leaves"].get(k, v) != v]
    if saved.get("meta") != now["meta"]:
        bad.append("meta")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DigestMismatch(f"digest mismatch in {', '.join(bad[:3])}{more}: the bytes read "
                             "are not those saved")


def _manager(directory: str, **options: Any) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(**options))


def save_policy(intervals: Sequence[int] = (), steps: Sequence[int] = ()
                ) -> ocp.checkpoint_managers.SaveDecisionPolicy:
    """Orbax's decision of when to save: at every multiple of each interval (0 or None:
    never) and at the given steps.

    Spelled out rather than ``save_interval_steps``, whose default policy also saves
    the first step of a fresh run (``InitialSavePolicy``) and at JAX's preemption sync
    point. That point is not used: it answers only when JAX's distributed runtime's
    preemption service is on, its own SIGTERM notifier would stand beside this
    project's handling of SIGTERM, SIGINT and SIGHUP (experiments.signals), and the
    processes of a run already agree on stopping at logging steps (train.Cadence).
    """
    cm = ocp.checkpoint_managers
    policies = [cm.FixedIntervalPolicy(int(n)) for n in intervals if n]
    if steps:
        policies.append(cm.SpecificStepsPolicy(frozenset(int(s) for s in steps)))
    return cm.AnySavePolicy(policies)


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` for (state, meta) pairs.

    ``max_to_keep``: the newest checkpoints kept (orbax's ``LatestN`` preservation
    policy; its ``max_to_keep`` option is deprecated). ``policy``: when
    :meth:`should_save` says yes (:func:`save_policy`; by default never, so every save
    is asked for explicitly).

    An ``s3://`` workdir is checkpointed through a local mirror
    (:mod:`experiments.checkpoint_staging`): orbax works on the mirror, each step is
    uploaded once orbax has finished it, and :meth:`latest_step`, :meth:`all_steps`
    and :meth:`has_digest` answer from the bucket.
    """

    def __init__(self, workdir: str, max_to_keep: int = 3,
                 policy: Optional[ocp.checkpoint_managers.SaveDecisionPolicy] = None) -> None:
        self.workdir = paths.absolute(workdir)
        self.directory = paths.join(self.workdir, "checkpoints")
        self.errors_log = faults.errors_log(self.workdir)
        self.max_to_keep = max_to_keep
        options: dict[str, Any] = dict(
            create=True,
            preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
            save_decision_policy=policy or save_policy(),
            # The decision depends on the step alone: a save still being written in the
            # background must not make orbax skip the next one.
            enable_should_save_is_saving_in_progress_check=False,
            # Remove half-written steps left by a killed run.
            cleanup_tmp_directories=True,
            # Host arrays are written in a background thread while training goes on.
            enable_async_checkpointing=True)
        self.staged = checkpoint_staging.is_staged(self.workdir)
        self.local_directory = self.directory  # where orbax reads and writes
        if self.staged:
            index = jax.process_index()
            self.saves = index == 0  # process 0 holds the whole replicated state
            self.local_directory = checkpoint_staging.mirror_dir(self.directory, index)
            shutil.rmtree(self.local_directory, ignore_errors=True)
            os.makedirs(self.local_directory)
            self.uploads = checkpoint_staging.BackgroundUpload()
            if self.saves:
                checkpoint_staging.remove_unfinished(self.directory)
            # The bucket keeps max_to_keep steps; the mirror only the newest. Each
            # process's manager runs alone: no orbax barrier across processes (and then
            # orbax leaves creating the directory to the caller, done above).
            options.update(
                create=False, preservation_policy=ocp.checkpoint_managers.LatestN(1),
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    primary_host=index, active_processes={index}))
        self.manager = _manager(self.local_directory, **options)

    def should_save(self, step: int) -> bool:
        """Whether the policy saves after ``step`` (never a step already saved)."""
        return self.manager.should_save(step)

    def all_steps(self) -> list[int]:
        """The steps saved in the workdir, oldest first (on ``s3://``: those committed on
        the bucket, after the upload in flight, if any, has finished)."""
        if self.staged:
            self.uploads.wait()
            return checkpoint_staging.committed_steps(self.directory)
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        if self.staged:
            steps = self.all_steps()
            return steps[-1] if steps else None
        return self.manager.latest_step()

    def save(self, step: int, state: PyTree, meta: dict, digest: bool = True) -> None:
        """Save, whatever the policy says (the caller asked: a stop signal, or
        :meth:`should_save`); ``state`` should be host (numpy) arrays so that training
        may go on.

        The digest is computed here, from the arrays handed to orbax, so it
        describes what was meant to be written (``digest=False`` only for the
        benchmark of its cost)."""
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if self.staged:
            if not self.saves:
                return  # process 0 saves the replicated state (checkpoint_staging)
            self.uploads.wait()  # the previous step is on the bucket before the next starts
        if digest:
            items[DIGEST_ITEM] = ocp.args.JsonSave(state_digest(state, meta))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        if self.staged:
            self.uploads.start(lambda: self._upload(step))

    def _upload(self, step: int) -> None:
        """(Background) once orbax has finished ``step`` in the mirror: upload it, then
        keep the newest ``max_to_keep`` on the bucket."""
        self.manager.wait_until_finished()
        checkpoint_staging.upload_step(os.path.join(self.local_directory, str(step)),
                                       self.directory, step)
        checkpoint_staging.keep_newest(self.directory, self.max_to_keep)

    def has_digest(self, step: int) -> bool:
        return paths.exists(paths.join(self.directory, str(step), DIGEST_ITEM))

    def _fetch(self, step: int) -> None:
        """On ``s3://``: the committed ``step`` downloaded into the mirror, replacing any
        copy there, and shown to orbax."""
        self.manager.wait_until_finished()
        self.uploads.wait()
        try:
            checkpoint_staging.download_step(self.directory, step,
                                             os.path.join(self.local_directory, str(step)))
        finally:
            self.manager.reload()

    def restore(self, step: int, abstract_state: PyTree,
                verify: bool = True) -> tuple[PyTree, dict]:
        """Restore into the structure, shapes and dtypes of ``abstract_state``; a
        checkpoint with a digest is checked against it (DigestMismatch)."""
        if self.staged:
            self._fetch(step)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        items = dict(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        # Whether the copy orbax reads has a digest (on s3://, the one just downloaded).
        verify = verify and paths.exists(paths.join(self.local_directory, str(step),
                                                    DIGEST_ITEM))
        if verify:
            items[DIGEST_ITEM] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        meta = out["meta"]
        if not isinstance(meta, dict):
            raise ValueError(f"its meta item is {type(meta).__name__}, not a JSON object")
        if verify:
            check_digest(out[DIGEST_ITEM], out["state"], meta)
        return out["state"], dict(meta)

    def restore_newest(self, abstract_state: PyTree, log: Callable[[str], None] = print,
                       is_main: bool = True) -> Optional[tuple[int, PyTree, dict]]:
        """(step, state, meta) of the newest checkpoint that restores; None if there is none.

        Each one that fails is named in one line and moved aside (process 0
        moves, every process skips it); NoUsableCheckpoint when all fail;
        CheckpointUnreadable, with nothing moved, when a read fails for a reason
        that is not the checkpoint's (:func:`says_nothing_of_the_bytes`).
        """
        failures = []
        for step in reversed(self.all_steps()):
            try:
                with quiet_libraries(self.errors_log, f"restoring checkpoint {step}"):
                    state, meta = self.restore(step, abstract_state)
                return step, state, meta
            except Exception as e:  # noqa: BLE001 - any damage means: try the next one
                reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
                faults.append(self.errors_log, f"checkpoint {step} cannot be restored",
                        faults.traceback_text(e))
                if says_nothing_of_the_bytes(e):
                    raise CheckpointUnreadable(
                        f"checkpoint {step} in {self.directory} could not be read ({reason}), "
                        "which says nothing of its bytes: nothing was moved aside; rerun to "
                        "try again") from e
                failures.append(f"  step {step}: {reason}")
                where = self._move_aside(step) if is_main else "left for process 0 to move"
                if self.staged:  # its downloaded copy, whoever moves the original
                    shutil.rmtree(os.path.join(self.local_directory, str(step)),
                                  ignore_errors=True)
                    self.manager.reload()
                log(f"checkpoint {step} cannot be restored ({reason}); {where}; trying the "
                    "next older one")
        if failures:
            raise NoUsableCheckpoint(
                f"no checkpoint in {self.directory} restores:\n" + "\n".join(failures)
                + f"\nthe damaged ones are in {paths.join(self.workdir, DAMAGED_DIR)}; "
                "rerun with --overwrite to start over")
        return None

    def _move_aside(self, step: int) -> str:
        src = paths.join(self.directory, str(step))
        dst_dir = paths.join(self.workdir, DAMAGED_DIR)
        paths.makedirs(dst_dir)
        dst = paths.join(dst_dir, str(step))
        n = 1
        while paths.exists(dst):
            dst, n = paths.join(dst_dir, f"{step}.{n}"), n + 1
        paths.move(src, dst)
        self.manager.reload()
        return f"moved aside to {dst}"

    def wait(self) -> None:
        """Until the last save is written (and, on ``s3://``, uploaded)."""
        self.manager.wait_until_finished()
        if self.staged:
            self.uploads.wait()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
            if self.staged:
                shutil.rmtree(self.local_directory, ignore_errors=True)


_QUIET_LOGGERS = ("absl", "orbax", "asyncio", "jax")


@contextlib.contextmanager
def quiet_libraries(log_path: Optional[str], title: str) -> Iterator[None]:
    """Keep the libraries' own reports of a failing restore out of the console.

    Orbax and tensorstore report a damaged file through absl/orbax/asyncio
    loggers and, from their background threads and event loops, as unhandled
    thread exceptions and "Exception ignored" messages (``RuntimeError: Event
    loop is closed``): tens of tracebacks for one truncated file. Here they go
    to ``log_path`` instead; the caller says what failed in one line.
    """
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    saved = [(lg, lg.level, lg.propagate, list(lg.handlers)) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
        lg.setLevel(logging.WARNING)
    hooks = (threading.excepthook, sys.unraisablehook, sys.stderr)

    def on_thread(args: Any) -> None:
        captured.write("".join(traceback.format_exception(
            args.exc_type, args.exc_value, args.exc_traceback)))

    def on_unraisable(unraisable: Any) -> None:
        captured.write(f"{unraisable.err_msg or 'Exception ignored'}: {unraisable.exc_value!r}\n")

    # Tensorstore's callbacks into orbax's finished event loop print their tracebacks
    # from their own threads, straight to the process's stderr (PyErr_Print, no hook
    # involved): so file descriptor 2 itself points at a capture file meanwhile.
    stream = _CapturingStream(captured)
    threading.excepthook, sys.unraisablehook, sys.stderr = on_thread, on_unraisable, stream
    capture_fd = tempfile.TemporaryFile()
    sys.__stderr__.flush()
    saved_fd = os.dup(2)
    os.dup2(capture_fd.fileno(), 2)
    try:
        yield
    except BaseException:
        _settle(stream, capture_fd)  # the threads of a failed read report a moment later
        raise
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        threading.excepthook, sys.unraisablehook, sys.stderr = hooks
        for lg, level, propagate, handlers in saved:
            lg.setLevel(level)
            lg.propagate, lg.handlers = propagate, handlers
        capture_fd.seek(0)
        captured.write(capture_fd.read().decode(errors="replace"))
        capture_fd.close()
        faults.append(log_path, title, captured.getvalue())


class _CapturingStream(io.TextIOBase):
    """A thread-safe text sink standing in for sys.stderr, remembering its last write."""

    def __init__(self, sink: io.StringIO) -> None:
        self._sink, self._lock = sink, threading.Lock()
        self.last_write = time.monotonic()

    def write(self, text: str) -> int:
        with self._lock:
            self.last_write = time.monotonic()
            return self._sink.write(text)


def _settle(stream: _CapturingStream, capture_fd: Any, quiet_s: float = 0.3,
            at_most_s: float = 3.0) -> None:
    """Wait until neither sink was written for ``quiet_s`` (at most ``at_most_s``)."""
    deadline = time.monotonic() + at_most_s
    size, changed = os.fstat(capture_fd.fileno()).st_size, time.monotonic()
    while time.monotonic() < deadline:
        now_size = os.fstat(capture_fd.fileno()).st_size
        if now_size != size:
            size, changed = now_size, time.monotonic()
        if time.monotonic() - max(changed, stream.last_write) >= quiet_s:
            return
        time.sleep(0.05)


def load_state(workdir: str, step: Optional[int] = None) -> tuple[int, dict]:
    """(step, state as nested dicts of numpy arrays) of a run's checkpoint.

    For analysis and tests: no target structure is needed, so NamedTuples in the
    optimizer state come back as plain containers. On ``s3://`` the newest committed
    step (or ``step``) is downloaded to a temporary folder and read from there.
    """
    directory = paths.absolute(paths.join(workdir, "checkpoints"))
    if not checkpoint_staging.is_staged(directory):
        return _load_state(directory, workdir, step)
    if step is None:
        committed = checkpoint_staging.committed_steps(directory)
        step = committed[-1] if committed else None
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}")
    with tempfile.TemporaryDirectory(prefix="grasp_jax_load_") as local:
        checkpoint_staging.download_step(directory, step, os.path.join(local, str(step)))
        return _load_state(local, workdir, step)


def _load_state(directory: str, workdir: str, step: Optional[int]) -> tuple[int, dict]:
    manager = _manager(directory, read_only=True, create=False)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}")
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return step, jax.tree_util.tree_map(np.asarray, out["state"])
