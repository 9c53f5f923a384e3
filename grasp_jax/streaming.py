"""Scores over a stream of batches, holding one chunk on the device at a time.

The reference GraSP scores ImageNet on 150 batches of 250 images: it sums g
over every chunk of every batch, then, with that g, sums each chunk's
Hessian-vector product. Here the batches come from ``make_batches()``, a
factory of a fresh iterable, called once per pass: GraSP makes two passes, so
the stream must be restartable (the same batches, with the same augmentation,
each time). Each pass is a loop of :func:`grasp_jax.accumulate.accumulate_gradient` or
:func:`grasp_jax.accumulate.accumulate_hvp`, so host memory is one batch and device
memory one chunk, however many batches there are: the loop waits for each
batch's sum before it hands the next batch to the device, so a device slower
than the input pipeline cannot let batches pile up in flight (JAX dispatches
asynchronously and would otherwise queue every batch the stream yields). For
data-parallel streaming, ``pmap`` those two primitives with ``axis_name`` over
the same loop (their increments are summed across devices; the accumulator
stays replicated).

``progress(kind, batches)``, if given, is called after each batch is summed,
``kind`` being ``"gradient"`` (the first pass) or ``"hvp"`` (GraSP's second);
an exception it raises abandons the scoring (e.g. on a stop signal).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax

from grasp_jax import criteria
from grasp_jax.accumulate import LossFn, accumulate_gradient, accumulate_hvp
from grasp_jax.criteria import Criterion
from grasp_jax.precision import SCORING_PRECISION
from grasp_jax.prunable import PrunableSpec
from grasp_jax.scoring import from_sums

PyTree = Any
BatchStream = Callable[[], Iterable[PyTree]]
Progress = Callable[[str, int], None]

__all__ = [
    "gradient_and_hvp_from_batches", "gradient_from_batches", "grasp_abs_scores_from_batches",
    "grasp_scores_from_batches", "scores_from_batches", "snip_scores_from_batches",
]


def _sum_over_stream(step: Callable[[PyTree, PyTree | None], PyTree],
                     make_batches: BatchStream, kind: str,
                     progress: Progress | None = None) -> PyTree:
    acc, done = None, 0
    for batch in make_batches():
        if acc is not None:  # the next batch is on the host: let the last one finish first
            jax.block_until_ready(acc)
            done += 1
            if progress is not None:
                progress(kind, done)
        acc = step(batch, acc)
    if acc is None:
        raise ValueError("make_batches() yielded no batch")
    jax.block_until_ready(acc)
    if progress is not None:
        progress(kind, done + 1)
    return acc


def gradient_from_batches(params: PyTree, loss_fn: LossFn, make_batches: BatchStream, *,
                          num_microbatches: int | None = None, microbatch_size: int | None = None,
                          prunable: PrunableSpec = None,
                          batch_axis_name: str | None = None,
                          progress: Progress | None = None,
                          matmul_precision: str | None = SCORING_PRECISION) -> PyTree:
    """g = Σ over every chunk of every batch of ∇_θ L; one pass over ``make_batches()``.

    Each batch is cut into chunks as in :func:`grasp_jax.grasp_scores`
    (``microbatch_size=20`` on batches of 250: 12 x 20 + 10 each), and its
    matmuls and convolutions run at ``matmul_precision`` (float32 on every
    backend unless None: see :func:`grasp_jax.grasp_scores`).
    """
    opts = {"num_microbatches": num_microbatches, "microbatch_size": microbatch_size,
            "prunable": prunable, "batch_axis_name": batch_axis_name,
            "matmul_precision": matmul_precision}
    return _sum_over_stream(
        lambda batch, acc: accumulate_gradient(params, loss_fn, batch, acc, **opts), make_batches,
        "gradient", progress)


def gradient_and_hvp_from_batches(params: PyTree, loss_fn: LossFn, make_batches: BatchStream, *,
                                  num_microbatches: int | None = None,
                                  microbatch_size: int | None = None,
                                  prunable: PrunableSpec = None,
                                  batch_axis_name: str | None = None,
                                  progress: Progress | None = None,
                                  matmul_precision: str | None = SCORING_PRECISION,
                                  ) -> tuple[PyTree, PyTree]:
    """g as :func:`gradient_from_batches`, then Hg = Σ_c ∇²_θθ L_c · g over a
    second pass of ``make_batches()``, which must yield the same batches."""
    opts = {"num_microbatches": num_microbatches, "microbatch_size": microbatch_size,
            "prunable": prunable, "batch_axis_name": batch_axis_name,
            "matmul_precision": matmul_precision}
    g = gradient_from_batches(params, loss_fn, make_batches, progress=progress, **opts)
    hg = _sum_over_stream(
        lambda batch, acc: accumulate_hvp(params, loss_fn, batch, g, acc, **opts), make_batches,
        "hvp", progress)
    return g, hg


def scores_from_batches(criterion: Criterion | str, params: PyTree, loss_fn: LossFn,
                        make_batches: BatchStream, *, num_microbatches: int | None = None,
                        microbatch_size: int | None = None, prunable: PrunableSpec = None,
                        batch_axis_name: str | None = None, progress: Progress | None = None,
                        matmul_precision: str | None = SCORING_PRECISION) -> PyTree:
    """The scores of a data-dependent ``criterion`` over a restartable stream.

    One pass (g) when it needs ``"gradient"``, two (g, then Hg) when it needs
    ``"hvp"``; then ``criterion.from_sums(params, g, Hg, flags)``. Equal to
    :func:`grasp_jax.scores` on the batches concatenated, when the chunks are
    the same.
    """
    criterion = criteria.get(criterion)
    if criterion.needs == "none":
        raise ValueError(f"criterion {criterion.name!r} is data-free: score it with its own "
                         "function, not from batches")
    opts = {"num_microbatches": num_microbatches, "microbatch_size": microbatch_size,
            "prunable": prunable, "batch_axis_name": batch_axis_name, "progress": progress,
            "matmul_precision": matmul_precision}
    if criterion.needs == "hvp":
        g, hg = gradient_and_hvp_from_batches(params, loss_fn, make_batches, **opts)
    else:
        g, hg = gradient_from_batches(params, loss_fn, make_batches, **opts), None
    return from_sums(criterion, params, g, hg, prunable=prunable)


def grasp_scores_from_batches(params: PyTree, loss_fn: LossFn, make_batches: BatchStream, *,
                              num_microbatches: int | None = None,
                              microbatch_size: int | None = None, prunable: PrunableSpec = None,
                              batch_axis_name: str | None = None,
                              progress: Progress | None = None,
                              matmul_precision: str | None = SCORING_PRECISION) -> PyTree:
    """GraSP's -θ ⊙ Hg over a restartable stream (two passes); prune the **highest**.

    Equal to :func:`grasp_jax.grasp_scores` on the batches concatenated, when
    the chunks are the same.
    """
    return scores_from_batches(
        "grasp", params, loss_fn, make_batches, num_microbatches=num_microbatches,
        microbatch_size=microbatch_size, prunable=prunable, batch_axis_name=batch_axis_name,
        progress=progress, matmul_precision=matmul_precision)


def grasp_abs_scores_from_batches(params: PyTree, loss_fn: LossFn, make_batches: BatchStream, *,
                                  num_microbatches: int | None = None,
                                  microbatch_size: int | None = None,
                                  prunable: PrunableSpec = None,
                                  batch_axis_name: str | None = None,
                                  progress: Progress | None = None,
                                  matmul_precision: str | None = SCORING_PRECISION) -> PyTree:
    """|θ ⊙ Hg| (Lubana & Dick, 2021) over a stream (two passes); prune the **lowest**."""
    return scores_from_batches(
        "grasp_abs", params, loss_fn, make_batches, num_microbatches=num_microbatches,
        microbatch_size=microbatch_size, prunable=prunable, batch_axis_name=batch_axis_name,
        progress=progress, matmul_precision=matmul_precision)


def snip_scores_from_batches(params: PyTree, loss_fn: LossFn, make_batches: BatchStream, *,
                             num_microbatches: int | None = None,
                             microbatch_size: int | None = None, prunable: PrunableSpec = None,
                             batch_axis_name: str | None = None,
                             progress: Progress | None = None,
                             matmul_precision: str | None = SCORING_PRECISION) -> PyTree:
    """SNIP's |θ ⊙ g| over a stream (one pass); prune the **lowest**."""
    return scores_from_batches(
        "snip", params, loss_fn, make_batches, num_microbatches=num_microbatches,
        microbatch_size=microbatch_size, prunable=prunable, batch_axis_name=batch_axis_name,
        progress=progress, matmul_precision=matmul_precision)
