"""A run's working directory: where it goes, whether it can host a run, and who holds it.

* :func:`unusable` says why a path cannot be a workdir (a file, not creatable,
  not writable, a read-only file system) without leaving anything behind.
* :func:`conflict` says why a workdir holds another run.
* :class:`Lock` makes a workdir one run's at a time: a file holding the
  holder's PID, host and start time, created exclusively before anything else
  is written. A lock whose process is gone (on this host) is taken over.
* :func:`prepare` clears an old run when asked and saves the config.

A workdir may be a ``gs://`` or ``s3://`` URL (the hosts of a TPU pod share no
file system); every file goes through ``experiments.paths``, and on an object
store the lock is a conditional create (see :func:`paths.create_exclusive`).
An ``s3://`` workdir's checkpoints are written to a local mirror first
(:mod:`experiments.checkpoint_staging`), which must be writable too.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
import time
from typing import Optional

from experiments import checkpoint_staging, config_schema, paths
from experiments.outputs import write_text

# The files a run owns in its workdir; --overwrite removes these and nothing else.
RUN_FILES = ("checkpoints", "checkpoints.damaged", "tensorboard", "config.json", "metrics.jsonl",
             "results.json", "sparsity.md", "density.png", "masks.npz", "gradient_flow.json",
             "sparse_params.npz", "errors.log")
LOCK_FILE = "run.lock"
# A lock with no readable content this long after it was written was left by a start
# that failed mid-write (a full disk, a crash): not a holder, so it is taken over.
UNREADABLE_LOCK_STALE_S = 10.0


def default_workdir(config: config_schema.Config) -> str:
    name = f"{config.dataset}_{config.arch}_{config.method}"
    if config.sparsity or config.method != "dense":
        name += f"_{config.sparsity:g}"
    return os.path.join("runs", f"{name}_seed{config.seed}")


def unusable(path: str) -> Optional[str]:
    """Why ``path`` cannot be a directory this process writes into, or None.

    Probes for real (a temporary file in the directory, or in the nearest
    existing ancestor when it does not exist yet) and removes the probe: the
    permission bits do not tell the whole story (root, read-only mounts).
    """
    if not path.strip():
        return "is empty"
    if paths.is_url(path):
        return paths.unusable_url(path) or checkpoint_mirror_problem(path)
    if os.path.islink(path) and not os.path.exists(path):
        return "is a symbolic link that leads nowhere (dangling, or a loop)"
    if os.path.exists(path) and not os.path.isdir(path):
        return "exists and is not a directory"
    probe_dir = path
    while not os.path.isdir(probe_dir):
        parent = os.path.dirname(os.path.abspath(probe_dir))
        if os.path.exists(probe_dir) or parent == probe_dir:
            return f"cannot be created ({probe_dir} is not a directory)"
        probe_dir = parent
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".write-probe-"):
            pass
    except OSError as e:
        reason = "read-only file system" if e.errno == errno.EROFS else e.strerror
        return f"is not writable ({probe_dir}: {reason})"
    return None


def checkpoint_mirror_problem(url: str) -> Optional[str]:
    """Why the local mirror that an ``s3://`` workdir's checkpoints are written to first
    (:mod:`experiments.checkpoint_staging`) cannot be, or None (always None elsewhere)."""
    if not checkpoint_staging.is_staged(url):
        return None
    root = checkpoint_staging.cache_root()
    problem = unusable(root)
    if problem:
        return (f"cannot be checkpointed: its local checkpoint mirror {root} "
                f"(${checkpoint_staging.CACHE_ENV}) {problem}")
    return None


def conflict(workdir: str, config: config_schema.Config) -> Optional[str]:
    """Why ``workdir`` cannot host ``config`` (None if it can: new, empty or the same run).

    Runs are the same when their resolved configs agree on every field except
    the run-control ones (``config_schema.RUN_CONTROL_FIELDS``), which do not change
    the training trajectory.
    """
    path = paths.join(workdir, "config.json")
    damaged = damaged_side_file(workdir)
    if damaged:
        return damaged
    failed = no_usable_checkpoint(workdir)
    if failed:
        return failed
    if paths.exists(path):
        try:
            raw = json.loads(paths.read_text(path))
            if not isinstance(raw, dict):
                raise ValueError(f"it holds a JSON {type(raw).__name__}, not an object")
            saved = config_schema.Config.from_dict(raw)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            return f"{path} cannot be read ({e})"
        diff = config_schema.differences(saved, config)
        if diff:
            lines = "\n".join(f"  {k}: {a!r} in the workdir, {b!r} now" for k, a, b in diff)
            return f"{workdir} holds a run with a different configuration:\n{lines}"
        return None
    if paths.exists(paths.join(workdir, "checkpoints")):
        return f"{workdir} holds checkpoints but no config.json to check them against"
    return None


def damaged_side_file(workdir: str) -> Optional[str]:
    """Why one of the files a resumed run reads is unusable (naming it), or None.

    Checked before anything is written, so a damaged file is a refusal rather than a
    traceback halfway through the run: ``checkpoints`` must be a directory,
    ``gradient_flow.json`` a JSON object, each complete line of ``metrics.jsonl`` a
    JSON object (a last line cut short by a kill is dropped on resume, as before).
    """
    checkpoints = paths.join(workdir, "checkpoints")
    if paths.exists(checkpoints) and not paths.isdir(checkpoints):
        return f"{checkpoints} is a file, not a directory of checkpoints"
    flow = paths.join(workdir, "gradient_flow.json")
    if paths.exists(flow):
        try:
            if not isinstance(json.loads(paths.read_text(flow)), dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            return f"{flow} cannot be read ({e}); remove it, or pass --overwrite"
    metrics = paths.join(workdir, "metrics.jsonl")
    if paths.exists(metrics):
        try:
            text = paths.read_text(metrics)
        except (OSError, ValueError) as e:
            return f"{metrics} cannot be read ({e}); remove it, or pass --overwrite"
        for number, line in enumerate(text.splitlines(keepends=True), 1):
            if not line.endswith("\n"):
                break  # cut short by a kill: dropped on resume
            try:
                ok = isinstance(json.loads(line), dict)
            except ValueError:
                ok = False
            if not ok:
                return (f"{metrics} line {number} is not a JSON object ({line.strip()[:60]!r}); "
                        "remove that line, or pass --overwrite")
    return None


def no_usable_checkpoint(workdir: str) -> Optional[str]:
    """Why a workdir whose checkpoints were all moved aside as damaged cannot resume.

    Without this a plain rerun would find no checkpoint and silently start over
    from step 0; it keeps being refused until ``--overwrite`` says to.
    """
    damaged = paths.join(workdir, "checkpoints.damaged")
    checkpoints = paths.join(workdir, "checkpoints")
    if not paths.isdir(damaged) or not paths.listdir(damaged):
        return None
    if checkpoint_staging.is_staged(workdir):  # a step without its marker does not count
        steps = checkpoint_staging.committed_steps(checkpoints)
    else:
        steps = [n for n in (paths.listdir(checkpoints) if paths.isdir(checkpoints) else [])
                 if n.isdigit()]
    if steps:
        return None
    return (f"no checkpoint in {checkpoints} restores (the damaged ones are in {damaged}); "
            "rerun with --overwrite to start over")


def clear_run(workdir: str) -> None:
    """Remove the files a run owns (:data:`RUN_FILES`) from ``workdir``, nothing else."""
    for name in RUN_FILES:
        paths.remove_tree(paths.join(workdir, name))


def prepare(workdir: str, config: config_schema.Config, overwrite: bool) -> None:
    """Clear the old run if asked, then save the config (process 0 only)."""
    if overwrite:
        clear_run(workdir)
    paths.makedirs(workdir)
    write_text(paths.join(workdir, "config.json"), config.to_json())


class LockHeld(RuntimeError):
    """Another live run holds the workdir."""


class Lock:
    """``<workdir>/run.lock``: one run per workdir.

    :meth:`acquire` creates the workdir if needed and the lock file
    exclusively (``O_EXCL``, atomic on POSIX file systems; on an object store a
    write the store refuses once the object exists); it raises LockHeld
    naming the holder when a live process holds it, and takes over a lock
    whose process is gone from this host. :meth:`release` removes it (only if
    it is still ours).
    """

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.path = paths.join(workdir, LOCK_FILE)
        self.created_workdir = False
        self.held = False
        self.took_over: Optional[str] = None  # a line describing a stale holder, if any

    def _holder(self) -> Optional[dict]:
        try:
            return json.loads(paths.read_text(self.path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written right now, or damaged

    def acquire(self) -> None:
        if not paths.isdir(self.workdir):
            paths.makedirs(self.workdir)
            self.created_workdir = True
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        for _ in range(3):
            if not paths.create_exclusive(self.path, json.dumps(me).encode()):
                holder = self._holder()
                if holder is None:
                    continue  # released in between: try again
                if not holder:
                    age = paths.age_s(self.path)
                    if age is not None and age > UNREADABLE_LOCK_STALE_S:
                        self.took_over = (f"took over {self.path}: it has been unreadable for "
                                          f"{age:.0f} s (left by a start that failed)")
                        paths.remove(self.path)
                        continue
                if self._stale(holder):
                    self.took_over = (f"took over the lock of process {holder.get('pid')} on "
                                      f"{holder.get('host')} (started {holder.get('started')}), "
                                      "which is gone")
                    paths.remove(self.path)
                    continue
                raise LockHeld(self._describe(holder)) from None
            self.held = True
            return
        raise LockHeld(f"{self.path} keeps changing hands; is another run starting there?")

    def _stale(self, holder: dict) -> bool:
        same_host = holder.get("host") == socket.gethostname()
        pid = holder.get("pid")
        return same_host and isinstance(pid, int) and not paths.process_alive(pid)

    def _describe(self, holder: dict) -> str:
        if not holder:
            return (f"{self.workdir} is locked ({self.path} exists but cannot be read: a run is "
                    f"starting, or one failed to; it is taken over once it is "
                    f"{UNREADABLE_LOCK_STALE_S:.0f} s old)")
        return (f"{self.workdir} is in use by process {holder.get('pid')} on {holder.get('host')} "
                f"(started {holder.get('started')}); wait for it to finish, or stop it. If that "
                f"process is gone from another host, remove {self.path}")

    def release(self) -> None:
        if self.held and (self._holder() or {}).get("pid") == os.getpid():
            paths.remove(self.path)
        self.held = False

    def discard_workdir_if_created(self) -> None:
        """After a refusal: leave no trace of a workdir this lock created."""
        self.release()
        if paths.is_url(self.workdir):
            return  # a prefix with no objects under it does not exist
        if self.created_workdir and os.path.isdir(self.workdir) and not os.listdir(self.workdir):
            os.rmdir(self.workdir)
