"""Whether ``--sweep_dir`` can hold a sweep, decided before anything is written."""

from __future__ import annotations

import os
import tempfile

from experiments import paths, workdir


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def sweep_dir_problem(path: str, *, must_exist: bool = False) -> str | None:
    """What makes ``path`` unusable as a sweep directory, or None.

    Unusable: empty, not a directory, not writable (permissions, a read-only
    file system: ``os.access`` reports both), or, when absent, under a
    non-directory or a directory it cannot be created in (or ``must_exist``).
    Asks the file system only; :func:`create_sweep_dir` proves it by writing.
    """
    if not path:
        return "is empty"
    if paths.is_url(path):
        # A bucket prefix "exists" once an object is under it; the probe write finds no
        # credentials, no bucket, no network and no permission alike, in one line.
        if must_exist and not paths.isdir(path):
            return "holds no objects (no sweep there)"
        return paths.unusable_url(path) or workdir.checkpoint_mirror_problem(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        return "exists and is not a directory"
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            return "is not writable (permissions or a read-only file system)"
        return None
    if must_exist:
        return "does not exist"
    parent = _nearest_existing(path)
    if not os.path.isdir(parent):
        return f"cannot be created: {parent!r} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return (f"cannot be created: {parent!r} is not writable "
                "(permissions or a read-only file system)")
    return None


def create_sweep_dir(path: str) -> None:
    """Create ``path`` (and its missing parents) and write and delete a file in it.

    Raises OSError when that fails, having removed the directories it created:
    a refused sweep directory is left as it was found. A bucket URL needs
    nothing created (a prefix is no object) and was probed by
    :func:`sweep_dir_problem`.
    """
    if paths.is_url(path):
        return
    created = []
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError:
        for d in created:  # deepest first
            try:
                os.rmdir(d)
            except OSError:
                pass
        raise
