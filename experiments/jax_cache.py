"""JAX's persistent compilation cache, on by default for runs, sweeps and benchmarks.

A second run of the same shapes, a resumed run and every sweep cell after the
first then load their compiled programs from disk instead of compiling them
again (on CPU most of a small run's start-up). One directory per user:
``$XDG_CACHE_HOME/grasp_jax/jax``, else ``~/.cache/grasp_jax/jax``; the
runner's ``--compilation_cache DIR`` moves it and ``--compilation_cache none``
turns it off.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

DISABLED = "none"


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "grasp_jax", "jax")


def unusable(path: str) -> Optional[str]:
    """Why ``path`` cannot hold the cache (a file, not creatable, not writable), or None.

    Probed for real, as a workdir is: permission bits do not tell the whole story
    (root, read-only mounts).
    """
    from experiments import workdir

    return workdir.unusable(os.path.abspath(os.path.expanduser(path)))


def enable(path: Optional[str] = None) -> Optional[str]:
    """Point JAX's compilation cache at ``path`` (default: :func:`default_dir`); the directory used.

    Must run before the first compilation. Every program is cached, however
    quick to compile: on CPU a run compiles dozens of sub-second programs.
    """
    if path == DISABLED:
        return None
    import jax

    path = os.path.abspath(os.path.expanduser(path or default_dir()))
    # A cache is an optimisation: run without one rather than fail, in one line (JAX
    # itself warns once per program it cannot write: over a hundred lines a run).
    problem = unusable(path)
    if problem is None:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            problem = f"cannot be created ({e.strerror or e})"
    if problem:
        print(f"warning: compilation cache {path} {problem}; compiling without a cache",
              file=sys.stderr, flush=True)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def add_flag(parser, default: Optional[str] = None) -> None:
    """``--compilation_cache DIR|none`` on a benchmark's argparse parser.

    Benchmarks use the cache by default; those whose figures are compile times
    pass ``default="none"`` (a warm cache would time loading, not compiling).
    """
    parser.add_argument(
        "--compilation_cache", default=default,
        help="JAX's persistent compilation cache directory ('none' disables; default: "
             + ("none: this benchmark times compilation" if default == DISABLED
                else f"{default_dir()}") + ")")
