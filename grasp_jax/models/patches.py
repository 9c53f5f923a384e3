"""The patches formulation of a convolution: one matmul of input patches by the kernel.

For a channels-last input ``x`` of shape
``(N, H, W, C)``, kernel ``k`` of shape ``(KH, KW, C, O)``, zero padding
``(lo, hi)`` per spatial dim, stride ``s`` and kernel dilation ``r``::

    out[n,h,w,o] = Σ_{i,j,c} x_pad[n, s_h h + r_h i, s_w w + r_w j, c] k[i,j,c,o]
                 = Σ_{t,c} P[n,h,w,t,c] K[t,c,o]
    P[n,h,w,t,c] = x_pad[n, s_h h + r_h i_t, s_w w + r_w j_t, c]   (t = tap (i_t, j_t))
    K[t,c,o]     = k[i_t, j_t, c, o]

i.e. one matmul ``(N·Ho·Wo, T·C) @ (T·C, O)``.  Each column block ``P[..., t, :]``
is a (strided) slice of the unpadded input, zero-padded to the output's
shape where the tap reads padding; taps that read nothing but padding (at a
1x1 map only the centre tap of a 3x3 kernel survives) are dropped at trace
time.  Input dilation is materialised with ``lax.pad``'s interior padding,
feature groups become a batch dimension of the matmul, and any layout in
``dimension_numbers`` is transposed to channels-last and back.

Everything is plain ``lax`` slicing, padding and ``dot_general``, so
``jax.grad``, forward-over-reverse Hessian-vector products
(``jax.jvp(jax.grad(f), ...)``, as ``grasp_scores`` uses), ``vmap`` and
higher derivatives all come from JAX's own rules, with no ``custom_vjp`` (whose
backward pass cannot be differentiated forward-mode).  Those rules keep it
fast: the backward pass is again one matmul per operand, ``dK = Pᵀ @ dout``
and ``dP = dout @ Kᵀ``, with ``dP`` scattered back to ``dx`` as a sum of
shifted slices.  (A sum of one matmul per tap reads fewer zeros and runs the
forward pass ~2x faster at 2x2, but XLA:CPU then re-computes the per-tap sums
inside every per-tap consumer of the backward pass: measured 1.3-2x slower
``value_and_grad`` over a stack of such layers and up to 5x slower HVPs.)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

__all__ = ["Plan", "conv_patches", "native_value_fast_derivatives", "plan_or_none", "shape_dtype"]


def _dilate(size: int, dilation: int) -> int:
    """Size of an axis of ``size`` elements with ``dilation - 1`` zeros between."""
    return 0 if size == 0 else (size - 1) * dilation + 1


class Plan:
    """Static description of a convolution the patches formulation computes.

    Attributes:
      lhs_perm: transposes the input to channels-last ``(N, *spatial, C)``.
      rhs_perm: transposes the kernel to ``(*spatial, I, O)``.
      out_perm: transposes ``(N, *spatial, O)`` to the requested output layout.
      kernel: kernel spatial sizes.
      strides, lhs_dilation, rhs_dilation: per spatial dim.
      in_spatial: input spatial sizes after lhs dilation.
      window: kernel window sizes after rhs dilation.
      pads: explicit ``(lo, hi)`` padding per spatial dim.
      out_spatial: output spatial sizes.
      in_channels, in_features, out_features: input channels, kernel input
        channels (per group) and kernel output channels.
    """

    def __init__(
        self,
        lhs_shape: Sequence[int],
        rhs_shape: Sequence[int],
        window_strides: Sequence[int],
        padding: Any,
        lhs_dilation: Sequence[int],
        rhs_dilation: Sequence[int],
        dimension_numbers: Any,
    ):
        lhs_spec, rhs_spec, out_spec = lax.conv_dimension_numbers(
            tuple(lhs_shape), tuple(rhs_shape), dimension_numbers
        )
        self.lhs_perm = (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])
        self.rhs_perm = (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])
        # Our result has axes (batch, *spatial, feature); output axis q of the
        # requested layout is our axis a with out_target[a] == q.
        out_target = (out_spec[0], *out_spec[2:], out_spec[1])
        self.out_perm = tuple(int(a) for a in np.argsort(out_target))
        self.in_channels = lhs_shape[lhs_spec[1]]
        self.in_features = rhs_shape[rhs_spec[1]]
        self.out_features = rhs_shape[rhs_spec[0]]
        self.kernel = tuple(rhs_shape[d] for d in rhs_spec[2:])
        self.strides = tuple(window_strides)
        self.lhs_dilation = tuple(lhs_dilation)
        self.rhs_dilation = tuple(rhs_dilation)
        self.in_spatial = tuple(
            _dilate(lhs_shape[d], l) for d, l in zip(lhs_spec[2:], lhs_dilation)
        )
        self.window = tuple(_dilate(k, r) for k, r in zip(self.kernel, rhs_dilation))
        if isinstance(padding, str):
            padding = lax.padtype_to_pads(self.in_spatial, self.window, self.strides, padding)
        self.pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        self.out_spatial = tuple(
            max(0, (n + lo + hi - k) // s + 1)
            for n, (lo, hi), k, s in zip(self.in_spatial, self.pads, self.window, self.strides)
        )

    def tap_range(self, dim: int, tap: int) -> tuple[int, int, int] | None:
        """Where kernel tap ``tap`` along ``dim`` meets real input.

        Output index ``h`` reads padded index ``s h + r tap``, i.e. input index
        ``m = s h + r tap - lo``.  Returns ``(h0, h1, m0)``: outputs
        ``h0 <= h < h1`` read inputs ``m0, m0 + s, ...``; None if the tap reads
        only padding.
        """
        s, r = self.strides[dim], self.rhs_dilation[dim]
        lo = self.pads[dim][0]
        n, n_out = self.in_spatial[dim], self.out_spatial[dim]
        offset = r * tap - lo  # m = s h + offset
        h0 = max(0, _ceil_div(-offset, s))  # first h with m >= 0
        h1 = min(n_out, _ceil_div(n - offset, s))  # first h with m >= n
        if h0 >= h1:
            return None
        return h0, h1, s * h0 + offset


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return tuple(x.shape), np.dtype(x.dtype)
    x = np.asarray(x)
    return x.shape, x.dtype


def plan_or_none(
    lhs: Any,
    rhs: Any,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None,
    rhs_dilation: Sequence[int] | None,
    dimension_numbers: Any,
    feature_group_count: int,
    batch_group_count: int,
) -> Plan | None:
    """A plan if the patches formulation computes this call exactly, else None.

    Anything unusual (batch groups, integer or mismatched dtypes, inconsistent
    shapes, string padding with lhs dilation, empty arrays) goes to
    ``lax.conv_general_dilated``, which also raises lax's own errors for
    invalid calls.
    """
    lhs_shape, lhs_dtype = shape_dtype(lhs)
    rhs_shape, rhs_dtype = shape_dtype(rhs)
    nsp = len(lhs_shape) - 2
    if nsp < 1 or len(rhs_shape) != len(lhs_shape):
        return None
    if batch_group_count != 1 or feature_group_count < 1:
        return None
    if lhs_dtype != rhs_dtype or not jnp.issubdtype(lhs_dtype, jnp.inexact):
        return None
    lhs_dilation = (1,) * nsp if lhs_dilation is None else tuple(lhs_dilation)
    rhs_dilation = (1,) * nsp if rhs_dilation is None else tuple(rhs_dilation)
    if not len(window_strides) == len(lhs_dilation) == len(rhs_dilation) == nsp:
        return None
    if min((*window_strides, *lhs_dilation, *rhs_dilation)) < 1:
        return None
    if isinstance(padding, str) and any(d != 1 for d in lhs_dilation):
        return None  # lax raises for this
    if not isinstance(padding, str) and len(padding) != nsp:
        return None
    try:
        plan = Plan(
            lhs_shape,
            rhs_shape,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
        )
    except (TypeError, ValueError):
        return None
    g = feature_group_count
    if plan.in_channels != plan.in_features * g or plan.out_features % g:
        return None
    if 0 in lhs_shape or 0 in rhs_shape or 0 in plan.out_spatial:
        return None
    return plan


def conv_patches(
    lhs: jax.Array,
    rhs: jax.Array,
    plan: Plan,
    feature_group_count: int,
    precision: Any,
    preferred_element_type: Any,
) -> jax.Array:
    """The patches formulation; see the module docstring for the math."""
    nsp = len(plan.in_spatial)
    x = (
        lhs if plan.lhs_perm == tuple(range(lhs.ndim)) else jnp.transpose(lhs, plan.lhs_perm)
    )  # (N, *S, C)
    k = (
        rhs if plan.rhs_perm == tuple(range(rhs.ndim)) else jnp.transpose(rhs, plan.rhs_perm)
    )  # (*K, Cg, O)
    if any(d != 1 for d in plan.lhs_dilation):
        # Input dilation inserts zeros between input elements; materialising
        # them keeps the tap arithmetic unchanged (transposed convs are rare).
        x = lax.pad(
            x,
            jnp.zeros((), x.dtype),
            [(0, 0, 0)] + [(0, 0, d - 1) for d in plan.lhs_dilation] + [(0, 0, 0)],
        )
    g = feature_group_count
    out_dtype = jnp.dtype(preferred_element_type) if preferred_element_type is not None else x.dtype
    # Sub-float32 inputs: accumulate in float32 and round once at the end, as
    # the native convolution does.
    acc_dtype = out_dtype
    if jnp.issubdtype(out_dtype, jnp.floating) and jnp.finfo(out_dtype).bits < 32:
        acc_dtype = jnp.dtype(jnp.float32)
    # Feature groups become a batch dimension of the matmul (size 1 without
    # groups, which XLA folds away).
    x = x.reshape(*x.shape[:-1], g, x.shape[-1] // g)  # (N, *S, G, Cg)
    k = k.reshape(*k.shape[:-1], g, k.shape[-1] // g)  # (*K, Cg, G, Og)

    # Live taps: those reading at least one real input element.  Each tap is
    # a tuple over spatial dims of (kernel index, (h0, h1, m0)).
    per_dim = [
        [(t, r) for t in range(plan.kernel[d]) if (r := plan.tap_range(d, t)) is not None]
        for d in range(nsp)
    ]
    taps = list(itertools.product(*per_dim))
    if not taps:
        # Every output reads only padding, so it is identically zero (and so are
        # its derivatives, which JAX gets from the unused operands).
        out = jnp.zeros((x.shape[0], *plan.out_spatial, g * k.shape[-1]), out_dtype)
    else:
        zero = jnp.zeros((), x.dtype)
        columns = []
        for tap in taps:
            # P[:, h, ...] = x[:, s h + r i - lo, ...] on the outputs [h0, h1) that
            # see real input, zero elsewhere: a strided slice padded to Ho.
            start, limit, stride = [0] * x.ndim, list(x.shape), [1] * x.ndim
            out_pad = [(0, 0, 0)] * x.ndim
            for d, (_, (h0, h1, m0)) in enumerate(tap):
                s = plan.strides[d]
                start[1 + d], stride[1 + d] = m0, s
                limit[1 + d] = m0 + s * (h1 - h0 - 1) + 1
                out_pad[1 + d] = (h0, plan.out_spatial[d] - h1, 0)
            col = lax.slice(x, start, limit, stride)
            if any(p != (0, 0, 0) for p in out_pad):
                col = lax.pad(col, zero, out_pad)
            columns.append(col)
        patches = jnp.stack(columns, axis=-2)  # (N, *S', G, T, Cg)
        kernel = jnp.stack([k[tuple(t for t, _ in tap)] for tap in taps])
        kernel = jnp.moveaxis(kernel, 2, 0)  # (G, T, Cg, Og)
        # Contract (T, Cg), batch over G: (G, N, *S', Og).
        dims = (((nsp + 2, nsp + 3), (1, 2)), ((nsp + 1,), (0,)))
        out = lax.dot_general(
            patches, kernel, dims, precision=precision, preferred_element_type=acc_dtype
        )
        out = jnp.moveaxis(out, 0, -2)  # (N, *S', G, Og)
        out = out.reshape(*out.shape[:-2], g * k.shape[-1]).astype(out_dtype)
    if plan.out_perm != tuple(range(out.ndim)):
        out = jnp.transpose(out, plan.out_perm)
    return out


def native_value_fast_derivatives(native, patches, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """``native(lhs, rhs)`` whose derivatives are those of ``patches`` (the same function).

    The JVP is ``(native(x, k), patches(dx, k) + patches(x, dk))``: the tangent is
    linear in (dx, dk), so reverse mode transposes it to the patches' matmuls,
    and a second derivative differentiates plain ``lax`` ops. Symbolic-zero
    tangents (the data input, frozen weights) are skipped, not multiplied.
    """

    @jax.custom_jvp
    def conv(x, k):
        return native(x, k)

    def conv_jvp(primals, tangents):
        x, k = primals
        dx, dk = tangents
        out = conv(x, k)
        parts = []
        if not isinstance(dx, SymbolicZero):
            parts.append(patches(dx, k))
        if not isinstance(dk, SymbolicZero):
            parts.append(patches(x, dk))
        if not parts:
            return out, jnp.zeros_like(out)
        return out, parts[0] if len(parts) == 1 else parts[0] + parts[1]

    conv.defjvp(conv_jvp, symbolic_zeros=True)
    return conv(lhs, rhs)
