"""Saliency scores for pruning at initialization.

Every function here is pure: it takes a params pytree and returns a pytree of
the same structure holding a score for each prunable weight (zeros at leaves
that are not prunable). Which end of the ranking is pruned depends on the
criterion; see :data:`grasp_jax.criteria.CRITERIA`.

GraSP (Wang, Zhang & Grosse, ICLR 2020, eq. 8) scores a weight by how much
removing it changes the gradient norm ΔL(θ) = gᵀg after one step:

    S(-θ) = -θ ⊙ H g,      g = ∇_θ L,   H = ∇²_θ L,

and prunes the weights with the *highest* S(-θ): removing them reduces the
gradient flow least (or even increases it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from grasp_jax import criteria
from grasp_jax.accumulate import LossFn, accumulate, gradient_and_hvp_with, scoring_setup
from grasp_jax.criteria import Criterion
from grasp_jax.precision import SCORING_PRECISION
from grasp_jax.prunable import (
    PrunableSpec,
    check_leaf_dtypes,
    merge_prunable,
    path_name,
    prunable_flags,
    scatter_prunable,
    split_prunable,
)

PyTree = Any

__all__ = [
    "cross_entropy_with_temperature", "from_sums", "gradient_and_hvp", "grasp_abs_scores",
    "grasp_from_hvp", "grasp_scores", "magnitude_scores", "random_scores", "scores",
    "snip_from_gradient",
    "snip_scores", "synflow_scores",
]


# --------------------------------------------------------------------------
# The loss the paper scores with.


def cross_entropy_with_temperature(
    logits: jax.Array, labels: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """Mean softmax cross-entropy of ``logits / temperature`` against integer labels.

    GraSP's reference code divides the logits by T = 200 before the loss when
    it scores, which flattens the softmax so that the Hessian is not dominated
    by a few confident examples.
    """
    logits = logits / jnp.asarray(temperature, logits.dtype)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# --------------------------------------------------------------------------
# Scores from g and Hg.


@functools.partial(jax.jit, static_argnames=("flags", "from_sums"))
def _from_sums(params, g, hg, *, flags, from_sums):
    return from_sums(params, g, hg, flags)


# finish(params, g, hg, flags) for accumulate.gradient_and_hvp_with (static: module level).
def _pair_finish(params, g, hg, flags):
    return g, hg


def from_sums(criterion: Criterion | str, params: PyTree, g: PyTree | None, hg: PyTree | None,
              *, prunable: PrunableSpec = None) -> PyTree:
    """``criterion``'s scores from summed g and Hg (``None`` where it does not need one),
    e.g. of streamed or data-parallel sums; zeros off θ."""
    criterion = criteria.get(criterion)
    if criterion.needs == "none":
        raise ValueError(f"criterion {criterion.name!r} is data-free: it has no sums")
    return _from_sums(params, g, hg, flags=prunable_flags(params, prunable),
                      from_sums=criterion.from_sums)


def grasp_from_hvp(params: PyTree, hvp: PyTree, *, prunable: PrunableSpec = None) -> PyTree:
    """S(-θ) = -θ ⊙ Hg from a summed Hg (e.g. of :func:`accumulate_hvp`), zeros off θ."""
    return _from_sums(params, None, hvp, flags=prunable_flags(params, prunable),
                      from_sums=criteria.grasp_from_sums)


def snip_from_gradient(params: PyTree, gradient: PyTree, *,
                       prunable: PrunableSpec = None) -> PyTree:
    """|θ ⊙ g| from a summed g (e.g. of :func:`accumulate_gradient`), zeros off θ."""
    return _from_sums(params, gradient, None, flags=prunable_flags(params, prunable),
                      from_sums=criteria.snip_from_sums)


# --------------------------------------------------------------------------
# GraSP and SNIP on one batch.


def gradient_and_hvp(params: PyTree, loss_fn: LossFn, batch: PyTree, *,
                     num_microbatches: int | None = None, microbatch_size: int | None = None,
                     prunable: PrunableSpec = None, axis_name: str | None = None,
                     memory_budget_bytes: int | None = None,
                     batch_axis_name: str | None = None,
                     matmul_precision: str | None = SCORING_PRECISION) -> tuple[PyTree, PyTree]:
    """The gradient g and the Hessian-vector product Hg in the prunable subspace.

    With chunks b_1..b_k of ``batch`` and θ the prunable weights (everything
    else held fixed),

        g  = Σ_c ∇_θ L(θ; b_c),        Hg = Σ_c ∇²_θθ L(θ; b_c) · g.

    Hg is a forward-over-reverse product (``jax.linearize``/``jax.jvp`` of
    ``jax.grad``); H is never formed. Both results have the structure of
    ``params`` with zeros at non-prunable leaves. Arguments: see
    :func:`grasp_scores`.
    """
    setup = scoring_setup(params, loss_fn, batch, num_microbatches=num_microbatches,
                          microbatch_size=microbatch_size, prunable=prunable,
                          batch_axis_name=batch_axis_name, matmul_precision=matmul_precision)
    return gradient_and_hvp_with(_pair_finish, params, batch, setup, axis_name=axis_name,
                                 memory_budget_bytes=memory_budget_bytes)


def scores(criterion: Criterion | str, params: PyTree, loss_fn: LossFn, batch: PyTree, *,
           num_microbatches: int | None = None, microbatch_size: int | None = None,
           prunable: PrunableSpec = None, axis_name: str | None = None,
           memory_budget_bytes: int | None = None,
           batch_axis_name: str | None = None,
           matmul_precision: str | None = SCORING_PRECISION) -> PyTree:
    """The scores of a data-dependent ``criterion`` (a :class:`~grasp_jax.criteria.Criterion`
    or a name in :data:`~grasp_jax.criteria.CRITERIA`) on one batch.

    From what the criterion needs: ``"gradient"``, g = Σ_c ∇_θ L(θ; b_c) over
    the chunks; ``"hvp"``, g and then Hg = Σ_c ∇²_θθ L(θ; b_c) · g. Its scores
    are ``criterion.from_sums(params, g, Hg, flags)``. Arguments: as in
    :func:`grasp_scores` (``memory_budget_bytes`` matters only for ``"hvp"``).
    A data-free criterion (needs ``"none"``) is a ValueError: it has its own
    function (:func:`synflow_scores`, :func:`magnitude_scores`, :func:`random_scores`).
    """
    criterion = criteria.get(criterion)
    if criterion.needs == "none":
        raise ValueError(f"criterion {criterion.name!r} is data-free: score it with its own "
                         "function, not from a batch")
    setup = scoring_setup(params, loss_fn, batch, num_microbatches=num_microbatches,
                          microbatch_size=microbatch_size, prunable=prunable,
                          batch_axis_name=batch_axis_name, matmul_precision=matmul_precision)
    if criterion.needs == "hvp":
        return gradient_and_hvp_with(criterion.from_sums, params, batch, setup,
                                     axis_name=axis_name, memory_budget_bytes=memory_budget_bytes)
    g = accumulate("gradient", params, batch, None, None, setup, axis_name)
    return _from_sums(params, g, None, flags=setup.flags, from_sums=criterion.from_sums)


def grasp_scores(params: PyTree, loss_fn: LossFn, batch: PyTree, *,
                 num_microbatches: int | None = None, microbatch_size: int | None = None,
                 prunable: PrunableSpec = None, axis_name: str | None = None,
                 memory_budget_bytes: int | None = None,
                 batch_axis_name: str | None = None,
                 matmul_precision: str | None = SCORING_PRECISION) -> PyTree:
    """GraSP's S(-θ) = -θ ⊙ Hg for every prunable weight (paper, eq. 8).

    Args:
      params: any pytree of arrays (Flax Linen ``params``, an NNX ``nnx.State``
        of ``nnx.Param``, a plain dict).
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss of one
        chunk. BatchNorm runs in training mode inside it (its batch statistics
        are those of the chunk), and the temperature belongs here (see
        :func:`cross_entropy_with_temperature`). jit caches on the identity of
        ``loss_fn``: pass the same function object to reuse the compiled
        computation.
      batch: a pytree of arrays sharing a leading axis.
      num_microbatches: cut that axis into this many equal consecutive chunks,
        each its own forward pass.
      microbatch_size: or cut it into chunks of this many examples, the last
        one shorter when the size does not divide the batch (250 by 20:
        12 x 20 + 10). Not both; neither: the batch is one chunk.
      prunable: which leaves are θ (default: leaves named ``kernel``,
        ``weight`` or ``w`` with ndim >= 2); a pytree of bools or a callable
        ``(path, leaf) -> bool``.
      axis_name: data-parallel scoring. Call inside ``jax.pmap`` (or
        ``shard_map``) over this axis, each device holding its own chunks: g
        and then Hg are summed over every chunk of every device (``lax.psum``;
        on several hosts, of every host), so each device returns the scores of
        all chunks together. A device with fewer real chunks than the others
        pads with chunks whose loss is multiplied by 0.
      memory_budget_bytes: several chunks whose linearization residuals fit in
        this many bytes (default: half the free device memory; on CPU a quarter of RAM)
        are linearized at once, in one program at ~3 gradients of FLOPs;
        larger sets are visited one chunk at a time, twice (g, then Hg): a host
        loop over compiled per-chunk programs when called eagerly, a loop in
        the trace under ``jit``.
      batch_axis_name: the axis a model's BatchNorm reduces over
        (``nn.BatchNorm(axis_name='batch')``); bound with size 1 so the model
        can be scored outside ``pmap``, each chunk its own BatchNorm batch.
        Leave it unset inside a ``pmap`` that binds that axis itself.
      matmul_precision: the precision every matmul and convolution of the
        scoring programs is traced at (``jax.default_matmul_precision``'s
        names). The default ``"float32"`` asks full float32 on every backend
        (``precision_config = HIGHEST``), where TPUs would otherwise use one
        bfloat16 pass and NVIDIA GPUs TensorFloat-32; on CPU it changes
        nothing. ``None`` keeps the backend's default (or an enclosing
        ``jax.default_matmul_precision``), e.g. to score faster at lower precision.

    Returns:
      A pytree like ``params``: S(-θ) at prunable leaves, zeros elsewhere.
      GraSP prunes the weights with the **highest** scores.
    """
    return scores('grasp', params, loss_fn, batch, num_microbatches=num_microbatches,
                  microbatch_size=microbatch_size, prunable=prunable, axis_name=axis_name,
                  memory_budget_bytes=memory_budget_bytes,
                  batch_axis_name=batch_axis_name, matmul_precision=matmul_precision)


def grasp_abs_scores(params: PyTree, loss_fn: LossFn, batch: PyTree, *,
                     num_microbatches: int | None = None, microbatch_size: int | None = None,
                     prunable: PrunableSpec = None, axis_name: str | None = None,
                     memory_budget_bytes: int | None = None,
                     batch_axis_name: str | None = None,
                     matmul_precision: str | None = SCORING_PRECISION) -> PyTree:
    """Gradient-norm preservation: |θ ⊙ Hg| (Lubana & Dick, ICLR 2021); prune the **lowest**.

    GraSP's -θ ⊙ Hg is the first-order change of gᵀg when a weight is removed,
    with its sign: pruning the highest may *increase* the gradient norm.
    Lubana & Dick argue for preserving it instead, removing the weights whose
    removal changes it least in either direction. Their code
    (EkdeepSLubana/flowandprune, ``imp_estimator.cal_importance_grad_preserve``)
    sums θ·Hg over each filter, takes the absolute value and prunes the filters
    of **lowest** importance (``pruner.*_order_and_ratios``: ascending
    ``argsort``, the first ``int(ratio · n)``); here it is per weight.
    Arguments and chunking: as in :func:`grasp_scores`.
    """
    return scores('grasp_abs', params, loss_fn, batch, num_microbatches=num_microbatches,
                  microbatch_size=microbatch_size, prunable=prunable, axis_name=axis_name,
                  memory_budget_bytes=memory_budget_bytes,
                  batch_axis_name=batch_axis_name, matmul_precision=matmul_precision)


def snip_scores(params: PyTree, loss_fn: LossFn, batch: PyTree, *,
                num_microbatches: int | None = None, microbatch_size: int | None = None,
                prunable: PrunableSpec = None, axis_name: str | None = None,
                batch_axis_name: str | None = None,
                matmul_precision: str | None = SCORING_PRECISION) -> PyTree:
    """SNIP (Lee, Ajanthan & Torr, ICLR 2019): |θ ⊙ g|, g = Σ_c ∇_θ L(θ; b_c).

    The connection sensitivity |∂L/∂c| of a multiplicative mask c = 1 equals
    |θ ∂L/∂θ|. SNIP prunes the **lowest** scores. Arguments: as in
    :func:`grasp_scores` (g summed across devices with ``axis_name``).
    """
    return scores('snip', params, loss_fn, batch, num_microbatches=num_microbatches,
                  microbatch_size=microbatch_size, prunable=prunable, axis_name=axis_name,
                  batch_axis_name=batch_axis_name, matmul_precision=matmul_precision)


# --------------------------------------------------------------------------
# Baselines.


@functools.partial(jax.jit, static_argnames=("apply_fn", "input_shape", "flags", "rescale"))
def _synflow(params, *, apply_fn, input_shape, flags, rescale):
    theta, rest, treedef = split_prunable(params, flags)
    # SynFlow "linearizes" the network by taking |·| of every parameter, so
    # that all paths add up with a positive sign.
    theta = [jnp.abs(t) for t in theta]
    rest = [jnp.abs(r) if jnp.issubdtype(r.dtype, jnp.floating) else r for r in rest]
    if rescale:
        # R = Π_layers (...) grows like Π_l fan_in_l · mean|θ_l| and overflows
        # float32 in deep nets. Dividing each layer by c_l = fan_in · mean|θ_l|
        # keeps every activation O(1). For a positively homogeneous network
        # (no biases: the paper's models) R(θ_1/c_1, ...) = R(θ) / Π c_l and
        # every score θ ∂R/∂θ is divided by the same Π c_l, so the global
        # ranking, which is all that pruning uses, is unchanged.
        def scale(t):
            fan_in = np.prod(t.shape[:-1])
            m = jnp.mean(t) * fan_in
            return jnp.where(m > 0, 1.0 / jnp.where(m > 0, m, 1.0), 1.0).astype(t.dtype)

        theta = [t * scale(t) for t in theta]
    dtype = theta[0].dtype
    ones = jnp.ones((1,) + tuple(input_shape), dtype)

    def r(theta):
        return jnp.sum(apply_fn(merge_prunable(theta, rest, flags, treedef), ones))

    grads = jax.grad(r)(theta)
    return [jnp.abs(t * gi) for t, gi in zip(theta, grads)]


def synflow_scores(
    params: PyTree,
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    input_shape: Sequence[int],
    *,
    prunable: PrunableSpec = None,
    rescale: bool = True,
) -> PyTree:
    """SynFlow (Tanaka et al., NeurIPS 2020): |θ ⊙ ∂R/∂θ|, R = 1ᵀ f(1; |θ|).

    Data-free: the input is a single all-ones example of ``input_shape``
    (without the batch axis) and every parameter is replaced by its absolute
    value. ``apply_fn(params, x)`` must run the network in inference mode
    (BatchNorm with running statistics): batch statistics would normalize the
    all-ones signal away. With ``rescale`` each prunable layer is divided by a
    constant to avoid overflow (see the comment in the code; ranking-exact for
    bias-free networks); scores are then a constant multiple of the paper's.
    SynFlow prunes the **lowest** scores, iteratively (see
    :func:`grasp_jax.pruning.prune`, 100 rounds in the paper).
    """
    flags = prunable_flags(params, prunable)
    check_leaf_dtypes(params, flags)
    scores = _synflow(
        params, apply_fn=apply_fn, input_shape=tuple(int(d) for d in input_shape), flags=flags,
        rescale=bool(rescale),
    )
    return scatter_prunable(scores, params, flags)


def magnitude_scores(params: PyTree, *, prunable: PrunableSpec = None) -> PyTree:
    """|θ|; magnitude pruning removes the **lowest**."""
    flags = prunable_flags(params, prunable)
    check_leaf_dtypes(params, flags)
    theta, _, _ = split_prunable(params, flags)
    return scatter_prunable([jnp.abs(t) for t in theta], params, flags)


def random_scores(params: PyTree, key: jax.Array, *, prunable: PrunableSpec = None) -> PyTree:
    """Uniform random scores, independent per weight; a baseline for any direction."""
    flags = prunable_flags(params, prunable)
    check_leaf_dtypes(params, flags)
    theta, _, _ = split_prunable(params, flags)
    keys = jax.random.split(key, len(theta))
    return scatter_prunable(
        [jax.random.uniform(k, t.shape, t.dtype) for k, t in zip(keys, theta)], params, flags
    )


def check_finite(scores: PyTree, *, prunable: PrunableSpec = None) -> None:
    """Raise ValueError naming every prunable leaf with a NaN or infinite score."""
    flags = prunable_flags(scores, prunable)
    named = jax.tree_util.tree_flatten_with_path(scores)[0]
    checks = [jnp.all(jnp.isfinite(x)) for (_, x), f in zip(named, flags) if f]
    ok = jax.device_get(checks)
    names = [path_name(p) for (p, _), f in zip(named, flags) if f]
    bad = [n for n, good in zip(names, ok) if not good]
    if bad:
        raise ValueError(f"scores contain NaN or inf in leaves: {', '.join(bad)}")
