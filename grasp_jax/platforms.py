"""Choices made for the platform a program is lowered for, not the host that traces it.

Some code is faster on one backend and slower on another (the models' CPU
convolution path, unrolling a loop on XLA:CPU). Deciding by
``jax.default_backend()`` while tracing bakes the host's choice into the
program: traced on a CPU host and exported for a GPU or TPU, it would carry
the CPU's choices there. ``lax.platform_dependent`` stages both and lets the
lowering platform pick, so XLA only ever sees the branch for its platform.

Staging a choice at every place it is made (each convolution of a network)
costs much more than the choice itself under differentiation: each becomes a
``cond`` that ``grad``, ``linearize`` and transposition carry through, and the
partial evaluation of a cond keeps the residuals of both branches. So a
program that contains many such choices can stage *one*: :func:`per_platform`
traces a function twice, once for the CPU and once for every other platform,
with :func:`traced_platform` telling the code inside which it is being traced
for, so that each choice inside is a plain Python ``if``. Code that finds no
platform set (called outside :func:`per_platform`) stages its own choice.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar

import jax
from jax import lax

T = TypeVar("T")

#: What :func:`traced_platform` reports: the CPU, or any other platform (GPU, TPU).
Platform = Literal["cpu", "other"]

_state = threading.local()


def traced_platform() -> Platform | None:
    """The platform the enclosing :func:`per_platform` branch is traced for, or None
    outside any (then a choice must be staged, e.g. with ``lax.platform_dependent``)."""
    return getattr(_state, "platform", None)


@contextlib.contextmanager
def tracing_for(platform: Platform) -> Iterator[None]:
    """Trace the body for ``platform`` (what :func:`per_platform` does for each branch)."""
    if platform not in ("cpu", "other"):
        raise ValueError(f"platform={platform!r}; expected 'cpu' or 'other'")
    previous = traced_platform()
    _state.platform = platform
    try:
        yield
    finally:
        _state.platform = previous


def local_platform() -> Platform:
    """The branch the devices of this process run: JAX's default backend's."""
    return "cpu" if jax.default_backend() == "cpu" else "other"


def per_platform(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` traced once for the CPU and once for every other platform, the
    lowering platform picking one (``lax.platform_dependent``).

    Inside an enclosing :func:`per_platform` branch, or where the platform is known
    at once (outside any trace), ``fn`` is traced only once. Both traces must give
    outputs of one structure, shapes and dtypes.
    """
    current = traced_platform()
    if current is not None:
        return fn(*args)

    def branch(platform: Platform) -> Callable[..., T]:
        def run(*a: Any) -> T:
            with tracing_for(platform):
                return fn(*a)

        return run

    return lax.platform_dependent(*args, cpu=branch("cpu"), default=branch("other"))
