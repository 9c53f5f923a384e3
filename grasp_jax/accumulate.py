"""Sums over the chunks of a batch: the one mechanism behind every data-dependent score.

With chunks b_1..b_k of a batch and θ the prunable weights (everything else
held fixed at its value in ``params``):

    accumulate_gradient:  acc + Σ_c ∇_θ L(θ; b_c)
    accumulate_hvp:       acc + Σ_c ∇²_θθ L(θ; b_c) · v

Both are jittable and pmap-able. Called eagerly on several chunks they loop
over the chunks on the host, one compiled program per chunk shape, so the
device holds one chunk at a time (the batch may stay in host memory); inside a
trace they loop in the trace (see :func:`grasp_jax.chunks.sum_over_chunks`).
With ``axis_name`` each device sums its own chunks and the increment is
summed across devices (``lax.psum``), so a replicated ``acc`` stays replicated.

GraSP needs g summed over every chunk before any Hg can be formed. When the
residuals of every chunk fit in memory, :func:`gradient_and_hvp_with` instead
linearizes the gradient of Σ_c L_c once and applies that linear map to g, in
one program at the floor of ~3 gradients of FLOPs (XLA's count for two chunks
visited one after another in one traced program is ~3.65: each chunk's
forward and backward run again for Hg).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grasp_jax.chunks import (
    ChunkLayout,
    chunk_layout,
    host_chunks,
    sum_loss_over_chunks,
    sum_over_chunks,
)
from grasp_jax.platforms import local_platform, per_platform, traced_platform
from grasp_jax.precision import SCORING_PRECISION, check_matmul_precision, precision_scope
from grasp_jax.prunable import (
    PrunableSpec,
    check_leaf_dtypes,
    merge_prunable,
    prunable_flags,
    scatter_prunable,
    split_prunable,
)

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]
# finish(params, g, hg, flags) -> result, with g and hg shaped like params.
Finish = Callable[[PyTree, PyTree, PyTree, Sequence[bool]], Any]

__all__ = ["accumulate_gradient", "accumulate_hvp", "default_memory_budget"]


# --------------------------------------------------------------------------
# The loss as a function of θ.


def scalar_loss(loss_fn: LossFn, params: PyTree, batch: PyTree) -> jax.Array:
    """``loss_fn(params, batch)``, checked (at trace time, so once per compile) to be a scalar."""
    out = loss_fn(params, batch)
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if shape != () or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            "loss_fn(params, batch) must return a scalar float (the mean loss of one "
            f"microbatch); it returned shape={shape} dtype={dtype}"
        )
    return out


def prunable_loss(params: PyTree, loss_fn: LossFn,
                  flags: Sequence[bool]) -> tuple[list, Callable[[list, PyTree], jax.Array]]:
    """θ (a list of the prunable leaves) and ``(θ, batch) -> L``, the rest held at ``params``."""
    theta, rest, treedef = split_prunable(params, flags)

    def loss_of(t: list, batch: PyTree) -> jax.Array:
        return scalar_loss(loss_fn, merge_prunable(t, rest, flags, treedef), batch)

    return theta, loss_of


@functools.lru_cache(maxsize=64)
def with_batch_axis(loss_fn: LossFn, axis_name: str) -> LossFn:
    """``loss_fn`` run under a size-1 ``vmap`` named ``axis_name``.

    A Linen ``nn.BatchNorm(axis_name='batch')`` (Flax's ImageNet example)
    averages its statistics with ``lax.pmean`` over that axis and fails with an
    unbound-axis error outside ``pmap``. Over one member the mean is the
    identity, so the chunk stays its own BatchNorm batch. Cached, so the same
    ``loss_fn`` gives the same function and jit caches stay warm.
    """

    def bound(params: PyTree, batch: PyTree) -> jax.Array:
        def one(_):
            return loss_fn(params, batch)

        return jax.vmap(one, axis_name=axis_name)(jnp.zeros((1,)))[0]

    return bound


class ScoringSetup(NamedTuple):
    """What every data-dependent score checks once: θ's flags, the chunk layout, the loss,
    and the precision its matmuls and convolutions are traced at (None: the backend's)."""

    flags: tuple[bool, ...]
    layout: ChunkLayout
    loss_fn: LossFn
    matmul_precision: str | None = SCORING_PRECISION


def scoring_setup(params: PyTree, loss_fn: LossFn, batch: PyTree, *,
                  num_microbatches: int | None = None, microbatch_size: int | None = None,
                  prunable: PrunableSpec = None,
                  batch_axis_name: str | None = None,
                  matmul_precision: str | None = SCORING_PRECISION) -> ScoringSetup:
    """Validate the arguments shared by the scores; errors name the bad value."""
    precision = check_matmul_precision(matmul_precision)
    flags = prunable_flags(params, prunable)
    check_leaf_dtypes(params, flags)
    layout = chunk_layout(batch, num_microbatches=num_microbatches, microbatch_size=microbatch_size)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if batch_axis_name is not None:
        loss_fn = with_batch_axis(loss_fn, batch_axis_name)
    return ScoringSetup(flags, layout, loss_fn, precision)


# --------------------------------------------------------------------------
# The primitives and their single dispatch.


def _all_reduce(values: list, axis_name: str | None) -> list:
    """Σ over the devices of ``axis_name`` (every device of every host under a
    multi-process pmap); the identity without one."""
    return values if axis_name is None else jax.lax.psum(values, axis_name)


def _chunk_gradient(loss_of, theta, v, chunk):
    return jax.grad(loss_of)(theta, chunk)


def _chunk_hvp(loss_of, theta, v, chunk):
    # Forward-over-reverse: the jvp of the gradient along v; H is never formed.
    return jax.jvp(lambda t: jax.grad(loss_of)(t, chunk), (theta,), (v,))[1]


_PER_CHUNK = {"gradient": _chunk_gradient, "hvp": _chunk_hvp}


def _add_chunk_sums(params, batch, v, acc, *, kind, loss_fn, flags, layout, axis_name):
    # Traced once per platform: the model's backend choices are plain ones inside.
    return per_platform(functools.partial(_add_chunk_sums_on, kind=kind, loss_fn=loss_fn,
                                          flags=flags, layout=layout, axis_name=axis_name),
                        params, batch, v, acc)


def _add_chunk_sums_on(params, batch, v, acc, *, kind, loss_fn, flags, layout, axis_name):
    theta, loss_of = prunable_loss(params, loss_fn, flags)
    v_theta = None if v is None else split_prunable(v, flags)[0]
    per_chunk = _PER_CHUNK[kind]
    total = sum_over_chunks(lambda c: per_chunk(loss_of, theta, v_theta, c), batch, layout, theta)
    total = _all_reduce(total, axis_name)
    acc_theta, acc_rest, treedef = split_prunable(acc, flags)
    return merge_prunable([a + t for a, t in zip(acc_theta, total)], acc_rest, flags, treedef)


_STATIC = ("kind", "loss_fn", "flags", "layout", "axis_name")
_accumulate_program = jax.jit(_add_chunk_sums, static_argnames=_STATIC)
# The host loop's variant reuses the accumulator's buffers; it only ever sees its own.
_accumulate_in_place = jax.jit(_add_chunk_sums, static_argnames=_STATIC, donate_argnames=("acc",))


@functools.partial(jax.jit, static_argnames=("flags",))
def _zeros(params, *, flags):
    theta, _, _ = split_prunable(params, flags)
    return scatter_prunable([jnp.zeros_like(t) for t in theta], params, flags)


@jax.jit
def _copy(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


def is_traced(*trees: PyTree) -> bool:
    """Whether any leaf is a tracer (the call is inside jit, pmap, grad, ...)."""
    return any(isinstance(x, jax.core.Tracer) for t in trees for x in jax.tree_util.tree_leaves(t))


def accumulate(kind: str, params: PyTree, batch: PyTree, v: PyTree | None, acc: PyTree | None,
               setup: ScoringSetup, axis_name: str | None = None) -> PyTree:
    """``acc`` plus Σ_c of the per-chunk ``kind`` ("gradient" or "hvp" along ``v``).

    The one place that decides how chunks are visited: an eager call with
    several chunks loops on the host over one compiled per-chunk program (a
    short last chunk compiles one more); anything else is one program over the
    whole batch. The caller's ``acc`` is never overwritten. Every program is
    traced at ``setup.matmul_precision``.
    """
    with precision_scope(setup.matmul_precision):
        return _accumulate(kind, params, batch, v, acc, setup, axis_name)


def _accumulate(kind, params, batch, v, acc, setup, axis_name):
    static = {"kind": kind, "loss_fn": setup.loss_fn, "flags": setup.flags, "axis_name": axis_name}
    if setup.layout.num_chunks > 1 and axis_name is None and not is_traced(params, batch, v, acc):
        acc = _zeros(params, flags=setup.flags) if acc is None else _copy(acc)
        for chunk, one in host_chunks(batch, setup.layout):
            acc = _accumulate_in_place(params, chunk, v, acc, layout=one, **static)
        return acc
    if acc is None:
        acc = _zeros(params, flags=setup.flags)
    return _accumulate_program(params, batch, v, acc, layout=setup.layout, **static)


# --------------------------------------------------------------------------
# g and Hg together: every chunk linearized at once when it fits.


def _linearized(params, batch, loss_fn, flags, layout):
    """θ, g and the map v -> Σ_c H_c v, from one linearization of ∇ Σ_c L_c.

    ``jax.linearize`` evaluates the gradient once and keeps what its tangent
    map needs, so g and Hg cost one forward-over-reverse pass. Since
    Σ_c ∇²L_c · v is the derivative of Σ_c ∇L_c along v, one linearization of
    the summed gradient serves every chunk.
    """
    theta, loss_of = prunable_loss(params, loss_fn, flags)

    def total(t):
        return sum_loss_over_chunks(lambda c: loss_of(t, c), batch, layout)

    g, hvp = jax.linearize(jax.grad(total), theta)
    return theta, g, hvp


class Measured(NamedTuple):
    """A program's ``value`` and the bytes of the residuals it linearized.

    ``residual_bytes`` is pytree metadata, not a leaf: ``jax.eval_shape`` of
    the program reports it, and since eval_shape and the call share jit's
    trace cache, choosing the path costs no second linearization.
    """

    value: Any
    residual_bytes: int


jax.tree_util.register_pytree_node(
    Measured, lambda m: ((m.value,), m.residual_bytes), lambda nbytes, v: Measured(v[0], nbytes))


def tree_bytes(tree: PyTree) -> int:
    """Bytes of every array leaf of ``tree`` (shapes only: works on tracers)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


def _no_finish(params, g, hg, flags):
    return ()


def linearized_bytes(params: PyTree, batch: PyTree, setup: ScoringSetup) -> int:
    """Bytes of the residuals kept when every chunk is linearized at once (shapes only).

    Traced once per shape (jit caches the trace), compiled never.
    """
    with precision_scope(setup.matmul_precision):
        return _measure(_no_finish, params, batch, setup, None).residual_bytes


#: The budget on an accelerator that reports no memory limit: small enough for any
#: current GPU or TPU, next to the model, its optimizer and the batch.
UNKNOWN_DEVICE_BUDGET = 2**30


class MemoryBudgetWarning(UserWarning):
    """The memory budget was guessed (a device reported no limit), or a program that was
    expected to fit did not and scoring fell back to one chunk at a time."""


_warned_devices: set[str] = set()


def default_memory_budget() -> int:
    """Bytes the residuals of all chunks may take by default.

    Half the free memory of the first local device where it reports it (GPU,
    TPU); on CPU, whose device memory is the host's, a quarter of physical
    memory (2 GiB where that is unknown). An accelerator that reports no limit
    gets :data:`UNKNOWN_DEVICE_BUDGET` (1 GiB), with a
    :class:`MemoryBudgetWarning` naming it (once per device). The residual
    estimate is taken from the jaxpr, before XLA fuses and frees buffers, so it
    is on the high side (ResNet-20 on 100 CIFAR images: estimate 2.6 GiB,
    XLA's peak 1.2 GiB).
    """
    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 -- backends without memory statistics raise various errors
        stats = None
    if stats and "bytes_limit" in stats:
        return int(0.5 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
    if device.platform != "cpu":
        name = f"{device.platform}:{device.id} ({device.device_kind})"
        if name not in _warned_devices:
            _warned_devices.add(name)
            warnings.warn(
                f"device {name} reports no memory limit; scoring assumes "
                f"{UNKNOWN_DEVICE_BUDGET / 2**30:g} GiB for linearizing every chunk at once "
                "(pass memory_budget_bytes= to choose)", MemoryBudgetWarning, stacklevel=3)
        return UNKNOWN_DEVICE_BUDGET
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 4
    except (ValueError, OSError, AttributeError):  # not POSIX
        return 2 * 2**30


def is_resource_exhausted(error: BaseException) -> bool:
    """Whether ``error`` is XLA's out-of-memory (at compile or run time)."""
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


@functools.partial(jax.jit, static_argnames=("loss_fn", "flags", "layout", "axis_name", "finish"))
def _linearized_program(params, batch, *, loss_fn, flags, layout, axis_name, finish):
    residual_bytes = {}

    def program(params, batch):
        _, g, hvp = _linearized(params, batch, loss_fn, flags, layout)
        g = _all_reduce(g, axis_name)
        hg = _all_reduce(hvp(g), axis_name)
        g_tree, hg_tree = scatter_prunable(g, params, flags), scatter_prunable(hg, params, flags)
        # hvp is a pytree whose leaves are the residuals: its size is known at trace time.
        residual_bytes[traced_platform() or local_platform()] = tree_bytes(hvp)
        return finish(params, g_tree, hg_tree, flags)

    value = per_platform(program, params, batch)
    # The path is chosen for this process's devices: their platform's residuals.
    return Measured(value, residual_bytes.get(local_platform(), max(residual_bytes.values())))


def _program(finish: Finish, setup: ScoringSetup, axis_name: str | None) -> Callable:
    return functools.partial(_linearized_program, loss_fn=setup.loss_fn, flags=setup.flags,
                             layout=setup.layout, axis_name=axis_name, finish=finish)


def _measure(finish, params, batch, setup, axis_name) -> Measured:
    """The in-memory program's output shapes and residual bytes, from its (cached) trace."""
    return jax.eval_shape(_program(finish, setup, axis_name), params, batch)


@functools.partial(jax.jit, static_argnames=("flags", "finish"))
def _finish_program(params, g, hg, *, flags, finish):
    return finish(params, g, hg, flags)


def gradient_and_hvp_with(finish: Finish, params: PyTree, batch: PyTree, setup: ScoringSetup, *,
                          axis_name: str | None = None,
                          memory_budget_bytes: int | None = None) -> Any:
    """``finish(params, g, Hg, flags)`` with g = Σ_c ∇L_c and Hg = Σ_c ∇²L_c · g.

    One chunk, or several whose residuals (:func:`linearized_bytes`) fit in
    ``memory_budget_bytes`` (default :func:`default_memory_budget`): one
    program that linearizes them all at once. Otherwise two passes of
    :func:`accumulate` (g, then Hg), one chunk in memory at a time.
    ``finish`` must be hashable (a module-level function): it is static.
    Every program is traced at ``setup.matmul_precision``.
    """
    with precision_scope(setup.matmul_precision):
        return _gradient_and_hvp_with(finish, params, batch, setup, axis_name,
                                      memory_budget_bytes)


def _gradient_and_hvp_with(finish, params, batch, setup, axis_name, memory_budget_bytes):
    if setup.layout.num_chunks == 1:
        return _program(finish, setup, axis_name)(params, batch).value
    budget = default_memory_budget() if memory_budget_bytes is None else memory_budget_bytes
    residual_bytes = _measure(finish, params, batch, setup, axis_name).residual_bytes
    if residual_bytes <= budget:
        if is_traced(params, batch):
            return _program(finish, setup, axis_name)(params, batch).value
        # Called eagerly, a program that does not fit after all (the estimate is the
        # jaxpr's, the device's memory may be shared) need not fail: one chunk at a time does.
        try:
            return jax.block_until_ready(_all_chunks_at_once(finish, params, batch, setup,
                                                             axis_name))
        except jax.errors.JaxRuntimeError as error:
            if not is_resource_exhausted(error):
                raise
            device = jax.local_devices()[0]
            warnings.warn(
                f"linearizing all {setup.layout.num_chunks} chunks at once (residuals "
                f"estimated at {residual_bytes / 2**20:,.0f} MiB, budget {budget / 2**20:,.0f} "
                f"MiB) ran out of memory on {device.platform}:{device.id} "
                f"({device.device_kind}); scoring one chunk at a time instead (pass a smaller "
                "memory_budget_bytes= to go there directly)", MemoryBudgetWarning, stacklevel=4)
    return _one_chunk_at_a_time(finish, params, batch, setup, axis_name)


def _all_chunks_at_once(finish, params, batch, setup, axis_name):
    """The in-memory program: every chunk linearized at once."""
    return _program(finish, setup, axis_name)(params, batch).value


def _one_chunk_at_a_time(finish, params, batch, setup, axis_name):
    """Two passes (g, then Hg), one chunk in memory at a time."""
    g = _accumulate("gradient", params, batch, None, None, setup, axis_name)
    hg = _accumulate("hvp", params, batch, g, None, setup, axis_name)
    return _finish_program(params, g, hg, flags=setup.flags, finish=finish)


# --------------------------------------------------------------------------
# The public primitives.


def accumulate_gradient(params: PyTree, loss_fn: LossFn, batch: PyTree, acc: PyTree | None = None,
                        *, num_microbatches: int | None = None, microbatch_size: int | None = None,
                        prunable: PrunableSpec = None, axis_name: str | None = None,
                        batch_axis_name: str | None = None,
                        matmul_precision: str | None = SCORING_PRECISION) -> PyTree:
    """``acc + Σ_c ∇_θ L(θ; b_c)`` over the chunks b_c of ``batch``.

    ``acc`` (default zeros) and the result have the structure of ``params``;
    non-prunable leaves of ``acc`` pass through unchanged. Chunks: as in
    :func:`grasp_jax.grasp_scores` (``num_microbatches`` equal ones or
    ``microbatch_size`` with a shorter last one). With ``axis_name`` (inside
    ``pmap``) the increment is summed over the devices, so a replicated ``acc``
    stays replicated: streaming g over many batches is a loop of this call.
    ``matmul_precision``: as in :func:`grasp_jax.grasp_scores`.
    """
    setup = scoring_setup(params, loss_fn, batch, num_microbatches=num_microbatches,
                          microbatch_size=microbatch_size, prunable=prunable,
                          batch_axis_name=batch_axis_name, matmul_precision=matmul_precision)
    return accumulate("gradient", params, batch, None, acc, setup, axis_name)


def accumulate_hvp(params: PyTree, loss_fn: LossFn, batch: PyTree, v: PyTree,
                   acc: PyTree | None = None, *, num_microbatches: int | None = None,
                   microbatch_size: int | None = None, prunable: PrunableSpec = None,
                   axis_name: str | None = None, batch_axis_name: str | None = None,
                   matmul_precision: str | None = SCORING_PRECISION) -> PyTree:
    """``acc + Σ_c ∇²_θθ L(θ; b_c) · v``: :func:`accumulate_gradient`'s twin for
    Hessian-vector products (forward-over-reverse), ``v`` shaped like ``params``
    (its non-prunable leaves are ignored). For GraSP, v is the g summed over
    every chunk of every batch (and device) first.
    """
    setup = scoring_setup(params, loss_fn, batch, num_microbatches=num_microbatches,
                          microbatch_size=microbatch_size, prunable=prunable,
                          batch_axis_name=batch_axis_name, matmul_precision=matmul_precision)
    return accumulate("hvp", params, batch, v, acc, setup, axis_name)
