"""Saliency scores for pruning at initialization.

Every function here is pure: it takes a params pytree and returns a pytree of
the same structure holding a score for each prunable weight (zeros at leaves
that are not prunable). Which end of the ranking is pruned depends on the
criterion; see :data:`grasp_jax.pruning.PRUNE_DIRECTION`.

GraSP (Wang, Zhang & Grosse, ICLR 2020, eq. 8) scores a weight by how much
removing it changes the gradient norm ΔL(θ) = gᵀg after one step:

    S(-θ) = -θ ⊙ H g,      g = ∇_θ L,   H = ∇²_θ L,

and prunes the weights with the *highest* S(-θ): removing them reduces the
gradient flow least (or even increases it).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from grasp_jax.prunable import PrunableSpec, path_name, prunable_flags

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]


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
# Splitting params into the prunable θ and the rest, which is held fixed.


def _split(params: PyTree, flags: Sequence[bool]):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    theta = [x for x, f in zip(leaves, flags) if f]
    rest = [x for x, f in zip(leaves, flags) if not f]
    return theta, rest, treedef


def _merge(theta, rest, flags, treedef) -> PyTree:
    theta_it, rest_it = iter(theta), iter(rest)
    leaves = [next(theta_it) if f else next(rest_it) for f in flags]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _scatter(theta_values, params: PyTree, flags: Sequence[bool]) -> PyTree:
    """A params-shaped tree with ``theta_values`` at prunable leaves, zeros elsewhere."""
    _, rest, treedef = _split(params, flags)
    return _merge(theta_values, [jnp.zeros_like(r) for r in rest], flags, treedef)


# --------------------------------------------------------------------------
# Microbatches.


def _shape(x: Any) -> tuple:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def microbatch_size(batch: PyTree, num_microbatches: int) -> int:
    """The size of one chunk; a ValueError when the batch cannot be split evenly."""
    if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, (int, np.integer)) \
            or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be a positive integer, got {num_microbatches!r}")
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError("batch has no arrays")
    sizes = {_shape(x)[0] if _shape(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"every leaf of batch needs the same leading (batch) axis; got sizes {sorted(map(str, sizes))}"
        )
    (size,) = sizes
    if size % num_microbatches:
        raise ValueError(
            f"batch size {size} is not divisible by num_microbatches={num_microbatches}"
        )
    return size // int(num_microbatches)


def split_microbatches(batch: PyTree, num_microbatches: int) -> PyTree:
    """Reshape every leaf ``[B, ...]`` to ``[k, B // k, ...]`` (consecutive chunks)."""
    size = microbatch_size(batch, num_microbatches)
    k = int(num_microbatches)
    return jax.tree_util.tree_map(lambda x: jnp.reshape(x, (k, size) + _shape(x)[1:]), batch)


def _scalar_loss(loss_fn: LossFn, params: PyTree, chunk: PyTree) -> jax.Array:
    """``loss_fn(params, chunk)``, checked (at trace time, so once per compile) to be a scalar."""
    out = loss_fn(params, chunk)
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if shape != () or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            "loss_fn(params, batch) must return a scalar float (the mean loss of one "
            f"microbatch); it returned shape={shape} dtype={dtype}"
        )
    return out


def _sum_over(fn: Callable[[PyTree], list], chunks: PyTree, like: list) -> list:
    """Σ_c fn(chunk_c) inside a trace, one chunk after another.

    A ``lax.scan`` bounds memory by one chunk. XLA:CPU, however, runs
    convolutions inside a loop body ~30x slower than outside one (measured:
    ResNet-20 gradients, 4 chunks of 8, 17.5 s scanned vs 0.67 s unrolled), so
    on CPU the loop is unrolled and XLA decides the order. Eager calls do not
    come here: they loop over chunks on the host (see ``_host_loop``).
    """

    def body(acc, chunk):
        return [a + v for a, v in zip(acc, fn(chunk))], None

    unroll = jax.default_backend() == "cpu"
    total, _ = jax.lax.scan(body, [jnp.zeros_like(x) for x in like], chunks, unroll=unroll)
    return total


# --------------------------------------------------------------------------
# g and Hg.


def _all_reduce(values: list, axis_name: str | None) -> list:
    """Σ over the devices of ``axis_name`` (every device of every host under a
    multi-process pmap); the identity without one."""
    return values if axis_name is None else jax.lax.psum(values, axis_name)


def _gradient_and_hvp_lists(params, batch, loss_fn, flags, num_microbatches, axis_name=None):
    """g and Hg as lists over the prunable leaves (traced inside the jits below).

    With ``axis_name`` every device holds its own chunks: g is summed over them
    and then across devices, and only then is Hg formed (each device's chunks
    times the global g, summed across devices again).
    """
    theta, grad_fn = _theta_grad_fn(params, loss_fn, flags)
    chunks = split_microbatches(batch, num_microbatches)

    if num_microbatches == 1:
        # linearize evaluates the gradient once and keeps what its tangent map
        # needs, so g and Hg cost one forward-over-reverse pass instead of a
        # separate gradient plus a jvp-of-grad that recomputes it.
        chunk = jax.tree_util.tree_map(lambda x: x[0], chunks)
        g, hvp = jax.linearize(lambda t: grad_fn(t, chunk), theta)
        g = _all_reduce(g, axis_name)
        hg = _all_reduce(hvp(g), axis_name)
    else:
        # g must be summed over every chunk before any Hg can be formed, so
        # each chunk is visited twice; memory stays that of one chunk.
        g = _all_reduce(_sum_over(lambda c: grad_fn(theta, c), chunks, theta), axis_name)
        hg = _sum_over(
            lambda c: jax.jvp(lambda t: grad_fn(t, c), (theta,), (g,))[1], chunks, theta
        )
        hg = _all_reduce(hg, axis_name)
    return g, hg


_STATIC = ("loss_fn", "flags", "num_microbatches", "axis_name")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _gradient_and_hvp(params, batch, *, loss_fn, flags, num_microbatches, axis_name):
    g, hg = _gradient_and_hvp_lists(params, batch, loss_fn, flags, num_microbatches, axis_name)
    return _scatter(g, params, flags), _scatter(hg, params, flags)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _grasp_scores(params, batch, *, loss_fn, flags, num_microbatches, axis_name):
    _, hg = _gradient_and_hvp_lists(params, batch, loss_fn, flags, num_microbatches, axis_name)
    theta, _, _ = _split(params, flags)
    return _scatter([_neg_product(t, h) for t, h in zip(theta, hg)], params, flags)


# --------------------------------------------------------------------------
# Eager calls with several chunks: a host loop over per-chunk programs. Each
# program sees one chunk, so memory is that of one chunk on every backend and
# no convolution runs inside an XLA loop.


def _is_traced(*trees: PyTree) -> bool:
    return any(isinstance(x, jax.core.Tracer) for t in trees for x in jax.tree_util.tree_leaves(t))


def _chunk(batch: PyTree, i: int, size: int) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x[i * size:(i + 1) * size], batch)


def _theta_grad_fn(params, loss_fn, flags):
    """θ and ``(θ, chunk) -> ∇_θ L``, every non-prunable leaf held at its value in ``params``."""
    theta, rest, treedef = _split(params, flags)
    grad_fn = jax.grad(lambda t, c: _scalar_loss(loss_fn, _merge(t, rest, flags, treedef), c))
    return theta, grad_fn


@functools.partial(jax.jit, static_argnames=("loss_fn", "flags"), donate_argnames=("acc",))
def _add_chunk_grad(params, chunk, acc, *, loss_fn, flags):
    theta, grad_fn = _theta_grad_fn(params, loss_fn, flags)
    return [a + v for a, v in zip(acc, grad_fn(theta, chunk))]


@functools.partial(jax.jit, static_argnames=("loss_fn", "flags"), donate_argnames=("acc",))
def _add_chunk_hvp(params, chunk, g, acc, *, loss_fn, flags):
    theta, grad_fn = _theta_grad_fn(params, loss_fn, flags)
    hvp = jax.jvp(lambda t: grad_fn(t, chunk), (theta,), (g,))[1]
    return [a + v for a, v in zip(acc, hvp)]


def _host_loop(params, batch, loss_fn, flags, num_microbatches, *, with_hvp: bool):
    size = microbatch_size(batch, num_microbatches)
    theta, _, _ = _split(params, flags)
    g = [jnp.zeros_like(t) for t in theta]
    for i in range(num_microbatches):
        g = _add_chunk_grad(params, _chunk(batch, i, size), g, loss_fn=loss_fn, flags=flags)
    if not with_hvp:
        return g, None
    hg = [jnp.zeros_like(t) for t in theta]
    for i in range(num_microbatches):
        hg = _add_chunk_hvp(params, _chunk(batch, i, size), g, hg, loss_fn=loss_fn, flags=flags)
    return g, hg


@functools.partial(jax.jit, static_argnames=("flags", "fn"))
def _combine(params, values, *, flags, fn):
    """Scatter ``fn(θ, v)`` for each prunable leaf back into a params-shaped tree."""
    theta, _, _ = _split(params, flags)
    return _scatter([fn(t, v) for t, v in zip(theta, values)], params, flags)


def _neg_product(t, h):
    return -t * h


def _abs_product(t, g):
    return jnp.abs(t * g)


def _second(t, v):
    return v


def _validated(params, loss_fn, batch, num_microbatches, prunable):
    """Checks shared by the data-dependent scores; returns the static flags."""
    flags = prunable_flags(params, prunable)
    microbatch_size(batch, num_microbatches)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    return flags


def gradient_and_hvp(
    params: PyTree,
    loss_fn: LossFn,
    batch: PyTree,
    *,
    num_microbatches: int = 1,
    prunable: PrunableSpec = None,
    axis_name: str | None = None,
) -> tuple[PyTree, PyTree]:
    """The gradient g and the Hessian-vector product Hg in the prunable subspace.

    With chunks b_1..b_k of ``batch`` (``num_microbatches = k``) and θ the
    prunable weights (everything else held fixed),

        g  = Σ_c ∇_θ L(θ; b_c),        Hg = Σ_c ∇²_θθ L(θ; b_c) · g.

    Hg is a forward-over-reverse product (``jax.linearize``/``jax.jvp`` of
    ``jax.grad``); H is never formed. Both results have the structure of
    ``params`` with zeros at non-prunable leaves. ``axis_name``: see
    :func:`grasp_scores`.
    """
    flags = _validated(params, loss_fn, batch, num_microbatches, prunable)
    k = int(num_microbatches)
    if k > 1 and axis_name is None and not _is_traced(params, batch):
        g, hg = _host_loop(params, batch, loss_fn, flags, k, with_hvp=True)
        return _combine(params, g, flags=flags, fn=_second), _combine(params, hg, flags=flags, fn=_second)
    return _gradient_and_hvp(params, batch, loss_fn=loss_fn, flags=flags, num_microbatches=k,
                             axis_name=axis_name)


def grasp_scores(
    params: PyTree,
    loss_fn: LossFn,
    batch: PyTree,
    *,
    num_microbatches: int = 1,
    prunable: PrunableSpec = None,
    axis_name: str | None = None,
) -> PyTree:
    """GraSP's S(-θ) = -θ ⊙ Hg for every prunable weight (paper, eq. 8).

    Args:
      params: any pytree of arrays (Flax Linen ``params``, an NNX ``nnx.State``
        of ``nnx.Param``, a plain dict).
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss of one
        microbatch. BatchNorm runs in training mode inside it (its batch
        statistics are those of the chunk), and the temperature belongs here
        (see :func:`cross_entropy_with_temperature`). jit caches on the
        identity of ``loss_fn``: pass the same function object to reuse the
        compiled computation.
      batch: a pytree of arrays sharing a leading axis.
      num_microbatches: split that axis into this many equal consecutive
        chunks, each its own forward pass, visited one after another (a host
        loop over one compiled per-chunk program when called eagerly; a loop in
        the trace when called under ``jit``), so memory is that of one chunk.
      prunable: which leaves are θ (default: leaves named ``kernel`` with
        ndim >= 2); a pytree of bools or a callable ``(path, leaf) -> bool``.
      axis_name: data-parallel scoring. Call inside ``jax.pmap`` (or
        ``shard_map``) over this axis, each device holding its own
        ``num_microbatches`` chunks: g and then Hg are summed over every chunk of
        every device (``lax.psum``; on several hosts, of every host), so each
        device returns the scores of all chunks together. A device with fewer
        real chunks than the others pads with chunks whose loss is multiplied
        by 0.

    Returns:
      A pytree like ``params``: S(-θ) at prunable leaves, zeros elsewhere.
      GraSP prunes the weights with the **highest** scores.
    """
    flags = _validated(params, loss_fn, batch, num_microbatches, prunable)
    k = int(num_microbatches)
    if k > 1 and axis_name is None and not _is_traced(params, batch):
        _, hg = _host_loop(params, batch, loss_fn, flags, k, with_hvp=True)
        return _combine(params, hg, flags=flags, fn=_neg_product)
    return _grasp_scores(params, batch, loss_fn=loss_fn, flags=flags, num_microbatches=k,
                         axis_name=axis_name)


# --------------------------------------------------------------------------
# Baselines.


@functools.partial(jax.jit, static_argnames=_STATIC)
def _snip_scores(params, batch, *, loss_fn, flags, num_microbatches, axis_name):
    theta, grad_fn = _theta_grad_fn(params, loss_fn, flags)
    chunks = split_microbatches(batch, num_microbatches)
    g = _all_reduce(_sum_over(lambda c: grad_fn(theta, c), chunks, theta), axis_name)
    return _scatter([jnp.abs(t * gi) for t, gi in zip(theta, g)], params, flags)


def snip_scores(
    params: PyTree,
    loss_fn: LossFn,
    batch: PyTree,
    *,
    num_microbatches: int = 1,
    prunable: PrunableSpec = None,
    axis_name: str | None = None,
) -> PyTree:
    """SNIP (Lee, Ajanthan & Torr, ICLR 2019): |θ ⊙ g|, g = Σ_c ∇_θ L(θ; b_c).

    The connection sensitivity |∂L/∂c| of a multiplicative mask c = 1 equals
    |θ ∂L/∂θ|. SNIP prunes the **lowest** scores. ``axis_name``: data-parallel,
    as in :func:`grasp_scores` (g summed across devices).
    """
    flags = _validated(params, loss_fn, batch, num_microbatches, prunable)
    k = int(num_microbatches)
    if k > 1 and axis_name is None and not _is_traced(params, batch):
        g, _ = _host_loop(params, batch, loss_fn, flags, k, with_hvp=False)
        return _combine(params, g, flags=flags, fn=_abs_product)
    return _snip_scores(params, batch, loss_fn=loss_fn, flags=flags, num_microbatches=k,
                        axis_name=axis_name)


@functools.partial(jax.jit, static_argnames=("apply_fn", "input_shape", "flags", "rescale"))
def _synflow(params, *, apply_fn, input_shape, flags, rescale):
    theta, rest, treedef = _split(params, flags)
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
        return jnp.sum(apply_fn(_merge(theta, rest, flags, treedef), ones))

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
    scores = _synflow(
        params, apply_fn=apply_fn, input_shape=tuple(int(d) for d in input_shape), flags=flags,
        rescale=bool(rescale),
    )
    return _scatter(scores, params, flags)


def magnitude_scores(params: PyTree, *, prunable: PrunableSpec = None) -> PyTree:
    """|θ|; magnitude pruning removes the **lowest**."""
    flags = prunable_flags(params, prunable)
    theta, _, _ = _split(params, flags)
    return _scatter([jnp.abs(t) for t in theta], params, flags)


def random_scores(params: PyTree, key: jax.Array, *, prunable: PrunableSpec = None) -> PyTree:
    """Uniform random scores, independent per weight; a baseline for any direction."""
    flags = prunable_flags(params, prunable)
    theta, _, _ = _split(params, flags)
    keys = jax.random.split(key, len(theta))
    return _scatter(
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
