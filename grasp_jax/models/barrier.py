"""An identity that XLA cannot fuse through: it stops XLA:CPU recomputing residual chains.

Why.  In a ResNet stage every block's output is an elementwise function of the previous one,

    x_{k+1} = relu(a_k * conv_k(x_k) + b_k + x_k)        (BatchNorm folded into a_k, b_k),

so x_k is an elementwise function of the conv outputs of all earlier blocks of the stage. XLA
duplicates cheap elementwise producers into each consumer that can fuse them, and the kernel
gradient of every convolution reads its input x_k through a layout copy (NHWC -> CHWN) that
can. Each copy then recomputes the whole chain instead of reading x_k: measured in ResNet-32's
training gradient at batch 128 (``python -m benchmarks.conv_profile``), those copies took ~55%
of the step, 3-5x the kernel gradients they feed. ``lax.optimization_barrier`` does not help:
XLA:CPU removes it before fusion.

How.  A ``lax.cond`` is never fused, so its result is a buffer that every consumer reads:

    fusion_barrier(x, p) = cond(p[0] == p[0], x ↦ x, x ↦ x * 1)

Both branches are the identity (``x * 1`` is exact for every float, and keeps XLA from seeing
two equal branches and removing the cond), so values and every derivative are those of the
identity. The predicate is read from an input XLA cannot fold: ``x`` itself by default, the
convolution's kernel in :func:`grasp_jax.models.conv.conv_general_dilated`. The kernel matters
under ``vmap``: a batched predicate turns the cond into a select, which is no barrier, and
GraSP's scoring vmaps the model over its chunks with the kernels unbatched. Measured on
ResNet-32, 100 images in two chunks: the real barrier there cut grasp_scores' compile time
from 3.9 s to 2.8 s and its run from 3.8 s to 2.9 s. The cost is one copy of ``x``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

#: The ``jax.named_scope`` of the barrier's ops (visible in a lowered module's locations).
BARRIER_SCOPE = "fusion_barrier"


def fusion_barrier(x: jax.Array, predicate_from: jax.Array | None = None) -> jax.Array:
    """``x``, as a value XLA must materialize (see the module docstring); floats only.

    ``predicate_from`` (default ``x``) is the array the cond's predicate is read from; give
    one that stays unbatched under the ``vmap`` the caller expects, such as a weight.

    Raises:
      ValueError: naming the dtype, if ``x`` is not a floating-point array.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise ValueError(f"fusion_barrier takes floating-point arrays, got dtype {x.dtype}")
    src = x if predicate_from is None else jnp.asarray(predicate_from)
    # The scope names the cond in a lowered program's metadata, where tests look for it.
    with jax.named_scope(BARRIER_SCOPE):
        first = src[(0,) * src.ndim] if src.size else jnp.zeros((), src.dtype)
        one = jnp.ones((), x.dtype)
        return lax.cond(first == first, lambda v: v, lambda v: v * one, x)
